//! `serve`'s security and limit flags, flattened into `ServeArgs`.

use std::{path::PathBuf, time::Duration};

use anyhow::bail;
use clap::Args;

use crate::{
    config::Config,
    security::{SecurityConfig, rate::Rate, tls::TlsPaths},
};

/// TLS, authentication and connection limit flags of `serve`.
#[derive(Debug, Args, Clone)]
pub struct SecurityArgs {
    /// PEM certificate chain of the gRPC port; with --tls-key, serves TLS. Reloaded when
    /// the file changes.
    #[arg(long, env = "PIXIU_METADATA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PIXIU_METADATA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle client certificates must chain to (mTLS). Clients are identified by
    /// the SPIFFE ID in their certificate (`spiffe://<td>/ns/<ns>/sa/<sa>`). Mandatory
    /// unless --token-file is also given.
    #[arg(long, env = "PIXIU_METADATA_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// How often the TLS, token, policy and admin token files are checked for changes.
    #[arg(long, env = "PIXIU_METADATA_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,
    /// TOML file of bearer tokens (`[[token]]` entries: name, namespace, sha256 or token); clients
    /// send `authorization: Bearer <token>`.
    #[arg(long, env = "PIXIU_METADATA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// TOML file of grants beyond a client's own namespace (`[[grant]]` entries: identities,
    /// namespaces, operations).
    #[arg(long, env = "PIXIU_METADATA_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// File holding the bearer token admin HTTP requires; needed when --admin-addr is not
    /// loopback.
    #[arg(long, env = "PIXIU_METADATA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Most concurrent HTTP/2 streams per connection.
    #[arg(
        long,
        env = "PIXIU_METADATA_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1000
    )]
    pub max_streams_per_connection: u32,
    /// Largest request header list in bytes (each header's name and value and 32): a larger
    /// one is answered `RESOURCE_EXHAUSTED`; HTTP/2 itself refuses four times as much.
    #[arg(
        long,
        env = "PIXIU_METADATA_MAX_HEADER_LIST_BYTES",
        default_value_t = 16 * 1024
    )]
    pub max_header_list_bytes: u32,
    /// Most resource names one ADS stream may subscribe to, across types.
    #[arg(
        long,
        env = "PIXIU_METADATA_MAX_SUBSCRIPTIONS_PER_STREAM",
        default_value_t = 100_000
    )]
    pub max_subscriptions_per_stream: usize,
    /// Interval of the server's HTTP/2 keepalive pings.
    #[arg(long, env = "PIXIU_METADATA_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "PIXIU_METADATA_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,
    /// How long a new connection may take to finish TLS and send the HTTP/2 preface.
    #[arg(long, env = "PIXIU_METADATA_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// How long a connection may send nothing at all (keepalive answers included).
    #[arg(long, env = "PIXIU_METADATA_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Age after which a connection is drained with GOAWAY so clients rebalance; `0s`
    /// never.
    #[arg(long, env = "PIXIU_METADATA_MAX_CONNECTION_AGE", default_value = "30m", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,
    /// How long a draining connection's streams may go on before it is closed.
    #[arg(long, env = "PIXIU_METADATA_MAX_CONNECTION_AGE_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub max_connection_age_grace: Duration,
    /// Sustained publishes per second per authenticated identity; 0 is unlimited.
    #[arg(long, env = "PIXIU_METADATA_PUBLISH_RATE", default_value_t = 100.0)]
    pub publish_rate: f64,
    /// Publishes per authenticated identity allowed in a burst.
    #[arg(long, env = "PIXIU_METADATA_PUBLISH_BURST", default_value_t = 500)]
    pub publish_burst: u32,
}

impl SecurityArgs {
    /// Writes these flags into `config`.
    pub fn apply(&self, config: &mut Config) -> anyhow::Result<()> {
        let mut security = SecurityConfig {
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsPaths {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.client_ca.clone(),
                }),
                _ => None,
            },
            tls_reload_interval: Some(self.tls_reload_interval),
            token_file: self.token_file.clone(),
            policy_file: self.policy_file.clone(),
            admin_token_file: self.admin_token_file.clone(),
            ..SecurityConfig::default()
        };
        if self.tls_reload_interval.is_zero() {
            bail!("--tls-reload-interval must be longer than zero");
        }
        if !self.publish_rate.is_finite() || self.publish_rate < 0.0 {
            bail!("--publish-rate must be a number of publishes per second, 0 for unlimited");
        }
        let limits = &mut security.limits;
        limits.max_concurrent_streams_per_connection = self.max_streams_per_connection.max(1);
        if self.max_header_list_bytes < 1024 {
            bail!("--max-header-list-bytes must be at least 1024: gRPC's own headers need room");
        }
        limits.max_header_list_bytes = self.max_header_list_bytes;
        limits.http2_keepalive_interval = self.http2_keepalive_interval;
        limits.http2_keepalive_timeout = self.http2_keepalive_timeout;
        limits.handshake_timeout = self.handshake_timeout;
        limits.idle_timeout = self.idle_timeout;
        limits.max_connection_age =
            (!self.max_connection_age.is_zero()).then_some(self.max_connection_age);
        limits.max_connection_age_grace = self.max_connection_age_grace;
        limits.publish_rate = (self.publish_rate > 0.0).then_some(Rate {
            per_second: self.publish_rate,
            burst: self.publish_burst.max(1),
        });
        config.xds.limits.max_subscribed_names = self.max_subscriptions_per_stream;
        config.security = security;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    /// The security flags alone, as `serve` flattens them.
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        security: SecurityArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<Config> {
        let flags = Flags::try_parse_from(["pixiu-metadata"].iter().chain(args))?;
        let mut config = Config::default();
        flags.security.apply(&mut config)?;
        Ok(config)
    }

    #[test]
    fn defaults_are_a_development_server_with_limits() {
        let config = config(&[]).unwrap();
        let security = &config.security;
        assert!(security.tls.is_none() && security.token_file.is_none());
        assert_eq!(
            security.limits.max_connection_age,
            Some(Duration::from_secs(1800))
        );
        assert_eq!(security.limits.max_concurrent_streams_per_connection, 1000);
        assert_eq!(
            security
                .limits
                .publish_rate
                .map(|r| (r.per_second, r.burst)),
            Some((100.0, 500))
        );
    }

    #[test]
    fn flags_reach_the_config() {
        let config = config(&[
            "--tls-cert=c.pem",
            "--tls-key=k.pem",
            "--client-ca=ca.pem",
            "--token-file=t.toml",
            "--policy-file=p.toml",
            "--max-connection-age=0s",
            "--publish-rate=0",
            "--max-subscriptions-per-stream=10",
            "--idle-timeout=1m",
        ])
        .unwrap();
        let tls = config.security.tls.as_ref().unwrap();
        assert_eq!(
            tls.client_ca.as_deref(),
            Some(std::path::Path::new("ca.pem"))
        );
        assert_eq!(config.security.limits.max_connection_age, None);
        assert_eq!(config.security.limits.publish_rate, None);
        assert_eq!(config.security.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.xds.limits.max_subscribed_names, 10);
    }

    #[test]
    fn a_key_without_a_certificate_is_refused() {
        assert!(config(&["--tls-key=k.pem"]).is_err());
        assert!(config(&["--client-ca=ca.pem"]).is_err());
        assert!(config(&["--publish-rate=-1"]).is_err());
    }
}
