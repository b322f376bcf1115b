//! How fast the emulator serves a pre-built backlog over Pub/Sub, so that it is never what a
//! benchmark of sfmirror measures. Run with `cargo bench --bench emulator_serve [-- N]`
//! (N events, default 500,000).
//!
//! A bare gRPC client subscribes at EARLIEST to `/data/ChangeEvents`, keeps the full 100
//! events requested at all times (as a fast subscriber does), and only counts what arrives:
//! no decoding, no database.

use futures::StreamExt;
use sfmirror::emulator::{Emulator, EmulatorConfig};
use sfmirror::proto::pub_sub_client::PubSubClient;
use sfmirror::proto::{FetchRequest, ReplayPreset};
use std::time::Instant;
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(500_000);
    let t0 = Instant::now();
    let emulator = Emulator::start(EmulatorConfig {
        backlog: Some(n.to_string().parse().map_err(anyhow::Error::msg)?),
        ..Default::default()
    })
    .await?;
    println!(
        "backlog: {n} events built in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // Receive windows as a fast subscriber sets them (sfmirror's client does the same): with
    // HTTP/2's 64 KB default, every 100-event response would wait for a window update.
    let channel = tonic::transport::Endpoint::from_shared(emulator.pubsub_endpoint.clone())?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 * 1024 * 1024))
        .initial_connection_window_size(Some(32 * 1024 * 1024))
        .connect()
        .await?;
    let mut client = PubSubClient::new(channel);
    let (tx, rx) = mpsc::channel::<FetchRequest>(16);
    tx.send(FetchRequest {
        topic_name: "/data/ChangeEvents".into(),
        replay_preset: ReplayPreset::Earliest as i32,
        num_requested: 100,
        ..Default::default()
    })
    .await?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let md = request.metadata_mut();
    md.insert("accesstoken", emulator.access_token.parse()?);
    md.insert("instanceurl", emulator.rest_url.parse()?);
    md.insert("tenantid", emulator.org.org_id.parse()?);
    let t0 = Instant::now();
    let mut stream = client.subscribe(request).await?.into_inner();
    let mut got = 0usize;
    let mut bytes = 0usize;
    while got < n {
        let Some(r) = stream.next().await else {
            anyhow::bail!("the stream ended after {got} events");
        };
        let r = r?;
        let k = r.events.len();
        bytes += r
            .events
            .iter()
            .filter_map(|e| e.event.as_ref())
            .map(|e| e.payload.len())
            .sum::<usize>();
        got += k;
        if k > 0 {
            tx.send(FetchRequest {
                topic_name: "/data/ChangeEvents".into(),
                num_requested: k as i32,
                ..Default::default()
            })
            .await?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "served: {got} events ({:.0} MB of payload) in {secs:.2} s = {:.0} events/s",
        bytes as f64 / 1e6,
        got as f64 / secs
    );
    drop(tx);
    emulator.stop().await;
    Ok(())
}
