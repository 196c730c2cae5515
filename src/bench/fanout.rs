//! Many subscribed streams: ADS (State of the World or Delta) to our server, or etcd watch
//! streams; one publish, and the time until each stream has it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::pb;

/// The application and revision every fan-out stream subscribes to.
pub const APPLICATION: &str = "bench-fanout";
/// See [`APPLICATION`].
pub const REVISION: &str = "r1";
/// The etcd key every watcher watches.
pub const ETCD_KEY: &str = "/bench/fanout";
/// An application no stream subscribes to.
pub const OTHER_APPLICATION: &str = "bench-fanout-other";
/// An etcd key no watcher watches.
pub const OTHER_ETCD_KEY: &str = "/bench/fanout-other";

/// What kind of subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// ADS, State of the World.
    Sotw,
    /// ADS, Incremental.
    Delta,
    /// An etcd watch stream with one watcher.
    EtcdWatch,
}

/// Where the streams report their deliveries, without a queue: each stream writes the number
/// of its latest update (1 for the first after subscribing) and when it arrived into a slot of
/// its own, and counts one arrival; the arrival an update waits for last wakes the collector.
/// A channel cost the generator a push onto a queue shared by every stream and a wake-up of
/// the collector per delivery, on the cores the server uses too.
#[derive(Debug)]
struct Board {
    base: Instant,
    slots: Box<[Slot]>,
    arrivals: AtomicU64,
    /// The count of arrivals that wakes the collector.
    wake_at: AtomicU64,
    wake: Notify,
}

/// One stream's latest delivery, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot {
    update: AtomicU64,
    /// Nanoseconds from the board's `base`.
    at_ns: AtomicU64,
}

impl Board {
    fn new(n: usize) -> Self {
        Self {
            base: Instant::now(),
            slots: (0..n).map(|_| Slot::default()).collect(),
            arrivals: AtomicU64::new(0),
            wake_at: AtomicU64::new(u64::MAX),
            wake: Notify::new(),
        }
    }

    /// Stream `i` received `update`, now.
    fn deliver(&self, i: usize, update: u64) {
        let slot = &self.slots[i];
        let at_ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        slot.at_ns.store(at_ns, Ordering::Relaxed);
        slot.update.store(update, Ordering::Release);
        // Sequentially consistent with the collector's store of `wake_at` and load of
        // `arrivals`: either this sees the target, or the collector sees this arrival.
        let arrived = self.arrivals.fetch_add(1, Ordering::SeqCst) + 1;
        if arrived == self.wake_at.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }
}

/// Open streams, each reporting its deliveries.
#[derive(Debug)]
pub struct Streams {
    board: Arc<Board>,
    /// Arrivals accounted for by earlier updates (or drains).
    seen: u64,
    tasks: Vec<JoinHandle<()>>,
    /// How many streams.
    pub n: usize,
    /// Streams that ended or failed after subscribing.
    pub failed: Arc<AtomicU64>,
}

impl Drop for Streams {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How many streams are opened at once.
const OPEN_PARALLELISM: usize = 256;

/// Opens `n` streams of `kind` to `url` over `connections` connections and waits until each
/// holds its first state (ADS: the first response, ACKed; etcd: the watch is created).
pub async fn open(kind: Kind, url: &str, n: usize, connections: usize) -> anyhow::Result<Streams> {
    let connections = connections.clamp(1, n.max(1));
    let board = Arc::new(Board::new(n));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks = match kind {
        Kind::Sotw | Kind::Delta => {
            let channels: Vec<Channel> = futures::stream::iter(0..connections)
                .map(|_| super::connect(url))
                .buffered(64)
                .try_collect()
                .await?;
            futures::stream::iter(0..n)
                .map(|i| {
                    let channel = channels[i % connections].clone();
                    let (board, failed) = (board.clone(), failed.clone());
                    async move {
                        if kind == Kind::Sotw {
                            sotw(channel, i, board, failed).await
                        } else {
                            delta(channel, i, board, failed).await
                        }
                    }
                })
                .buffer_unordered(OPEN_PARALLELISM)
                .try_collect()
                .await?
        }
        Kind::EtcdWatch => {
            let clients: Vec<etcd_client::Client> = futures::stream::iter(0..connections)
                .map(|_| etcd_client::Client::connect([url], None))
                .buffered(64)
                .try_collect()
                .await
                .context("connecting to etcd")?;
            futures::stream::iter(0..n)
                .map(|i| {
                    let client = clients[i % connections].clone();
                    let (board, failed) = (board.clone(), failed.clone());
                    async move { etcd_watch(client, i, board, failed).await }
                })
                .buffer_unordered(OPEN_PARALLELISM)
                .try_collect()
                .await?
        }
    };
    Ok(Streams {
        board,
        seen: 0,
        tasks,
        n,
        failed,
    })
}

fn node(i: usize) -> Node {
    Node {
        id: format!("bench-{i}"),
        ..Default::default()
    }
}

/// A stream's requests, boxed in their channel: a channel's blocks hold 32 of its items,
/// and a `DiscoveryRequest` is over 500 bytes, so unboxed each stream kept some 17 KiB of
/// slots and copied every ACK into one it had not touched for 32 ACKs.
fn request_channel<T: Send + 'static>() -> (
    mpsc::Sender<Box<T>>,
    impl futures::Stream<Item = T> + Send + 'static,
) {
    let (requests, rx) = mpsc::channel(4);
    (
        requests,
        ReceiverStream::new(rx).map(|request: Box<T>| *request),
    )
}

async fn sotw(
    channel: Channel,
    i: usize,
    board: Arc<Board>,
    failed: Arc<AtomicU64>,
) -> anyhow::Result<JoinHandle<()>> {
    let (requests, rx) = request_channel();
    let names = vec![format!("{APPLICATION}/{REVISION}")];
    requests
        .send(Box::new(DiscoveryRequest {
            node: Some(node(i)),
            type_url: pb::METADATA_TYPE_URL.into(),
            resource_names: names.clone(),
            ..Default::default()
        }))
        .await?;
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(rx)
        .await?
        .into_inner();
    let first = responses
        .message()
        .await?
        .context("the stream ended at once")?;
    let ack = move |version: String, nonce: String| {
        Box::new(DiscoveryRequest {
            type_url: pb::METADATA_TYPE_URL.into(),
            resource_names: names.clone(),
            version_info: version,
            response_nonce: nonce,
            ..Default::default()
        })
    };
    requests.send(ack(first.version_info, first.nonce)).await?;
    Ok(tokio::spawn(async move {
        let mut update = 0;
        while let Ok(Some(response)) = responses.message().await {
            update += 1;
            board.deliver(i, update);
            if requests
                .send(ack(response.version_info, response.nonce))
                .await
                .is_err()
            {
                break;
            }
        }
        failed.fetch_add(1, Ordering::Relaxed);
    }))
}

async fn delta(
    channel: Channel,
    i: usize,
    board: Arc<Board>,
    failed: Arc<AtomicU64>,
) -> anyhow::Result<JoinHandle<()>> {
    let (requests, rx) = request_channel();
    requests
        .send(Box::new(DeltaDiscoveryRequest {
            node: Some(node(i)),
            type_url: pb::METADATA_TYPE_URL.into(),
            resource_names_subscribe: vec![format!("{APPLICATION}/{REVISION}")],
            ..Default::default()
        }))
        .await?;
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(rx)
        .await?
        .into_inner();
    let first = responses
        .message()
        .await?
        .context("the stream ended at once")?;
    let ack = |nonce: String| {
        Box::new(DeltaDiscoveryRequest {
            type_url: pb::METADATA_TYPE_URL.into(),
            response_nonce: nonce,
            ..Default::default()
        })
    };
    requests.send(ack(first.nonce)).await?;
    Ok(tokio::spawn(async move {
        let mut update = 0;
        while let Ok(Some(response)) = responses.message().await {
            update += 1;
            board.deliver(i, update);
            if requests.send(ack(response.nonce)).await.is_err() {
                break;
            }
        }
        failed.fetch_add(1, Ordering::Relaxed);
    }))
}

async fn etcd_watch(
    client: etcd_client::Client,
    i: usize,
    board: Arc<Board>,
    failed: Arc<AtomicU64>,
) -> anyhow::Result<JoinHandle<()>> {
    let mut stream = client.watch_client().watch(ETCD_KEY, None).await?;
    let created = stream.message().await?.context("the watch ended at once")?;
    if !created.created() {
        bail!("etcd's first watch response did not confirm the watch");
    }
    Ok(tokio::spawn(async move {
        let mut update = 0;
        // Keep the stream (and its request sender) alive as long as the task runs.
        while let Ok(Some(response)) = stream.message().await {
            if response.events().is_empty() {
                continue;
            }
            update += 1;
            board.deliver(i, update);
        }
        failed.fetch_add(1, Ordering::Relaxed);
    }))
}

/// What one update's delivery measured.
#[derive(Debug, Clone)]
pub struct UpdateResult {
    /// Microseconds from the start of the publish to each stream's receipt.
    pub latencies_us: Vec<u64>,
    /// Streams that did not receive the update within the timeout.
    pub missing: u64,
}

impl Streams {
    /// How many deliveries arrived since the last look, whatever their update.
    pub fn drain(&mut self) -> u64 {
        let arrivals = self.board.arrivals.load(Ordering::SeqCst);
        let n = arrivals - self.seen;
        self.seen = arrivals;
        n
    }

    /// Waits until every stream reports `update`, or `timeout` passes.
    pub async fn collect(&mut self, update: u64, t0: Instant, timeout: Duration) -> UpdateResult {
        let board = &self.board;
        let target = self.seen + self.n as u64;
        board.wake_at.store(target, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        while board.arrivals.load(Ordering::SeqCst) < target {
            if tokio::time::timeout_at(deadline, board.wake.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        self.seen = target;
        let latencies_us: Vec<u64> = board
            .slots
            .iter()
            .filter(|slot| slot.update.load(Ordering::Acquire) == update)
            .map(|slot| {
                let at = board.base + Duration::from_nanos(slot.at_ns.load(Ordering::Relaxed));
                u64::try_from(at.saturating_duration_since(t0).as_micros()).unwrap_or(u64::MAX)
            })
            .collect();
        UpdateResult {
            missing: (self.n - latencies_us.len()) as u64,
            latencies_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(n: usize) -> Streams {
        Streams {
            board: Arc::new(Board::new(n)),
            seen: 0,
            tasks: Vec::new(),
            n,
            failed: Arc::default(),
        }
    }

    /// The collector wakes when the last stream reports the update, whichever thread it
    /// reports from, and reads every stream's time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn collects_every_streams_delivery_of_an_update() {
        let mut streams = streams(64);
        for update in 1..=3 {
            let t0 = Instant::now();
            let board = streams.board.clone();
            let reporters: Vec<_> = (0..64)
                .map(|i| {
                    let board = board.clone();
                    tokio::spawn(async move { board.deliver(i, update) })
                })
                .collect();
            let result = streams.collect(update, t0, Duration::from_secs(10)).await;
            futures::future::try_join_all(reporters).await.unwrap();
            assert_eq!(result.missing, 0);
            assert_eq!(result.latencies_us.len(), 64);
            assert!(result.latencies_us.iter().all(|&us| us < 10_000_000));
        }
        assert_eq!(streams.drain(), 0, "nothing arrived beyond the updates");
        streams.board.deliver(5, 4);
        assert_eq!(streams.drain(), 1);
    }

    /// A stream that does not report the update is missing once the timeout passes, and a
    /// stream still on an earlier update is not counted as having this one.
    #[tokio::test]
    async fn a_stream_that_does_not_report_is_missing() {
        let mut streams = streams(3);
        let t0 = Instant::now();
        streams.board.deliver(0, 1);
        streams.board.deliver(2, 1);
        let result = streams.collect(1, t0, Duration::from_millis(50)).await;
        assert_eq!((result.latencies_us.len(), result.missing), (2, 1));
    }
}
