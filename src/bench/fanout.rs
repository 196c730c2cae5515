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
use tokio::{sync::mpsc, task::JoinHandle};
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

/// A delivery: which update (1 for the first after subscribing) reached a stream, and when.
type Delivery = (u64, Instant);

/// Open streams, each reporting its deliveries.
#[derive(Debug)]
pub struct Streams {
    deliveries: mpsc::UnboundedReceiver<Delivery>,
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
    let (tx, deliveries) = mpsc::unbounded_channel();
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
                    let (tx, failed) = (tx.clone(), failed.clone());
                    async move {
                        if kind == Kind::Sotw {
                            sotw(channel, i, tx, failed).await
                        } else {
                            delta(channel, i, tx, failed).await
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
                    let (tx, failed) = (tx.clone(), failed.clone());
                    async move { etcd_watch(client, tx, failed).await }
                })
                .buffer_unordered(OPEN_PARALLELISM)
                .try_collect()
                .await?
        }
    };
    Ok(Streams {
        deliveries,
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

async fn sotw(
    channel: Channel,
    i: usize,
    deliveries: mpsc::UnboundedSender<Delivery>,
    failed: Arc<AtomicU64>,
) -> anyhow::Result<JoinHandle<()>> {
    let (requests, rx) = mpsc::channel(4);
    let names = vec![format!("{APPLICATION}/{REVISION}")];
    requests
        .send(DiscoveryRequest {
            node: Some(node(i)),
            type_url: pb::METADATA_TYPE_URL.into(),
            resource_names: names.clone(),
            ..Default::default()
        })
        .await?;
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = responses
        .message()
        .await?
        .context("the stream ended at once")?;
    let ack = move |version: String, nonce: String| DiscoveryRequest {
        type_url: pb::METADATA_TYPE_URL.into(),
        resource_names: names.clone(),
        version_info: version,
        response_nonce: nonce,
        ..Default::default()
    };
    requests.send(ack(first.version_info, first.nonce)).await?;
    Ok(tokio::spawn(async move {
        let mut update = 0;
        while let Ok(Some(response)) = responses.message().await {
            update += 1;
            let _ = deliveries.send((update, Instant::now()));
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
    deliveries: mpsc::UnboundedSender<Delivery>,
    failed: Arc<AtomicU64>,
) -> anyhow::Result<JoinHandle<()>> {
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DeltaDiscoveryRequest {
            node: Some(node(i)),
            type_url: pb::METADATA_TYPE_URL.into(),
            resource_names_subscribe: vec![format!("{APPLICATION}/{REVISION}")],
            ..Default::default()
        })
        .await?;
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = responses
        .message()
        .await?
        .context("the stream ended at once")?;
    let ack = |nonce: String| DeltaDiscoveryRequest {
        type_url: pb::METADATA_TYPE_URL.into(),
        response_nonce: nonce,
        ..Default::default()
    };
    requests.send(ack(first.nonce)).await?;
    Ok(tokio::spawn(async move {
        let mut update = 0;
        while let Ok(Some(response)) = responses.message().await {
            update += 1;
            let _ = deliveries.send((update, Instant::now()));
            if requests.send(ack(response.nonce)).await.is_err() {
                break;
            }
        }
        failed.fetch_add(1, Ordering::Relaxed);
    }))
}

async fn etcd_watch(
    client: etcd_client::Client,
    deliveries: mpsc::UnboundedSender<Delivery>,
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
            let _ = deliveries.send((update, Instant::now()));
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
        let mut n = 0;
        while self.deliveries.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    /// Waits until every stream reports `update`, or `timeout` passes.
    pub async fn collect(&mut self, update: u64, t0: Instant, timeout: Duration) -> UpdateResult {
        let mut latencies_us = Vec::with_capacity(self.n);
        let deadline = tokio::time::Instant::now() + timeout;
        while latencies_us.len() < self.n {
            match tokio::time::timeout_at(deadline, self.deliveries.recv()).await {
                Ok(Some((u, at))) if u == update => latencies_us.push(
                    u64::try_from(at.saturating_duration_since(t0).as_micros()).unwrap_or(u64::MAX),
                ),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        UpdateResult {
            missing: (self.n - latencies_us.len()) as u64,
            latencies_us,
        }
    }
}
