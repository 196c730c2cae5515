//! The State-of-the-World state machine (`xds/src/sotw.rs`) under arbitrary interleavings of
//! requests (names, wildcard, ACK, NACK, stale and foreign nonces, error details) and cache
//! writes in its own and another partition.
//!
//! Checks: no panic; nonces never repeat; every resource sent is in the stream's view at the
//! version of the snapshot it was computed from; the machine refuses only what the limits or
//! the protocol forbid.
#![no_main]

mod common;

use std::collections::{HashMap, HashSet};

use arbitrary::Arbitrary;
use common::{NonceChoice, Write};
use envoy_types::pb::{
    envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse},
    google::rpc::Status as RpcStatus,
};
use libfuzzer_sys::fuzz_target;
use pixiu_xds::{ProtocolError, SotwStream};

#[derive(Debug, Arbitrary)]
enum Op {
    Write(Write),
    Request {
        type_idx: u8,
        names: Vec<u8>,
        nonce: NonceChoice,
        nack: bool,
        empty_type: bool,
    },
    Notify,
}

fuzz_target!(|ops: Vec<Op>| {
    let (cache, writer) = pixiu_xds::cache();
    let mut stream = SotwStream::new(common::view(), "f", common::limits());
    let mut sent: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, (String, String)> = HashMap::new();
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
                names,
                nonce,
                nack,
                empty_type,
            } => {
                let type_url = if *empty_type {
                    ""
                } else {
                    common::type_url(*type_idx)
                };
                let names: Vec<String> = names
                    .iter()
                    .take(10)
                    .map(|i| common::name(*i).to_string())
                    .collect();
                let previous = last.get(type_url);
                let request = DiscoveryRequest {
                    type_url: type_url.to_string(),
                    resource_names: names,
                    version_info: previous.map(|p| p.0.clone()).unwrap_or_default(),
                    response_nonce: nonce.pick(previous.map(|p| &p.1), &sent),
                    error_detail: nack.then(|| RpcStatus {
                        code: 3,
                        message: "rejected".into(),
                        details: vec![],
                    }),
                    ..Default::default()
                };
                match stream.on_request(&request, &snapshot) {
                    Ok(step) => step,
                    Err(ProtocolError::MissingTypeUrl) => {
                        assert!(type_url.is_empty());
                        return;
                    }
                    Err(ProtocolError::TypeUrlTooLong { .. }) => {
                        unreachable!("the type URLs used here are short")
                    }
                    // The stream ends here, as the server ends it.
                    Err(
                        ProtocolError::TooManySubscriptions { .. }
                        | ProtocolError::TooManyTypes { .. },
                    ) => return,
                }
            }
        };
        for response in &step.responses {
            let response: DiscoveryResponse = common::decoded(response);
            assert!(seen.insert(response.nonce.clone()), "nonce repeated");
            sent.push(response.nonce.clone());
            let bodies = common::visible_bodies(&snapshot, &response.type_url);
            assert!(response.resources.len() <= bodies.len());
            for any in &response.resources {
                assert!(!common::is_theirs(&any.value), "leaked another partition");
                assert!(
                    bodies.contains(&any.value),
                    "sent something not in the view"
                );
                assert_eq!(any.type_url, response.type_url);
            }
            last.insert(
                common::TYPES
                    .iter()
                    .find(|t| **t == response.type_url)
                    .copied()
                    .unwrap_or(""),
                (response.version_info.clone(), response.nonce.clone()),
            );
        }
    }
});
