//! What the State-of-the-World and Delta state machines share: limits, protocol errors, the
//! output of one step, nonces, and the reading of a request's `response_nonce` as ACK, NACK
//! or stale.
//!
//! Nothing here knows which variant it serves; [`sotw`](crate::sotw) and
//! [`delta`](crate::delta) decide what to send.

use std::collections::BTreeSet;

use envoy_types::pb::google::rpc::Status as RpcStatus;
use smallvec::SmallVec;

use crate::{
    status::{Nack, Notice, TypeStatus},
    subscription::Subscription,
    types::{Nonce, TypeUrl, Version},
};

/// A request the protocol does not allow; the stream ends with `INVALID_ARGUMENT`.
///
/// Retrying the same request does not help: the client has to ask for less or fix the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// ADS requires every request to name its type.
    #[error("request has no type_url")]
    MissingTypeUrl,
    /// A type URL longer than any real one ([`MAX_TYPE_URL_BYTES`]): it would be kept per
    /// stream and shown in status and metrics.
    #[error("type_url is {len} bytes, more than the {MAX_TYPE_URL_BYTES} allowed")]
    TypeUrlTooLong {
        /// Its length.
        len: usize,
    },
    /// A request would take the stream past its configured subscription limit.
    #[error("stream subscribes to more than {limit} resource names")]
    TooManySubscriptions {
        /// The configured limit.
        limit: usize,
    },
    /// A request would take the stream past its configured type limit.
    #[error("stream subscribes to more than {limit} types")]
    TooManyTypes {
        /// The configured limit.
        limit: usize,
    },
}

/// The longest type URL a request may name. Real ones are under 150 bytes
/// (`type.googleapis.com/` and a fully qualified message name).
pub const MAX_TYPE_URL_BYTES: usize = 512;

/// The longest `node.id` and `node.cluster` a stream may present: they are kept for the
/// stream's life and matched by every CSDS request. Real ones are under 200 bytes.
pub const MAX_NODE_FIELD_BYTES: usize = 2048;

/// The most of a NACK's `error_detail.message` kept for status and logs; the rest is cut,
/// so a client cannot make the server hold megabytes per type and stream.
pub const MAX_NACK_MESSAGE_BYTES: usize = 4096;

/// Checks a request's type URL: present, and no longer than [`MAX_TYPE_URL_BYTES`].
pub(crate) fn check_type_url(type_url: &str) -> Result<(), ProtocolError> {
    match type_url.len() {
        0 => Err(ProtocolError::MissingTypeUrl),
        len if len > MAX_TYPE_URL_BYTES => Err(ProtocolError::TypeUrlTooLong { len }),
        _ => Ok(()),
    }
}

/// `message` cut to at most [`MAX_NACK_MESSAGE_BYTES`] on a character boundary, saying how
/// much was cut.
fn bounded_message(message: &str) -> String {
    if message.len() <= MAX_NACK_MESSAGE_BYTES {
        return message.to_string();
    }
    let mut end = MAX_NACK_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &message[..end], message.len() - end)
}

/// Limits a stream enforces on what a client may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most resource names subscribed across all types (default 100,000). A Delta client's
    /// `initial_resource_versions` for one type counts against it too.
    pub max_subscribed_names: usize,
    /// Most types subscribed (default 64).
    pub max_types: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_subscribed_names: 100_000,
            max_types: 64,
        }
    }
}

impl Limits {
    /// Checks that subscribing `type_url` to `n_names` names keeps the stream within limits,
    /// given the current subscriptions of every type (`type_url`'s own is replaced).
    pub(crate) fn check<'a>(
        &self,
        type_url: &TypeUrl,
        subscriptions: impl Iterator<Item = (&'a TypeUrl, &'a Subscription)>,
        n_names: usize,
    ) -> Result<(), ProtocolError> {
        let mut n_types = 0;
        let mut known_type = false;
        let mut n_other_names = 0;
        for (other_type, subscription) in subscriptions {
            n_types += 1;
            if other_type == type_url {
                known_type = true;
            } else {
                n_other_names += subscription.names().len();
            }
        }
        if !known_type && n_types >= self.max_types {
            return Err(ProtocolError::TooManyTypes {
                limit: self.max_types,
            });
        }
        if n_other_names + n_names > self.max_subscribed_names {
            return Err(ProtocolError::TooManySubscriptions {
                limit: self.max_subscribed_names,
            });
        }
        Ok(())
    }
}

/// Deviations from the protocol's general rules for one stream, for clients known to break on
/// them. The default is none: every rule as the xDS protocol document states it.
///
/// The embedding server chooses them per stream from the client's node
/// ([`ViewResolver::quirks`](crate::ViewResolver::quirks)), so one client's needs never
/// change what another client sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quirks {
    /// Never send a response that carries no resource (default false).
    ///
    /// Delta withholds a response that would only remove resources, or be empty: the
    /// stream goes on counting them as held, so the next change of content is sent as usual.
    /// SotW withholds an empty set. For clients that apply every response as their complete
    /// state, so that "nothing" would wipe them.
    pub withhold_resourceless: bool,
    /// Types whose first request naming no resource subscribes to nothing, rather than to
    /// the legacy wildcard (default none). For clients that send an empty list when they
    /// want nothing and fail on what they did not name.
    pub no_legacy_wildcard: BTreeSet<TypeUrl>,
}

impl Quirks {
    /// Whether an empty first request of `type_url` is the legacy wildcard.
    pub fn legacy_wildcard(&self, type_url: &TypeUrl) -> bool {
        !self.no_legacy_wildcard.contains(type_url)
    }
}

/// What one step of a state machine produced. A step of a stream's one type (the ACK of a
/// response, the push of a change) has one response or one notice: those are held inline,
/// so the step of every stream woken by a change allocates no vector.
#[derive(Debug)]
pub struct Step<R> {
    /// Responses to send, in order.
    pub responses: SmallVec<[R; 1]>,
    /// ACKs, NACKs and stale nonces seen.
    pub notices: SmallVec<[Notice; 1]>,
}

impl<R> Default for Step<R> {
    fn default() -> Self {
        Self {
            responses: SmallVec::new(),
            notices: SmallVec::new(),
        }
    }
}

/// The nonces of one stream: `<prefix>-1`, `<prefix>-2`, ...
///
/// The prefix (the stream id) keeps them apart from any earlier stream's, so a nonce a client
/// carries over from another stream never matches.
#[derive(Debug)]
pub(crate) struct Nonces {
    prefix: String,
    n_issued: u64,
}

impl Nonces {
    pub(crate) fn new(prefix: String) -> Self {
        Self {
            prefix,
            n_issued: 0,
        }
    }

    pub(crate) fn next(&mut self) -> Nonce {
        self.n_issued += 1;
        // Written on the stack, then one allocation for the nonce itself: a push to 10,000
        // streams makes 10,000 of them.
        let mut digits = itoa::Buffer::new();
        let n = digits.format(self.n_issued);
        let mut nonce = SmallVec::<[u8; 64]>::new();
        nonce.extend_from_slice(self.prefix.as_bytes());
        nonce.push(b'-');
        nonce.extend_from_slice(n.as_bytes());
        Nonce::new(std::str::from_utf8(&nonce).expect("a string, a dash and digits"))
    }
}

/// Reads a request's `response_nonce` against what was last sent for its type, recording an
/// ACK or NACK in `status`.
///
/// - The last nonce sent for the type: an ACK, or a NACK when `error_detail` is set. A NACK
///   names the version of the rejected response; an ACK records `acked_version` when the
///   protocol carries one (SotW `version_info`), else the version of the ACKed response.
/// - Any other non-empty nonce on a started type is stale: neither ACK nor NACK, reported
///   only as a notice. Status is left untouched.
/// - An empty nonce, or any nonce on the first request of a type (it can only come from an
///   earlier stream), means nothing.
pub(crate) fn read_response_nonce(
    status: &mut TypeStatus,
    type_url: &TypeUrl,
    started: bool,
    nonce: &str,
    error_detail: Option<&RpcStatus>,
    acked_version: Option<&str>,
) -> Option<Notice> {
    if nonce.is_empty() {
        return None;
    }
    let is_current = status
        .sent_nonce
        .as_ref()
        .is_some_and(|sent| sent.as_str() == nonce);
    if !is_current {
        return started.then(|| Notice::StaleNonce {
            type_url: type_url.clone(),
            nonce: Nonce::new(nonce),
        });
    }
    let sent_version = status
        .sent_version
        .clone()
        .expect("a sent nonce always has a sent version");
    match error_detail {
        Some(error) => {
            let nack = Nack {
                version: sent_version,
                nonce: Nonce::new(nonce),
                message: bounded_message(&error.message),
                code: error.code,
            };
            status.n_nacks += 1;
            status.nack = Some(nack.clone());
            Some(Notice::Nack {
                type_url: type_url.clone(),
                nack,
            })
        }
        None => {
            // The sent version's shared string when the client names it, as it does.
            let version = match acked_version {
                Some(acked) if acked != sent_version.as_str() => Version::new(acked),
                _ => sent_version,
            };
            status.n_acks += 1;
            status.acked_version = Some(version.clone());
            status.nack = None;
            Some(Notice::Ack {
                type_url: type_url.clone(),
                version,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_the_prefix_a_dash_and_a_count_from_one() {
        let mut nonces = Nonces::new("3f".into());
        let issued: Vec<Nonce> = (0..12).map(|_| nonces.next()).collect();
        assert_eq!(issued[0].as_str(), "3f-1");
        assert_eq!(issued[11].as_str(), "3f-12");
        let mut nonces = Nonces::new("ffffffffffffffff".into());
        nonces.n_issued = u64::MAX - 1;
        assert_eq!(
            nonces.next().as_str(),
            "ffffffffffffffff-18446744073709551615"
        );
    }
}
