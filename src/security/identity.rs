//! Who a caller is: a SPIFFE workload ID from its client certificate, an entry of the token
//! file named by its bearer token, or nobody.
//!
//! The certificate itself was verified by rustls against `--client-ca` before any request
//! arrives; this module only reads the identity out of it. Tokens are kept as SHA-256
//! digests, so the token file may hold digests instead of the secrets.

use std::{collections::HashMap, path::Path};

use rustls_pki_types::CertificateDer;
use serde::Deserialize;

use crate::model;

/// The identity of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No credentials presented.
    Anonymous,
    /// Credentials presented but not accepted (unknown token, certificate without a valid
    /// SPIFFE workload ID).
    Rejected,
    /// An authenticated workload.
    Workload(Workload),
}

/// An authenticated workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    /// What the policy file matches: the SPIFFE ID, or `token:<name>`.
    pub principal: String,
    /// The namespace the workload belongs to.
    pub namespace: String,
}

impl Workload {
    /// The workload `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn spiffe(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            principal: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
            namespace: namespace.to_string(),
        }
    }

    /// The workload of the token file entry `name` in `namespace`.
    pub fn token(name: &str, namespace: &str) -> Self {
        Self {
            principal: format!("token:{name}"),
            namespace: namespace.to_string(),
        }
    }
}

/// Parses a SPIFFE ID of istio's form, `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`.
///
/// Strict: exactly those four path segments, a namespace that passes the namespace rules,
/// no query, no fragment, no percent-encoding, no empty segment.
pub fn parse_spiffe_id(uri: &str) -> Option<Workload> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (trust_domain, path) = rest.split_once('/')?;
    let valid_segment = |s: &str| {
        !s.is_empty()
            && s.len() <= model::MAX_NAME_BYTES
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s != "."
            && s != ".."
    };
    if !valid_segment(trust_domain) {
        return None;
    }
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["ns", namespace, "sa", service_account]
            if valid_segment(namespace)
                && valid_segment(service_account)
                && model::check_namespace(namespace).is_ok() =>
        {
            Some(Workload::spiffe(trust_domain, namespace, service_account))
        }
        _ => None,
    }
}

/// The workload named by the SPIFFE URI SAN of a (verified) leaf certificate: the first URI
/// SAN that is a SPIFFE ID. `None` when the certificate cannot be parsed or has none.
pub fn workload_of_certificate(leaf: &CertificateDer<'_>) -> Option<Workload> {
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let san = certificate.subject_alternative_name().ok()??;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .filter(|uri| uri.starts_with("spiffe://"))
        .collect();
    // A SPIFFE SVID carries exactly one SPIFFE ID; more is ambiguous, so none is taken.
    match uris.as_slice() {
        [uri] => parse_spiffe_id(uri),
        _ => None,
    }
}

/// The token file: bearer tokens and the workloads they stand for.
///
/// ```toml
/// [[token]]
/// name = "deployer"        # the principal is token:deployer
/// namespace = "ci"         # its own namespace
/// sha256 = "9f86d08..."    # hex SHA-256 of the token (or: token = "the secret")
/// ```
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Workload>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default, rename = "token")]
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    namespace: String,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("reading the token file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file's content is not acceptable (the message never contains a token).
    #[error("the token file {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn digest(token: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Tokens {
    /// Parses token file TOML.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: TokenFile = toml::from_str(text).map_err(|e| {
            // toml's message may quote the offending line, which may hold a token.
            format!("not valid token TOML near {:?}", e.span())
        })?;
        let mut by_digest = HashMap::new();
        for entry in file.tokens {
            model::check_namespace(&entry.namespace)
                .map_err(|e| format!("entry {:?}: {e}", entry.name))?;
            let digest = match (&entry.sha256, &entry.token) {
                (Some(hex), None) => {
                    parse_hex_digest(&hex.to_ascii_lowercase()).ok_or_else(|| {
                        format!("entry {:?}: sha256 must be 64 hex digits", entry.name)
                    })?
                }
                (None, Some(token)) if !token.is_empty() => digest(token.as_bytes()),
                _ => {
                    return Err(format!(
                        "entry {:?}: give exactly one of sha256 or token",
                        entry.name
                    ));
                }
            };
            if by_digest
                .insert(digest, Workload::token(&entry.name, &entry.namespace))
                .is_some()
            {
                return Err(format!("entry {:?}: duplicate token", entry.name));
            }
        }
        Ok(Self { by_digest })
    }

    /// Reads and parses a token file.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| TokenFileError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// The workload a presented token stands for.
    pub fn lookup(&self, token: &[u8]) -> Option<&Workload> {
        self.by_digest.get(&digest(token))
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether the file has no token.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// Identifies callers from what the transport and the request headers carry.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    /// Bearer tokens, when `--token-file` is set.
    pub tokens: Option<Tokens>,
    /// Whether client certificates are verified (`--client-ca` is set).
    pub client_certificates: bool,
}

impl Authenticator {
    /// Whether any authentication is configured; then anonymous callers are refused.
    pub fn required(&self) -> bool {
        self.tokens.is_some() || self.client_certificates
    }

    /// The identity of a caller that presented `peer_certificates` (verified by TLS) and
    /// the `authorization` header value `authorization`.
    ///
    /// A certificate wins over a token. A bearer token sent to a server without a token
    /// file is ignored (development servers accept any client).
    pub fn identify(
        &self,
        peer_certificates: Option<&[CertificateDer<'_>]>,
        authorization: Option<&[u8]>,
    ) -> Identity {
        if self.client_certificates
            && let Some(leaf) = peer_certificates.and_then(<[_]>::first)
        {
            return match workload_of_certificate(leaf) {
                Some(workload) => Identity::Workload(workload),
                None => Identity::Rejected,
            };
        }
        match (authorization, &self.tokens) {
            (Some(value), Some(tokens)) => match bearer(value) {
                Some(token) => tokens
                    .lookup(token)
                    .cloned()
                    .map_or(Identity::Rejected, Identity::Workload),
                None => Identity::Rejected,
            },
            _ => Identity::Anonymous,
        }
    }
}

/// The token of an `authorization: Bearer <token>` value: the scheme in any case, then one
/// or more spaces (RFC 7235).
pub(crate) fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    let token = rest.strip_prefix(b" ")?;
    let token = &token[token.iter().take_while(|b| **b == b' ').count()..];
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        let cases = [
            ("spiffe://cluster.local/ns/a/sa/app", Some(("a", "app"))),
            ("spiffe://td/ns/team-1/sa/x_y", Some(("team-1", "x_y"))),
            ("spiffe://td/ns/a/sa/app/extra", None),
            ("spiffe://td/ns//sa/app", None),
            ("spiffe://td/ns/../sa/app", None),
            ("spiffe://td/ns/a%2Fb/sa/app", None),
            ("spiffe://td/sa/app/ns/a", None),
            ("spiffe:///ns/a/sa/app", None),
            ("http://td/ns/a/sa/app", None),
            ("spiffe://td/ns/a/sa/app?x=1", None),
            ("spiffe://td/ns/a\0/sa/app", None),
        ];
        for (uri, expected) in cases {
            let got = parse_spiffe_id(uri);
            assert_eq!(
                got.as_ref()
                    .map(|w| (w.namespace.as_str(), w.principal.as_str())),
                expected.map(|(ns, _)| (ns, uri)),
                "{uri}"
            );
        }
    }

    #[test]
    fn tokens() {
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"
        let tokens = Tokens::from_toml(&format!(
            "[[token]]\nname = \"a\"\nnamespace = \"ns-a\"\nsha256 = \"{hex}\"\n\
             [[token]]\nname = \"b\"\nnamespace = \"ns-b\"\ntoken = \"secret-b\"\n"
        ))
        .unwrap();
        assert_eq!(tokens.len(), 2);
        let auth = Authenticator {
            tokens: Some(tokens),
            client_certificates: false,
        };
        assert_eq!(
            auth.identify(None, Some(b"Bearer test")),
            Identity::Workload(Workload::token("a", "ns-a"))
        );
        assert_eq!(
            auth.identify(None, Some(b"bearer secret-b")),
            Identity::Workload(Workload::token("b", "ns-b"))
        );
        assert_eq!(
            auth.identify(None, Some(b"Bearer nope")),
            Identity::Rejected
        );
        assert_eq!(auth.identify(None, Some(b"Basic xyz")), Identity::Rejected);
        assert_eq!(auth.identify(None, Some(b"Bearer ")), Identity::Rejected);
        assert_eq!(bearer(b"bearer   test"), Some(&b"test"[..]));
        assert_eq!(bearer(b"BEARER test"), Some(&b"test"[..]));
        assert_eq!(bearer(b"Bearertest"), None);
        assert_eq!(bearer(b"Bearer    "), None);
        assert_eq!(bearer(b"Basic test"), None);
        assert_eq!(auth.identify(None, None), Identity::Anonymous);
        assert!(auth.required());
        let open = Authenticator::default();
        assert_eq!(
            open.identify(None, Some(b"Bearer test")),
            Identity::Anonymous
        );
        assert!(!open.required());
    }

    #[test]
    fn bad_token_files_do_not_echo_secrets() {
        for text in [
            "[[token]]\nname = \"a\"\nnamespace = \"n\"\n",
            "[[token]]\nname = \"a\"\nnamespace = \"n\"\ntoken = \"s3cr3t\"\nsha256 = \"00\"\n",
            "[[token]]\nname = \"a\"\nnamespace = \"bad/ns\"\ntoken = \"s3cr3t\"\n",
            "[[token]]\nname = \"a\"\nnamespace = \"n\"\ntoken = \"s3cr3t\"\n[[token]]\nname = \"b\"\nnamespace = \"n\"\ntoken = \"s3cr3t\"\n",
            "token = s3cr3t garbage",
        ] {
            let error = Tokens::from_toml(text).unwrap_err();
            assert!(!error.contains("s3cr3t"), "{error}");
        }
    }
}
