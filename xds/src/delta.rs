//! The Incremental (Delta) stream state machine.
//!
//! Synchronous and IO-free, the same shape as [`SotwStream`](crate::sotw::SotwStream):
//! [`DeltaStream::on_request`] takes one client request and the current snapshot,
//! [`DeltaStream::on_snapshot`] takes a newer snapshot; both return the responses to send and
//! notices for logs and metrics.
//!
//! Per type the stream tracks what the client holds (name and version, in
//! [`TypeStatus::resources`]); every response is the difference between that and what the
//! client should hold (the subscribed resources that exist in the snapshot), after which the
//! client is taken to hold exactly that. Rules implemented (xDS protocol document,
//! "Incremental xDS", and the comments on `DeltaDiscoveryRequest`):
//! - a request is (N)ACK *and* subscription change at once: a `response_nonce` equal to the
//!   last nonce sent for the type is an ACK, or a NACK when it carries `error_detail`, and the
//!   request's `resource_names_subscribe` / `resource_names_unsubscribe` are applied either
//!   way; any other nonce is stale, neither ACK nor NACK, and its subscription changes are
//!   still applied;
//! - a NACK is recorded, not answered: the client is still taken to hold what it rejected, so
//!   the same content is not resent, and the next change goes out normally;
//! - wildcard: an empty first subscribe list is the legacy wildcard, `*` the explicit one
//!   (see [`Subscription::apply_delta`](crate::Subscription::apply_delta));
//! - on the first request of a type, `initial_resource_versions` is what the client holds:
//!   resources held at the current version are not resent, held resources that no longer
//!   exist go out in `removed_resources`;
//! - "the server must respond with all resources listed in `resource_names_subscribe`, even
//!   if it believes the client has the most recent version of them": on later requests a
//!   subscribed name is resent if it exists (and removed if the client holds it but it is
//!   gone);
//! - a subscribed name that does not exist is not answered; it is sent when it appears, and
//!   goes out in `removed_resources` when it disappears;
//! - an unsubscribed name is forgotten without a response, unless the wildcard still covers
//!   it: then it is sent again, which tells the client to keep it (Envoy keeps such a resource
//!   "ambiguous" until the server says);
//! - a held resource that stops matching because a wildcard ended (`*` unsubscribed, or names
//!   subscribed after a legacy wildcard) goes out in `removed_resources`: the client cannot
//!   tell which of its resources it held only through the wildcard;
//! - the first wildcard request of a type is always answered, even when empty, so a client
//!   that waits for it (Envoy's LDS and CDS initialisation) is not left waiting;
//! - `system_version_info` is [`Version::of_set`] of everything the client holds after the
//!   response, so it agrees across replicas.
//!
//! A first request of a type that carries a `response_nonce` (from an earlier stream, since
//! this stream has sent nothing for the type) is neither ACK nor NACK and produces no notice,
//! even with `error_detail`: nothing says which content it refers to. Its
//! `initial_resource_versions` carries what matters. `resource_locators_*` (dynamic
//! parameters) are not implemented and ignored.

use std::{collections::HashSet, sync::Arc};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use crate::{
    cache::{Resource, Snapshot, View},
    protocol::{Limits, Nonces, ProtocolError, Quirks, read_response_nonce},
    response::DeltaResponse,
    status::TypeStatus,
    typemap::TypeMap,
    types::{Nonce, ResourceName, TypeUrl, Version, WILDCARD},
};

/// What one Delta step produced: responses to send and notices.
pub type Step = crate::protocol::Step<DeltaResponse>;

/// The per-type state of one Delta stream. A type is started once it is in the map.
#[derive(Debug, Default)]
struct TypeState {
    /// Subscription, sent/ACKed/NACKed state, and in `resources` what the client holds.
    status: TypeStatus,
    /// The snapshot generation of this type last compared with what the client holds.
    seen_generation: u64,
}

/// One Incremental (Delta) stream.
#[derive(Debug)]
pub struct DeltaStream {
    view: View,
    nonces: Nonces,
    limits: Limits,
    quirks: Quirks,
    types: TypeMap<TypeState>,
}

impl DeltaStream {
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

    /// The status of every type this stream has asked for; `resources` is what the client
    /// holds.
    pub fn status(&self) -> impl Iterator<Item = (&TypeUrl, &TypeStatus)> {
        self.types.iter().map(|(t, s)| (t, &s.status))
    }

    /// Handles one client request: (N)ACK, subscription changes, and on the first request of
    /// a type, `initial_resource_versions`.
    pub fn on_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
        snapshot: &Snapshot,
    ) -> Result<Step, ProtocolError> {
        crate::protocol::check_type_url(&request.type_url)?;
        // The stored key when the type is known: no allocation for an ACK.
        let type_url = self
            .types
            .key(&request.type_url)
            .cloned()
            .unwrap_or_else(|| TypeUrl::new(&request.type_url));
        let first = !self.types.contains_key(type_url.as_str());
        let subscribe = &request.resource_names_subscribe;
        let unsubscribe = &request.resource_names_unsubscribe;

        // The next subscription, checked against the limits before anything changes. A later
        // request that names nothing (an ACK) keeps the current one as it is.
        let next = if !first && subscribe.is_empty() && unsubscribe.is_empty() {
            None
        } else {
            let mut subscription = self
                .types
                .get(type_url.as_str())
                .map(|s| s.status.subscription.clone())
                .unwrap_or_default();
            subscription.apply_delta(
                subscribe,
                unsubscribe,
                first && self.quirks.legacy_wildcard(&type_url),
            );
            self.limits.check(
                &type_url,
                self.types.iter().map(|(t, s)| (t, &s.status.subscription)),
                subscription.names().len(),
            )?;
            Some(subscription)
        };
        if first && request.initial_resource_versions.len() > self.limits.max_subscribed_names {
            return Err(ProtocolError::TooManySubscriptions {
                limit: self.limits.max_subscribed_names,
            });
        }

        let mut step = Step::default();
        let state = self.types.get_or_default(&type_url);
        step.notices.extend(read_response_nonce(
            &mut state.status,
            &type_url,
            !first,
            &request.response_nonce,
            request.error_detail.as_ref(),
            None,
        ));

        let subscription_changed = next.is_some_and(|subscription| {
            let changed = subscription != state.status.subscription;
            state.status.subscription = subscription;
            changed
        });
        let held = &mut state.status.resources;
        // What the client (re)subscribes to is resent even if it should hold it already; it
        // stays in `held` so that, if it no longer exists, the client is told to remove it.
        let mut resend = HashSet::new();
        if first {
            *held = request
                .initial_resource_versions
                .iter()
                .map(|(name, version)| (ResourceName::new(name), Version::new(version)))
                .collect();
        } else {
            resend.extend(
                subscribe
                    .iter()
                    .filter(|n| *n != WILDCARD)
                    .map(String::as_str),
            );
        }
        // The client drops what it unsubscribes from.
        for name in unsubscribe {
            held.remove(name.as_str());
        }

        let generation = snapshot.generation(&self.view, &type_url);
        let must_compare = first
            || subscription_changed
            || !subscribe.is_empty()
            || !unsubscribe.is_empty()
            || generation != state.seen_generation;
        if must_compare {
            state.seen_generation = generation;
            let answer_empty = first && state.status.subscription.is_wildcard();
            if let Some(response) = reconcile(
                snapshot,
                &self.view,
                &type_url,
                state,
                &resend,
                answer_empty,
                &self.quirks,
                &mut self.nonces,
            ) {
                step.responses.push(response);
            }
        }
        Ok(step)
    }

    /// Handles a newer snapshot: sends, for every type whose visible content changed, what
    /// changed and what was removed.
    pub fn on_snapshot(&mut self, snapshot: &Snapshot) -> Step {
        let mut step = Step::default();
        for (type_url, state) in self.types.iter_mut() {
            let generation = snapshot.generation(&self.view, type_url);
            if generation == state.seen_generation {
                continue;
            }
            state.seen_generation = generation;
            if let Some(response) = reconcile(
                snapshot,
                &self.view,
                type_url,
                state,
                &HashSet::new(),
                false,
                &self.quirks,
                &mut self.nonces,
            ) {
                step.responses.push(response);
            }
        }
        step
    }
}

/// Compares what the client holds with what it should hold, and when they differ (or
/// `answer_empty`), builds the response that makes them equal and records it as sent.
/// Resources named in `resend` are sent even when the client holds their current version.
/// With [`Quirks::withhold_resourceless`], a response that would carry no resource is not
/// built, and the client is still counted as holding what it holds.
#[allow(clippy::too_many_arguments)]
fn reconcile(
    snapshot: &Snapshot,
    view: &View,
    type_url: &TypeUrl,
    state: &mut TypeState,
    resend: &HashSet<&str>,
    answer_empty: bool,
    quirks: &Quirks,
    nonces: &mut Nonces,
) -> Option<DeltaResponse> {
    let subscription = &state.status.subscription;
    let held = &state.status.resources;

    let removed: Vec<ResourceName> = held
        .keys()
        .filter(|name| {
            !subscription.matches(name.as_str())
                || snapshot.get(view, type_url, name.as_str()).is_none()
        })
        .cloned()
        .collect();
    let wanted = if subscription.is_wildcard() {
        snapshot.resources(view, type_url)
    } else {
        subscription
            .names()
            .iter()
            .filter_map(|name| snapshot.get(view, type_url, name.as_str()))
            .collect()
    };
    let changed: Vec<Arc<Resource>> = wanted
        .into_iter()
        .filter(|resource| {
            resend.contains(resource.name.as_str())
                || held.get(&resource.name) != Some(&resource.version)
        })
        .cloned()
        .collect();
    if changed.is_empty() && removed.is_empty() && !answer_empty {
        return None;
    }
    if changed.is_empty() && quirks.withhold_resourceless {
        return None;
    }

    let held = &mut state.status.resources;
    for name in &removed {
        held.remove(name);
    }
    for resource in &changed {
        held.insert(resource.name.clone(), resource.version.clone());
    }
    let version = Version::of_set(held.iter());
    let nonce: Nonce = nonces.next();
    state.status.sent_version = Some(version.clone());
    state.status.sent_nonce = Some(nonce.clone());
    Some(DeltaResponse {
        system_version: version,
        resources: changed,
        type_url: type_url.clone(),
        removed,
        nonce,
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
