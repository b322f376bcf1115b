//! Bulk API 2.0 query jobs: create one, wait until Salesforce has run it, and read its CSV
//! results one chunk at a time.
//!
//! Owns the wire shapes of `/jobs/query` and nothing else: it does not know what the rows
//! mean or where they go. Memory stays bounded whatever the size of the result because a
//! caller only ever holds the chunk it asked for (`maxRecords` rows) and follows the
//! `Sforce-Locator` of that chunk to the next one. Locators stay valid while the job exists,
//! so a caller that remembers the locator of the next chunk can stop and resume later,
//! even from another process.
//!
//! Errors are [`SourceError`]s, classified as elsewhere: HTTP failures and 5xx are transient;
//! a job that Salesforce reports `Failed` or `Aborted` is definite (the same query would fail
//! again) and names the job and Salesforce's `errorMessage`.

use super::SourceError;
use super::rest::RestClient;
use crate::backoff::Backoff;
use bytes::Bytes;
use serde::Deserialize;
use std::time::Duration;

/// Which records a job reads: `queryAll` includes those in the recycle bin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Query,
    QueryAll,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Query => "query",
            Operation::QueryAll => "queryAll",
        }
    }
}

/// A job's state as Salesforce names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    UploadComplete,
    InProgress,
    JobComplete,
    Failed,
    Aborted,
    /// A state this client does not know; treated as still running.
    Other(String),
}

impl JobState {
    fn parse(s: &str) -> JobState {
        match s {
            "UploadComplete" => JobState::UploadComplete,
            "InProgress" => JobState::InProgress,
            "JobComplete" => JobState::JobComplete,
            "Failed" => JobState::Failed,
            "Aborted" => JobState::Aborted,
            other => JobState::Other(other.to_string()),
        }
    }
}

/// What `POST /jobs/query` and `GET /jobs/query/{id}` answer (the fields sfmirror uses).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobInfo {
    pub id: String,
    #[serde(default)]
    pub operation: String,
    #[serde(default)]
    pub object: String,
    pub state: String,
    #[serde(default)]
    pub number_records_processed: Option<u64>,
    #[serde(default)]
    pub error_message: Option<String>,
}

impl JobInfo {
    pub fn job_state(&self) -> JobState {
        JobState::parse(&self.state)
    }
}

/// One chunk of a job's results: CSV text with its header row.
#[derive(Debug, Clone)]
pub struct ResultChunk {
    pub csv: Bytes,
    /// `Sforce-NumberOfRecords`: rows in this chunk.
    pub records: Option<u64>,
    /// `Sforce-Locator` of the next chunk; `None` when this was the last one.
    pub next_locator: Option<String>,
}

impl ResultChunk {
    /// A CSV reader over the chunk (header row first), in the job's format: comma separated,
    /// every field quoted, an empty field for null.
    pub fn reader(&self) -> csv::Reader<&[u8]> {
        csv::ReaderBuilder::new()
            .has_headers(true)
            .delimiter(b',')
            .from_reader(&self.csv[..])
    }
}

/// A Bulk API 2.0 query client over the REST session.
#[derive(Clone)]
pub struct BulkClient {
    rest: RestClient,
    /// The schedule of job polls.
    poll: Backoff,
}

/// Whether `e` says the job no longer exists (deleted, expired, or created with another API
/// version): a caller resuming it must start a new one.
pub fn is_job_gone(e: &SourceError) -> bool {
    matches!(e, SourceError::Status { status, code, .. }
        if *status == 404 || (*status == 409 && code == "INVALIDJOB")
            || code == "INVALID_QUERY_LOCATOR")
}

impl BulkClient {
    /// Polls first after 250 ms, doubling up to 10 s.
    pub fn new(rest: RestClient) -> BulkClient {
        BulkClient {
            rest,
            poll: Backoff::new(Duration::from_millis(250), Duration::from_secs(10))
                .without_jitter(),
        }
    }

    /// Changes the polling backoff (first delay, longest delay).
    pub fn with_polling(mut self, min: Duration, max: Duration) -> BulkClient {
        self.poll = Backoff::new(min, max).without_jitter();
        self
    }

    fn jobs_path(&self) -> String {
        format!("{}/jobs/query", self.rest.data_path())
    }

    fn job_path(&self, job_id: &str) -> Result<String, SourceError> {
        // Ids end up in a URL path; anything but an id is refused rather than sent.
        if job_id.is_empty() || !job_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(SourceError::BadResponse {
                api: "bulk",
                url: self.jobs_path(),
                message: format!("`{job_id}` is not a job id"),
            });
        }
        Ok(format!("{}/{job_id}", self.jobs_path()))
    }

    /// Creates a query job (CSV, comma, LF). Salesforce runs it in the background.
    pub async fn create(&self, soql: &str, operation: Operation) -> Result<JobInfo, SourceError> {
        let body = serde_json::json!({
            "operation": operation.as_str(),
            "query": soql,
            "contentType": "CSV",
            "columnDelimiter": "COMMA",
            "lineEnding": "LF",
        });
        self.rest
            .send_json(
                "bulk",
                reqwest::Method::POST,
                &self.jobs_path(),
                Some(&body),
            )
            .await
    }

    /// The job's current info.
    pub async fn info(&self, job_id: &str) -> Result<JobInfo, SourceError> {
        let path = self.job_path(job_id)?;
        self.rest.get_json("bulk", &path).await
    }

    /// Polls with backoff until the job is `JobComplete`; `Failed` and `Aborted` are definite
    /// errors naming the job and Salesforce's message.
    pub async fn wait(&self, job_id: &str) -> Result<JobInfo, SourceError> {
        let mut poll = self.poll.clone();
        loop {
            let info = self.info(job_id).await?;
            match info.job_state() {
                JobState::JobComplete => return Ok(info),
                JobState::Failed | JobState::Aborted => {
                    return Err(SourceError::Status {
                        api: "bulk",
                        url: self.job_path(job_id)?,
                        status: 200,
                        code: info.state.clone(),
                        message: format!(
                            "query job {job_id} on {} ended {} without results: {}",
                            info.object,
                            info.state,
                            info.error_message
                                .as_deref()
                                .filter(|m| !m.is_empty())
                                .unwrap_or("(Salesforce gave no errorMessage)")
                        ),
                    });
                }
                JobState::Other(state) => {
                    tracing::debug!(job = job_id, state, "unknown Bulk job state; still waiting");
                }
                JobState::UploadComplete | JobState::InProgress => {}
            }
            tokio::time::sleep(poll.next_delay()).await;
        }
    }

    /// One chunk of at most `max_records` rows, starting at `locator` (`None`: the first).
    pub async fn results(
        &self,
        job_id: &str,
        locator: Option<&str>,
        max_records: u32,
    ) -> Result<ResultChunk, SourceError> {
        let path = format!("{}/results", self.job_path(job_id)?);
        let max_records = max_records.max(1).to_string();
        let mut query = vec![("maxRecords", max_records.as_str())];
        if let Some(l) = locator.filter(|l| !l.is_empty()) {
            query.push(("locator", l));
        }
        let reply = self
            .rest
            .send(
                "bulk",
                reqwest::Method::GET,
                &path,
                &query,
                None,
                &[("Accept", "text/csv")],
            )
            .await?;
        let headers = reply.headers;
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let next_locator = header("sforce-locator")
            .filter(|l| !l.is_empty() && *l != "null")
            .map(str::to_string);
        let records = header("sforce-numberofrecords").and_then(|n| n.parse().ok());
        Ok(ResultChunk {
            csv: reply.body,
            records,
            next_locator,
        })
    }

    /// Deletes a finished job and its results (best effort housekeeping).
    pub async fn delete(&self, job_id: &str) -> Result<(), SourceError> {
        let path = self.job_path(job_id)?;
        self.rest
            .send("bulk", reqwest::Method::DELETE, &path, &[], None, &[])
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_gone_jobs() {
        assert_eq!(JobState::parse("JobComplete"), JobState::JobComplete);
        assert_eq!(
            JobState::parse("Queued"),
            JobState::Other("Queued".to_string())
        );
        let status = |status: u16, code: &str| SourceError::Status {
            api: "bulk",
            url: "u".into(),
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(is_job_gone(&status(404, "NOT_FOUND")));
        assert!(is_job_gone(&status(409, "INVALIDJOB")));
        assert!(is_job_gone(&status(400, "INVALID_QUERY_LOCATOR")));
        assert!(!is_job_gone(&status(500, "UNKNOWN_EXCEPTION")));
    }

    #[test]
    fn csv_chunks_read_quoted_fields_and_embedded_newlines() {
        let chunk = ResultChunk {
            csv: Bytes::from_static(
                b"\"Id\",\"Name\"\n\"001A\",\"a, \"\"b\"\"\nc\"\n\"001B\",\"\"\n",
            ),
            records: Some(2),
            next_locator: None,
        };
        let mut reader = chunk.reader();
        let header: Vec<String> = reader
            .headers()
            .expect("header")
            .iter()
            .map(str::to_string)
            .collect();
        assert_eq!(header, ["Id", "Name"]);
        let rows: Vec<Vec<String>> = reader
            .records()
            .map(|r| r.expect("row").iter().map(str::to_string).collect())
            .collect();
        assert_eq!(rows, [["001A", "a, \"b\"\nc"], ["001B", ""]]);
    }
}
