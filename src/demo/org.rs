//! The demo's hands on the org: records through the REST API, as any Salesforce client
//! writes them ([`RestWriter`]), and the emulator's control API for what no client can do
//! (seeding, a workload, gap events, overflow, a new field) ([`Control`]).

use crate::emulator::Emulator;
use anyhow::{Context, bail};
use serde_json::Value as J;

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

/// The emulator's `/emulator/*` control API, over HTTP like any test or benchmark uses it.
pub struct Control {
    http: reqwest::Client,
    base: String,
}

impl Control {
    pub fn new(emulator: &Emulator) -> Control {
        Control {
            http: reqwest::Client::new(),
            base: format!("{}/emulator", emulator.rest_url),
        }
    }

    /// POSTs `body` to `/emulator/<path>` and returns the JSON answer.
    pub async fn post(&self, path: &str, body: J) -> anyhow::Result<J> {
        let resp = self
            .http
            .post(format!("{}/{path}", self.base))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("calling the emulator's {path}"))?;
        let status = resp.status();
        let answer: J = resp
            .json()
            .await
            .with_context(|| format!("reading the emulator's {path} answer"))?;
        if !status.is_success() {
            bail!("the emulator's {path} answered HTTP {status}: {answer}");
        }
        Ok(answer)
    }

    /// `GET /emulator/stats`.
    pub async fn stats(&self) -> anyhow::Result<J> {
        let resp = self
            .http
            .get(format!("{}/stats", self.base))
            .send()
            .await
            .context("calling the emulator's stats")?;
        Ok(resp.json().await?)
    }
}
