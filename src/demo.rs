//! `sfmirror demo`: the emulator, the daemon and a workload in one process, printing what
//! reached the replica. It writes only to its own schemas (`salesforce_demo`,
//! `sfmirror_demo`), which it recreates on each run.

use crate::config::Config;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::sync::supervisor;
use anyhow::{Context, bail};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const DATA_SCHEMA: &str = "salesforce_demo";
const CONTROL_SCHEMA: &str = "sfmirror_demo";

/// Creates and updates records through the emulator's REST API, as any Salesforce client would.
pub struct RestWriter {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl RestWriter {
    pub fn new(emulator: &Emulator) -> RestWriter {
        RestWriter {
            http: reqwest::Client::new(),
            base: format!("{}/services/data/v62.0/sobjects", emulator.rest_url),
            token: emulator.access_token.clone(),
        }
    }

    pub async fn create(&self, object: &str, fields: serde_json::Value) -> anyhow::Result<String> {
        let resp = self
            .http
            .post(format!("{}/{object}", self.base))
            .bearer_auth(&self.token)
            .json(&fields)
            .send()
            .await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await?;
        if !status.is_success() {
            bail!("create {object} failed: HTTP {status} {body}");
        }
        body["id"]
            .as_str()
            .map(str::to_string)
            .context("create answer has no id")
    }

    pub async fn update(
        &self,
        object: &str,
        id: &str,
        fields: serde_json::Value,
    ) -> anyhow::Result<()> {
        let resp = self
            .http
            .patch(format!("{}/{object}/{id}", self.base))
            .bearer_auth(&self.token)
            .json(&fields)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!(
                "update {object} {id} failed: HTTP {} {}",
                resp.status(),
                resp.text().await?
            );
        }
        Ok(())
    }
}

impl RestWriter {
    pub async fn delete(&self, object: &str, id: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .delete(format!("{}/{object}/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!(
                "delete {object} {id} failed: HTTP {} {}",
                resp.status(),
                resp.text().await?
            );
        }
        Ok(())
    }
}

/// A daemon config that mirrors `channels` (name, objects) of `emulator` into
/// `database_url`, with the default schemas and the metrics listener off. Callers adjust
/// fields (schemas, `sync`, delete mode) on the returned value.
fn config_for(
    emulator: &Emulator,
    database_url: &str,
    channels: &[(&str, &[&str])],
) -> anyhow::Result<Config> {
    let mut text = format!(
        r#"
        [salesforce]
        login_url = "{rest}"
        auth = "client_credentials"
        client_id = "{id}"
        client_secret = "{secret}"
        pubsub_endpoint = "{grpc}"
        [replica]
        url = "{db}"
        [metrics]
        listen = ""
        "#,
        rest = emulator.rest_url,
        id = emulator.credentials.client_id,
        secret = emulator.credentials.client_secret,
        grpc = emulator.pubsub_endpoint,
        db = database_url,
    );
    for (name, objects) in channels {
        let list: Vec<String> = objects.iter().map(|o| format!("\"{o}\"")).collect();
        text.push_str(&format!(
            "[[channels]]\nname = \"{name}\"\nobjects = [{}]\n",
            list.join(", ")
        ));
    }
    Ok(Config::from_toml(&text)?)
}

pub async fn run(database_url: &str, accounts: usize, follow: bool) -> anyhow::Result<()> {
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    println!(
        "emulator: REST {} , Pub/Sub {}",
        emulator.rest_url, emulator.pubsub_endpoint
    );
    let mut cfg = config_for(
        &emulator,
        database_url,
        &[("/data/AccountChangeEvent", &["Account"])],
    )?;
    cfg.replica.schema = DATA_SCHEMA.to_string();
    cfg.replica.control_schema = CONTROL_SCHEMA.to_string();
    let (client, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {database_url} (set DATABASE_URL)"))?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {DATA_SCHEMA} CASCADE; DROP SCHEMA IF EXISTS {CONTROL_SCHEMA} CASCADE;"
        ))
        .await?;

    let shutdown = CancellationToken::new();
    crate::shutdown::on_signal(shutdown.clone());
    let daemon = {
        let cfg = cfg.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { supervisor::run(&cfg, stop, None).await })
    };
    // No checkpoint yet: the daemon starts at LATEST, so write only once it listens.
    let t0 = Instant::now();
    while emulator.subscription_count() == 0 {
        if t0.elapsed() > Duration::from_secs(30) || daemon.is_finished() {
            shutdown.cancel();
            let outcome = daemon.await;
            bail!("the daemon did not subscribe: {outcome:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let writer = RestWriter::new(&emulator);
    let cities = ["Paris", "Lyon", "Berlin", "Austin", "Osaka"];
    let mut ids = Vec::new();
    for i in 0..accounts {
        let id = writer
            .create(
                "Account",
                json!({"Name": format!("Demo Account {i}"), "BillingCity": cities[i % cities.len()],
                       "NumberOfEmployees": 10 * (i + 1), "Industry": "Technology"}),
            )
            .await?;
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        writer
            .update(
                "Account",
                id,
                json!({"Rating": "Hot", "NumberOfEmployees": 1000 + i}),
            )
            .await?;
    }
    println!(
        "created {} accounts and updated {} through the REST API",
        ids.len(),
        ids.len().div_ceil(2)
    );

    let expected_hot = ids.len().div_ceil(2) as i64;
    let t0 = Instant::now();
    loop {
        let counted = client
            .query_opt(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE rating = 'Hot') FROM {DATA_SCHEMA}.account"
                ),
                &[],
            )
            .await;
        if let Ok(Some(row)) = counted {
            let (n, hot): (i64, i64) = (row.get(0), row.get(1));
            if n == ids.len() as i64 && hot == expected_hot {
                break;
            }
        }
        if t0.elapsed() > Duration::from_secs(60) || daemon.is_finished() {
            shutdown.cancel();
            bail!("the replica did not catch up within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "mirrored in {:.2}s; {DATA_SCHEMA}.account now holds:",
        t0.elapsed().as_secs_f64()
    );
    let rows = client
        .query(
            &format!(
                "SELECT id, name, billingcity, numberofemployees, coalesce(rating, ''), _sfm_version
                 FROM {DATA_SCHEMA}.account ORDER BY name LIMIT 10"
            ),
            &[],
        )
        .await?;
    println!(
        "{:<18}  {:<18}  {:<8}  {:>9}  {:<6}  version",
        "id", "name", "city", "employees", "rating"
    );
    for r in rows {
        let (id, name, city, emp, rating, v): (
            String,
            String,
            Option<String>,
            Option<i32>,
            String,
            i64,
        ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        println!(
            "{id:<18}  {name:<18}  {:<8}  {:>9}  {rating:<6}  {v}",
            city.unwrap_or_default(),
            emp.map(|e| e.to_string()).unwrap_or_default()
        );
    }
    let replica = crate::sync::setup::Setup::connect(&cfg).await?;
    let checkpoint = crate::replica::checkpoint::load(
        &replica.pool.get().await?,
        CONTROL_SCHEMA,
        "/data/AccountChangeEvent",
    )
    .await?
    .context("no checkpoint was committed")?;
    println!(
        "checkpoint of /data/AccountChangeEvent: replay id {}",
        checkpoint.replay_id
    );

    if follow {
        println!("following: one update a second until Ctrl-C");
        let mut n = 0usize;
        while !shutdown.is_cancelled() {
            let id = &ids[n % ids.len()];
            writer
                .update("Account", id, json!({"NumberOfEmployees": 2000 + n}))
                .await?;
            n += 1;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    shutdown.cancel();
    daemon.await??;
    emulator.stop().await;
    Ok(())
}
