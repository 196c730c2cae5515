//! `pixiu-xds`: a general Aggregated Discovery Service (xDS) server.
//!
//! - [`cache`](mod@cache) decides *what exists and at which version*: resources keyed by
//!   partition, type URL and name, versions derived from their bytes, immutable snapshots.
//! - [`subscription`], [`sotw`] (State of the World) and [`delta`] (Incremental) hold the
//!   per-stream protocol logic as synchronous state machines with no IO; [`protocol`] holds
//!   what the two share (limits, errors, nonces, reading ACK and NACK).
//! - [`server`] runs streams over tonic; [`registry`] and [`status`] expose per-client sync
//!   status, and [`csds`] serves it as the Client Status Discovery Service.
//!
//! What this crate does **not** do: know any resource type (type URLs are opaque keys; an
//! unknown type is one with no resources), decide who may read what (a
//! [`ViewResolver`] supplied by the embedding server does), or load resources from anywhere.

pub mod cache;
pub mod csds;
pub mod delta;
pub mod interest;
pub mod protocol;
pub mod registry;
pub mod response;
pub mod server;
pub mod sotw;
pub mod status;
pub mod subscription;
mod typemap;
pub mod types;

pub use cache::{Cache, CacheWriter, Resource, Snapshot, Update, View, cache};
pub use csds::{CsdsServer, ShowAll, StatusFilter};
pub use delta::DeltaStream;
pub use interest::{Interest, Wanted};
pub use protocol::{Limits, ProtocolError, Quirks};
pub use registry::Registry;
pub use response::{DeltaResponse, SotwResponse};
pub use server::{
    AdsServer, AdsService, NoObserver, Pushed, ResponseStream, ServerConfig, StreamContext,
    StreamObserver, ViewResolver,
};
pub use sotw::SotwStream;
pub use status::{Nack, Notice, Protocol, StreamStatus, SyncState, TypeStatus};
pub use subscription::Subscription;
pub use types::{NodeId, Nonce, Partition, ResourceName, TypeUrl, Version, WILDCARD};
