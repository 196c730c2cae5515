//! The State-of-the-World stream state machine.
//!
//! Synchronous and IO-free: [`SotwStream::on_request`] takes one client request and the
//! current snapshot, [`SotwStream::on_snapshot`] takes a newer snapshot; both return the
//! responses to send and notices for logs and metrics. The driver in `server.rs` is the only
//! code that awaits.
//!
//! Rules implemented (xDS protocol document, "ACK and NACK semantics" and "When to send an
//! update"):
//! - a request whose `response_nonce` is the last nonce sent for its type is an ACK, or a
//!   NACK when it carries `error_detail`;
//! - a NACK is remembered and *not* answered by resending the same resources: the next
//!   response goes out only when the content changes (go-control-plane #962);
//! - a request with any other nonce is stale: neither ACK nor NACK, but its
//!   `resource_names` still replace the subscription (Envoy #10363);
//! - the first request of a type is always answered, unless it names, in `version_info`, the
//!   exact version the server would send (a client reconnecting after a restart or to another
//!   replica: versions derive from content, so they agree);
//! - a response carries every subscribed resource that exists; a resource that disappears is
//!   removed by omission.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use crate::{
    cache::{Snapshot, View},
    protocol::{Nonces, Quirks, read_response_nonce},
    response::SotwResponse,
    status::TypeStatus,
    subscription::Subscription,
    typemap::TypeMap,
    types::{Nonce, ResourceName, TypeUrl, Version},
};

pub use crate::protocol::{Limits, ProtocolError};

/// What one SotW step produced: responses to send and notices.
pub type Step = crate::protocol::Step<SotwResponse>;

/// The per-type state of one SotW stream.
#[derive(Debug, Default)]
struct TypeState {
    status: TypeStatus,
    /// The snapshot generation of this type last looked at.
    seen_generation: u64,
    /// Whether a response (or an accepted `version_info`) was recorded for this type.
    started: bool,
}

/// One State-of-the-World stream.
#[derive(Debug)]
pub struct SotwStream {
    view: View,
    nonces: Nonces,
    limits: Limits,
    quirks: Quirks,
    types: TypeMap<TypeState>,
}

impl SotwStream {
    /// A stream reading `view`; nonces start with `nonce_prefix` (e.g. the stream id), so they
    /// differ from any earlier stream's.
    pub fn new(view: View, nonce_prefix: impl Into<String>, limits: Limits) -> Self {
        Self {
            view,
            nonces: Nonces::new(nonce_prefix.into()),
            limits,
            quirks: Quirks::default(),
            types: TypeMap::default(),
        }
    }

    /// The same stream, deviating from the protocol's rules as `quirks` says.
    #[must_use]
    pub fn with_quirks(mut self, quirks: Quirks) -> Self {
        self.quirks = quirks;
        self
    }

    /// The view this stream reads.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// The status of every type this stream has asked for.
    pub fn status(&self) -> impl Iterator<Item = (&TypeUrl, &TypeStatus)> {
        self.types.iter().map(|(t, s)| (t, &s.status))
    }

    /// Handles a request that needs no look at the cache, or returns `None`: a later request
    /// of a type this stream has started that repeats its names in order (an ACK, a NACK, or
    /// a stale nonce) changes no subscription, so it sends nothing and reads no snapshot. Any
    /// other request goes to [`on_request`](Self::on_request), which gives the same answer
    /// for these (it starts here).
    pub fn on_repeat(&mut self, request: &DiscoveryRequest) -> Option<Step> {
        let (type_url, state) = self.types.entry_mut(&request.type_url)?;
        if !state.started
            || !state
                .status
                .subscription
                .sotw_repeats(&request.resource_names)
        {
            return None;
        }
        // No limit to check: the subscription is the one they accepted, and every change to
        // another type's since was checked with this one counted.
        let mut step = Step::default();
        step.notices.extend(read_response_nonce(
            &mut state.status,
            type_url,
            state.started,
            &request.response_nonce,
            request.error_detail.as_ref(),
            Some(&request.version_info),
        ));
        Some(step)
    }

    /// Handles one client request.
    pub fn on_request(
        &mut self,
        request: &DiscoveryRequest,
        snapshot: &Snapshot,
    ) -> Result<Step, ProtocolError> {
        if let Some(step) = self.on_repeat(request) {
            return Ok(step);
        }
        crate::protocol::check_type_url(&request.type_url)?;
        // The stored key when the type is known: no allocation for an ACK.
        let type_url = self
            .types
            .key(&request.type_url)
            .cloned()
            .unwrap_or_else(|| TypeUrl::new(&request.type_url));
        self.limits.check(
            &type_url,
            self.types.iter().map(|(t, s)| (t, &s.status.subscription)),
            request.resource_names.len(),
        )?;

        let mut step = Step::default();
        let first = !self.types.contains_key(type_url.as_str());
        let state = self.types.get_or_default(&type_url);
        step.notices.extend(read_response_nonce(
            &mut state.status,
            &type_url,
            state.started,
            &request.response_nonce,
            request.error_detail.as_ref(),
            Some(&request.version_info),
        ));

        let subscription = if request.resource_names.is_empty()
            && first
            && !self.quirks.legacy_wildcard(&type_url)
        {
            Subscription::default()
        } else {
            state
                .status
                .subscription
                .sotw_next(&request.resource_names, first)
        };
        let subscription_changed = subscription != state.status.subscription;
        state.status.subscription = subscription;

        if !state.started {
            // First request of this type on this stream (whatever nonce it carries from an
            // earlier stream): answer it, unless the client already holds exactly this.
            let (version, resources) = compute(snapshot, &self.view, &type_url, state);
            state.seen_generation = snapshot.generation(&self.view, &type_url);
            state.started = true;
            if !request.version_info.is_empty() && request.version_info == version.as_str() {
                state.status.sent_version = Some(version.clone());
                state.status.acked_version = Some(version);
                state.status.resources = resources;
            } else if !(resources.is_empty() && self.quirks.withhold_resourceless) {
                let nonce = self.nonces.next();
                step.responses.push(respond(
                    snapshot, &self.view, &type_url, state, version, resources, nonce,
                ));
            }
        } else if subscription_changed {
            let nonces = &mut self.nonces;
            if let Some(response) =
                refresh(snapshot, &self.view, &type_url, state, &self.quirks, || {
                    nonces.next()
                })
            {
                step.responses.push(response);
            }
        }
        Ok(step)
    }

    /// Handles a newer snapshot: sends every subscribed type whose visible content changed.
    pub fn on_snapshot(&mut self, snapshot: &Snapshot) -> Step {
        let mut step = Step::default();
        for (type_url, state) in self.types.iter_mut() {
            if !state.started {
                continue;
            }
            let generation = snapshot.generation(&self.view, type_url);
            if generation == state.seen_generation {
                continue;
            }
            state.seen_generation = generation;
            let nonces = &mut self.nonces;
            if let Some(response) =
                refresh(snapshot, &self.view, type_url, state, &self.quirks, || {
                    nonces.next()
                })
            {
                step.responses.push(response);
            }
        }
        step
    }
}

/// The resources this stream should hold for `type_url` and their SotW version.
fn compute(
    snapshot: &Snapshot,
    view: &View,
    type_url: &TypeUrl,
    state: &TypeState,
) -> (Version, BTreeMap<ResourceName, Version>) {
    let sub = &state.status.subscription;
    let resources: BTreeMap<ResourceName, Version> = if sub.is_wildcard() {
        snapshot
            .resources(view, type_url)
            .into_iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    } else {
        sub.names()
            .iter()
            .filter_map(|name| snapshot.get(view, type_url, name.as_str()))
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    };
    (Version::of_set(resources.iter()), resources)
}

/// Whether the resources this stream should hold for `type_url` are, name for name and
/// version for version, the ones it was last sent: the same test as comparing their SotW
/// version with the sent one, without building the set or hashing it. A change elsewhere in
/// the type (another application's record, in a namespace of many) wakes every stream of
/// the type, and most of them end here.
fn holds_current(snapshot: &Snapshot, view: &View, type_url: &TypeUrl, state: &TypeState) -> bool {
    if state.status.sent_version.is_none() {
        return false;
    }
    let sub = &state.status.subscription;
    let sent = state.status.resources.iter();
    let same = |r: &std::sync::Arc<crate::cache::Resource>,
                (name, version): (&ResourceName, &Version)| {
        r.name == *name && r.version == *version
    };
    // Both sides are ordered by name: the subscription's names and the snapshot's resources
    // as the sent map is.
    if sub.is_wildcard() {
        let current = snapshot.resources(view, type_url);
        current.len() == state.status.resources.len()
            && current.into_iter().zip(sent).all(|(r, s)| same(r, s))
    } else {
        let mut current = sub
            .names()
            .iter()
            .filter_map(|name| snapshot.get(view, type_url, name.as_str()));
        let mut sent = sent;
        loop {
            match (current.next(), sent.next()) {
                (None, None) => return true,
                (Some(r), Some(s)) if same(r, s) => {}
                _ => return false,
            }
        }
    }
}

/// Sends the current state if it differs from what the client was last sent.
///
/// Comparing with the last *sent* state (not the ACKed one) is what keeps a NACKed version
/// from being resent: only a change in content produces a new response. With
/// [`Quirks::withhold_resourceless`] an empty set is not sent.
fn refresh(
    snapshot: &Snapshot,
    view: &View,
    type_url: &TypeUrl,
    state: &mut TypeState,
    quirks: &Quirks,
    nonce: impl FnOnce() -> Nonce,
) -> Option<SotwResponse> {
    if holds_current(snapshot, view, type_url, state) {
        return None;
    }
    let (version, resources) = compute(snapshot, view, type_url, state);
    if state.status.sent_version.as_ref() == Some(&version) {
        return None;
    }
    if resources.is_empty() && quirks.withhold_resourceless {
        return None;
    }
    Some(respond(
        snapshot,
        view,
        type_url,
        state,
        version,
        resources,
        nonce(),
    ))
}

fn respond(
    snapshot: &Snapshot,
    view: &View,
    type_url: &TypeUrl,
    state: &mut TypeState,
    version: Version,
    resources: BTreeMap<ResourceName, Version>,
    nonce: Nonce,
) -> SotwResponse {
    let bodies = resources
        .keys()
        .filter_map(|name| snapshot.get(view, type_url, name.as_str()))
        .cloned()
        .collect();
    state.status.sent_version = Some(version.clone());
    state.status.sent_nonce = Some(nonce.clone());
    state.status.resources = resources;
    SotwResponse {
        version,
        resources: bodies,
        type_url: type_url.clone(),
        nonce,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
