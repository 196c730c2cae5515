//! The connection every call of a [`super::Client`] goes through: a tonic channel (TLS when
//! configured) whose requests all carry the client's credentials and namespace.

use std::fmt;

use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use super::{ClientConfig, Error, subscribe::CONNECT_TIMEOUT};
use crate::model::NAMESPACE_HEADER;

/// A channel to the server that adds the client's bearer token and namespace to every call;
/// tonic's generated clients take it like a [`Channel`].
pub type Transport = InterceptedService<Channel, Credentials>;

/// A bearer token, kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// Wraps `token`, surrounding whitespace removed (as a token file ends with a newline).
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into().trim().to_string())
    }

    /// The token itself.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

/// Adds `authorization: Bearer <token>` and `x-pixiu-namespace` to every request that does
/// not already carry them. The server reads the namespace of an ADS stream from its node first
/// and falls back to the header.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<AsciiMetadataValue>,
    namespace: Option<AsciiMetadataValue>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("authorization", &self.authorization.as_ref().map(|_| ".."))
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Credentials {
    /// The credentials of `config`, checked to be sendable as headers.
    pub fn of(config: &ClientConfig) -> Result<Self, Error> {
        let namespace = match &config.namespace {
            Some(namespace) => {
                Some(
                    MetadataValue::try_from(namespace.as_str()).map_err(|_| Error::Namespace {
                        namespace: namespace.clone(),
                    })?,
                )
            }
            None => None,
        };
        let authorization = match &config.token {
            Some(token) if token.secret().is_empty() => return Err(Error::Token),
            Some(token) => {
                let mut value = MetadataValue::try_from(format!("Bearer {}", token.secret()))
                    .map_err(|_| Error::Token)?;
                // Never indexed by HPACK, so it stays out of the connection's header tables.
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self {
            authorization,
            namespace,
        })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        if let Some(authorization) = &self.authorization
            && !metadata.contains_key("authorization")
        {
            metadata.insert("authorization", authorization.clone());
        }
        if let Some(namespace) = &self.namespace
            && !metadata.contains_key(NAMESPACE_HEADER)
        {
            metadata.insert(NAMESPACE_HEADER, namespace.clone());
        }
        Ok(request)
    }
}

/// Connects to `config.endpoint` (over TLS with `config.tls`) within the connect timeout.
pub async fn connect_transport(config: &ClientConfig) -> Result<Transport, Error> {
    let credentials = Credentials::of(config)?;
    let mut endpoint =
        Channel::from_shared(config.endpoint.clone()).map_err(|_| Error::Endpoint {
            endpoint: config.endpoint.clone(),
        })?;
    if let Some(tls) = &config.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|source| Error::Connect {
                endpoint: config.endpoint.clone(),
                source,
            })?;
    }
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| Error::ConnectTimeout {
            endpoint: config.endpoint.clone(),
        })?
        .map_err(|source| Error::Connect {
            endpoint: config.endpoint.clone(),
            source,
        })?;
    Ok(InterceptedService::new(channel, credentials))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intercepted(config: &ClientConfig, request: Request<()>) -> Request<()> {
        Credentials::of(config).unwrap().call(request).unwrap()
    }

    #[test]
    fn every_request_carries_the_token_and_the_namespace() {
        let config = ClientConfig::new("http://x")
            .namespace("team-a")
            .token(BearerToken::new("s3cret\n"));
        let request = intercepted(&config, Request::new(()));
        let metadata = request.metadata();
        assert_eq!(metadata.get("authorization").unwrap(), "Bearer s3cret");
        assert!(metadata.get("authorization").unwrap().is_sensitive());
        assert_eq!(metadata.get(NAMESPACE_HEADER).unwrap(), "team-a");

        // A call that names its own namespace keeps it.
        let mut own = Request::new(());
        own.metadata_mut()
            .insert(NAMESPACE_HEADER, "team-b".parse().unwrap());
        let request = intercepted(&config, own);
        assert_eq!(request.metadata().get(NAMESPACE_HEADER).unwrap(), "team-b");

        // Without either, nothing is added.
        let request = intercepted(&ClientConfig::new("http://x"), Request::new(()));
        assert!(request.metadata().is_empty());
    }

    #[test]
    fn tokens_and_namespaces_that_are_no_header_are_refused() {
        let bad_token = ClientConfig::new("http://x").token(BearerToken::new("a\u{7}b"));
        assert!(matches!(Credentials::of(&bad_token), Err(Error::Token)));
        let empty = ClientConfig::new("http://x").token(BearerToken::new("  \n"));
        assert!(matches!(Credentials::of(&empty), Err(Error::Token)));
        let bad_namespace = ClientConfig::new("http://x").namespace("team\na");
        assert!(matches!(
            Credentials::of(&bad_namespace),
            Err(Error::Namespace { .. })
        ));
    }

    #[test]
    fn the_token_stays_out_of_debug_output() {
        let config = ClientConfig::new("http://x").token(BearerToken::new("s3cret"));
        assert!(!format!("{config:?}").contains("s3cret"));
        let credentials = Credentials::of(&config).unwrap();
        assert!(!format!("{credentials:?}").contains("s3cret"));
    }
}
