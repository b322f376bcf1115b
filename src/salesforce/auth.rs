//! OAuth 2.0 against Salesforce and the current session.
//!
//! Owns the access token, the instance URL and the org id (tenant id) that every REST and
//! Pub/Sub call carries. Salesforce does not say when a token expires, so a session is
//! refreshed when a call is refused (`INVALID_SESSION_ID`, Pub/Sub auth error); concurrent
//! refreshes of the same stale token collapse into one token request.

use super::SourceError;
use crate::config::{AuthFlow, SalesforceConfig, Secret};
use serde::Deserialize;
use std::sync::{Arc, RwLock};
use tokio::sync::Mutex;

/// A usable login: what Pub/Sub metadata and REST headers need.
#[derive(Debug, Clone)]
pub struct Session {
    pub access_token: Secret,
    /// Scheme and host, no trailing slash.
    pub instance_url: String,
    /// 18-character org id.
    pub org_id: String,
    pub user_id: String,
    /// When the token was obtained, to renew it before the org's session timeout.
    pub obtained: std::time::Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    instance_url: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

#[derive(Deserialize)]
struct UserInfo {
    organization_id: String,
    #[serde(default)]
    user_id: String,
}

/// Logs in with the configured flow and hands out the current session.
pub struct Authenticator {
    cfg: SalesforceConfig,
    http: reqwest::Client,
    current: RwLock<Option<Arc<Session>>>,
    refresh_token: RwLock<Secret>,
    login: Mutex<()>,
}

impl Authenticator {
    pub fn new(cfg: SalesforceConfig, http: reqwest::Client) -> Authenticator {
        let refresh_token = RwLock::new(cfg.refresh_token.clone());
        Authenticator {
            cfg,
            http,
            current: RwLock::new(None),
            refresh_token,
            login: Mutex::new(()),
        }
    }

    /// The session, logging in first if there is none, and renewing it once it is older
    /// than `salesforce.session_refresh_secs` (Salesforce does not say when a token expires;
    /// renewing ahead of the org's session timeout avoids a refused call mid-stream).
    pub async fn session(&self) -> Result<Arc<Session>, SourceError> {
        if let Some(s) = self.current() {
            let max_age = std::time::Duration::from_secs(self.cfg.session_refresh_secs);
            if s.obtained.elapsed() < max_age || self.cfg.auth == AuthFlow::AccessToken {
                return Ok(s);
            }
            return self.renew(Some(&s)).await;
        }
        self.renew(None).await
    }

    /// The session without waiting, if one exists.
    pub fn current(&self) -> Option<Arc<Session>> {
        self.current.read().ok().and_then(|g| g.clone())
    }

    /// Replaces `stale` with a fresh session. If another task already replaced it, returns
    /// that one instead of logging in again.
    pub async fn renew(&self, stale: Option<&Session>) -> Result<Arc<Session>, SourceError> {
        let _guard = self.login.lock().await;
        if let Some(cur) = self.current() {
            let replaced = match stale {
                Some(s) => s.access_token != cur.access_token,
                None => true,
            };
            if replaced {
                return Ok(cur);
            }
        }
        let session = Arc::new(self.login().await?);
        tracing::info!(
            instance_url = %session.instance_url,
            org_id = %session.org_id,
            flow = ?self.cfg.auth,
            "logged in to Salesforce"
        );
        if let Ok(mut g) = self.current.write() {
            *g = Some(session.clone());
        }
        Ok(session)
    }

    async fn login(&self) -> Result<Session, SourceError> {
        let cfg = &self.cfg;
        let (token, instance_url) = match cfg.auth {
            AuthFlow::AccessToken => {
                if self.current().is_some() {
                    return Err(SourceError::Auth {
                        message: "the configured access_token was refused and cannot be \
                                  refreshed; configure a refreshable flow or a new token"
                            .to_string(),
                        transient: false,
                    });
                }
                let url = cfg.instance_url.clone().unwrap_or_default();
                (cfg.access_token.clone(), url)
            }
            AuthFlow::ClientCredentials => {
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", cfg.client_id.as_str()),
                    ("client_secret", cfg.client_secret.expose()),
                ];
                self.token_request(&form).await?
            }
            AuthFlow::Password => {
                let form = [
                    ("grant_type", "password"),
                    ("client_id", cfg.client_id.as_str()),
                    ("client_secret", cfg.client_secret.expose()),
                    ("username", cfg.username.as_str()),
                    ("password", cfg.password.expose()),
                ];
                self.token_request(&form).await?
            }
            AuthFlow::RefreshToken => {
                let refresh = self
                    .refresh_token
                    .read()
                    .map(|t| t.clone())
                    .unwrap_or_default();
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("client_id", cfg.client_id.as_str()),
                    ("refresh_token", refresh.expose()),
                ];
                if !cfg.client_secret.is_empty() {
                    form.push(("client_secret", cfg.client_secret.expose()));
                }
                self.token_request(&form).await?
            }
            AuthFlow::Jwt => {
                let assertion = self.jwt_assertion()?;
                let form = [
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion.as_str()),
                ];
                self.token_request(&form).await?
            }
        };
        let instance_url = instance_url.trim_end_matches('/').to_string();
        let info = self.userinfo(&instance_url, &token).await?;
        Ok(Session {
            access_token: token,
            instance_url,
            org_id: info.organization_id,
            user_id: info.user_id,
            obtained: std::time::Instant::now(),
        })
    }

    fn jwt_assertion(&self) -> Result<String, SourceError> {
        let cfg = &self.cfg;
        let path = cfg
            .private_key_file
            .as_ref()
            .ok_or_else(|| SourceError::Auth {
                message: "salesforce.private_key_file is required for jwt".to_string(),
                transient: false,
            })?;
        let pem = std::fs::read(path).map_err(|e| SourceError::Auth {
            message: format!("cannot read private key {}: {e}", path.display()),
            transient: false,
        })?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).map_err(|e| SourceError::Auth {
            message: format!("{} is not an RSA private key in PEM: {e}", path.display()),
            transient: false,
        })?;
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            sub: &'a str,
            aud: &'a str,
            exp: i64,
        }
        let claims = Claims {
            iss: &cfg.client_id,
            sub: &cfg.username,
            aud: cfg.login_url.trim_end_matches('/'),
            exp: chrono::Utc::now().timestamp() + 300,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .map_err(|e| SourceError::Auth {
            message: format!("cannot sign the JWT assertion: {e}"),
            transient: false,
        })
    }

    async fn token_request(&self, form: &[(&str, &str)]) -> Result<(Secret, String), SourceError> {
        let url = format!(
            "{}/services/oauth2/token",
            self.cfg.login_url.trim_end_matches('/')
        );
        let resp = self
            .http
            .post(&url)
            .form(form)
            .send()
            .await
            .map_err(|source| SourceError::Http {
                api: "oauth",
                url: url.clone(),
                source,
            })?;
        let status = resp.status().as_u16();
        crate::telemetry::record_salesforce_request("oauth", status);
        let body = resp.text().await.map_err(|source| SourceError::Http {
            api: "oauth",
            url: url.clone(),
            source,
        })?;
        if status != 200 {
            let err: OAuthError = serde_json::from_str(&body).unwrap_or(OAuthError {
                error: format!("HTTP {status}"),
                error_description: body.chars().take(200).collect(),
            });
            return Err(SourceError::Auth {
                message: format!(
                    "token request to {url} refused: {} ({}); check the connected app and \
                     the credentials of flow {:?}",
                    err.error, err.error_description, self.cfg.auth
                ),
                transient: status >= 500 || status == 429,
            });
        }
        let token: TokenResponse =
            serde_json::from_str(&body).map_err(|e| SourceError::BadResponse {
                api: "oauth",
                url: url.clone(),
                message: e.to_string(),
            })?;
        if let Some(rt) = token.refresh_token
            && let Ok(mut g) = self.refresh_token.write()
        {
            *g = Secret::new(rt);
        }
        let instance_url = token
            .instance_url
            .or_else(|| self.cfg.instance_url.clone())
            .ok_or_else(|| SourceError::BadResponse {
                api: "oauth",
                url: url.clone(),
                message: "token response has no instance_url".to_string(),
            })?;
        check_instance_url(&instance_url, &url)?;
        Ok((Secret::new(token.access_token), instance_url))
    }

    async fn userinfo(&self, instance_url: &str, token: &Secret) -> Result<UserInfo, SourceError> {
        let url = format!("{instance_url}/services/oauth2/userinfo");
        let resp = self
            .http
            .get(&url)
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|source| SourceError::Http {
                api: "oauth",
                url: url.clone(),
                source,
            })?;
        let status = resp.status().as_u16();
        crate::telemetry::record_salesforce_request("oauth", status);
        if status != 200 {
            // A token refused right after it was issued was revoked meanwhile (or the org is
            // busy): worth another login after a backoff, not a stop.
            return Err(SourceError::Auth {
                message: format!("userinfo at {url} answered HTTP {status} for a new token"),
                transient: status >= 500 || status == 401,
            });
        }
        resp.json::<UserInfo>()
            .await
            .map_err(|e| SourceError::BadResponse {
                api: "oauth",
                url,
                message: format!("userinfo: {e}"),
            })
    }
}

/// Refuses an `instance_url` from the token endpoint that is not https (http is accepted for a
/// loopback host, an emulator): every later call would carry the access token in plaintext.
/// Definite: the next login returns the same URL.
fn check_instance_url(instance_url: &str, token_url: &str) -> Result<(), SourceError> {
    crate::config::check_salesforce_url(instance_url).map_err(|message| SourceError::Auth {
        message: format!(
            "the token endpoint {token_url} returned instance_url {message}: the access token \
             would travel in plaintext; check salesforce.login_url and the org's My Domain \
             settings"
        ),
        transient: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_url_must_be_https_unless_loopback() {
        let token_url = "https://login.example.com/services/oauth2/token";
        for ok in [
            "https://na1.example.my.salesforce.com",
            "http://127.0.0.1:41234",
            "http://localhost:8080",
            "http://[::1]:8080",
        ] {
            check_instance_url(ok, token_url).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "http://na1.example.my.salesforce.com",
            "http://10.0.0.1",
            "na1",
        ] {
            let err = check_instance_url(bad, token_url).expect_err(bad);
            assert!(!err.is_transient(), "{err}");
            let text = err.to_string();
            assert!(
                text.contains("instance_url") && text.contains(bad),
                "{text}"
            );
        }
    }
}
