//! Many subscribed streams: ADS (State of the World or Delta) to our server, or etcd watch
//! streams; one publish, and the time until each stream has it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use bytes::Bytes;
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    },
};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use serde::Serialize;
use tokio::sync::Notify;

use super::{
    etcdpb as etcd,
    h2streams::{self, Connection, Driven, Opened, Protocol, Step},
};
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
    /// Each connection's tasks, held for their drop, which closes the streams.
    _connections: Vec<Driven>,
    /// How many streams.
    pub n: usize,
    /// Streams that ended or failed after subscribing.
    pub failed: Arc<AtomicU64>,
}

/// How many streams are opened at once.
const OPEN_PARALLELISM: usize = 256;

/// Opens `n` streams of `kind` to `url` over `connections` connections and waits until each
/// holds its first state (ADS: the first response, ACKed; etcd: the watch is created). Each
/// connection's streams are then run by one task (see [`h2streams`]).
pub async fn open(kind: Kind, url: &str, n: usize, connections: usize) -> anyhow::Result<Streams> {
    let connections = connections.clamp(1, n.max(1));
    let board = Arc::new(Board::new(n));
    let failed = Arc::new(AtomicU64::new(0));
    let conns: Vec<Connection> = futures::stream::iter(0..connections)
        .map(|_| Connection::open(url))
        .buffered(64)
        .try_collect()
        .await?;
    let tasks = match kind {
        Kind::Sotw => drive(conns, n, Sotw::new, &board, &failed).await?,
        Kind::Delta => drive(conns, n, Delta::new, &board, &failed).await?,
        Kind::EtcdWatch => drive(conns, n, |_| EtcdWatch, &board, &failed).await?,
    };
    Ok(Streams {
        board,
        seen: 0,
        _connections: tasks,
        n,
        failed,
    })
}

/// Opens `n` streams, stream `i` speaking `protocol(i)` on connection `i % conns.len()`,
/// then hands each connection's streams to its task.
async fn drive<P: Protocol>(
    conns: Vec<Connection>,
    n: usize,
    protocol: impl Fn(usize) -> P,
    board: &Arc<Board>,
    failed: &Arc<AtomicU64>,
) -> anyhow::Result<Vec<Driven>> {
    let (conns_ref, protocol) = (&conns, &protocol);
    let opened: Vec<(usize, Opened, P)> = futures::stream::iter(0..n)
        .map(|i| async move {
            let mut protocol = protocol(i);
            let (mut stream, first) = conns_ref[i % conns_ref.len()]
                .call(P::PATH, protocol.first())
                .await?;
            if let Some(reply) = protocol.on_first(first)? {
                stream.send(reply)?;
            }
            anyhow::Ok((i, stream, protocol))
        })
        .buffer_unordered(OPEN_PARALLELISM)
        .try_collect()
        .await?;
    let per_connection = conns.len();
    let mut by_connection: Vec<Vec<(usize, Opened, P)>> =
        (0..per_connection).map(|_| Vec::new()).collect();
    for stream in opened {
        by_connection[stream.0 % per_connection].push(stream);
    }
    let mut driven = Vec::with_capacity(per_connection);
    for (connection, mine) in conns.into_iter().zip(by_connection) {
        // Stream `i`'s latest update, at `i / per_connection`.
        let updates: Box<[AtomicU64]> = mine.iter().map(|_| AtomicU64::new(0)).collect();
        let (board, failed) = (board.clone(), failed.clone());
        driven.push(connection.drive(
            mine,
            move |i| {
                let update = updates[i / per_connection].fetch_add(1, Ordering::Relaxed) + 1;
                board.deliver(i, update);
            },
            move |_| {
                failed.fetch_add(1, Ordering::Relaxed);
            },
        ));
    }
    Ok(driven)
}

fn node(i: usize) -> Node {
    Node {
        id: format!("bench-{i}"),
        ..Default::default()
    }
}

/// A State of the World subscriber: ACKs every response with its version and nonce.
struct Sotw {
    i: usize,
    names: Vec<String>,
}

impl Sotw {
    fn new(i: usize) -> Self {
        Self {
            i,
            names: vec![format!("{APPLICATION}/{REVISION}")],
        }
    }

    fn ack(&self, message: Bytes) -> anyhow::Result<Bytes> {
        let response = DiscoveryResponse::decode(message)?;
        Ok(h2streams::frame(&DiscoveryRequest {
            type_url: pb::METADATA_TYPE_URL.into(),
            resource_names: self.names.clone(),
            version_info: response.version_info,
            response_nonce: response.nonce,
            ..Default::default()
        }))
    }
}

impl Protocol for Sotw {
    const PATH: &'static str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

    fn first(&self) -> Bytes {
        h2streams::frame(&DiscoveryRequest {
            node: Some(node(self.i)),
            type_url: pb::METADATA_TYPE_URL.into(),
            resource_names: self.names.clone(),
            ..Default::default()
        })
    }

    fn on_first(&mut self, message: Bytes) -> anyhow::Result<Option<Bytes>> {
        self.ack(message).map(Some)
    }

    fn on_message(&mut self, message: Bytes) -> anyhow::Result<Step> {
        Ok(Step {
            delivered: true,
            reply: Some(self.ack(message)?),
        })
    }
}

/// A Delta subscriber: ACKs every response with its nonce.
struct Delta {
    i: usize,
}

impl Delta {
    fn new(i: usize) -> Self {
        Self { i }
    }

    fn ack(message: Bytes) -> anyhow::Result<Bytes> {
        let response = DeltaDiscoveryResponse::decode(message)?;
        Ok(h2streams::frame(&DeltaDiscoveryRequest {
            type_url: pb::METADATA_TYPE_URL.into(),
            response_nonce: response.nonce,
            ..Default::default()
        }))
    }
}

impl Protocol for Delta {
    const PATH: &'static str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

    fn first(&self) -> Bytes {
        h2streams::frame(&DeltaDiscoveryRequest {
            node: Some(node(self.i)),
            type_url: pb::METADATA_TYPE_URL.into(),
            resource_names_subscribe: vec![format!("{APPLICATION}/{REVISION}")],
            ..Default::default()
        })
    }

    fn on_first(&mut self, message: Bytes) -> anyhow::Result<Option<Bytes>> {
        Self::ack(message).map(Some)
    }

    fn on_message(&mut self, message: Bytes) -> anyhow::Result<Step> {
        Ok(Step {
            delivered: true,
            reply: Some(Self::ack(message)?),
        })
    }
}

/// An etcd watch stream with one watcher: a response with events is a delivery.
struct EtcdWatch;

impl Protocol for EtcdWatch {
    const PATH: &'static str = etcd::WATCH;

    fn first(&self) -> Bytes {
        h2streams::frame(&etcd::WatchRequest {
            create_request: Some(etcd::WatchCreateRequest {
                key: ETCD_KEY.as_bytes().to_vec(),
            }),
        })
    }

    fn on_first(&mut self, message: Bytes) -> anyhow::Result<Option<Bytes>> {
        if !etcd::WatchResponse::decode(message)?.created {
            bail!("etcd's first watch response did not confirm the watch");
        }
        Ok(None)
    }

    fn on_message(&mut self, message: Bytes) -> anyhow::Result<Step> {
        let response = etcd::WatchResponse::decode(message)?;
        if response.canceled {
            bail!("etcd canceled the watch");
        }
        Ok(Step {
            delivered: !response.events.is_empty(),
            reply: None,
        })
    }
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
            _connections: Vec::new(),
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
