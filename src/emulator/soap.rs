//! The SOAP partner API's `login()` call (`POST /services/Soap/u/XX.X`), which jsforce's
//! default `login(username, password)` and other username-password clients use: the
//! credentials in, a session id (an access token the REST API accepts) and the server URL
//! out. Like Salesforce, `login()` exists up to API 64.0; 65.0 retired it, and versions
//! Salesforce retired altogether are refused too. Every refusal is a SOAP fault with HTTP 500,
//! as SOAP API answers them. No other SOAP call is served.

use super::query::{NEWEST_VERSION, OLDEST_VERSION};
use super::rest::RestState;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use std::sync::Arc;

/// The first version without `login()`.
pub const LOGIN_RETIRED_FROM: u32 = 65;

pub fn routes(state: Arc<RestState>) -> Router {
    Router::new()
        .route("/services/Soap/u/{version}", post(login))
        .with_state(state)
}

const XML: &str = "text/xml;charset=UTF-8";

/// A SOAP fault: `sf:<code>` and `<code>: <message>`, as the partner API writes them.
fn fault(code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><soapenv:Envelope \
         xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         xmlns:sf=\"urn:fault.partner.soap.sforce.com\"><soapenv:Body><soapenv:Fault>\
         <faultcode>sf:{code}</faultcode><faultstring>{code}: {}</faultstring>\
         </soapenv:Fault></soapenv:Body></soapenv:Envelope>",
        escape(message)
    );
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, XML)],
        body,
    )
        .into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The text of the first element named `name` in any namespace prefix (`<username>` or
/// `<n1:username>`); enough for the flat `login` request.
fn element(xml: &str, name: &str) -> Option<String> {
    let mut rest = xml;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let end = rest.find('>')?;
        let tag = &rest[..end];
        let local = tag
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .rsplit(':')
            .next()
            .unwrap_or_default();
        if local == name && !tag.starts_with('/') && !tag.ends_with('/') {
            let body = &rest[end + 1..];
            let close = body.find("</")?;
            return Some(unescape(&body[..close]));
        }
    }
    None
}

/// The `XX.X` of the path as a whole version number, if it is one.
fn version_number(version: &str) -> Option<u32> {
    let (major, minor) = version.split_once('.')?;
    (minor == "0").then(|| major.parse().ok()).flatten()
}

async fn login(
    State(st): State<Arc<RestState>>,
    Path(version): Path<String>,
    body: Bytes,
) -> Response {
    let Some(v) = version_number(&version).filter(|v| *v <= NEWEST_VERSION) else {
        return fault(
            "UNSUPPORTED_API_VERSION",
            &format!("Invalid Api version specified on URL: {version}"),
        );
    };
    if v < OLDEST_VERSION {
        return fault(
            "UNSUPPORTED_API_VERSION",
            &format!("API version {version} is retired and no longer available"),
        );
    }
    if v >= LOGIN_RETIRED_FROM {
        return fault(
            "UNSUPPORTED_API_VERSION",
            &format!(
                "login() is not available from API version {LOGIN_RETIRED_FROM}.0; use an \
                 OAuth 2.0 flow"
            ),
        );
    }
    let xml = String::from_utf8_lossy(&body);
    let (Some(username), Some(password)) = (element(&xml, "username"), element(&xml, "password"))
    else {
        return fault(
            "INVALID_LOGIN",
            "Invalid username, password, security token; or user locked out.",
        );
    };
    if username != st.creds.username || password != st.creds.password {
        return fault(
            "INVALID_LOGIN",
            "Invalid username, password, security token; or user locked out.",
        );
    }
    let session = st.org.issue_token(st.token_ttl_ms);
    let org = &st.org.org_id;
    let user = &st.org.user_id;
    let base = &st.rest_url;
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><soapenv:Envelope \
         xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         xmlns=\"urn:partner.soap.sforce.com\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soapenv:Body><loginResponse>\
         <result><metadataServerUrl>{base}/services/Soap/m/{version}/{org}</metadataServerUrl>\
         <passwordExpired>false</passwordExpired><sandbox>false</sandbox>\
         <serverUrl>{base}/services/Soap/u/{version}/{org}</serverUrl>\
         <sessionId>{}</sessionId><userId>{user}</userId><userInfo>\
         <accessibilityMode>false</accessibilityMode><currencySymbol>$</currencySymbol>\
         <orgDefaultCurrencyIsoCode>USD</orgDefaultCurrencyIsoCode>\
         <organizationId>{org}</organizationId><organizationMultiCurrency>false\
         </organizationMultiCurrency><organizationName>sfmirror emulator</organizationName>\
         <userEmail>{}</userEmail><userFullName>Emulator Admin</userFullName>\
         <userId>{user}</userId><userLanguage>en_US</userLanguage><userLocale>en_US</userLocale>\
         <userName>{}</userName><userTimeZone>GMT</userTimeZone><userType>Standard</userType>\
         </userInfo></result></loginResponse></soapenv:Body></soapenv:Envelope>",
        escape(&session),
        escape(&st.creds.username),
        escape(&st.creds.username),
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, XML)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_fields_are_found_under_any_prefix_and_unescaped() {
        let jsforce = "<se:Envelope xmlns:se=\"x\"><se:Header/><se:Body><login \
                       xmlns=\"urn:partner.soap.sforce.com\"><username>a@b.c</username>\
                       <password>p&amp;w&lt;</password></login></se:Body></se:Envelope>";
        assert_eq!(element(jsforce, "username").as_deref(), Some("a@b.c"));
        assert_eq!(element(jsforce, "password").as_deref(), Some("p&w<"));
        let prefixed = "<n1:login xmlns:n1=\"urn\"><n1:username>u</n1:username>\
                        <n1:password>p</n1:password></n1:login>";
        assert_eq!(element(prefixed, "username").as_deref(), Some("u"));
        assert_eq!(element(prefixed, "password").as_deref(), Some("p"));
        assert_eq!(element("<login/>", "username"), None);
        assert_eq!(version_number("62.0"), Some(62));
        assert_eq!(version_number("62.5"), None);
        assert_eq!(version_number("v62.0"), None);
    }
}
