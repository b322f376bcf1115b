//! The Pub/Sub API client: connection, auth metadata, `GetSchema`, and `Subscribe` with flow
//! control.
//!
//! A [`Subscription`] is one `Subscribe` call. It asks for at most [`MAX_OUTSTANDING`] events
//! and tops the allowance up as events arrive, so the pipe stays full while the server never
//! sees more than 100 outstanding. It does not decode or apply anything; the caller reads
//! responses at its own pace, which is what bounds memory.

use super::SourceError;
use super::auth::{Authenticator, Session};
use crate::config::SalesforceConfig;
use crate::model::ReplayId;
use crate::proto::pub_sub_client::PubSubClient;
use crate::proto::{FetchRequest, FetchResponse, ReplayPreset, SchemaRequest, TopicRequest};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The server's cap on requested-but-undelivered events per stream.
pub const MAX_OUTSTANDING: i32 = 100;
/// Ask for more once the allowance falls to this many.
const REFILL_AT: i32 = 50;

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq)]
pub enum StartAt {
    Latest,
    Earliest,
    /// Strictly after this replay id.
    After(ReplayId),
}

/// A connected Pub/Sub client.
#[derive(Clone)]
pub struct PubSub {
    channel: Channel,
    auth: Arc<Authenticator>,
    endpoint: String,
}

impl PubSub {
    /// Prepares a channel to the configured endpoint: TLS with the system roots (plus
    /// `ca_file`) for `https://`, plaintext only for an explicit `http://` endpoint.
    pub fn connect(
        cfg: &SalesforceConfig,
        auth: Arc<Authenticator>,
    ) -> Result<PubSub, SourceError> {
        let endpoint_url = cfg.pubsub_endpoint.trim_end_matches('/').to_string();
        let err = |message: String| SourceError::Connect {
            endpoint: endpoint_url.clone(),
            message,
        };
        let mut endpoint = Endpoint::from_shared(endpoint_url.clone())
            .map_err(|e| err(format!("not a valid endpoint URL: {e}")))?
            .connect_timeout(Duration::from_secs(20))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            // Events are up to 1 MB each and come 100 at a time: windows large enough that
            // the server never waits for a WINDOW_UPDATE mid-batch.
            .initial_stream_window_size(Some(8 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024));
        if endpoint_url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| err(format!("cannot read ca_file {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| err(format!("TLS setup: {e}")))?;
        }
        Ok(PubSub {
            channel: endpoint.connect_lazy(),
            auth,
            endpoint: endpoint_url,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn client(&self) -> PubSubClient<Channel> {
        PubSubClient::new(self.channel.clone()).max_decoding_message_size(64 * 1024 * 1024)
    }

    fn request<T>(&self, session: &Session, message: T) -> Result<tonic::Request<T>, SourceError> {
        let mut req = tonic::Request::new(message);
        let md = req.metadata_mut();
        for (key, value) in [
            ("accesstoken", session.access_token.expose()),
            ("instanceurl", session.instance_url.as_str()),
            ("tenantid", session.org_id.as_str()),
        ] {
            let v = MetadataValue::try_from(value).map_err(|_| SourceError::Auth {
                message: format!("{key} contains characters not allowed in gRPC metadata"),
                transient: false,
            })?;
            md.insert(key, v);
        }
        Ok(req)
    }

    /// Runs a unary call, renewing the session once on an auth error.
    async fn unary<T, R, F, Fut>(
        &self,
        call: &'static str,
        topic: &str,
        message: T,
        f: F,
    ) -> Result<R, SourceError>
    where
        T: Clone,
        F: Fn(PubSubClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let mut session = self.auth.session().await?;
        let mut renewed = false;
        loop {
            let req = self.request(&session, message.clone())?;
            match f(self.client(), req).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(status) => {
                    let err = grpc_error(call, topic, &status);
                    if err.needs_reauth() && !renewed {
                        renewed = true;
                        session = self.auth.renew(Some(&session)).await?;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }

    /// The Avro schema JSON for `schema_id`.
    pub async fn get_schema(&self, schema_id: &str) -> Result<String, SourceError> {
        let msg = SchemaRequest {
            schema_id: schema_id.to_string(),
        };
        let info = self
            .unary("GetSchema", schema_id, msg, |mut c, r| async move {
                c.get_schema(r).await
            })
            .await?;
        Ok(info.schema_json)
    }

    /// Topic metadata (checks the topic exists and may be subscribed to).
    pub async fn get_topic(&self, topic: &str) -> Result<crate::proto::TopicInfo, SourceError> {
        let msg = TopicRequest {
            topic_name: topic.to_string(),
        };
        self.unary("GetTopic", topic, msg, |mut c, r| async move {
            c.get_topic(r).await
        })
        .await
    }

    /// Opens a `Subscribe` stream on `topic` from `start`, asking for the first allowance.
    pub async fn subscribe(
        &self,
        topic: &str,
        start: StartAt,
    ) -> Result<Subscription, SourceError> {
        let session = self.auth.session().await?;
        self.subscribe_as(session, topic, start).await
    }

    /// [`Self::subscribe`] with a given session, so that the caller knows which session an
    /// auth error refused (and renews exactly that one, not one another channel just got).
    pub async fn subscribe_as(
        &self,
        session: Arc<Session>,
        topic: &str,
        start: StartAt,
    ) -> Result<Subscription, SourceError> {
        let (tx, rx) = mpsc::channel::<FetchRequest>(8);
        let (preset, replay_id) = match &start {
            StartAt::Latest => (ReplayPreset::Latest, Vec::new()),
            StartAt::Earliest => (ReplayPreset::Earliest, Vec::new()),
            StartAt::After(id) => (ReplayPreset::Custom, id.0.clone()),
        };
        let first = FetchRequest {
            topic_name: topic.to_string(),
            replay_preset: preset as i32,
            replay_id,
            num_requested: MAX_OUTSTANDING,
            auth_refresh: String::new(),
        };
        // The first request is queued before the call starts so the server sees it at once.
        tx.send(first).await.map_err(|_| SourceError::Connect {
            endpoint: self.endpoint.clone(),
            message: "request queue closed".to_string(),
        })?;
        let req = self.request(&session, tokio_stream::wrappers::ReceiverStream::new(rx))?;
        let responses = match self.client().subscribe(req).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(grpc_error("Subscribe", topic, &status)),
        };
        Ok(Subscription {
            topic: topic.to_string(),
            requests: tx,
            responses,
            outstanding: MAX_OUTSTANDING,
            session,
        })
    }

    pub fn auth(&self) -> &Arc<Authenticator> {
        &self.auth
    }
}

/// One open `Subscribe` call.
pub struct Subscription {
    topic: String,
    requests: mpsc::Sender<FetchRequest>,
    responses: tonic::Streaming<FetchResponse>,
    outstanding: i32,
    session: Arc<Session>,
}

impl Subscription {
    /// The next response (events or a keepalive); `None` when the server ended the stream.
    /// Tops up the allowance after each response.
    pub async fn next(&mut self) -> Result<Option<FetchResponse>, SourceError> {
        let msg = match self.responses.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(status) => return Err(grpc_error("Subscribe", &self.topic, &status)),
        };
        // The server's count of undelivered requested events is authoritative; a server that
        // leaves it at 0 gets a fresh allowance, which it caps at 100 anyway.
        self.outstanding = msg.pending_num_requested.clamp(0, MAX_OUTSTANDING);
        if self.outstanding <= REFILL_AT {
            let more = MAX_OUTSTANDING - self.outstanding;
            let req = FetchRequest {
                topic_name: self.topic.clone(),
                num_requested: more,
                ..Default::default()
            };
            // A closed request side means the call is ending; the next read reports why.
            if self.requests.send(req).await.is_ok() {
                self.outstanding += more;
            }
        }
        Ok(Some(msg))
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The session this stream authenticated with (to renew exactly it on an auth error).
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

/// Maps a gRPC status to a [`SourceError`], keeping Salesforce's `error-code` trailer.
pub fn grpc_error(call: &'static str, topic: &str, status: &tonic::Status) -> SourceError {
    let error_code = status
        .metadata()
        .get("error-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    SourceError::Grpc {
        call,
        topic: topic.to_string(),
        code: status.code(),
        error_code,
        message: status.message().to_string(),
    }
}
