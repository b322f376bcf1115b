//! The emulator's Pub/Sub API (tonic): `GetTopic`, `GetSchema`, `Subscribe`, and `Publish` /
//! `PublishStream` for platform events (`ManagedSubscribe` answers UNIMPLEMENTED).
//!
//! Every call is authenticated from its metadata (`accesstoken`, `instanceurl`, `tenantid`,
//! keys matched case-insensitively as gRPC lower-cases them). Errors carry Salesforce's
//! `error-code` trailer. `Subscribe` honours the replay preset of the first request only,
//! adds `num_requested` to what is outstanding (capped at 100), and sends keepalives with the
//! latest replay id when there is nothing to deliver. Every delivery counts against the
//! org's delivery allocation; once it is spent, Subscribe is refused and open streams end
//! with `subscription.limit.exceeded`.
//!
//! It serves what the store and the bus hold and must not change records: published platform
//! events go through the store, which checks them.

use super::bus::Position;
use super::store::Org;
use crate::proto::pub_sub_server::PubSub;
use crate::proto::{
    ConsumerEvent, FetchRequest, FetchResponse, ManagedFetchRequest, ManagedFetchResponse,
    ProducerEvent, PublishRequest, PublishResponse, PublishResult, ReplayPreset, SchemaInfo,
    SchemaRequest, TopicInfo, TopicRequest,
};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

const ERROR_PREFIX: &str = "sfdc.platform.eventbus.grpc.";

/// The status of a Subscribe call refused, or a stream ended, because the org's event
/// delivery allocation is spent. The `error-code` trailer and the message are Salesforce's;
/// the documentation does not name the gRPC code, RESOURCE_EXHAUSTED is gRPC's for a quota.
fn delivery_limit_exceeded() -> Status {
    sf_status(
        Code::ResourceExhausted,
        "subscription.limit.exceeded",
        "You have exceeded the event delivery limit for your org.",
    )
}
const MAX_OUTSTANDING: i32 = 100;

/// A subscription as the emulator saw it (for the control API's stats and tests).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriptionRecord {
    pub topic: String,
    pub preset: String,
    pub replay_id: Option<u64>,
    /// Where delivery started: events above this id.
    pub started_after: u64,
}

#[derive(Clone)]
pub struct PubSubService {
    org: Arc<Org>,
    keepalive: Duration,
    /// A stream with nothing requested for this long is closed (Salesforce: about 70 s).
    idle_close: Duration,
    pub subscriptions: Arc<Mutex<Vec<SubscriptionRecord>>>,
    /// Cancelled by the control API to drop every open stream.
    pub drop_streams: Arc<Mutex<CancellationToken>>,
}

/// Builds a Salesforce-style error status: code, message ending in `rpcId`, and trailers.
pub fn sf_status(code: Code, error_code: &str, message: &str) -> Status {
    let rpc_id = uuid::Uuid::new_v4().to_string();
    let mut md = MetadataMap::new();
    if let Ok(v) = MetadataValue::try_from(format!("{ERROR_PREFIX}{error_code}")) {
        md.insert("error-code", v);
    }
    if let Ok(v) = MetadataValue::try_from(rpc_id.as_str()) {
        md.insert("rpc-id", v);
    }
    Status::with_metadata(code, format!("{message} rpcId: {rpc_id}"), md)
}

impl PubSubService {
    pub fn new(org: Arc<Org>, keepalive: Duration, idle_close: Duration) -> PubSubService {
        PubSubService {
            org,
            keepalive,
            idle_close,
            subscriptions: Arc::new(Mutex::new(Vec::new())),
            drop_streams: Arc::new(Mutex::new(CancellationToken::new())),
        }
    }

    fn authenticate(&self, md: &MetadataMap) -> Result<(), Status> {
        if self.org.refusing() {
            return Err(sf_status(
                Code::Unavailable,
                "service.unavailable",
                "The service is temporarily unavailable. Try again later.",
            ));
        }
        let get = |key: &str| {
            md.get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_default()
        };
        let (token, instance, tenant) = (get("accesstoken"), get("instanceurl"), get("tenantid"));
        if token.is_empty() || instance.is_empty() || tenant.is_empty() {
            return Err(sf_status(
                Code::Unauthenticated,
                "service.auth.headers.invalid",
                "The auth headers accesstoken, instanceurl and tenantid are required.",
            ));
        }
        if tenant != self.org.org_id {
            return Err(sf_status(
                Code::Unauthenticated,
                "service.auth.error",
                "The tenantid does not match the org of the access token.",
            ));
        }
        if !self.org.token_valid(&token) {
            return Err(sf_status(
                Code::Unauthenticated,
                "service.auth.error",
                "An authentication exception occurred: the session is invalid or expired.",
            ));
        }
        Ok(())
    }

    fn check_topic(&self, topic: &str) -> Result<(), Status> {
        if self.org.bus.has_channel(topic) {
            Ok(())
        } else {
            Err(sf_status(
                Code::NotFound,
                "topic.not.found",
                &format!(
                    "The topic {topic} does not exist or Change Data Capture is not enabled for it."
                ),
            ))
        }
    }
}

impl PubSubService {
    /// Publishes the events of one request; per-event problems come back as results with an
    /// error, as on Salesforce, while a topic that takes no publishing fails the call.
    fn publish_batch(&self, request: PublishRequest) -> Result<PublishResponse, Status> {
        let topic = request.topic_name;
        let events: Vec<(String, Vec<u8>)> = request
            .events
            .iter()
            .map(|e| (e.schema_id.clone(), e.payload.to_vec()))
            .collect();
        let results = self.org.publish_events(&topic, &events).map_err(|e| {
            sf_status(
                Code::PermissionDenied,
                "publish.topic.cannot.publish",
                &e.message,
            )
        })?;
        let schema_id = self
            .org
            .event_type(&topic)
            .map(|t| t.schema_id.clone())
            .unwrap_or_default();
        Ok(PublishResponse {
            results: request
                .events
                .iter()
                .zip(results)
                .map(|(event, result)| match result {
                    Ok(replay) => PublishResult {
                        replay_id: replay.to_be_bytes().to_vec(),
                        error: None,
                        correlation_key: event.id.clone(),
                    },
                    Err(msg) => PublishResult {
                        replay_id: Vec::new(),
                        error: Some(crate::proto::Error {
                            code: crate::proto::ErrorCode::Publish as i32,
                            msg,
                        }),
                        correlation_key: event.id.clone(),
                    },
                })
                .collect(),
            schema_id,
            rpc_id: uuid::Uuid::new_v4().to_string(),
        })
    }
}

/// The clocks of a subscription.
#[derive(Clone, Copy)]
struct Timing {
    keepalive: Duration,
    idle_close: Duration,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl PubSub for PubSubService {
    type SubscribeStream = ResponseStream<FetchResponse>;
    type PublishStreamStream = ResponseStream<PublishResponse>;
    type ManagedSubscribeStream = ResponseStream<ManagedFetchResponse>;

    async fn get_topic(
        &self,
        request: Request<TopicRequest>,
    ) -> Result<Response<TopicInfo>, Status> {
        self.authenticate(request.metadata())?;
        let topic = request.into_inner().topic_name;
        self.check_topic(&topic)?;
        // A per-object channel reports that object's schema, an event channel its event's;
        // the all-changes and custom channels carry several schemas and report none.
        let event_type = self.org.event_type(&topic);
        let schema_id = match &event_type {
            Some(t) => t.schema_id.clone(),
            None => self.org.channel_schema_id(&topic).unwrap_or_default(),
        };
        Ok(Response::new(TopicInfo {
            topic_name: topic,
            tenant_guid: self.org.org_id.clone(),
            can_publish: event_type.is_some(),
            can_subscribe: true,
            schema_id,
            rpc_id: uuid::Uuid::new_v4().to_string(),
        }))
    }

    async fn get_schema(
        &self,
        request: Request<SchemaRequest>,
    ) -> Result<Response<SchemaInfo>, Status> {
        self.authenticate(request.metadata())?;
        let schema_id = request.into_inner().schema_id;
        let json = self.org.schema_json(&schema_id).ok_or_else(|| {
            sf_status(
                Code::NotFound,
                "schema.validation.failed",
                &format!("The schema id {schema_id} is not valid."),
            )
        })?;
        Ok(Response::new(SchemaInfo {
            schema_json: json,
            schema_id,
            rpc_id: uuid::Uuid::new_v4().to_string(),
        }))
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<FetchRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.authenticate(request.metadata())?;
        let mut inbound = request.into_inner();
        let first = match inbound.message().await? {
            Some(m) => m,
            None => {
                return Err(sf_status(
                    Code::InvalidArgument,
                    "topic.validation.empty",
                    "The first FetchRequest must name a topic.",
                ));
            }
        };
        let topic = first.topic_name.clone();
        self.check_topic(&topic)?;
        if self.org.deliveries_exhausted() {
            return Err(delivery_limit_exceeded());
        }
        if first.num_requested <= 0 {
            return Err(sf_status(
                Code::InvalidArgument,
                "subscription.fetch.requested.events.invalid",
                "num_requested must be greater than 0.",
            ));
        }
        let bus = &self.org.bus;
        let preset = ReplayPreset::try_from(first.replay_preset).unwrap_or(ReplayPreset::Latest);
        let (start, replay_id) = match preset {
            ReplayPreset::Latest => (bus.tip(), None),
            ReplayPreset::Earliest => (bus.earliest(&topic), None),
            ReplayPreset::Custom => {
                let bytes: Option<[u8; 8]> = first.replay_id.as_slice().try_into().ok();
                let Some(bytes) = bytes else {
                    return Err(sf_status(
                        Code::InvalidArgument,
                        "subscription.fetch.replayid.validation.failed",
                        "A CUSTOM replay preset needs a valid replay id.",
                    ));
                };
                let id = u64::from_be_bytes(bytes);
                match bus.resolve_custom(&topic, id) {
                    Position::After(p) => (p, Some(id)),
                    Position::Invalid => {
                        return Err(sf_status(
                            Code::InvalidArgument,
                            "subscription.fetch.replayid.corrupted",
                            "The Replay ID validation failed.",
                        ));
                    }
                }
            }
        };
        if let Ok(mut subs) = self.subscriptions.lock() {
            subs.push(SubscriptionRecord {
                topic: topic.clone(),
                preset: preset.as_str_name().to_string(),
                replay_id,
                started_after: start,
            });
        }
        let (tx, rx) = mpsc::channel::<Result<FetchResponse, Status>>(4);
        let org = self.org.clone();
        let keepalive = self.keepalive;
        let dropped = self
            .drop_streams
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        let credits = first.num_requested.min(MAX_OUTSTANDING);
        let timing = Timing {
            keepalive,
            idle_close: self.idle_close,
        };
        tokio::spawn(serve_subscription(
            org, topic, start, credits, inbound, tx, timing, dropped,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.authenticate(request.metadata())?;
        let request = request.into_inner();
        self.check_topic(&request.topic_name)?;
        Ok(Response::new(self.publish_batch(request)?))
    }

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        self.authenticate(request.metadata())?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<PublishResponse, Status>>(16);
        let service = self.clone();
        let dropped = self
            .drop_streams
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        tokio::spawn(async move {
            loop {
                // A publish stream must see a request within the idle window or it is closed.
                let next = tokio::select! {
                    m = tokio::time::timeout(service.idle_close, inbound.message()) => m,
                    _ = dropped.cancelled() => {
                        let _ = tx.send(Err(sf_status(Code::Unavailable, "service.unavailable",
                            "The service is unavailable; the stream was closed."))).await;
                        return;
                    }
                };
                let request = match next {
                    Ok(Ok(Some(r))) => r,
                    // Idle for too long, the client finished, or the transport failed.
                    _ => return,
                };
                let answer = service
                    .check_topic(&request.topic_name)
                    .and_then(|()| service.publish_batch(request));
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn managed_subscribe(
        &self,
        request: Request<Streaming<ManagedFetchRequest>>,
    ) -> Result<Response<Self::ManagedSubscribeStream>, Status> {
        self.authenticate(request.metadata())?;
        Err(Status::unimplemented(
            "ManagedSubscribe is not offered by this emulator",
        ))
    }
}

/// Delivers events of `topic` above `position` while the client has credit.
#[allow(clippy::too_many_arguments)]
async fn serve_subscription(
    org: Arc<Org>,
    topic: String,
    mut position: u64,
    mut credits: i32,
    mut inbound: Streaming<FetchRequest>,
    tx: mpsc::Sender<Result<FetchResponse, Status>>,
    timing: Timing,
    dropped: CancellationToken,
) {
    let mut changes = org.bus.watch();
    let rpc_id = uuid::Uuid::new_v4().to_string();
    // When the client's credit last ran out: a stream left without credit is closed.
    let mut starved_since: Option<tokio::time::Instant> = None;
    loop {
        // Deliver what is available, within the credit and what is left of the allocation.
        while credits > 0 {
            let events = org.deliver(credits as u64, |room| {
                org.bus.read_after(&topic, position, room)
            });
            let Some(last) = events.last() else { break };
            let last_replay = last.replay;
            let n = events.len() as i32;
            credits -= n;
            let response = FetchResponse {
                events: events
                    .iter()
                    .map(|e| ConsumerEvent {
                        event: Some(ProducerEvent {
                            id: e.event_uuid.clone(),
                            schema_id: e.schema_id.clone(),
                            // Shared with the stored event: no copy per delivery.
                            payload: e.payload.clone(),
                            headers: Vec::new(),
                        }),
                        replay_id: e.replay.to_be_bytes().to_vec(),
                    })
                    .collect(),
                latest_replay_id: last_replay.to_be_bytes().to_vec(),
                rpc_id: rpc_id.clone(),
                pending_num_requested: credits,
            };
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
            position = last_replay;
        }
        // Once the org's delivery allocation is spent (by this stream or any other), the
        // stream ends, after what it could still deliver.
        if org.deliveries_exhausted() {
            let _ = tx.send(Err(delivery_limit_exceeded())).await;
            return;
        }
        if credits > 0 {
            starved_since = None;
        } else if starved_since.is_none() {
            starved_since = Some(tokio::time::Instant::now());
        }
        let idle = tokio::time::sleep(timing.keepalive);
        let close_at = starved_since.map(|t| t + timing.idle_close);
        tokio::select! {
            // Salesforce ends a stream whose client stopped asking for events; the call ends
            // with OK and the client resubscribes when it wants more.
            _ = async { match close_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            } } => return,
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if !req.topic_name.is_empty() && req.topic_name != topic {
                        let _ = tx.send(Err(sf_status(Code::InvalidArgument,
                            "subscription.fetch.topic.mismatch",
                            "The topic of a FetchRequest must match the first request's."))).await;
                        return;
                    }
                    if req.num_requested <= 0 {
                        let _ = tx.send(Err(sf_status(Code::InvalidArgument,
                            "subscription.fetch.requested.events.invalid",
                            "num_requested must be greater than 0."))).await;
                        return;
                    }
                    credits = credits.saturating_add(req.num_requested).min(MAX_OUTSTANDING);
                }
                // The client closed its side or went away.
                _ => return,
            },
            changed = changes.changed() => {
                if changed.is_err() { return; }
            }
            _ = idle => {
                // Nothing to deliver: the position is the newest the client has, or the
                // channel tip when it has everything.
                // Tip first: an event published after this read has a higher id and is
                // still delivered, so the keepalive never claims a position past it.
                let tip = org.bus.tip();
                let caught_up = org
                    .bus
                    .read_after(&topic, position, 1)
                    .first()
                    .is_none_or(|e| e.replay > tip);
                let latest = if caught_up { tip.max(position) } else { position };
                let keepalive = FetchResponse {
                    events: Vec::new(),
                    latest_replay_id: latest.to_be_bytes().to_vec(),
                    rpc_id: rpc_id.clone(),
                    pending_num_requested: credits,
                };
                if tx.send(Ok(keepalive)).await.is_err() { return; }
            }
            _ = dropped.cancelled() => {
                let _ = tx.send(Err(sf_status(Code::Unavailable, "service.unavailable",
                    "The service is unavailable; the stream was closed."))).await;
                return;
            }
        }
    }
}
