//! `sfmirror init` against the emulator: it logs in, lists the org's objects, asks Pub/Sub
//! about each one's channel and writes a config that `sfmirror check` accepts; without a
//! login it still writes the sections it can, and it never overwrites a file unasked.

use crate::common::{self, TestDb};
use tokio::process::Command;

fn sfmirror() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sfmirror"))
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sfm-init-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

#[tokio::test]
async fn init_proposes_the_orgs_channels_and_check_accepts_the_file() {
    let emulator = common::emulator().await;
    let db = TestDb::create().await;
    let d = dir("ok");
    let secret = d.join("client_secret");
    std::fs::write(&secret, &emulator.credentials.client_secret).expect("secret");
    let config = d.join("sfmirror.toml");
    let out = sfmirror()
        .arg("init")
        .arg("--output")
        .arg(&config)
        .args(["--login-url", &emulator.rest_url])
        .args(["--auth", "client_credentials"])
        .args(["--client-id", &emulator.credentials.client_id])
        .arg("--client-secret-file")
        .arg(&secret)
        .args(["--pubsub-endpoint", &emulator.pubsub_endpoint])
        .args(["--replica-url", &db.url])
        .output()
        .await
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("describeGlobal:"), "{stdout}");
    let text = std::fs::read_to_string(&config).expect("written");
    // Every object of the built-in org with change events, and not the platform event.
    for (object, channel) in [
        ("Account", "/data/AccountChangeEvent"),
        ("Contact", "/data/ContactChangeEvent"),
        ("Opportunity", "/data/OpportunityChangeEvent"),
        ("Invoice__c", "/data/Invoice__ChangeEvent"),
    ] {
        assert!(
            text.contains(&format!("name = \"{channel}\"\nobjects = [\"{object}\"]")),
            "{channel} proposed:\n{text}"
        );
    }
    assert!(!text.contains("Order_Shipped__e"), "{text}");
    // The secret stays in its file.
    assert!(
        !text.contains(emulator.credentials.client_secret.as_str()),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config)
        .expect("meta")
        .permissions()
        .mode();
    // It holds no secret, and the systemd units' dynamic user must read it.
    assert_eq!(mode & 0o777, 0o644, "{mode:o}");

    let check = sfmirror()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .expect("check runs");
    let check_out = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{check_out}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check_out.contains("channel /data/Invoice__ChangeEvent: may be subscribed to"),
        "{check_out}"
    );

    // A second run does not overwrite the file unless told to.
    let again = sfmirror()
        .arg("init")
        .arg("--output")
        .arg(&config)
        .args(["--auth", "client_credentials", "--offline"])
        .output()
        .await
        .expect("runs");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&config).expect("kept"), text);
    emulator.stop().await;
}

#[tokio::test]
async fn init_limits_channels_to_the_objects_named_and_writes_without_a_login() {
    let emulator = common::emulator().await;
    let d = dir("partial");
    let secret = d.join("client_secret");
    std::fs::write(&secret, &emulator.credentials.client_secret).expect("secret");
    let run = |config: std::path::PathBuf, secret: std::path::PathBuf, extra: Vec<&str>| {
        let mut cmd = sfmirror();
        cmd.arg("init")
            .arg("--output")
            .arg(config)
            .args(["--login-url", &emulator.rest_url])
            .args(["--auth", "client_credentials"])
            .args(["--client-id", &emulator.credentials.client_id])
            .arg("--client-secret-file")
            .arg(secret)
            .args(["--pubsub-endpoint", &emulator.pubsub_endpoint])
            .args(extra);
        cmd
    };
    let only = d.join("only.toml");
    let out = run(only.clone(), secret.clone(), vec!["--object", "Invoice__c"])
        .output()
        .await
        .expect("runs");
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&only).expect("written");
    assert_eq!(text.matches("[[channels]]").count(), 1, "{text}");
    assert!(text.contains("/data/Invoice__ChangeEvent"), "{text}");

    // Refused credentials: the file is still written, channels left to fill in.
    let wrong = d.join("wrong_secret");
    std::fs::write(&wrong, "not-the-secret").expect("secret");
    let refused = d.join("refused.toml");
    let out = run(refused.clone(), wrong, vec![])
        .output()
        .await
        .expect("runs");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not log in"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&refused).expect("written");
    assert!(!text.contains("\n[[channels]]"), "{text}");
    assert!(text.contains("# [[channels]]"), "{text}");
    assert!(text.contains("# Change this"), "{text}");
    emulator.stop().await;
}
