use envoy_types::pb::{
    envoy::service::discovery::v3::DiscoveryResponse, google::protobuf::Any,
    google::rpc::Status as RpcStatus,
};

use super::*;
use crate::cache::{CacheWriter, Update, cache};
use crate::status::Notice;

const T: &str = "type.googleapis.com/test.Thing";

struct Harness {
    writer: CacheWriter,
    cache: crate::cache::Cache,
    stream: SotwStream,
}

/// What the client decodes from a step's responses.
fn decoded(step: Step) -> Vec<DiscoveryResponse> {
    step.responses.iter().map(SotwResponse::decoded).collect()
}

impl Harness {
    fn new() -> Self {
        let (cache, writer) = cache();
        let stream = SotwStream::new(View::new(["p".into()]), "s1", Limits::default());
        Self {
            writer,
            cache,
            stream,
        }
    }

    fn put(&self, name: &str, value: &str) {
        self.writer.apply([Update::Put {
            partition: "p".into(),
            type_url: T.into(),
            name: name.into(),
            body: Any {
                type_url: T.into(),
                value: value.as_bytes().to_vec(),
            },
        }]);
    }

    fn delete(&self, name: &str) {
        self.writer.apply([Update::Delete {
            partition: "p".into(),
            type_url: T.into(),
            name: name.into(),
        }]);
    }

    fn request(&mut self, req: DiscoveryRequest) -> Vec<DiscoveryResponse> {
        let snap = self.cache.snapshot();
        decoded(self.stream.on_request(&req, &snap).unwrap())
    }

    fn changed(&mut self) -> Vec<DiscoveryResponse> {
        let snap = self.cache.snapshot();
        decoded(self.stream.on_snapshot(&snap))
    }

    fn status(&self) -> TypeStatus {
        self.stream
            .status()
            .find(|(t, _)| t.as_str() == T)
            .map(|(_, s)| s.clone())
            .unwrap()
    }
}

fn req(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: T.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn ack(resp: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    req(names, &resp.version_info, &resp.nonce)
}

/// A real client's NACK: the previously accepted version, the rejected nonce, an error.
fn nack(previous_version: &str, resp: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: "cannot parse".into(),
            details: vec![],
        }),
        ..req(names, previous_version, &resp.nonce)
    }
}

fn names(resp: &DiscoveryResponse) -> Vec<String> {
    resp.resources
        .iter()
        .map(|a| String::from_utf8(a.value.clone()).unwrap())
        .collect()
}

#[test]
fn first_request_is_answered_even_when_empty() {
    let mut h = Harness::new();
    let out = h.request(req(&["a"], "", ""));
    assert_eq!(out.len(), 1);
    assert!(out[0].resources.is_empty());
    assert!(!out[0].nonce.is_empty() && !out[0].version_info.is_empty());
}

#[test]
fn subscribe_before_publish_then_push() {
    let mut h = Harness::new();
    let r0 = h.request(req(&["a"], "", "")).remove(0);
    assert!(
        h.request(ack(&r0, &["a"])).is_empty(),
        "an ACK is not answered"
    );
    h.put("a", "A1");
    let r1 = h.changed().remove(0);
    assert_eq!(names(&r1), vec!["A1"]);
    assert_ne!(r1.nonce, r0.nonce);
    h.put("b", "B1");
    assert!(
        h.changed().is_empty(),
        "a resource not subscribed to pushes nothing"
    );
}

#[test]
fn ack_records_version_and_no_resend() {
    let mut h = Harness::new();
    h.put("a", "A1");
    let r = h.request(req(&["a"], "", "")).remove(0);
    assert!(h.request(ack(&r, &["a"])).is_empty());
    assert_eq!(h.status().acked_version.unwrap().as_str(), r.version_info);
    assert_eq!(h.status().state(), crate::status::SyncState::Synced);
    assert!(h.changed().is_empty());
}

#[test]
fn nack_is_not_answered_with_the_same_version() {
    let mut h = Harness::new();
    h.put("a", "A1");
    let r1 = h.request(req(&["a"], "", "")).remove(0);
    h.request(ack(&r1, &["a"]));
    h.put("a", "A2");
    let r2 = h.changed().remove(0);
    let out = h.request(nack(&r1.version_info, &r2, &["a"]));
    assert!(
        out.is_empty(),
        "NACK must not trigger a resend of the same version"
    );
    let st = h.status();
    let recorded = st.nack.clone().unwrap();
    assert_eq!(recorded.version.as_str(), r2.version_info);
    assert_eq!(recorded.message, "cannot parse");
    assert_eq!(st.acked_version.as_ref().unwrap().as_str(), r1.version_info);
    assert_eq!(st.state(), crate::status::SyncState::Nacked);
    // A snapshot change elsewhere does not resend either.
    h.put("zzz", "other");
    assert!(h.changed().is_empty());
    // The next real change is sent normally.
    h.put("a", "A3");
    let r3 = h.changed().remove(0);
    assert_eq!(names(&r3), vec!["A3"]);
}

#[test]
fn stale_nonce_is_not_an_ack_but_changes_subscription() {
    let mut h = Harness::new();
    h.put("a", "A1");
    h.put("b", "B1");
    let r1 = h.request(req(&["a"], "", "")).remove(0);
    h.put("a", "A2");
    let r2 = h.changed().remove(0);
    // The client, not yet having seen r2, ACKs r1 and adds "b" in the same request.
    let out = h.request(req(&["a", "b"], &r1.version_info, &r1.nonce));
    assert!(
        h.status().acked_version.is_none(),
        "a stale nonce is not an ACK"
    );
    assert_eq!(out.len(), 1, "the subscription change is still applied");
    assert_eq!(names(&out[0]), vec!["A2", "B1"]);
    assert_ne!(out[0].nonce, r2.nonce);
}

#[test]
fn removal_by_omission() {
    let mut h = Harness::new();
    h.put("a", "A1");
    h.put("b", "B1");
    let r = h.request(req(&[], "", "")).remove(0);
    assert_eq!(names(&r), vec!["A1", "B1"]);
    h.delete("a");
    let r2 = h.changed().remove(0);
    assert_eq!(names(&r2), vec!["B1"]);
}

#[test]
fn reconnect_with_current_version_is_not_resent() {
    let mut h = Harness::new();
    h.put("a", "A1");
    let r = h.request(req(&["a"], "", "")).remove(0);
    let mut other = SotwStream::new(View::new(["p".into()]), "s2", Limits::default());
    let snap = h.cache.snapshot();
    let out = other
        .on_request(&req(&["a"], &r.version_info, &r.nonce), &snap)
        .unwrap();
    assert!(
        out.responses.is_empty(),
        "client already holds this version"
    );
    // A stale client version gets the current state.
    let mut third = SotwStream::new(View::new(["p".into()]), "s3", Limits::default());
    let out = third
        .on_request(&req(&["a"], "old-version", "x"), &snap)
        .unwrap();
    assert_eq!(out.responses.len(), 1);
}

#[test]
fn unsubscribe_all_and_limits() {
    let mut h = Harness::new();
    h.put("a", "A1");
    let r = h.request(req(&["a"], "", "")).remove(0);
    let out = h.request(req(&[], &r.version_info, &r.nonce));
    assert_eq!(out.len(), 1);
    assert!(out[0].resources.is_empty());
    let mut tight = SotwStream::new(
        View::new(["p".into()]),
        "s",
        Limits {
            max_subscribed_names: 1,
            max_types: 1,
        },
    );
    let snap = h.cache.snapshot();
    assert!(matches!(
        tight.on_request(&req(&["a", "b"], "", ""), &snap),
        Err(ProtocolError::TooManySubscriptions { .. })
    ));
    let mut other_type = req(&["a"], "", "");
    tight.on_request(&other_type, &snap).unwrap();
    other_type.type_url = "t2".into();
    assert!(matches!(
        tight.on_request(&other_type, &snap),
        Err(ProtocolError::TooManyTypes { .. })
    ));
    assert_eq!(
        tight
            .on_request(&DiscoveryRequest::default(), &snap)
            .unwrap_err(),
        ProtocolError::MissingTypeUrl
    );
    let mut long_type = req(&["a"], "", "");
    long_type.type_url = "t".repeat(crate::protocol::MAX_TYPE_URL_BYTES + 1);
    assert_eq!(
        tight.on_request(&long_type, &snap).unwrap_err(),
        ProtocolError::TypeUrlTooLong {
            len: crate::protocol::MAX_TYPE_URL_BYTES + 1
        }
    );
}

#[test]
fn a_nack_keeps_a_bounded_message() {
    let mut h = Harness::new();
    h.put("a", "A1");
    let r1 = h.request(req(&["a"], "", "")).remove(0);
    let mut rejection = nack("", &r1, &["a"]);
    // Multi-byte characters across the cut.
    let message = "é".repeat(3 * crate::protocol::MAX_NACK_MESSAGE_BYTES);
    rejection.error_detail.as_mut().unwrap().message = message.clone();
    h.request(rejection);
    let kept = h.status().nack.unwrap().message;
    let max = crate::protocol::MAX_NACK_MESSAGE_BYTES;
    assert!(kept.len() < max + 32, "{} bytes kept", kept.len());
    let cut = kept.find('…').unwrap();
    assert!(message.starts_with(&kept[..cut]));
    assert!(cut > max - 2 && cut <= max);
    assert!(kept.ends_with(&format!("({} more bytes)", message.len() - cut)));
}

#[test]
fn quirks_withhold_empty_sets_and_drop_the_legacy_wildcard() {
    let mut h = Harness::new();
    h.stream =
        SotwStream::new(View::new(["p".into()]), "q1", Limits::default()).with_quirks(Quirks {
            withhold_resourceless: true,
            no_legacy_wildcard: [TypeUrl::new(T)].into(),
        });
    h.put("a", "A1");
    assert!(
        h.request(req(&[], "", "")).is_empty(),
        "an empty list subscribes to nothing, and nothing is not sent"
    );
    assert!(h.changed().is_empty());
    assert!(
        h.request(req(&["b"], "", "")).is_empty(),
        "b does not exist"
    );
    h.put("b", "B1");
    assert_eq!(names(&h.changed().remove(0)), vec!["B1"]);
    h.delete("b");
    assert!(h.changed().is_empty(), "the empty set is withheld");
    h.put("b", "B2");
    assert_eq!(names(&h.changed().remove(0)), vec!["B2"]);
}

#[test]
fn a_stream_holding_the_current_set_is_sent_nothing_until_it_changes() {
    for names_asked in [&["a", "b"][..], &[]] {
        let mut h = Harness::new();
        h.put("a", "A1");
        h.put("b", "B1");
        let r = h.request(req(names_asked, "", "")).remove(0);
        assert!(h.request(ack(&r, names_asked)).is_empty());
        // The same content written again: same versions, nothing to send.
        h.put("a", "A1");
        assert!(h.changed().is_empty(), "{names_asked:?}");
        // Deleted and written back before the stream looked: it holds the current set.
        h.delete("b");
        h.put("b", "B1");
        assert!(h.changed().is_empty(), "{names_asked:?}");
        h.put("b", "B2");
        let r2 = h.changed().remove(0);
        assert_eq!(names(&r2), vec!["A1", "B2"], "{names_asked:?}");
        h.delete("a");
        assert_eq!(names(&h.changed().remove(0)), vec!["B2"], "{names_asked:?}");
    }
}

/// A request that repeats the stream's names is answered without a snapshot: ACKs, NACKs and
/// stale nonces alike; a first request, other names or another order need the snapshot.
#[test]
fn a_repeated_request_is_handled_without_a_snapshot() {
    let mut h = Harness::new();
    h.put("a", "1");
    h.put("b", "1");
    let first = req(&["a", "b"], "", "");
    assert!(h.stream.on_repeat(&first).is_none(), "a first request");
    let sent = h.request(first);
    assert_eq!(sent.len(), 1);
    let (version, nonce) = (sent[0].version_info.clone(), sent[0].nonce.clone());

    let ack = h
        .stream
        .on_repeat(&req(&["a", "b"], &version, &nonce))
        .expect("an ACK that repeats the names");
    assert!(ack.responses.is_empty());
    assert!(matches!(&ack.notices[..], [Notice::Ack { version: v, .. }] if v.as_str() == version));
    assert_eq!(h.status().acked_version.unwrap().as_str(), version);
    let stale = h
        .stream
        .on_repeat(&req(&["a", "b"], &version, "old"))
        .unwrap();
    assert!(matches!(&stale.notices[..], [Notice::StaleNonce { .. }]));

    assert!(
        h.stream
            .on_repeat(&req(&["b", "a"], &version, &nonce))
            .is_none(),
        "another order"
    );
    assert!(
        h.stream.on_repeat(&req(&["a"], &version, &nonce)).is_none(),
        "fewer names"
    );
    let mut other_type = req(&["a", "b"], &version, &nonce);
    other_type.type_url = "type.googleapis.com/test.Other".into();
    assert!(
        h.stream.on_repeat(&other_type).is_none(),
        "a type not started"
    );
    // The same names in another order are the same subscription: nothing to send.
    assert!(h.request(req(&["b", "a"], &version, &nonce)).is_empty());
}
