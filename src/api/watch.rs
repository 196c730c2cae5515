//! The `Watch` methods: requests into [`Selector`]s, [`Diff`]s into response messages.

use std::collections::BTreeMap;

use prost::Message;
use tonic::Request;
use tracing::warn;

use super::{Api, Error};
use crate::security::Operation;
use crate::{
    model::{self, Kind},
    pb::metadata as proto,
    push,
    watches::{Diff, Names, Selector, WatchState, WatchStream},
};

/// Most entries of a metadata watch's `known_versions` (`RESOURCE_EXHAUSTED` beyond).
const MAX_KNOWN_VERSIONS: usize = 100_000;

fn hub(api: &Api) -> Result<&crate::watches::WatchHub, Error> {
    api.watch
        .as_ref()
        .ok_or(Error::Unsupported { what: "watch" })
}

/// The body of a resource the push layer wrote, decoded; `None` (and a log line) if it does
/// not decode, which would be a bug of ours, never a reason to panic.
fn decode<M: Message + Default>(resource: &pixiu_xds::Resource) -> Option<M> {
    match M::decode(resource.value()) {
        Ok(message) => Some(message),
        Err(error) => {
            warn!(%error, resource.name = %resource.name, "cached resource does not decode");
            None
        }
    }
}

pub(super) fn metadata(
    api: &Api,
    request: Request<proto::WatchMetadataRequest>,
) -> Result<WatchStream<proto::WatchMetadataResponse>, Error> {
    let namespace = api.namespace(&request, Operation::Subscribe)?;
    let request = request.into_inner();
    model::check_application(&request.application_name)?;
    let prefix = format!("{}/", request.application_name);
    let names = if request.revision.is_empty() {
        Names::Prefix(prefix.clone())
    } else {
        model::check_name("revision", &request.revision)?;
        Names::Exact(format!("{prefix}{}", request.revision))
    };
    if request.known_versions.len() > MAX_KNOWN_VERSIONS {
        return Err(Error::Invalid(model::Invalid::ValueTooLarge {
            field: "known_versions",
            len: request.known_versions.len(),
            limit: MAX_KNOWN_VERSIONS,
        }));
    }
    let mut known = BTreeMap::new();
    for (revision, version) in request.known_versions {
        model::check_name("known_versions key", &revision)?;
        model::check_name("known_versions value", &version)?;
        known.insert(format!("{prefix}{revision}"), version);
    }
    let selector = Selector {
        namespace,
        type_url: push::type_url(Kind::Metadata),
        names,
    };
    hub(api)?.spawn(selector, WatchState::resume(known), move |diff: Diff| {
        let strip = |name: &str| name.strip_prefix(&prefix).unwrap_or(name).to_string();
        proto::WatchMetadataResponse {
            updated: diff
                .updated
                .iter()
                .filter_map(|resource| {
                    let metadata: proto::Metadata = decode(resource)?;
                    Some(proto::WatchedMetadata {
                        revision: metadata.revision,
                        metadata_info: metadata.metadata_info,
                        version: resource.version.to_string(),
                    })
                })
                .collect(),
            removed: diff.removed.iter().map(|name| strip(name)).collect(),
            initial: diff.initial,
            empty: diff.empty,
        }
    })
}

/// A single-resource diff as `(state, present resource, version)`.
fn single(diff: &Diff) -> (proto::WatchState, Option<&pixiu_xds::Resource>, String) {
    let version = diff.versions.values().next().cloned().unwrap_or_default();
    match diff.updated.first() {
        Some(resource) => (proto::WatchState::Present, Some(resource), version),
        None if diff.empty => (proto::WatchState::Absent, None, String::new()),
        None => (proto::WatchState::Unchanged, None, version),
    }
}

fn known_single(name: &str, known_version: String) -> Result<WatchState, Error> {
    let mut known = BTreeMap::new();
    if !known_version.is_empty() {
        model::check_name("known_version", &known_version)?;
        known.insert(name.to_string(), known_version);
    }
    Ok(WatchState::resume(known))
}

pub(super) fn definition(
    api: &Api,
    request: Request<proto::WatchServiceDefinitionRequest>,
) -> Result<WatchStream<proto::WatchServiceDefinitionResponse>, Error> {
    let namespace = api.namespace(&request, Operation::Subscribe)?;
    let request = request.into_inner();
    model::check_name("identifier", &request.identifier)?;
    let state = known_single(&request.identifier, request.known_version)?;
    let selector = Selector {
        namespace,
        type_url: push::type_url(Kind::Definition),
        names: Names::Exact(request.identifier),
    };
    hub(api)?.spawn(selector, state, |diff: Diff| {
        let (state, resource, version) = single(&diff);
        let definition = resource
            .and_then(decode::<proto::ServiceDefinition>)
            .map(|d| d.service_definition)
            .unwrap_or_default();
        proto::WatchServiceDefinitionResponse {
            state: state.into(),
            service_definition: definition,
            version,
            initial: diff.initial,
        }
    })
}

pub(super) fn mapping(
    api: &Api,
    request: Request<proto::WatchServiceMappingRequest>,
) -> Result<WatchStream<proto::WatchServiceMappingResponse>, Error> {
    let namespace = api.namespace(&request, Operation::Subscribe)?;
    let request = request.into_inner();
    model::check_interface(&request.interface)?;
    let state = known_single(&request.interface, request.known_version)?;
    let selector = Selector {
        namespace,
        type_url: push::type_url(Kind::Mapping),
        names: Names::Exact(request.interface),
    };
    hub(api)?.spawn(selector, state, |diff: Diff| {
        let (state, resource, version) = single(&diff);
        let application_names = resource
            .and_then(decode::<proto::ServiceMapping>)
            .map(|m| m.application_names)
            .unwrap_or_default();
        proto::WatchServiceMappingResponse {
            state: state.into(),
            application_names,
            version,
            initial: diff.initial,
        }
    })
}
