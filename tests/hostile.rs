//! Hostile input: one test per row of the table in docs/security.md. Each starts the real
//! server with a bystander client (an ADS stream and unary calls on their own connection),
//! does the hostile thing, checks the documented outcome, and then checks that the
//! bystander is still served: a publish reaches its stream and a Get answers.

mod common;

use std::{future::Future, net::SocketAddr, time::Duration};

use bytes::{Buf, BufMut};
use common::TestServer;
use envoy_types::pb::{
    envoy::service::{
        discovery::v3::{
            DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
        status::v3::{
            ClientStatusRequest,
            client_status_discovery_service_client::ClientStatusDiscoveryServiceClient,
        },
    },
    google::protobuf::{Any, ListValue, Struct, Value, value::Kind},
};
use pixiu_metadata::{
    config::{Backend, Config},
    pb::{
        self,
        metadata::{
            GetMetadataRequest, ListMetadataRequest, PublishMetadataRequest,
            PublishServiceDefinitionRequest,
        },
    },
};
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status, Streaming,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

// === harness ===

/// The bystander: its own connection, an ADS stream in namespace `bystander`.
struct Bystander {
    channel: Channel,
    _tx: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
    n_checks: usize,
}

impl Bystander {
    async fn start(server: &TestServer) -> Self {
        let channel = server.channel().await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(DiscoveryRequest {
            node: Some(common::node("bystander", Some("bystander"))),
            type_url: pb::METADATA_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut responses = AggregatedDiscoveryServiceClient::new(channel.clone())
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        recv(&mut responses).await;
        Self {
            channel,
            _tx: tx,
            responses,
            n_checks: 0,
        }
    }

    /// A publish in the bystander's namespace reaches its stream, and a Get answers.
    async fn check(&mut self) {
        self.n_checks += 1;
        let revision = format!("r{}", self.n_checks);
        common::metadata_client(self.channel.clone())
            .publish(common::with_namespace(
                PublishMetadataRequest {
                    application_name: "bystander".into(),
                    revision: revision.clone(),
                    metadata_info: "still here".into(),
                },
                "bystander",
            ))
            .await
            .expect("the bystander's publish is served");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let response = tokio::time::timeout_at(deadline, self.responses.message())
                .await
                .expect("the bystander's push within 10 s")
                .expect("the bystander's stream is healthy")
                .expect("the bystander's stream is open");
            let names: Vec<String> = response
                .resources
                .iter()
                .map(|any| {
                    pb::metadata::Metadata::decode(any.value.as_slice())
                        .unwrap()
                        .revision
                })
                .collect();
            if names.contains(&revision) {
                break;
            }
        }
        let got = common::metadata_client(self.channel.clone())
            .get(common::with_namespace(
                GetMetadataRequest {
                    application_name: "bystander".into(),
                    revision,
                },
                "bystander",
            ))
            .await
            .expect("the bystander's get is served");
        assert_eq!(got.into_inner().metadata_info, "still here");
    }
}

async fn recv(responses: &mut Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a response within 10 s")
        .expect("stream healthy")
        .expect("stream open")
}

fn memory_config() -> Config {
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config
}

/// Runs one hostile case with a bystander before and after it.
async fn case<F, Fut>(config: Config, hostile: F)
where
    F: FnOnce(SocketAddr, Channel) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = TestServer::start(config).await;
    let mut bystander = Bystander::start(&server).await;
    bystander.check().await;
    let attacker = server.channel().await;
    hostile(server.addr, attacker).await;
    bystander.check().await;
    server.stop().await;
}

/// Sends raw bytes as the protobuf message of a unary method.
async fn raw_unary(channel: Channel, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

const PUBLISH: &str = "/pixiu.pkg.metadata.MetadataService/Publish";

#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// A length-delimited protobuf field.
fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// A Publish body: application 1, revision 2, metadata_info 3 (the seed's numbers).
fn publish_body(application: &[u8], revision: &[u8], info: &[u8]) -> Vec<u8> {
    [field(1, application), field(2, revision), field(3, info)].concat()
}

async fn publish(
    channel: &Channel,
    application: &str,
    revision: &str,
    info: &str,
) -> Result<(), Code> {
    common::metadata_client(channel.clone())
        .publish(PublishMetadataRequest {
            application_name: application.into(),
            revision: revision.into(),
            metadata_info: info.into(),
        })
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

async fn get(channel: &Channel, application: &str, revision: &str) -> Result<String, Code> {
    common::metadata_client(channel.clone())
        .get(GetMetadataRequest {
            application_name: application.into(),
            revision: revision.into(),
        })
        .await
        .map(|r| r.into_inner().metadata_info)
        .map_err(|s| s.code())
}

/// Opens a SotW stream with `first` and returns its first answer.
async fn sotw_first(
    channel: &Channel,
    first: DiscoveryRequest,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    Option<Streaming<DiscoveryResponse>>,
    Result<DiscoveryResponse, Code>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let opened = AggregatedDiscoveryServiceClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await;
    let mut responses = match opened {
        Ok(response) => response.into_inner(),
        // Refused before the stream opened.
        Err(status) => return (tx, None, Err(status.code())),
    };
    let first = tokio::time::timeout(Duration::from_secs(20), responses.message())
        .await
        .expect("an answer within 20 s");
    let first = match first {
        Ok(Some(response)) => Ok(response),
        Ok(None) => Err(Code::Ok),
        Err(status) => Err(status.code()),
    };
    (tx, Some(responses), first)
}

fn metadata_request(names: Vec<String>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(common::node("attacker", Some("attacker"))),
        type_url: pb::METADATA_TYPE_URL.into(),
        resource_names: names,
        ..Default::default()
    }
}

/// Reads from a raw TCP connection until the server closes it; the time it took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = tokio::time::Instant::now();
    let mut buf = [0; 1024];
    loop {
        match tokio::time::timeout_at(start + limit, stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

fn short_handshake() -> Config {
    let mut config = memory_config();
    config.security.limits.handshake_timeout = Duration::from_millis(300);
    config
}

// === unary: empty, huge and malformed fields ===

#[tokio::test]
async fn h01_empty_application_name_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        assert_eq!(publish(&c, "", "r1", "x").await, Err(Code::InvalidArgument));
    })
    .await;
}

#[tokio::test]
async fn h02_empty_revision_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        assert_eq!(
            publish(&c, "app", "", "x").await,
            Err(Code::InvalidArgument)
        );
    })
    .await;
}

#[tokio::test]
async fn h03_empty_message_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        let status = raw_unary(c, PUBLISH, Vec::new()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h04_empty_value_is_stored() {
    case(memory_config(), |_, c| async move {
        assert_eq!(publish(&c, "app", "r1", "").await, Ok(()));
        assert_eq!(get(&c, "app", "r1").await, Ok(String::new()));
    })
    .await;
}

#[tokio::test]
async fn h05_name_over_253_bytes_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        let long = "a".repeat(254);
        assert_eq!(
            publish(&c, &long, "r1", "x").await,
            Err(Code::InvalidArgument)
        );
        assert_eq!(
            publish(&c, "app", &long, "x").await,
            Err(Code::InvalidArgument)
        );
        // 253 bytes (a 128-character SHA-512 revision fits easily) is accepted.
        assert_eq!(publish(&c, "app", &"b".repeat(253), "x").await, Ok(()));
    })
    .await;
}

#[tokio::test]
async fn h06_value_over_the_limit_is_resource_exhausted() {
    case(memory_config(), |_, c| async move {
        let huge = "v".repeat(pixiu_metadata::model::DEFAULT_MAX_VALUE_BYTES + 1);
        assert_eq!(
            publish(&c, "app", "r1", &huge).await,
            Err(Code::ResourceExhausted)
        );
    })
    .await;
}

#[tokio::test]
async fn h07_message_over_the_decoding_limit_is_resource_exhausted() {
    case(memory_config(), |_, c| async move {
        let body = publish_body(b"app", b"r1", &vec![b'v'; 8 << 20]);
        let status = raw_unary(c.clone(), PUBLISH, body).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        // tonic's words, and what bounds a value.
        assert!(
            status
                .message()
                .starts_with("Error, decoded message length too large")
                && status.message().ends_with(&format!(
                    "(a published value may hold up to {} bytes: --max-value-bytes)",
                    pixiu_metadata::model::DEFAULT_MAX_VALUE_BYTES
                )),
            "{}",
            status.message()
        );
        // A service that takes no published values says nothing of them.
        let csds = "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus";
        let status = raw_unary(c, csds, vec![0; 8 << 20]).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status
                .message()
                .starts_with("Error, decoded message length too large")
                && !status.message().contains("published value"),
            "{}",
            status.message()
        );
    })
    .await;
}

#[tokio::test]
async fn h08_non_utf8_application_name_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        let status = raw_unary(c, PUBLISH, publish_body(b"\xff\xfe", b"r1", b"x"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h09_non_utf8_revision_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        let status = raw_unary(c, PUBLISH, publish_body(b"app", b"\xc3\x28", b"x"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h10_non_utf8_value_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        let status = raw_unary(c, PUBLISH, publish_body(b"app", b"r1", b"\x80abc"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h11_truncated_protobuf_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        // Field 1, length 100, three bytes of it.
        let status = raw_unary(c, PUBLISH, vec![0x0a, 100, b'a', b'b', b'c'])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h12_wrong_wire_type_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        // Field 1 as a varint instead of a string.
        let status = raw_unary(c, PUBLISH, vec![0x08, 0x01]).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h13_unknown_fields_are_ignored() {
    case(memory_config(), |_, c| async move {
        let mut body = publish_body(b"app", b"r1", b"x");
        body.extend(field(999, b"from the future"));
        raw_unary(c.clone(), PUBLISH, body).await.unwrap();
        assert_eq!(get(&c, "app", "r1").await, Ok("x".into()));
    })
    .await;
}

// === unary: names ===

#[tokio::test]
async fn h14_slash_in_application_name_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        assert_eq!(
            publish(&c, "a/b", "r1", "x").await,
            Err(Code::InvalidArgument)
        );
    })
    .await;
}

#[tokio::test]
async fn h15_slash_in_revision_stays_in_its_key() {
    case(memory_config(), |_, c| async move {
        assert_eq!(publish(&c, "app", "r1/extra", "slash").await, Ok(()));
        assert_eq!(get(&c, "app", "r1/extra").await, Ok("slash".into()));
        assert_eq!(get(&c, "app", "r1").await, Err(Code::NotFound));
    })
    .await;
}

#[tokio::test]
async fn h16_dot_dot_names_are_opaque() {
    case(memory_config(), |_, c| async move {
        publish(&c, "victim", "r1", "untouched").await.unwrap();
        assert_eq!(publish(&c, "..", "..", "dots").await, Ok(()));
        assert_eq!(publish(&c, "app", "../victim/r1", "dots").await, Ok(()));
        assert_eq!(get(&c, "..", "..").await, Ok("dots".into()));
        assert_eq!(get(&c, "victim", "r1").await, Ok("untouched".into()));
    })
    .await;
}

#[tokio::test]
async fn h17_nul_in_names_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        assert_eq!(
            publish(&c, "app\0", "r1", "x").await,
            Err(Code::InvalidArgument)
        );
        assert_eq!(
            publish(&c, "app", "r\x001", "x").await,
            Err(Code::InvalidArgument)
        );
    })
    .await;
}

#[tokio::test]
async fn h18_control_characters_in_identifier_are_invalid_argument() {
    case(memory_config(), |_, c| async move {
        let status = common::definition_client(c)
            .publish(PublishServiceDefinitionRequest {
                identifier: "svc\nforged log line".into(),
                service_definition: "{}".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h19_bad_namespace_headers_are_invalid_argument() {
    case(memory_config(), |_, c| async move {
        for value in [
            http::HeaderValue::from_static("a/b"),
            http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
            http::HeaderValue::from_static(""),
        ] {
            let mut request = tonic::Request::new(ListMetadataRequest::default());
            request.metadata_mut().insert(
                "x-pixiu-namespace",
                tonic::metadata::MetadataValue::try_from(value.as_bytes()).unwrap(),
            );
            let status = common::metadata_client(c.clone())
                .list(request)
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{value:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn h20_bidi_overrides_are_refused_emoji_and_joiners_are_stored_as_given() {
    case(memory_config(), |_, c| async move {
        // "app<RLO>gnp.exe" shows as "appexe.png": one name passing for another.
        for name in ["app\u{202e}gnp.exe", "app\u{2067}x", "app\u{200f}"] {
            assert_eq!(
                publish(&c, name, "r1", "x").await,
                Err(Code::InvalidArgument),
                "{name:?}"
            );
        }
        // Other format characters are part of ordinary text: a zero-width joiner in an emoji.
        let name = "app-👩\u{200d}💻🦀";
        assert_eq!(publish(&c, name, "r1", "x").await, Ok(()));
        assert_eq!(get(&c, name, "r1").await, Ok("x".into()));
    })
    .await;
}

#[tokio::test]
async fn h21_list_page_tokens_and_sizes_are_bounded() {
    case(memory_config(), |_, c| async move {
        for i in 0..3 {
            publish(&c, "app", &format!("r{i}"), "x").await.unwrap();
        }
        let mut client = common::metadata_client(c.clone());
        let huge = client
            .list(ListMetadataRequest {
                page_size: u32::MAX,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(huge.into_inner().records.len(), 3);
        let garbage = client
            .list(ListMetadataRequest {
                page_token: "zzz-not-a-token".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(garbage.into_inner().records.is_empty());
        let status = client
            .list(ListMetadataRequest {
                page_token: "a\u{7}b".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);

        // Pages are bounded in bytes too: five values of 700 KiB come two by two, each page
        // within 2 MiB, and a names-only page takes them all.
        let big = "v".repeat(700 * 1024);
        for i in 0..5 {
            publish(&c, "big", &format!("r{i}"), &big).await.unwrap();
        }
        let (mut seen, mut pages, mut token) = (Vec::new(), Vec::new(), String::new());
        loop {
            let page = client
                .list(ListMetadataRequest {
                    application_name: "big".into(),
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            pages.push(page.records.len());
            assert!(page.records.iter().all(|r| r.metadata_info == big));
            seen.extend(page.records.into_iter().map(|r| r.revision));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(pages, [2, 2, 1]);
        assert_eq!(seen, ["r0", "r1", "r2", "r3", "r4"]);
        let names = client
            .list(ListMetadataRequest {
                application_name: "big".into(),
                names_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(names.records.len(), 5);
    })
    .await;
}

#[tokio::test]
async fn h22_a_full_namespace_is_resource_exhausted() {
    let mut config = memory_config();
    config.store.max_records_per_namespace = 10;
    case(config, |_, c| async move {
        for i in 0..10 {
            publish(&c, "app", &format!("r{i}"), "x").await.unwrap();
        }
        assert_eq!(
            publish(&c, "app", "r10", "x").await,
            Err(Code::ResourceExhausted)
        );
    })
    .await;
}

/// Sends `body` as is (no gRPC framing added) to `path` and returns the call's gRPC status
/// code, from the headers of a trailers-only answer or from the trailers.
async fn raw_framing(channel: Channel, path: &str, body: &'static [u8]) -> Code {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};
    let request = http::Request::post(format!("http://pixiu{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(
            http_body_util::Full::new(bytes::Bytes::from_static(body))
                .map_err(|never| match never {}),
        ))
        .unwrap();
    let mut channel = channel;
    let response = channel.ready().await.unwrap().call(request).await.unwrap();
    let code = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .map(|v| Code::from_i32(v.to_str().unwrap().parse().unwrap()))
    };
    if let Some(code) = code(response.headers()) {
        return code;
    }
    let collected = response.into_body().collect().await.unwrap();
    code(collected.trailers().expect("trailers")).expect("a grpc-status")
}

#[tokio::test]
async fn h23b_broken_grpc_framing_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        const CSDS_STREAM: &str =
            "/envoy.service.status.v3.ClientStatusDiscoveryService/StreamClientStatus";
        const ADS: &str =
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
        let cases: [(&str, &'static [u8], Code); 7] = [
            // A length prefix of 100 bytes, 3 sent.
            (PUBLISH, b"\0\0\0\0\x64abc", Code::InvalidArgument),
            // A prefix cut short.
            (PUBLISH, b"\0\0\0", Code::InvalidArgument),
            // No message on a unary call.
            (PUBLISH, b"", Code::InvalidArgument),
            // A compression flag that does not exist.
            (PUBLISH, b"\x07\0\0\0\x01a", Code::InvalidArgument),
            // The compressed flag without grpc-encoding: INTERNAL, as gRPC's spec requires.
            (PUBLISH, b"\x01\0\0\0\x01a", Code::Internal),
            // Streams: a message that does not decode, a message cut short.
            (
                CSDS_STREAM,
                b"\0\0\0\0\x03\xff\xff\xff",
                Code::InvalidArgument,
            ),
            (ADS, b"\0\0\0\0\x64abc", Code::InvalidArgument),
        ];
        for (path, body, want) in cases {
            let got = raw_framing(c.clone(), path, body).await;
            assert_eq!(got, want, "{path} with {body:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn h23c_an_oversized_header_list_is_resource_exhausted() {
    case(memory_config(), |_, c| async move {
        let request = |headers: usize| {
            let mut request = tonic::Request::new(GetMetadataRequest {
                application_name: "app".into(),
                revision: "r1".into(),
            });
            for i in 0..headers {
                let name: tonic::metadata::AsciiMetadataKey =
                    format!("x-filler-{i}").parse().unwrap();
                request
                    .metadata_mut()
                    .insert(name, "0123456789abcdef0123456789abcdef".parse().unwrap());
            }
            request
        };
        // About 37 KiB: over the 16 KiB limit, under the 64 KiB HTTP/2 takes. Refused before
        // any service reads it, with a status that says why.
        let status = common::metadata_client(c.clone())
            .get(request(500))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("over the limit of 16384")
                && status.message().contains("--max-header-list-bytes"),
            "{status:?}"
        );
        // Just under the limit: served (NotFound: nothing was published).
        assert_eq!(
            common::metadata_client(c.clone())
                .get(request(150))
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
        // About 187 KiB, past what HTTP/2 takes: h2 answers HTTP 431 itself, before any
        // service and with no gRPC status, so the client reads UNKNOWN (or INTERNAL). The
        // connection and the server carry on.
        let status = common::metadata_client(c.clone())
            .get(request(2_500))
            .await
            .unwrap_err();
        assert!(
            matches!(status.code(), Code::Unknown | Code::Internal),
            "{status:?}"
        );
        assert_eq!(get(&c, "app", "r1").await, Err(Code::NotFound));
    })
    .await;
}

#[tokio::test]
async fn h23_unknown_method_is_unimplemented() {
    case(memory_config(), |_, c| async move {
        let status = raw_unary(c, "/pixiu.pkg.metadata.MetadataService/Drop", vec![])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
    })
    .await;
}

// === ADS ===

#[tokio::test]
async fn h24_ten_thousand_subscriptions_are_answered() {
    case(memory_config(), |_, c| async move {
        let names: Vec<String> = (0..10_000).map(|i| format!("app/r{i}")).collect();
        let (_tx, _rx, first) = sotw_first(&c, metadata_request(names)).await;
        assert!(first.unwrap().resources.is_empty());
    })
    .await;
}

#[tokio::test]
async fn h25_subscriptions_over_the_limit_are_invalid_argument() {
    let mut config = memory_config();
    config.xds.limits.max_subscribed_names = 5_000;
    case(config, |_, c| async move {
        let names: Vec<String> = (0..10_000).map(|i| format!("app/r{i}")).collect();
        let (_tx, _rx, first) = sotw_first(&c, metadata_request(names)).await;
        assert_eq!(first.unwrap_err(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h26_unknown_type_url_is_answered_empty() {
    case(memory_config(), |_, c| async move {
        let mut request = metadata_request(vec![]);
        request.type_url = "type.googleapis.com/no.such.Type".into();
        let (_tx, _rx, first) = sotw_first(&c, request).await;
        let first = first.unwrap();
        assert!(first.resources.is_empty());
        assert_eq!(first.type_url, "type.googleapis.com/no.such.Type");
    })
    .await;
}

#[tokio::test]
async fn h27_empty_type_url_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        let mut request = metadata_request(vec![]);
        request.type_url = String::new();
        let (_tx, _rx, first) = sotw_first(&c, request).await;
        assert_eq!(first.unwrap_err(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h27b_long_type_urls_and_node_ids_are_invalid_argument() {
    case(memory_config(), |_, c| async move {
        // A type URL would be a metrics label and stream status; a node id is kept for the
        // stream's life and matched by every CSDS request.
        let mut request = metadata_request(vec![]);
        request.type_url = format!("type.googleapis.com/{}", "x".repeat(3 << 20));
        let (_tx, _rx, first) = sotw_first(&c, request).await;
        assert_eq!(first.unwrap_err(), Code::InvalidArgument);
        let mut request = metadata_request(vec![]);
        request.node.as_mut().unwrap().id = "n".repeat(200 * 1024);
        let (_tx, _rx, first) = sotw_first(&c, request).await;
        assert_eq!(first.unwrap_err(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h28_malformed_any_in_a_nack_is_taken_as_a_nack() {
    case(memory_config(), |_, c| async move {
        let (tx, responses, first) = sotw_first(&c, metadata_request(vec![])).await;
        let mut responses = responses.unwrap();
        let first = first.unwrap();
        tx.send(DiscoveryRequest {
            type_url: first.type_url.clone(),
            response_nonce: first.nonce.clone(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: "x".repeat(100_000),
                details: vec![Any {
                    type_url: "\u{0}not a type url".into(),
                    value: vec![0xff; 64],
                }],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        // A NACK is not answered by a resend.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), responses.message())
                .await
                .is_err()
        );
    })
    .await;
}

#[tokio::test]
async fn h29_oversized_nonce_is_a_stale_nonce() {
    case(memory_config(), |_, c| async move {
        let (tx, responses, first) = sotw_first(&c, metadata_request(vec![])).await;
        let mut responses = responses.unwrap();
        let first = first.unwrap();
        tx.send(DiscoveryRequest {
            type_url: first.type_url.clone(),
            version_info: first.version_info.clone(),
            response_nonce: "n".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), responses.message())
                .await
                .is_err()
        );
    })
    .await;
}

#[tokio::test]
async fn h30_request_over_the_ads_size_limit_is_resource_exhausted() {
    case(memory_config(), |_, c| async move {
        let (_tx, _rx, first) = sotw_first(&c, metadata_request(vec!["n".repeat(5 << 20)])).await;
        assert_eq!(first.unwrap_err(), Code::ResourceExhausted);
    })
    .await;
}

#[tokio::test]
async fn h31_deeply_nested_node_metadata_is_invalid_argument() {
    case(memory_config(), |_, c| async move {
        let mut value = Value {
            kind: Some(Kind::StringValue("deep".into())),
        };
        for _ in 0..200 {
            value = Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![value],
                })),
            };
        }
        let mut request = metadata_request(vec![]);
        request.node.as_mut().unwrap().metadata = Some(Struct {
            fields: [("deep".to_string(), value)].into(),
        });
        let (_tx, _rx, first) = sotw_first(&c, request).await;
        assert_eq!(first.unwrap_err(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h32_non_string_node_namespace_falls_back_to_the_default() {
    case(memory_config(), |_, c| async move {
        let mut request = metadata_request(vec![]);
        request.node.as_mut().unwrap().metadata = Some(Struct {
            fields: [(
                "NAMESPACE".to_string(),
                Value {
                    kind: Some(Kind::NumberValue(7.0)),
                },
            )]
            .into(),
        });
        let (_tx, _rx, first) = sotw_first(&c, request).await;
        // The default namespace is empty here: no bystander resource leaks.
        assert!(first.unwrap().resources.is_empty());
    })
    .await;
}

#[tokio::test]
async fn h33_delta_with_huge_initial_versions_is_invalid_argument() {
    let mut config = memory_config();
    config.xds.limits.max_subscribed_names = 1_000;
    case(config, |_, c| async move {
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            node: Some(common::node("attacker", Some("attacker"))),
            type_url: pb::METADATA_TYPE_URL.into(),
            initial_resource_versions: (0..5_000).map(|i| (format!("a/{i}"), "v".into())).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut responses = AggregatedDiscoveryServiceClient::new(c)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let status = tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    })
    .await;
}

#[tokio::test]
async fn h34_streams_opened_and_abandoned_are_released() {
    let mut config = memory_config();
    config.xds.max_streams = 201;
    case(config, |addr, _| async move {
        let channel = common::channel_to(addr).await;
        let mut abandoned = Vec::new();
        for _ in 0..200 {
            let (tx, rx) = mpsc::channel::<DiscoveryRequest>(1);
            // Never sends a request.
            let stream = AggregatedDiscoveryServiceClient::new(channel.clone())
                .stream_aggregated_resources(ReceiverStream::new(rx))
                .await
                .unwrap();
            abandoned.push((tx, stream));
        }
        drop(abandoned);
        // Every permit comes back: 200 new streams open (the limit is 201 with the
        // bystander's).
        let fresh = common::channel_to(addr).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut open = Vec::new();
        while open.len() < 200 {
            let (tx, responses, first) = sotw_first(&fresh, metadata_request(vec![])).await;
            match first {
                Ok(_) => open.push((tx, responses)),
                Err(code) => {
                    assert_eq!(code, Code::ResourceExhausted);
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "permits not released"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(channel);
    })
    .await;
}

#[tokio::test]
async fn h35_stream_flood_over_the_total_limit_is_resource_exhausted() {
    let mut config = memory_config();
    // The bystander holds one stream.
    config.xds.max_streams = 51;
    case(config, |addr, _| async move {
        let channel = common::channel_to(addr).await;
        let mut open = Vec::new();
        let mut n_refused = 0;
        for _ in 0..100 {
            let (tx, responses, first) = sotw_first(&channel, metadata_request(vec![])).await;
            match first {
                Ok(_) => open.push((tx, responses)),
                Err(code) => {
                    assert_eq!(code, Code::ResourceExhausted);
                    n_refused += 1;
                }
            }
        }
        assert_eq!(open.len(), 50);
        assert_eq!(n_refused, 50);
    })
    .await;
}

#[tokio::test]
async fn h36_streams_per_connection_are_capped() {
    let mut config = memory_config();
    config.security.limits.max_concurrent_streams_per_connection = 20;
    case(config, |addr, _| async move {
        let channel = common::channel_to(addr).await;
        let mut open = Vec::new();
        for _ in 0..20 {
            let (tx, responses, first) = sotw_first(&channel, metadata_request(vec![])).await;
            first.unwrap();
            open.push((tx, responses));
        }
        // The 21st stream on this connection waits for a free slot (HTTP/2
        // SETTINGS_MAX_CONCURRENT_STREAMS); it is not served while the others are open.
        let mut client = AggregatedDiscoveryServiceClient::new(channel.clone());
        let (tx, rx) = mpsc::channel(1);
        tx.send(metadata_request(vec![])).await.unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_millis(500),
            client.stream_aggregated_resources(ReceiverStream::new(rx)),
        )
        .await;
        assert!(waiting.is_err(), "the 21st stream was opened");
        // Another connection is not affected.
        let other = common::channel_to(addr).await;
        let (_tx, _rx, first) = sotw_first(&other, metadata_request(vec![])).await;
        first.unwrap();
    })
    .await;
}

// === connections ===

#[tokio::test]
async fn h37_silent_connection_is_closed_after_the_handshake_timeout() {
    case(short_handshake(), |addr, _| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let took = closed_within(&mut stream, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(250), "{took:?}");
    })
    .await;
}

#[tokio::test]
async fn h38_slow_loris_preface_is_closed() {
    case(short_handshake(), |addr, _| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let start = tokio::time::Instant::now();
        for byte in preface {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if start.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        closed_within(&mut stream, Duration::from_secs(5)).await;
        assert!(start.elapsed() < Duration::from_secs(5));
    })
    .await;
}

#[tokio::test]
async fn h39_many_idle_connections_do_not_stop_the_server() {
    case(short_handshake(), |addr, _| async move {
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        for stream in &mut idle {
            closed_within(stream, Duration::from_secs(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn h40_garbage_instead_of_a_preface_is_closed() {
    case(memory_config(), |addr, _| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(&[
                0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                16, 17, 18, 19,
            ])
            .await
            .unwrap();
        closed_within(&mut stream, Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test]
async fn h41_http1_request_is_answered_and_closed() {
    case(memory_config(), |addr, _| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /pixiu.pkg.metadata.MetadataService/Get HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        closed_within(&mut stream, Duration::from_secs(5)).await;
    })
    .await;
}

#[tokio::test]
async fn h42_csds_regex_matcher_is_invalid_argument() {
    use envoy_types::pb::envoy::r#type::matcher::v3::{
        NodeMatcher, RegexMatcher, StringMatcher, string_matcher::MatchPattern,
    };
    case(memory_config(), |_, c| async move {
        let status = ClientStatusDiscoveryServiceClient::new(c.clone())
            .fetch_client_status(ClientStatusRequest {
                node_matchers: vec![NodeMatcher {
                    node_id: Some(StringMatcher {
                        match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                            regex: "(a+)+$".into(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        // Every matcher is tried on every stream: their number and length are bounded.
        let contains = |pattern: String| NodeMatcher {
            node_id: Some(StringMatcher {
                match_pattern: Some(MatchPattern::Contains(pattern)),
                ignore_case: true,
            }),
            ..Default::default()
        };
        for node_matchers in [
            vec![contains("a".into()); 1000],
            vec![contains("a".repeat(3000))],
        ] {
            let status = ClientStatusDiscoveryServiceClient::new(c.clone())
                .fetch_client_status(ClientStatusRequest {
                    node_matchers,
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn h42b_a_csds_answer_past_its_limit_is_resource_exhausted() {
    // Every node may hold every resource, bodies included: 20 streams holding a 1 MB record
    // would make a 20 MB answer, past the 16 MiB limit. It is refused before it is built.
    case(memory_config(), |_, c| async move {
        publish(&c, "big", "1", &"x".repeat(1_000_000))
            .await
            .unwrap();
        let mut streams = Vec::new();
        for _ in 0..20 {
            let mut request = metadata_request(vec![]);
            request.node = Some(common::node("holder", None));
            let (tx, responses, first) = sotw_first(&c, request).await;
            assert_eq!(first.unwrap().resources.len(), 1);
            streams.push((tx, responses));
        }
        let status = ClientStatusDiscoveryServiceClient::new(c.clone())
            .max_decoding_message_size(64 << 20)
            .fetch_client_status(ClientStatusRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("exclude_resource_contents"),
            "{}",
            status.message()
        );
        // Without the bodies the same streams fit.
        let names_only = ClientStatusDiscoveryServiceClient::new(c.clone())
            .fetch_client_status(ClientStatusRequest {
                exclude_resource_contents: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let held: usize = names_only
            .config
            .iter()
            .map(|node| node.generic_xds_configs.len())
            .sum();
        assert!(held >= 20, "{held}");
    })
    .await;
}

#[tokio::test]
async fn h43_old_connections_are_drained_and_clients_reconnect() {
    let mut config = memory_config();
    config.security.limits.max_connection_age = Some(Duration::from_millis(500));
    config.security.limits.max_connection_age_grace = Duration::from_millis(500);
    // The bystander's own connection is drained too; its check reconnects through the same
    // channel, which is what a client of a draining replica does.
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let (_tx, responses, first) = sotw_first(&channel, metadata_request(vec![])).await;
    first.unwrap();
    let mut responses = responses.unwrap();
    // GOAWAY after 500 ms, closed after the 500 ms grace: the stream ends.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match responses.message().await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream outlived max connection age and its grace"
    );
    // The same channel reconnects and is served.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match publish(&channel, "app", "after-drain", "x").await {
            Ok(()) => break,
            Err(code) => {
                assert_eq!(code, Code::Unavailable);
                assert!(tokio::time::Instant::now() < deadline, "no reconnect");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(get(&channel, "app", "after-drain").await, Ok("x".into()));
    server.stop().await;
}
