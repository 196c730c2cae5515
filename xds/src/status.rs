//! Per-stream, per-type sync status: what was sent, what the client accepted or rejected.
//!
//! Plain data produced by the protocol state machines after every step, read by CSDS and by
//! whatever admin surface the embedding server offers.

use std::{collections::BTreeMap, time::SystemTime};

use crate::{
    subscription::Subscription,
    types::{Nonce, ResourceName, TypeUrl, Version},
};

/// Which protocol variant a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// State of the World: every response carries the full subscribed set.
    Sotw,
    /// Incremental: responses carry changed and removed resources only.
    Delta,
}

impl Protocol {
    /// `"sotw"` or `"delta"`, the value of the `protocol` tracing field.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Sotw => "sotw",
            Protocol::Delta => "delta",
        }
    }
}

/// A rejected response, as the client reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The version the client rejected (of the response with the NACKed nonce).
    pub version: Version,
    /// The nonce of the rejected response.
    pub nonce: Nonce,
    /// The client's `error_detail.message`.
    pub message: String,
    /// The client's `error_detail.code` (a gRPC status code).
    pub code: i32,
}

/// The sync state of one type, in `istioctl proxy-status` terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// The last response was ACKed.
    Synced,
    /// A response was sent and neither ACKed nor NACKed yet.
    Stale,
    /// The last response was NACKed.
    Nacked,
    /// Subscribed, nothing sent yet.
    NotSent,
}

impl SyncState {
    /// Upper-case label: `SYNCED`, `STALE`, `NACKED`, `NOT SENT`.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::Nacked => "NACKED",
            SyncState::NotSent => "NOT SENT",
        }
    }
}

/// What one stream knows about one type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeStatus {
    /// What the client asked for.
    pub subscription: Subscription,
    /// The version of the last response sent (SotW `version_info`, Delta
    /// `system_version_info`).
    pub sent_version: Option<Version>,
    /// The nonce of the last response sent.
    pub sent_nonce: Option<Nonce>,
    /// The last version the client ACKed.
    pub acked_version: Option<Version>,
    /// The last NACK, cleared by the next ACK.
    pub nack: Option<Nack>,
    /// The resources the client was last sent and holds, by name, with their versions.
    pub resources: BTreeMap<ResourceName, Version>,
    /// ACKs received.
    pub n_acks: u64,
    /// NACKs received.
    pub n_nacks: u64,
}

impl TypeStatus {
    /// The sync state derived from sent, ACKed and NACKed.
    pub fn state(&self) -> SyncState {
        match (&self.sent_nonce, &self.nack) {
            // A SotW client that reconnected holding exactly the current version.
            (None, _)
                if self.acked_version.is_some() && self.acked_version == self.sent_version =>
            {
                SyncState::Synced
            }
            (None, _) => SyncState::NotSent,
            (Some(nonce), Some(nack)) if &nack.nonce == nonce => SyncState::Nacked,
            (Some(_), _)
                if self.acked_version.is_some() && self.acked_version == self.sent_version =>
            {
                SyncState::Synced
            }
            (Some(_), _) => SyncState::Stale,
        }
    }
}

/// Everything known about one stream.
#[derive(Debug, Clone)]
pub struct StreamStatus {
    /// Process-unique stream number.
    pub stream_id: u64,
    /// The client's `node.id`.
    pub node_id: String,
    /// The client's `node.cluster`.
    pub node_cluster: String,
    /// The partitions this stream reads.
    pub partitions: Vec<String>,
    /// The peer address, when known.
    pub peer: Option<std::net::SocketAddr>,
    /// Protocol variant.
    pub protocol: Protocol,
    /// When the stream opened.
    pub connected_since: SystemTime,
    /// Per type.
    pub types: BTreeMap<TypeUrl, TypeStatus>,
}

/// Something the state machine noticed, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// The client accepted a response.
    Ack {
        /// The type.
        type_url: TypeUrl,
        /// The version it accepted.
        version: Version,
    },
    /// The client rejected a response.
    Nack {
        /// The type.
        type_url: TypeUrl,
        /// What it rejected and why.
        nack: Nack,
    },
    /// A request carried a nonce other than the last one sent for its type.
    StaleNonce {
        /// The type.
        type_url: TypeUrl,
        /// The nonce the request carried.
        nonce: Nonce,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_derivation() {
        let mut st = TypeStatus::default();
        assert_eq!(st.state(), SyncState::NotSent);
        st.sent_version = Some("v1".into());
        st.sent_nonce = Some("n1".into());
        assert_eq!(st.state(), SyncState::Stale);
        st.acked_version = Some("v1".into());
        assert_eq!(st.state(), SyncState::Synced);
        st.nack = Some(Nack {
            version: "v1".into(),
            nonce: "n1".into(),
            message: "bad".into(),
            code: 3,
        });
        assert_eq!(st.state(), SyncState::Nacked);
        st.sent_nonce = Some("n2".into());
        st.sent_version = Some("v2".into());
        assert_eq!(
            st.state(),
            SyncState::Stale,
            "a newer response supersedes the NACK"
        );
    }
}
