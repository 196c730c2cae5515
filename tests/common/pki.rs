//! Test certificates made with rcgen: a CA, a server certificate for `localhost`, and
//! client certificates carrying SPIFFE URI SANs.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{net::SocketAddr, path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Pem {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "pixiu-metadata");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with these URI SANs (e.g. a SPIFFE ID).
    pub fn client(&self, uris: &[&str]) -> Pem {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "workload");
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    /// The client certificate of `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub fn workload(&self, namespace: &str, service_account: &str) -> Pem {
        self.client(&[&format!(
            "spiffe://cluster.local/ns/{namespace}/sa/{service_account}"
        )])
    }

    fn sign(&self, params: CertificateParams) -> Pem {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes the server's TLS files into `dir`: `server.crt`, `server.key`, `ca.crt`.
pub fn write_server_files(dir: &Path, server: &Pem, client_ca: &Ca) {
    write_atomically(&dir.join("server.crt"), &server.cert);
    write_atomically(&dir.join("server.key"), &server.key);
    write_atomically(&dir.join("ca.crt"), &client_ca.pem());
}

/// Replaces a file in one rename, as a secret mount does.
pub fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS endpoint trusting `server_ca`, presenting `client` when given.
pub fn endpoint(addr: SocketAddr, server_ca: &str, client: Option<&Pem>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.cert, &client.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
}

/// Connects over TLS, retrying while the server starts; the error once 10 s have passed.
pub async fn connect(
    addr: SocketAddr,
    server_ca: &str,
    client: Option<&Pem>,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = endpoint(addr, server_ca, client);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(error) if tokio::time::Instant::now() > deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
