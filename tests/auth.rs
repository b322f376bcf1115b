//! The OAuth flows against the emulator: JWT bearer (RS256, iss/sub/aud/exp checked), client
//! credentials, password, refresh token and a supplied access token; bad credentials fail
//! with a definite error that names the flow.

use sfmirror::config::Config;
use sfmirror::emulator::{Credentials, Emulator, EmulatorConfig};
use sfmirror::salesforce::auth::Authenticator;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

async fn emulator() -> Emulator {
    let public = std::fs::read_to_string(format!("{FIXTURES}/jwt-test-key.pub.pem"))
        .expect("public key fixture");
    Emulator::start(EmulatorConfig {
        credentials: Credentials {
            jwt_public_key_pem: Some(public),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .expect("emulator")
}

fn config(emulator: &Emulator, salesforce: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        [salesforce]
        login_url = "{rest}"
        pubsub_endpoint = "{grpc}"
        {salesforce}
        [replica]
        url = "postgres://unused@127.0.0.1/x"
        [[channels]]
        name = "/data/AccountChangeEvent"
        objects = ["Account"]
        "#,
        rest = emulator.rest_url,
        grpc = emulator.pubsub_endpoint,
    ))
    .expect("config")
}

async fn login(cfg: &Config) -> Result<String, sfmirror::salesforce::SourceError> {
    let auth = Authenticator::new(cfg.salesforce.clone(), reqwest::Client::new());
    auth.session().await.map(|s| s.org_id.clone())
}

#[tokio::test]
async fn every_flow_logs_in_and_learns_the_org_id() {
    let emulator = emulator().await;
    let c = &emulator.credentials;
    for flow in [
        format!(
            "auth = \"jwt\"\nclient_id = \"{}\"\nusername = \"{}\"\nprivate_key_file = \"{FIXTURES}/jwt-test-key.pem\"",
            c.client_id, c.username
        ),
        format!(
            "auth = \"client_credentials\"\nclient_id = \"{}\"\nclient_secret = \"{}\"",
            c.client_id, c.client_secret
        ),
        format!(
            "auth = \"password\"\nclient_id = \"{}\"\nusername = \"{}\"\npassword = \"{}\"",
            c.client_id, c.username, c.password
        ),
        format!(
            "auth = \"refresh_token\"\nclient_id = \"{}\"\nrefresh_token = \"{}\"",
            c.client_id, c.refresh_token
        ),
        format!(
            "auth = \"access_token\"\naccess_token = \"{}\"\ninstance_url = \"{}\"",
            emulator.access_token, emulator.rest_url
        ),
    ] {
        let org = login(&config(&emulator, &flow)).await;
        assert_eq!(
            org.as_deref().ok(),
            Some(emulator.org.org_id.as_str()),
            "{flow}: {org:?}"
        );
    }
    emulator.stop().await;
}

#[tokio::test]
async fn bad_credentials_are_definite_errors() {
    let emulator = emulator().await;
    let c = &emulator.credentials;
    for (flow, expect) in [
        // A JWT for another user.
        (
            format!(
                "auth = \"jwt\"\nclient_id = \"{}\"\nusername = \"someone@else\"\nprivate_key_file = \"{FIXTURES}/jwt-test-key.pem\"",
                c.client_id
            ),
            "invalid_grant",
        ),
        // A JWT for another connected app.
        (
            format!(
                "auth = \"jwt\"\nclient_id = \"other-app\"\nusername = \"{}\"\nprivate_key_file = \"{FIXTURES}/jwt-test-key.pem\"",
                c.username
            ),
            "invalid_grant",
        ),
        (
            format!(
                "auth = \"client_credentials\"\nclient_id = \"{}\"\nclient_secret = \"wrong\"",
                c.client_id
            ),
            "invalid_client",
        ),
        (
            format!(
                "auth = \"password\"\nclient_id = \"{}\"\nusername = \"{}\"\npassword = \"wrong\"",
                c.client_id, c.username
            ),
            "invalid_grant",
        ),
    ] {
        let err = login(&config(&emulator, &flow)).await.expect_err(&flow);
        assert!(!err.is_transient(), "{flow}: {err}");
        assert!(err.to_string().contains(expect), "{flow}: {err}");
    }
    emulator.stop().await;
}
