//! The Pub/Sub API client: connection, auth metadata, `GetSchema`, and `Subscribe` with flow
//! control.
//!
//! A [`Subscription`] is one `Subscribe` call. It asks for at most [`MAX_OUTSTANDING`] events
//! and tops the allowance up as events arrive, so the pipe stays full while the server never
//! sees more than 100 outstanding. The count is kept here, from what was asked and what came
//! ([`Allowance`]), not taken from the server's `pending_num_requested`: that figure lags the
//! requests still on their way to the server, and topping up from it can ask for more than
//! 100. It does not decode or apply anything; the caller reads responses at its own pace,
//! which is what bounds memory.

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

/// Requested-but-undelivered events of one stream, counted on the client: every request adds
/// to it, every delivered event takes one away. Requests are additive and the server sends
/// no more than was asked, so this is exactly what the server holds plus what is still on
/// its way to it, and topping it up to [`MAX_OUTSTANDING`] can never ask for more.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Allowance {
    outstanding: i32,
}

impl Allowance {
    /// The allowance the first request asks for: all of it.
    pub fn first() -> Allowance {
        Allowance {
            outstanding: MAX_OUTSTANDING,
        }
    }

    /// A response brought `delivered` events (0 for a keepalive). Returns how many more to
    /// ask for, if the allowance fell to the refill mark; the caller asks, then calls
    /// [`Self::requested`] if the request went out.
    pub fn delivered(&mut self, delivered: usize) -> Option<i32> {
        let delivered = i32::try_from(delivered).unwrap_or(i32::MAX);
        self.outstanding = self.outstanding.saturating_sub(delivered).max(0);
        (self.outstanding <= REFILL_AT).then_some(MAX_OUTSTANDING - self.outstanding)
    }

    /// A request for `n` more went out.
    pub fn requested(&mut self, n: i32) {
        self.outstanding += n;
    }

    pub fn outstanding(&self) -> i32 {
        self.outstanding
    }
}

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
        let allowance = Allowance::first();
        let first = FetchRequest {
            topic_name: topic.to_string(),
            replay_preset: preset as i32,
            replay_id,
            num_requested: allowance.outstanding(),
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
            allowance,
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
    allowance: Allowance,
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
        if let Some(more) = self.allowance.delivered(msg.events.len()) {
            let req = FetchRequest {
                topic_name: self.topic.clone(),
                num_requested: more,
                ..Default::default()
            };
            // A closed request side means the call is ending; the next read reports why.
            if self.requests.send(req).await.is_ok() {
                self.allowance.requested(more);
            }
        }
        Ok(Some(msg))
    }

    pub fn topic(&self) -> &str {
        &self.topic
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone)]
    enum Step {
        /// The server sends a response of up to this many events (0: a keepalive).
        Send(usize),
        /// The server reads the oldest request still on its way.
        Read,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0usize..120).prop_map(Step::Send),
            1 => Just(Step::Read),
        ]
    }

    proptest! {
        /// Whatever the server's timing (responses sent before it has read the top-ups asked
        /// for earlier), the server never holds more than 100 requested events, and the client
        /// never leaves it with nothing to send: its count is exactly what the server holds
        /// plus what is on its way.
        #[test]
        fn never_more_than_100_outstanding_and_never_starved(
            steps in proptest::collection::vec(step(), 1..300)
        ) {
            let mut client = Allowance::first();
            let mut server_holds = 0i32;
            let mut on_the_way: VecDeque<i32> = VecDeque::from([client.outstanding()]);
            for s in steps {
                match s {
                    Step::Read => {
                        if let Some(n) = on_the_way.pop_front() {
                            server_holds += n;
                        }
                    }
                    Step::Send(up_to) => {
                        let n = up_to.min(server_holds as usize);
                        server_holds -= n as i32;
                        if let Some(more) = client.delivered(n) {
                            on_the_way.push_back(more);
                            client.requested(more);
                        }
                    }
                }
                let asked: i32 = server_holds + on_the_way.iter().sum::<i32>();
                prop_assert!(asked <= MAX_OUTSTANDING, "{} requested and undelivered", asked);
                prop_assert_eq!(client.outstanding(), asked);
                prop_assert!(asked > REFILL_AT, "the pipe is kept full: {}", asked);
            }
        }
    }

    #[test]
    fn the_race_that_reading_the_servers_count_lost() {
        // 60 delivered: top up 60. Before the server reads that, it sends the 40 it still
        // holds, reporting 0 pending. Refilling from its count would ask for 100 more, 160 in
        // all; counting here knows the 60 are on their way and asks for nothing yet.
        let mut a = Allowance::first();
        assert_eq!(a.delivered(60), Some(60));
        a.requested(60);
        assert_eq!(a.delivered(40), None);
        assert_eq!(a.outstanding(), 60);
        assert_eq!(a.delivered(0), None, "a keepalive asks for nothing");
        // The server reads the 60 and sends them all: now the whole allowance again.
        assert_eq!(a.delivered(60), Some(100));
    }
}
