//! The Incremental (Delta) state machine (`xds/src/delta.rs`) under arbitrary interleavings
//! of subscribes, unsubscribes, wildcard, `initial_resource_versions`, ACK, NACK, stale and
//! foreign nonces, and cache writes in its own and another partition.
//!
//! Checks: no panic; nonces never repeat; a resource sent is in the stream's view of the
//! snapshot it was computed from, at that version; a name is never both sent and removed in
//! one response.
#![no_main]

mod common;

use std::collections::{HashMap, HashSet};

use arbitrary::Arbitrary;
use common::{NonceChoice, Write};
use envoy_types::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse},
    google::rpc::Status as RpcStatus,
};
use libfuzzer_sys::fuzz_target;
use pixiu_xds::{DeltaStream, ProtocolError, TypeUrl};

#[derive(Debug, Arbitrary)]
enum Op {
    Write(Write),
    Request {
        type_idx: u8,
        subscribe: Vec<u8>,
        unsubscribe: Vec<u8>,
        initial: Vec<(u8, Vec<u8>)>,
        nonce: NonceChoice,
        nack: bool,
    },
    Notify,
}

fuzz_target!(|ops: Vec<Op>| {
    let (cache, writer) = pixiu_xds::cache();
    let mut stream = DeltaStream::new(common::view(), "f", common::limits());
    let mut sent: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut last: HashMap<String, String> = HashMap::new();
    for op in ops.iter().take(256) {
        let snapshot = cache.snapshot();
        let step = match op {
            Op::Write(write) => {
                write.apply(&writer);
                continue;
            }
            Op::Notify => stream.on_snapshot(&snapshot),
            Op::Request {
                type_idx,
                subscribe,
                unsubscribe,
                initial,
                nonce,
                nack,
            } => {
                let type_url = common::type_url(*type_idx);
                let names = |list: &Vec<u8>| -> Vec<String> {
                    list.iter()
                        .take(10)
                        .map(|i| common::name(*i).to_string())
                        .collect()
                };
                let request = DeltaDiscoveryRequest {
                    type_url: type_url.to_string(),
                    resource_names_subscribe: names(subscribe),
                    resource_names_unsubscribe: names(unsubscribe),
                    initial_resource_versions: initial
                        .iter()
                        .take(10)
                        .map(|(n, v)| {
                            (
                                common::name(*n).to_string(),
                                String::from_utf8_lossy(v).into_owned(),
                            )
                        })
                        .collect(),
                    response_nonce: nonce.pick(last.get(type_url), &sent),
                    error_detail: nack.then(|| RpcStatus {
                        code: 3,
                        message: "rejected".into(),
                        details: vec![],
                    }),
                    ..Default::default()
                };
                match stream.on_request(&request, &snapshot) {
                    Ok(step) => step,
                    Err(ProtocolError::MissingTypeUrl) => unreachable!("every request has a type"),
                    Err(ProtocolError::TypeUrlTooLong { .. }) => {
                        unreachable!("the type URLs used here are short")
                    }
                    Err(
                        ProtocolError::TooManySubscriptions { .. }
                        | ProtocolError::TooManyTypes { .. },
                    ) => {
                        return;
                    }
                }
            }
        };
        for response in &step.responses {
            let response: DeltaDiscoveryResponse = common::decoded(response);
            assert!(seen.insert(response.nonce.clone()), "nonce repeated");
            sent.push(response.nonce.clone());
            last.insert(response.type_url.clone(), response.nonce.clone());
            let type_url = TypeUrl::new(&response.type_url);
            for resource in &response.resources {
                let current = snapshot.get(&common::view(), &type_url, &resource.name);
                let current = current.expect("sent a resource outside the view");
                assert_eq!(resource.version, current.version.to_string());
                let body = resource.resource.as_ref().expect("a body");
                assert!(!common::is_theirs(&body.value), "leaked another partition");
                assert!(!response.removed_resources.contains(&resource.name));
            }
        }
    }
});
