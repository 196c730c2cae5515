//! The generator's unary calls (`get`, `publish-*`), through one of two clients:
//!
//! - [`ClientKind::H2`] (the default): gRPC spoken over `h2` directly ([`h2streams`]), the
//!   same for all three servers, each call written to its connection as it is made;
//! - [`ClientKind::Stock`]: the clients a user would run, tonic's generated
//!   `MetadataServiceClient` for ours and the echo, `etcd-client` for etcd. Their channels put
//!   a buffer task between every call and its connection, which batches calls and costs the
//!   generator CPU on the cores the servers use; the two clients differ, so the comparison is
//!   of what users would see rather than of the servers alone.
//!
//! Either way every answer is decoded and checked.

use std::sync::Arc;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tonic::transport::Channel;

use super::{etcdpb, h2streams};
use crate::pb::metadata::{self as proto, metadata_service_client::MetadataServiceClient};

/// The paths of the seed's `MetadataService` the generator calls.
const GET: &str = "/pixiu.pkg.metadata.MetadataService/Get";
const PUBLISH: &str = "/pixiu.pkg.metadata.MetadataService/Publish";
const LIST: &str = "/pixiu.pkg.metadata.MetadataService/List";

/// Which client the unary workers call through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// gRPC over `h2` directly, alike for every server.
    #[default]
    H2,
    /// tonic's generated client (ours, the echo) and `etcd-client` (etcd).
    Stock,
}

/// `n` connections to one server, through which the workers call (worker `w` on connection
/// `w % n`).
#[derive(Clone)]
pub enum Clients {
    /// Any server, over `h2`.
    H2(Arc<Vec<h2streams::Connection>>),
    /// Ours or the echo, through tonic's client.
    Tonic(Arc<Vec<MetadataServiceClient<Channel>>>),
    /// etcd, through `etcd-client`.
    Etcd(Arc<Vec<etcd_client::Client>>),
}

impl Clients {
    /// Connections to a `MetadataService` (ours or the echo) at `url`.
    pub async fn metadata(kind: ClientKind, url: &str, n: usize) -> anyhow::Result<Self> {
        Ok(match kind {
            ClientKind::H2 => Self::H2(h2_connections(url, n).await?),
            ClientKind::Stock => {
                let clients = futures::stream::iter(0..n.max(1))
                    .map(|_| async { super::connect(url).await.map(MetadataServiceClient::new) })
                    .buffered(16)
                    .try_collect()
                    .await?;
                Self::Tonic(Arc::new(clients))
            }
        })
    }

    /// Connections to etcd at `url`.
    pub async fn etcd(kind: ClientKind, url: &str, n: usize) -> anyhow::Result<Self> {
        Ok(match kind {
            ClientKind::H2 => Self::H2(h2_connections(url, n).await?),
            ClientKind::Stock => {
                let mut clients = Vec::with_capacity(n.max(1));
                for _ in 0..n.max(1) {
                    clients.push(
                        etcd_client::Client::connect([url], None)
                            .await
                            .context("connecting to etcd")?,
                    );
                }
                Self::Etcd(Arc::new(clients))
            }
        })
    }

    /// `MetadataService/Get`; fails on an empty answer.
    pub async fn get(
        &self,
        worker: usize,
        request: proto::GetMetadataRequest,
    ) -> anyhow::Result<()> {
        let metadata_info = match self {
            Self::H2(connections) => {
                let answer = pick(connections, worker)
                    .unary(GET, h2streams::frame(&request))
                    .await?;
                proto::GetMetadataResponse::decode(answer)?.metadata_info
            }
            Self::Tonic(clients) => {
                pick(clients, worker)
                    .clone()
                    .get(request)
                    .await?
                    .into_inner()
                    .metadata_info
            }
            Self::Etcd(_) => bail!("etcd has no MetadataService"),
        };
        if metadata_info.is_empty() {
            bail!("an empty answer");
        }
        Ok(())
    }

    /// `MetadataService/Publish`.
    pub async fn publish(
        &self,
        worker: usize,
        request: proto::PublishMetadataRequest,
    ) -> anyhow::Result<()> {
        match self {
            Self::H2(connections) => {
                let answer = pick(connections, worker)
                    .unary(PUBLISH, h2streams::frame(&request))
                    .await?;
                proto::PublishMetadataResponse::decode(answer)?;
            }
            Self::Tonic(clients) => {
                pick(clients, worker).clone().publish(request).await?;
            }
            Self::Etcd(_) => bail!("etcd has no MetadataService"),
        }
        Ok(())
    }

    /// `MetadataService/List`; fails unless the page holds `expected` records.
    pub async fn list(
        &self,
        worker: usize,
        request: proto::ListMetadataRequest,
        expected: usize,
    ) -> anyhow::Result<()> {
        let records = match self {
            Self::H2(connections) => {
                let answer = pick(connections, worker)
                    .unary(LIST, h2streams::frame(&request))
                    .await?;
                proto::ListMetadataResponse::decode(answer)?.records
            }
            Self::Tonic(clients) => {
                pick(clients, worker)
                    .clone()
                    .list(request)
                    .await?
                    .into_inner()
                    .records
            }
            Self::Etcd(_) => bail!("etcd has no MetadataService"),
        };
        if records.len() != expected {
            bail!("a page of {} records, not {expected}", records.len());
        }
        Ok(())
    }

    /// etcd's `Range` of the keys from `from` to `end` (excluded), at most `limit`; fails
    /// unless it answers `limit` keys.
    pub async fn range_page(
        &self,
        worker: usize,
        from: String,
        end: Vec<u8>,
        limit: usize,
    ) -> anyhow::Result<()> {
        let found = self.range_count(worker, from, end, limit).await?;
        if found != limit {
            bail!("a range of {found} keys, not {limit}");
        }
        Ok(())
    }

    /// etcd's `Range` of one key; fails when the key is missing.
    pub async fn range(&self, worker: usize, key: String) -> anyhow::Result<()> {
        if self.range_count(worker, key, Vec::new(), 0).await? == 0 {
            bail!("a missing key");
        }
        Ok(())
    }

    /// How many keys etcd's `Range` answers: of `key` alone when `end` is empty, else of
    /// `[key, end)`, at most `limit` (0: no limit).
    async fn range_count(
        &self,
        worker: usize,
        key: String,
        end: Vec<u8>,
        limit: usize,
    ) -> anyhow::Result<usize> {
        Ok(match self {
            Self::H2(connections) => {
                let request = h2streams::frame(&etcdpb::RangeRequest {
                    key: key.into_bytes(),
                    range_end: end,
                    limit: limit as i64,
                });
                let answer = pick(connections, worker)
                    .unary(etcdpb::RANGE, request)
                    .await?;
                etcdpb::RangeResponse::decode(answer)?.kvs.len()
            }
            Self::Etcd(clients) => {
                let options = (!end.is_empty()).then(|| {
                    etcd_client::GetOptions::new()
                        .with_range(end)
                        .with_limit(limit as i64)
                });
                pick(clients, worker)
                    .kv_client()
                    .get(key, options)
                    .await?
                    .kvs()
                    .len()
            }
            Self::Tonic(_) => bail!("not an etcd client"),
        })
    }

    /// etcd's `Put`; fails when the answer carries no revision.
    pub async fn put(&self, worker: usize, key: String, value: String) -> anyhow::Result<()> {
        let revised = match self {
            Self::H2(connections) => {
                let request = h2streams::frame(&etcdpb::PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                });
                let answer = pick(connections, worker)
                    .unary(etcdpb::PUT, request)
                    .await?;
                etcdpb::PutResponse::decode(answer)?.header.is_some()
            }
            Self::Etcd(clients) => pick(clients, worker)
                .kv_client()
                .put(key, value, None)
                .await?
                .header()
                .is_some(),
            Self::Tonic(_) => bail!("not an etcd client"),
        };
        if !revised {
            bail!("a put answered without its revision");
        }
        Ok(())
    }
}

fn pick<T>(items: &[T], worker: usize) -> &T {
    &items[worker % items.len()]
}

async fn h2_connections(url: &str, n: usize) -> anyhow::Result<Arc<Vec<h2streams::Connection>>> {
    let connections = futures::stream::iter(0..n.max(1))
        .map(|_| h2streams::Connection::open(url))
        .buffered(16)
        .try_collect()
        .await?;
    Ok(Arc::new(connections))
}
