//! Transport security, identity, namespace authorization and connection limits.
//!
//! - [`tls`]: rustls TLS/mTLS with certificate reload, and the accept loops feeding tonic.
//! - [`guard`]: handshake and idle deadlines on every connection (slow-loris).
//! - [`identity`]: SPIFFE IDs from client certificates, bearer tokens from the token file.
//! - [`policy`]: the one namespace decision, [`policy::decide`], and the policy file.
//! - [`rate`]: per-identity publish rate limits.
//!
//! Every service asks one [`Authorizer`] for the namespace a request acts in: the unary
//! RPCs in `api/`, the ADS view resolver in `push/`, the CSDS filter ([`CsdsAccess`]). A new
//! service gets the same rules with one call to [`Authorizer::authorize`].
//!
//! What this module does not do: validate names (that is `model`), or store anything.

pub mod guard;
pub mod identity;
pub mod policy;
pub mod rate;
pub mod tls;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use parking_lot::RwLock;

use tokio_util::sync::CancellationToken;
use tonic::{
    Status,
    metadata::MetadataMap,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tracing::{info, warn};

pub use identity::{Authenticator, Identity, Tokens, Workload};
pub use policy::{Denied, Operation, Policy};

use crate::metrics::Metrics;

/// Security settings of the server. The default is a development server: plaintext, no
/// authentication, every limit at its documented default.
#[derive(Debug, Clone, Default)]
pub struct SecurityConfig {
    /// TLS material (`--tls-cert`, `--tls-key`, `--client-ca`); `None` serves plaintext.
    pub tls: Option<tls::TlsPaths>,
    /// How often the TLS files are checked for changes (default 5 s).
    pub tls_reload_interval: Option<Duration>,
    /// Bearer tokens (`--token-file`).
    pub token_file: Option<PathBuf>,
    /// Grants beyond a client's own namespace (`--policy-file`).
    pub policy_file: Option<PathBuf>,
    /// A file holding the token admin HTTP requires (`--admin-token-file`); needed when the
    /// admin port is not on loopback.
    pub admin_token_file: Option<PathBuf>,
    /// Connection and request limits.
    pub limits: Limits,
}

/// Connection and request limits of the gRPC port.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most concurrent HTTP/2 streams per connection (default 1,000; gRPC-Go's is
    /// unlimited, which lets one connection take every stream permit).
    pub max_concurrent_streams_per_connection: u32,
    /// Interval of the server's HTTP/2 keepalive pings (default 30 s).
    pub http2_keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed (default 10 s).
    pub http2_keepalive_timeout: Duration,
    /// How long a new connection may take to finish TLS and send the HTTP/2 preface
    /// (default 10 s).
    pub handshake_timeout: Duration,
    /// How long a connection may send nothing at all, pings included (default 5 min).
    pub idle_timeout: Duration,
    /// Most TLS handshakes in progress at once (default 1,024).
    pub max_pending_handshakes: usize,
    /// Age after which a connection is sent GOAWAY and drained, so clients rebalance
    /// across replicas (default 30 min, as istiod's `MaxServerConnectionAge` in its charts).
    pub max_connection_age: Option<Duration>,
    /// How long a draining connection's streams may continue before it is closed
    /// (default 10 s, istiod's `MaxServerConnectionAgeGrace`).
    pub max_connection_age_grace: Duration,
    /// Publishes per identity (default 100 per second, bursts of 500); `None` is unlimited.
    /// Applies to authenticated identities; anonymous development clients are not limited.
    pub publish_rate: Option<rate::Rate>,
    /// Most identities whose publish rate is tracked at once (default 100,000).
    pub max_rate_principals: usize,
    /// Largest request header list, counted as HTTP/2 counts it (each header's name and value
    /// and 32 bytes; default 16 KiB, hyper's own). A larger one is answered
    /// `RESOURCE_EXHAUSTED` by [`header_list_limit`]; the HTTP/2 layer itself only refuses,
    /// with HTTP 431 and no gRPC status, lists over [`HTTP2_HEADER_LIST_FACTOR`] times this.
    pub max_header_list_bytes: u32,
}

/// How much larger than [`Limits::max_header_list_bytes`] a header list the HTTP/2 layer
/// takes before it answers HTTP 431 itself: between the two, a client hears a gRPC status.
pub const HTTP2_HEADER_LIST_FACTOR: u32 = 4;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams_per_connection: 1000,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_pending_handshakes: 1024,
            max_connection_age: Some(Duration::from_secs(30 * 60)),
            max_connection_age_grace: Duration::from_secs(10),
            publish_rate: Some(rate::Rate {
                per_second: 100.0,
                burst: 500,
            }),
            max_rate_principals: 100_000,
            max_header_list_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// The accept loop's share of the limits.
    pub fn accept(&self) -> tls::AcceptLimits {
        tls::AcceptLimits {
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            max_pending_handshakes: self.max_pending_handshakes,
        }
    }

    /// Applies the HTTP/2 limits to a tonic server builder.
    pub fn apply<L>(&self, builder: tonic::transport::Server<L>) -> tonic::transport::Server<L> {
        let builder = builder
            .max_concurrent_streams(self.max_concurrent_streams_per_connection)
            .http2_keepalive_interval(Some(self.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(self.http2_keepalive_timeout))
            .http2_max_header_list_size(
                self.max_header_list_bytes
                    .saturating_mul(HTTP2_HEADER_LIST_FACTOR),
            )
            .tcp_keepalive(Some(Duration::from_secs(60)));
        match self.max_connection_age {
            Some(age) => builder
                .max_connection_age(age)
                .max_connection_age_grace(self.max_connection_age_grace),
            None => builder,
        }
    }
}

/// Why the security settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The token file.
    #[error(transparent)]
    Tokens(#[from] identity::TokenFileError),
    /// The policy file.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    /// The admin token file could not be read or is empty.
    #[error("admin token file {0}: unreadable or empty")]
    AdminToken(String),
    /// Admin HTTP on a non-loopback address needs a token.
    #[error("the admin port {0} is not on loopback: give --admin-token-file")]
    AdminExposed(std::net::SocketAddr),
    /// Bearer tokens cannot be turned on without a restart.
    #[error("the server started without a token file; tokens need a restart")]
    TokensAdded,
}

/// The result of an authorized request: who asked and where it acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The caller.
    pub identity: Identity,
    /// The namespace the request acts in.
    pub namespace: String,
}

/// Identifies callers and decides namespaces; shared by every service.
#[derive(Debug)]
pub struct Authorizer {
    /// Its tokens are replaced when the token file changes ([`Authorizer::set_tokens`]).
    authenticator: RwLock<Authenticator>,
    /// Replaced when the policy file changes ([`Authorizer::set_policy`]).
    policy: RwLock<Policy>,
    default_namespace: String,
    metrics: Option<Metrics>,
}

impl Authorizer {
    /// A development server's authorizer: no authentication, anonymous clients pick their
    /// namespace.
    pub fn open(default_namespace: impl Into<String>) -> Self {
        Self::new(
            Authenticator::default(),
            Policy::default(),
            default_namespace,
        )
    }

    /// An authorizer with these credentials and policy.
    pub fn new(
        authenticator: Authenticator,
        policy: Policy,
        default_namespace: impl Into<String>,
    ) -> Self {
        Self {
            authenticator: RwLock::new(authenticator),
            policy: RwLock::new(policy),
            default_namespace: default_namespace.into(),
            metrics: None,
        }
    }

    /// Counts denials in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Whether authentication is configured.
    pub fn required(&self) -> bool {
        self.authenticator.read().required()
    }

    /// Decides the requests from now on with `policy`.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write() = policy;
    }

    /// Identifies bearer tokens from now on with `tokens`. A server that started without a
    /// token file accepts none later: whether anonymous callers are refused, and whether TLS
    /// asks for a client certificate, were settled at start.
    pub fn set_tokens(&self, tokens: Tokens) -> Result<(), Error> {
        match &mut self.authenticator.write().tokens {
            Some(current) => {
                *current = tokens;
                Ok(())
            }
            None => Err(Error::TokensAdded),
        }
    }

    /// The caller of a request, from the verified TLS peer certificates in its extensions
    /// and its `authorization` header.
    pub fn identify(&self, extensions: &tonic::Extensions, metadata: &MetadataMap) -> Identity {
        let certificates = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        let authorization = metadata.get("authorization").map(|v| v.as_bytes());
        self.authenticator
            .read()
            .identify(certificates.as_deref().map(Vec::as_slice), authorization)
    }

    /// [`policy::decide`] with this server's policy, without counting.
    pub fn decide(
        &self,
        identity: &Identity,
        requested: Option<&str>,
        operation: Operation,
    ) -> Result<String, Denied> {
        policy::decide(
            identity,
            requested,
            operation,
            &self.policy.read(),
            self.required(),
            &self.default_namespace,
        )
    }

    /// Identifies the caller and decides the namespace of `operation`, counting and logging
    /// a denial (without the namespace asked for, or any credential).
    pub fn authorize(
        &self,
        extensions: &tonic::Extensions,
        metadata: &MetadataMap,
        requested: Option<&str>,
        operation: Operation,
    ) -> Result<Decision, Denied> {
        let identity = self.identify(extensions, metadata);
        match self.decide(&identity, requested, operation) {
            Ok(namespace) => Ok(Decision {
                identity,
                namespace,
            }),
            Err(denied) => {
                self.denied(&identity, operation, denied);
                Err(denied)
            }
        }
    }

    fn denied(&self, identity: &Identity, operation: Operation, denied: Denied) {
        if let Some(metrics) = &self.metrics {
            metrics.denial(operation.as_str(), denied.as_str());
        }
        let principal = match identity {
            Identity::Workload(workload) => workload.principal.as_str(),
            Identity::Anonymous => "anonymous",
            Identity::Rejected => "rejected",
        };
        warn!(
            operation = operation.as_str(),
            reason = denied.as_str(),
            principal,
            "request denied"
        );
    }
}

/// The gRPC status of a denial: its code, and its message (which names nothing asked about).
pub fn status(denied: Denied) -> Status {
    Status::new(denied.code(), denied.to_string())
}

/// Shows a CSDS caller only the streams of namespaces it may read.
#[derive(Debug, Clone)]
pub struct CsdsAccess {
    authorizer: Arc<Authorizer>,
}

impl CsdsAccess {
    /// A filter deciding with `authorizer`.
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }
}

impl pixiu_xds::StatusFilter for CsdsAccess {
    fn filter(
        &self,
        context: &pixiu_xds::StreamContext,
        streams: Vec<pixiu_xds::StreamStatus>,
    ) -> Result<Vec<pixiu_xds::StreamStatus>, Status> {
        let authorizer = &self.authorizer;
        // The caller's own namespace first: refuses anonymous callers when auth is on.
        let decision = authorizer
            .authorize(
                &context.extensions,
                &context.metadata,
                None,
                Operation::Status,
            )
            .map_err(status)?;
        Ok(streams
            .into_iter()
            .filter(|stream| {
                let namespace = stream
                    .partitions
                    .iter()
                    .find(|p| p.as_str() != crate::model::GLOBAL_PARTITION);
                match namespace {
                    Some(namespace) => authorizer
                        .decide(&decision.identity, Some(namespace), Operation::Status)
                        .is_ok(),
                    // A stream reading only global resources reveals no namespace.
                    None => true,
                }
            })
            .collect())
    }
}

/// Refuses admin HTTP on a non-loopback address without a token: the debug pages show
/// every namespace's records.
pub fn check_admin_exposure(addr: std::net::SocketAddr, has_token: bool) -> Result<(), Error> {
    if addr.ip().is_loopback() || has_token {
        Ok(())
    } else {
        Err(Error::AdminExposed(addr))
    }
}

/// Reads the admin token file.
pub fn admin_token(path: &std::path::Path) -> Result<String, Error> {
    let token =
        std::fs::read_to_string(path).map_err(|_| Error::AdminToken(path.display().to_string()))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(Error::AdminToken(path.display().to_string()));
    }
    Ok(token)
}

/// The token admin HTTP requires, kept as its SHA-256 so requests are compared digest to
/// digest; replaced when its file changes.
#[derive(Debug)]
pub struct AdminToken(RwLock<[u8; 32]>);

impl AdminToken {
    /// The token `token`.
    pub fn new(token: &str) -> Self {
        Self(RwLock::new(Self::digest(token.as_bytes())))
    }

    /// Requires `token` from now on.
    pub fn set(&self, token: &str) {
        *self.0.write() = Self::digest(token.as_bytes());
    }

    /// Whether `presented` is the token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        Self::digest(presented) == *self.0.read()
    }

    fn digest(token: &[u8]) -> [u8; 32] {
        let digest = ring::digest::digest(&ring::digest::SHA256, token);
        digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
    }
}

/// Wraps the admin router so that every route but `/healthz` and `/readyz` requires
/// `Authorization: Bearer <token>`, the scheme in any case (401 otherwise).
pub fn require_admin_token(router: axum::Router, token: Arc<AdminToken>) -> axum::Router {
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                let path = request.uri().path();
                let open = path == "/healthz" || path == "/readyz";
                let presented = request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| identity::bearer(v.as_bytes()));
                if open || presented.is_some_and(|t| token.matches(t)) {
                    next.run(request).await
                } else {
                    axum::response::IntoResponse::into_response((
                        http::StatusCode::UNAUTHORIZED,
                        // RFC 6750: say which scheme the port wants.
                        [(
                            http::header::WWW_AUTHENTICATE,
                            "Bearer realm=\"pixiu-metadata admin\"",
                        )],
                        "admin token required\n",
                    ))
                }
            }
        },
    ))
}

/// The security settings, loaded: what `serve` wires into the services.
#[derive(Debug)]
pub struct Loaded {
    /// Decides every request's namespace.
    pub authorizer: Arc<Authorizer>,
    /// Publish rate limits per identity.
    pub publish_rate: Arc<rate::RateLimiter>,
    /// The TLS acceptor, when TLS is configured.
    pub tls: Option<tls::ReloadingTls>,
    /// The token admin HTTP requires, when configured.
    pub admin_token: Option<Arc<AdminToken>>,
}

/// Reads every file the settings name, so a mistake stops the server at start.
pub fn load(
    config: &SecurityConfig,
    default_namespace: &str,
    metrics: &Metrics,
) -> Result<Loaded, Error> {
    let tokens = config
        .token_file
        .as_deref()
        .map(identity::Tokens::load)
        .transpose()?;
    let policy = config
        .policy_file
        .as_deref()
        .map(Policy::load)
        .transpose()?
        .unwrap_or_default();
    let client_certificates = config
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca.is_some());
    // With tokens as an alternative, a client may connect without a certificate.
    let tls = config
        .tls
        .clone()
        .map(|paths| tls::ReloadingTls::new(paths, tokens.is_some()))
        .transpose()?;
    let authenticator = Authenticator {
        tokens,
        client_certificates,
    };
    let admin_token = config
        .admin_token_file
        .as_deref()
        .map(admin_token)
        .transpose()?
        .map(|token| Arc::new(AdminToken::new(&token)));
    Ok(Loaded {
        authorizer: Arc::new(
            Authorizer::new(authenticator, policy, default_namespace).with_metrics(metrics.clone()),
        ),
        publish_rate: Arc::new(rate::RateLimiter::new(
            config.limits.publish_rate,
            config.limits.max_rate_principals,
        )),
        tls,
        admin_token,
    })
}

/// Re-reads the token, policy and admin token files of `config` every `interval` and hands
/// what changed to `authorizer` and `admin`, like the TLS files: a file that does not load is
/// logged and the old content kept. Ends on `shutdown`.
pub async fn watch_files(
    authorizer: Arc<Authorizer>,
    admin: Option<Arc<AdminToken>>,
    config: &SecurityConfig,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tokens = config.token_file.clone().map(Watched::new);
    let mut policy = config.policy_file.clone().map(Watched::new);
    let mut admin_file = config.admin_token_file.clone().map(Watched::new);
    if tokens.is_none() && policy.is_none() && admin_file.is_none() {
        return;
    }
    crate::poll::every(interval, &shutdown, || {
        if let Some(file) = tokens.as_mut()
            && file.changed()
        {
            match Tokens::load(&file.path).map_err(Error::from).and_then(|t| {
                let n = t.len();
                authorizer.set_tokens(t).map(|()| n)
            }) {
                Ok(n) => info!(file = %file.path.display(), tokens = n, "token file reloaded"),
                Err(error) => warn!(%error, "token file not reloaded; keeping the old tokens"),
            }
        }
        if let Some(file) = policy.as_mut()
            && file.changed()
        {
            match Policy::load(&file.path) {
                Ok(loaded) => {
                    authorizer.set_policy(loaded);
                    info!(file = %file.path.display(), "policy file reloaded");
                }
                Err(error) => warn!(%error, "policy file not reloaded; keeping the old policy"),
            }
        }
        if let (Some(file), Some(admin)) = (admin_file.as_mut(), &admin)
            && file.changed()
        {
            match admin_token(&file.path) {
                Ok(token) => {
                    admin.set(&token);
                    info!(file = %file.path.display(), "admin token file reloaded");
                }
                Err(error) => warn!(%error, "admin token not reloaded; keeping the old one"),
            }
        }
    })
    .await;
}

/// A file and the bytes it held when last looked at.
struct Watched {
    path: PathBuf,
    seen: Option<Vec<u8>>,
}

impl Watched {
    /// `path`, as loaded at start.
    fn new(path: PathBuf) -> Self {
        let seen = read(&path);
        Self { path, seen }
    }

    /// Whether the file's bytes differ from the last look (an unreadable file counts as
    /// changed, so the reload reports why).
    fn changed(&mut self) -> bool {
        let now = read(&self.path);
        let changed = now.is_none() || now != self.seen;
        self.seen = now;
        changed
    }
}

fn read(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// The code of a trailers-only answer, `None` for any other (a status in the trailers).
fn trailers_only_code<B>(response: &http::Response<B>) -> Option<tonic::Code> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// The decoded `grpc-message` of an answer, empty when it has none.
fn grpc_message<B>(response: &http::Response<B>) -> String {
    response
        .headers()
        .get("grpc-message")
        .map_or_else(Default::default, |v| {
            percent_encoding::percent_decode(v.as_bytes()).decode_utf8_lossy()
        })
        .into_owned()
}

/// Rewrites tonic's trailers-only answer to a request it could not read (`INTERNAL` for a
/// message that does not decode or is cut short in its framing, `OUT_OF_RANGE` for one over
/// the size limit) to the code that says it was the client's doing; see
/// [`pixiu_xds::server::request_error_code`]. No handler of ours answers with those messages.
pub fn request_error_status<B>(mut response: http::Response<B>) -> http::Response<B> {
    let Some(code) = trailers_only_code(&response) else {
        return response;
    };
    if let Some(rewritten) = pixiu_xds::server::request_error_code(code, &grpc_message(&response)) {
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from(rewritten as i32));
    }
    response
}

/// The size of a request's header list as HTTP/2 counts it against
/// `SETTINGS_MAX_HEADER_LIST_SIZE` (RFC 9113, section 6.5.2): each field's name and value
/// and 32 bytes, the pseudo-headers `:method`, `:scheme`, `:authority` and `:path`
/// included.
pub fn header_list_bytes<B>(request: &http::Request<B>) -> usize {
    const ENTRY: usize = 32;
    let uri = request.uri();
    let pseudo = [
        (":method".len(), request.method().as_str().len()),
        (":scheme".len(), uri.scheme_str().map_or(0, str::len)),
        (
            ":authority".len(),
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path".len(),
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        ),
    ];
    let pseudo: usize = pseudo
        .iter()
        .filter(|(_, value)| *value > 0)
        .map(|(name, value)| name + value + ENTRY)
        .sum();
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + ENTRY)
        .sum();
    pseudo + fields
}

/// A predicate for `tower::filter` that answers a request whose header list is larger
/// than `max` bytes ([`header_list_bytes`]) `RESOURCE_EXHAUSTED`, before any service reads
/// it. tonic turns the error into the answer's status.
pub fn header_list_limit<B>(
    max: u32,
) -> impl Fn(http::Request<B>) -> Result<http::Request<B>, tonic::Status> + Clone {
    move |request| {
        let bytes = header_list_bytes(&request);
        if bytes > max as usize {
            return Err(tonic::Status::resource_exhausted(format!(
                "the request's header list is {bytes} bytes, over the limit of {max} \
                 (--max-header-list-bytes)"
            )));
        }
        Ok(request)
    }
}

/// For the services that take published values, inside [`request_error_status`]: a request
/// over the size limit (tonic's `OUT_OF_RANGE`, whose message gives only bytes) also hears
/// what bounds a published value, `max_value_bytes`.
pub fn value_size_hint<B>(
    max_value_bytes: usize,
) -> impl Fn(http::Response<B>) -> http::Response<B> + Clone {
    move |mut response| {
        if trailers_only_code(&response) != Some(tonic::Code::OutOfRange) {
            return response;
        }
        let explained = format!(
            "{} (a published value may hold up to {max_value_bytes} bytes: --max-value-bytes)",
            grpc_message(&response)
        );
        // gRPC's percent-encoding: everything outside printable ASCII, and '%'.
        const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
        let encoded = percent_encoding::utf8_percent_encode(&explained, GRPC_MESSAGE).to_string();
        if let Ok(value) = http::HeaderValue::from_str(&encoded) {
            response.headers_mut().insert("grpc-message", value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_list_is_counted_as_http2_counts_it() {
        let request = http::Request::post("http://127.0.0.1:1/a.B/C")
            .header("te", "trailers")
            .body(())
            .unwrap();
        // :method POST, :scheme http, :authority 127.0.0.1:1, :path /a.B/C, te: trailers.
        let expected = (7 + 4 + 32) + (7 + 4 + 32) + (10 + 11 + 32) + (5 + 6 + 32) + (2 + 8 + 32);
        assert_eq!(header_list_bytes(&request), expected);

        let check = header_list_limit(expected as u32);
        assert!(check(request).is_ok(), "at the limit is allowed");
        let mut request = http::Request::post("http://127.0.0.1:1/a.B/C")
            .header("te", "trailers")
            .body(())
            .unwrap();
        request
            .headers_mut()
            .insert("x", http::HeaderValue::from_static(""));
        let status = check(request).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status
                .message()
                .contains(&format!("{} bytes", expected + 33)),
            "{status:?}"
        );
        assert!(status.message().contains("--max-header-list-bytes"));
    }

    #[test]
    fn tokens_replace_tokens_but_cannot_turn_them_on() {
        let open = Authorizer::open("default");
        assert!(matches!(
            open.set_tokens(Tokens::default()),
            Err(Error::TokensAdded)
        ));
        assert!(!open.required(), "a refused reload changes nothing");
        let with_tokens = Authorizer::open("default");
        with_tokens.authenticator.write().tokens = Some(Tokens::default());
        with_tokens.set_tokens(Tokens::default()).unwrap();
        assert!(with_tokens.required());
    }

    #[tokio::test]
    async fn the_admin_token_is_read_with_any_case_of_its_scheme() {
        use tower::ServiceExt;
        let router = axum::Router::new()
            .route("/metrics", axum::routing::get(|| async { "metrics" }))
            .route("/healthz", axum::routing::get(|| async { "ok" }));
        let router = require_admin_token(router, Arc::new(AdminToken::new("admin-secret")));
        let status = |path: &'static str, authorization: Option<&'static str>| {
            let router = router.clone();
            async move {
                let mut request = http::Request::get(path);
                if let Some(value) = authorization {
                    request = request.header(http::header::AUTHORIZATION, value);
                }
                let request = request.body(axum::body::Body::empty()).unwrap();
                router.oneshot(request).await.unwrap().status().as_u16()
            }
        };
        assert_eq!(status("/metrics", Some("Bearer admin-secret")).await, 200);
        assert_eq!(status("/metrics", Some("bearer admin-secret")).await, 200);
        assert_eq!(status("/metrics", Some("BEARER admin-secret")).await, 200);
        assert_eq!(status("/metrics", Some("Basic admin-secret")).await, 401);
        assert_eq!(status("/metrics", Some("bearer wrong")).await, 401);
        assert_eq!(status("/metrics", None).await, 401);
        assert_eq!(status("/healthz", None).await, 200);
    }

    #[test]
    fn admin_exposure() {
        let loopback: std::net::SocketAddr = "127.0.0.1:15014".parse().unwrap();
        let v6_loopback: std::net::SocketAddr = "[::1]:15014".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:15014".parse().unwrap();
        let public: std::net::SocketAddr = "10.1.2.3:15014".parse().unwrap();
        assert!(check_admin_exposure(loopback, false).is_ok());
        assert!(check_admin_exposure(v6_loopback, false).is_ok());
        assert!(matches!(
            check_admin_exposure(any, false),
            Err(Error::AdminExposed(_))
        ));
        assert!(check_admin_exposure(public, false).is_err());
        assert!(check_admin_exposure(public, true).is_ok());
    }
}
