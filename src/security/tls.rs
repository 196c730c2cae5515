//! TLS and mTLS for the gRPC port with rustls, certificates reloaded when their files change.
//!
//! The server's certificate is given by a [`ResolvesServerCert`] and the client-certificate
//! check by a [`ClientCertVerifier`] whose current values sit behind a lock; a reload task
//! polls the files and swaps both when their bytes change, so a rotated certificate is served
//! to the next handshake without a restart. A file that does not parse is logged and the old
//! material kept.
//!
//! [`incoming_tls`] accepts TCP connections and runs each TLS handshake in its own task with a
//! deadline, so one slow handshake never holds up the accept loop, and yields the finished
//! `TlsStream`s to tonic's `serve_with_incoming`. tonic's `Connected` impl for `TlsStream`
//! puts the verified peer certificate chain into every request's extensions
//! (`TlsConnectInfo`), where [`super::identity`] reads the SPIFFE ID.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::Stream;
use parking_lot::RwLock;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use tokio::{io::AsyncWriteExt, net::TcpListener, sync::mpsc};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
        client::danger::HandshakeSignatureValid,
        crypto::CryptoProvider,
        server::{
            ClientHello, ResolvesServerCert, WebPkiClientVerifier,
            danger::{ClientCertVerified, ClientCertVerifier},
        },
        sign::CertifiedKey,
    },
    server::TlsStream,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::guard::Guarded;
use crate::transport::Batched;

/// Where the TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// PEM certificate chain of the server, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle client certificates must chain to; `None` asks for no client
    /// certificate.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS material could not be loaded. The files' contents never appear in the message.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        what: &'static str,
    },
    /// rustls refused the material (key not matching the certificate, bad CA).
    #[error("{what}: {message}")]
    Rustls {
        /// What was being built.
        what: &'static str,
        /// rustls' message.
        message: String,
    },
}

/// One consistent set of loaded material.
struct Material {
    key: Arc<CertifiedKey>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// Hash of the files' bytes, to notice a change.
    fingerprint: u128,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn fingerprint(paths: &TlsPaths) -> Result<(u128, [Vec<u8>; 3]), TlsError> {
    let cert = read(&paths.cert)?;
    let key = read(&paths.key)?;
    let ca = match &paths.client_ca {
        Some(path) => read(path)?,
        None => Vec::new(),
    };
    let mut all = Vec::with_capacity(cert.len() + key.len() + ca.len() + 2);
    for part in [&cert, &key, &ca] {
        all.extend_from_slice(part);
        all.push(0);
    }
    Ok((xxhash_rust::xxh3::xxh3_128(&all), [cert, key, ca]))
}

fn certificates(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            path: path.display().to_string(),
            what: "not valid PEM certificates",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.display().to_string(),
            what: "no certificate",
        });
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(paths: &TlsPaths, client_cert_optional: bool) -> Result<Material, TlsError> {
    let (fingerprint, [cert, key, ca]) = fingerprint(paths)?;
    let provider = provider();
    let chain = certificates(&paths.cert, &cert)?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|_| TlsError::Pem {
        path: paths.key.display().to_string(),
        what: "no private key",
    })?;
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| TlsError::Rustls {
        what: "server certificate and key",
        message: e.to_string(),
    })?;
    let verifier = match &paths.client_ca {
        None => None,
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(path, &ca)? {
                roots.add(ca).map_err(|e| TlsError::Rustls {
                    what: "client CA",
                    message: e.to_string(),
                })?;
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if client_cert_optional {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            Some(builder.build().map_err(|e| TlsError::Rustls {
                what: "client certificate verifier",
                message: e.to_string(),
            })?)
        }
    };
    Ok(Material {
        key: Arc::new(key),
        verifier,
        fingerprint,
    })
}

/// The current material, swapped by the reload task.
struct Current {
    material: RwLock<Arc<Material>>,
    client_cert_optional: bool,
}

#[derive(Clone)]
struct Reloading(Arc<Current>);

impl std::fmt::Debug for Reloading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").finish_non_exhaustive()
    }
}

impl Reloading {
    fn verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.0.material.read().verifier.clone()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.material.read().key.clone())
    }
}

fn no_verifier() -> rustls::Error {
    rustls::Error::General("no client CA loaded".into())
}

impl ClientCertVerifier for Reloading {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.0.client_cert_optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The CA set can change under us, and a borrowed answer cannot follow it; an empty
        // hint list lets the client send the certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .ok_or_else(no_verifier)?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()
            .ok_or_else(no_verifier)?
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()
            .ok_or_else(no_verifier)?
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match self.verifier() {
            Some(verifier) => verifier.supported_verify_schemes(),
            None => provider()
                .signature_verification_algorithms
                .supported_schemes(),
        }
    }
}

/// A TLS acceptor whose certificate and client CA follow their files.
#[derive(Clone)]
pub struct ReloadingTls {
    paths: TlsPaths,
    current: Reloading,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Loads the material once; fails when it does not load.
    ///
    /// `client_cert_optional`: with a client CA, whether a client may connect without a
    /// certificate (it then authenticates with a bearer token).
    pub fn new(paths: TlsPaths, client_cert_optional: bool) -> Result<Self, TlsError> {
        let material = load(&paths, client_cert_optional)?;
        let has_ca = material.verifier.is_some();
        let current = Reloading(Arc::new(Current {
            material: RwLock::new(Arc::new(material)),
            client_cert_optional,
        }));
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Rustls {
                what: "TLS versions",
                message: e.to_string(),
            })?;
        let builder = if has_ca {
            builder.with_client_cert_verifier(Arc::new(current.clone()))
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_cert_resolver(Arc::new(current.clone()));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            paths,
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reloads the files if their bytes changed. Returns whether new material is in use; an
    /// error leaves the old material in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (fingerprint, _) = fingerprint(&self.paths)?;
        if fingerprint == self.current.0.material.read().fingerprint {
            return Ok(false);
        }
        let material = load(&self.paths, self.current.0.client_cert_optional)?;
        if material.verifier.is_some() != self.current.0.material.read().verifier.is_some() {
            return Err(TlsError::Rustls {
                what: "reload",
                message: "the client CA cannot be added or removed without a restart".into(),
            });
        }
        *self.current.0.material.write() = Arc::new(material);
        Ok(true)
    }

    /// Polls the files every `interval` until `shutdown`, reloading on change.
    pub async fn watch(self, interval: Duration, shutdown: CancellationToken) {
        crate::poll::every(interval, &shutdown, || match self.reload() {
            Ok(true) => info!(cert = %self.paths.cert.display(), "TLS certificates reloaded"),
            Ok(false) => {}
            Err(error) => {
                warn!(error = %error, "TLS certificates not reloaded; keeping the old ones")
            }
        })
        .await;
    }
}

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// How long a connection may take to finish its TLS handshake and, on plaintext, to
    /// send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// How long a connection may go without sending a byte after its handshake.
    pub idle_timeout: Duration,
    /// Most TLS handshakes in progress at once; connections past it are closed at once.
    pub max_pending_handshakes: usize,
}

/// What the accept loop counts.
pub trait AcceptObserver: Send + Sync + 'static {
    /// A TLS handshake failed or timed out, or a connection was refused because too many
    /// handshakes were in progress.
    fn handshake_failed(&self, _reason: &'static str) {}
}

/// A stream of accepted plaintext connections, each guarded by the handshake and idle
/// timeouts and with its writes batched ([`Batched`]), for tonic's `serve_with_incoming`.
pub fn incoming_plain(
    listener: TcpListener,
    limits: AcceptLimits,
    shutdown: CancellationToken,
) -> impl Stream<Item = std::io::Result<Batched<Guarded<tokio::net::TcpStream>>>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(
        async move {
            loop {
                let Some((stream, _)) = accept(&listener, &shutdown).await else {
                    return;
                };
                let guarded = Guarded::new(stream, limits.handshake_timeout, limits.idle_timeout);
                if tx.send(Ok(Batched::new(guarded))).await.is_err() {
                    return;
                }
            }
        }
        .in_current_span(),
    );
    ReceiverStream::new(rx)
}

/// A stream of connections that finished their TLS handshake, for tonic's
/// `serve_with_incoming`.
pub fn incoming_tls(
    listener: TcpListener,
    tls: ReloadingTls,
    limits: AcceptLimits,
    observer: Arc<dyn AcceptObserver>,
    shutdown: CancellationToken,
) -> impl Stream<Item = std::io::Result<TlsStream<Batched<Guarded<tokio::net::TcpStream>>>>>
+ Send
+ 'static {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(
        limits.max_pending_handshakes.max(1),
    ));
    tokio::spawn(
        async move {
            loop {
                let Some((stream, peer)) = accept(&listener, &shutdown).await else {
                    return;
                };
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    observer.handshake_failed("too_many_pending");
                    debug!(peer.addr = %peer, "too many TLS handshakes in progress; closed");
                    continue;
                };
                let guarded = Guarded::new(stream, limits.handshake_timeout, limits.idle_timeout);
                let guarded = Batched::new(guarded);
                let acceptor = tls.acceptor.clone();
                let tx = tx.clone();
                let observer = observer.clone();
                tokio::spawn(
                    async move {
                        let handshake = tokio::time::timeout(
                            limits.handshake_timeout,
                            acceptor.accept(guarded).into_fallible(),
                        )
                        .await;
                        match handshake {
                            Ok(Ok(stream)) => {
                                // A failed handshake holds its permit until its alert left.
                                drop(permit);
                                let _ = tx.send(Ok(stream)).await;
                            }
                            // The guard's read deadline ends a stalled handshake first.
                            Ok(Err((error, _))) if error.kind() == std::io::ErrorKind::TimedOut => {
                                observer.handshake_failed("timeout");
                                debug!(peer.addr = %peer, "TLS handshake timed out");
                            }
                            Ok(Err((error, mut io))) => {
                                observer.handshake_failed("handshake");
                                debug!(peer.addr = %peer, %error, "TLS handshake failed");
                                // The alert that says why (an unknown CA, a missing
                                // certificate) is still in the connection's buffer.
                                let _ = tokio::time::timeout(ALERT_TIMEOUT, io.shutdown()).await;
                            }
                            Err(_) => {
                                observer.handshake_failed("timeout");
                                debug!(peer.addr = %peer, "TLS handshake timed out");
                            }
                        }
                    }
                    .in_current_span(),
                );
            }
        }
        .in_current_span(),
    );
    ReceiverStream::new(rx)
}

/// How long a failed handshake's alert may take to leave before the connection is closed.
const ALERT_TIMEOUT: Duration = Duration::from_secs(1);

/// The next accepted connection, or `None` on shutdown. Accept errors (out of file
/// descriptors) are logged and retried after a pause rather than ending the server.
async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, peer));
            }
            Err(error) => {
                warn!(%error, "accept failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}
