//! The command line: `serve` and the client commands.
//!
//! Flags parse into [`Config`](crate::Config) here and nowhere else; every `serve` flag can
//! also be set with a `PIXIU_METADATA_*` environment variable.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tonic::{
    Request,
    transport::{Certificate, ClientTlsConfig, Identity},
};

use crate::{
    client::{BearerToken, ClientConfig, Error as ClientError, Transport, connect_transport},
    config::{Backend, Config},
    pb::metadata as proto,
};

mod file;
pub mod output;
pub mod records;
pub mod security;
pub mod status;
mod watch;

pub use file::parse_from;
pub use output::Output;

/// pixiu-metadata: store Dubbo application metadata and service definitions, and push them
/// to consumers over xDS.
#[derive(Debug, Parser)]
#[command(name = "pixiu-metadata", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on standard error (filter with `RUST_LOG`, e.g. `RUST_LOG=debug`).
    #[arg(
        long,
        global = true,
        env = "PIXIU_METADATA_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Publish, read and watch application metadata.
    #[command(subcommand)]
    Metadata(MetadataCommand),
    /// Publish, read and watch service definitions.
    #[command(subcommand)]
    Definition(DefinitionCommand),
    /// Show each connected client's sync state per type (SYNCED, STALE, NACKED), like
    /// `istioctl proxy-status`, from the server's admin port.
    Status(status::StatusArgs),
    /// Print a shell completion script, e.g. `pixiu-metadata completions bash > /etc/bash_completion.d/pixiu-metadata`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the CustomResourceDefinitions of the Kubernetes store as YAML
    /// (`pixiu-metadata crds | kubectl apply -f -`).
    Crds,
    /// Benchmark this server against etcd and a bare tonic echo on loopback.
    Bench(crate::bench::BenchArgs),
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the gRPC port (metadata API, ADS, health, reflection).
    #[arg(
        long,
        env = "PIXIU_METADATA_GRPC_ADDR",
        default_value = "127.0.0.1:15010"
    )]
    pub grpc_addr: SocketAddr,
    /// Address of the admin HTTP port (health, metrics, debug pages, the operators' page).
    #[arg(
        long,
        env = "PIXIU_METADATA_ADMIN_ADDR",
        default_value = "127.0.0.1:15014"
    )]
    pub admin_addr: SocketAddr,
    /// TOML file of defaults for these flags, keyed by flag name (`grpc-addr = "..."`);
    /// environment variables and flags override it.
    #[arg(long, env = "PIXIU_METADATA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (and where each value came from) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// The effective configuration as TOML, filled in by [`parse_from`].
    #[arg(skip)]
    pub effective_config: String,
    /// Where records are stored.
    #[arg(
        long,
        env = "PIXIU_METADATA_STORE",
        value_enum,
        default_value = "embedded"
    )]
    pub store: Backend,
    /// Directory of the embedded store.
    #[arg(long, env = "PIXIU_METADATA_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// etcd client URLs of the etcd store, comma-separated (`http://10.0.0.1:2379,...`).
    #[arg(long, env = "PIXIU_METADATA_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every etcd key of the etcd store.
    #[arg(long, env = "PIXIU_METADATA_ETCD_PREFIX", default_value = crate::store::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// Kubeconfig file of the Kubernetes store (default: `$KUBECONFIG`, `~/.kube/config`,
    /// then the in-cluster service account).
    #[arg(long, env = "PIXIU_METADATA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This replica's name in the Kubernetes store's sweeper election (default: random; give
    /// the pod name).
    #[arg(long, env = "PIXIU_METADATA_KUBE_IDENTITY")]
    pub kube_identity: Option<String>,
    /// Namespace of requests and streams that name none.
    #[arg(
        long,
        env = "PIXIU_METADATA_DEFAULT_NAMESPACE",
        default_value = "default"
    )]
    pub default_namespace: String,
    /// Largest metadata_info or service definition accepted, in bytes.
    #[arg(long, env = "PIXIU_METADATA_MAX_VALUE_BYTES", default_value_t = crate::model::DEFAULT_MAX_VALUE_BYTES, value_parser = at_least_one())]
    pub max_value_bytes: usize,
    /// Most records per namespace and kind.
    #[arg(
        long,
        env = "PIXIU_METADATA_MAX_RECORDS_PER_NAMESPACE",
        default_value_t = 100_000
    )]
    pub max_records_per_namespace: usize,
    /// Most xDS streams (ADS and ECDS together) open at once.
    #[arg(long, env = "PIXIU_METADATA_MAX_STREAMS", default_value_t = 100_000)]
    pub max_streams: usize,
    /// How long a record lives after its last publish (e.g. `24h`, `90m`); providers
    /// re-publish to refresh it.
    #[arg(long, env = "PIXIU_METADATA_METADATA_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub metadata_ttl: std::time::Duration,
    /// How long open connections may take to finish on shutdown before they are closed
    /// (e.g. `10s`).
    #[arg(long, env = "PIXIU_METADATA_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Directory of YAML/JSON files with Envoy Listener, RouteConfiguration, Cluster and
    /// ClusterLoadAssignment resources, served to every xDS client and watched for changes.
    #[arg(long, env = "PIXIU_METADATA_ENVOY_CONFIG_DIR")]
    pub envoy_config_dir: Option<PathBuf>,
    /// Directory of Pixiu-style YAML/JSON files with listeners and clusters, served to Pixiu
    /// data planes over ECDS and watched for changes.
    #[arg(long, env = "PIXIU_METADATA_PIXIU_CONFIG_DIR")]
    pub pixiu_config_dir: Option<PathBuf>,
    /// TLS, authentication and connection limits.
    #[command(flatten)]
    pub security: Box<security::SecurityArgs>,
}

impl ServeArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<Config> {
        crate::model::check_namespace(&self.default_namespace).context("--default-namespace")?;
        let mut config = Config::default();
        config.grpc.addr = self.grpc_addr;
        config.grpc.drain_timeout = self.drain_timeout;
        config.store.backend = self.store;
        config.store.data_dir = self.data_dir.clone();
        config.store.max_records_per_namespace = self.max_records_per_namespace;
        if self.store == Backend::Etcd && self.etcd_endpoints.is_empty() {
            bail!("--store etcd needs --etcd-endpoints");
        }
        config.store.etcd_endpoints = self.etcd_endpoints.clone();
        config.store.etcd_prefix = self.etcd_prefix.clone();
        config.store.kubeconfig = self.kubeconfig.clone();
        config.store.kube_identity = self.kube_identity.clone();
        config.api.default_namespace = self.default_namespace.clone();
        config.api.max_value_bytes = self.max_value_bytes;
        config.xds.max_streams = self.max_streams;
        config.admin.addr = self.admin_addr;
        if self.metadata_ttl.is_zero() {
            anyhow::bail!("--metadata-ttl must be longer than zero");
        }
        config.lease.ttl = self.metadata_ttl;
        config.envoy.config_dir = self.envoy_config_dir.clone();
        config.pixiu.config_dir = self.pixiu_config_dir.clone();
        self.security.apply(&mut config)?;
        Ok(config)
    }
}

/// Flags shared by client commands.
#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// The server's gRPC address (`https://` for a server with `--tls-cert`).
    #[arg(
        long,
        env = "PIXIU_METADATA_SERVER",
        default_value = "http://127.0.0.1:15010"
    )]
    pub server: String,
    /// Namespace to publish to and read from (the server's default when absent).
    #[arg(long, short = 'n', env = "PIXIU_METADATA_NAMESPACE")]
    pub namespace: Option<String>,
    /// PEM CA bundle the server's certificate must chain to; needed for an `https://` server.
    #[arg(long, env = "PIXIU_METADATA_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// PEM certificate chain of this client, for a server that requires one (`--client-ca`).
    #[arg(long, env = "PIXIU_METADATA_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "PIXIU_METADATA_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name the server's certificate must hold, when it is not --server's host.
    #[arg(long, env = "PIXIU_METADATA_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// File holding a bearer token of the server's `--token-file`, sent on every call.
    #[arg(long, env = "PIXIU_METADATA_CLIENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// A value given inline or read from a file (`-` for standard input).
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ValueArgs {
    /// The value itself.
    #[arg(long)]
    pub value: Option<String>,
    /// Read the value from this file (`-` for standard input).
    #[arg(long)]
    pub file: Option<PathBuf>,
}

impl ValueArgs {
    fn read(&self) -> anyhow::Result<String> {
        match (&self.value, &self.file) {
            (Some(value), _) => Ok(value.clone()),
            (None, Some(path)) if path.as_os_str() == "-" => {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")
            }
            (None, Some(path)) => {
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
            }
            (None, None) => bail!("give --value or --file"),
        }
    }
}

/// `metadata` subcommands.
#[derive(Debug, Subcommand)]
pub enum MetadataCommand {
    /// Publish an application's metadata for one revision.
    Publish {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Application name.
        #[arg(long, short = 'a')]
        application: String,
        /// Revision (opaque; usually a hash computed by the provider).
        #[arg(long, short = 'r')]
        revision: String,
        #[command(flatten)]
        /// The metadata_info.
        value: ValueArgs,
    },
    /// Print the raw metadata_info of one revision.
    Get {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Application name.
        #[arg(long, short = 'a')]
        application: String,
        /// Revision.
        #[arg(long, short = 'r')]
        revision: String,
        /// Print a record as a table, JSON or YAML instead of the raw value.
        #[arg(long, short = 'o', value_enum)]
        output: Option<Output>,
    },
    /// List stored revisions of the namespace (names, sizes and ages; values with `-o json`).
    List {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Only this application's revisions.
        #[arg(long, short = 'a')]
        application: Option<String>,
        /// Leave the values out.
        #[arg(long)]
        names_only: bool,
        /// Print at most this many records.
        #[arg(long, default_value_t = 10_000, value_parser = at_least_one())]
        limit: usize,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete one revision's metadata (subscribers are pushed the removal).
    Delete {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Application name.
        #[arg(long, short = 'a')]
        application: String,
        /// Revision.
        #[arg(long, short = 'r')]
        revision: String,
    },
    /// Subscribe over ADS and print every push (all revisions when none is named).
    ///
    /// A stream that fails is opened again with back-off (100 ms to 30 s) and resumes; a
    /// subscription the server refuses (bad namespace, missing token, no permission) exits 1.
    Watch {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Resource names to watch, `<application>/<revision>`; none means all.
        names: Vec<String>,
        /// Stop after this many pushes.
        #[arg(long)]
        count: Option<usize>,
    },
}

/// `definition` subcommands.
#[derive(Debug, Subcommand)]
pub enum DefinitionCommand {
    /// Publish a service definition.
    Publish {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Identifier, e.g. `org.apache.dubbo.Greeter:1.0.0::provider:greeter-app`.
        #[arg(long, short = 'i')]
        identifier: String,
        #[command(flatten)]
        /// The definition.
        value: ValueArgs,
    },
    /// Print the raw definition.
    Get {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Identifier.
        #[arg(long, short = 'i')]
        identifier: String,
        /// Print a record as a table, JSON or YAML instead of the raw value.
        #[arg(long, short = 'o', value_enum)]
        output: Option<Output>,
    },
    /// List stored definitions of the namespace (names, sizes and ages; values with `-o json`).
    List {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Only identifiers starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Leave the values out.
        #[arg(long)]
        names_only: bool,
        /// Print at most this many records.
        #[arg(long, default_value_t = 10_000, value_parser = at_least_one())]
        limit: usize,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete one definition (subscribers are pushed the removal).
    Delete {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Identifier.
        #[arg(long, short = 'i')]
        identifier: String,
    },
    /// Subscribe over ADS and print every push (all definitions when none is named).
    ///
    /// A stream that fails is opened again with back-off (100 ms to 30 s) and resumes; a
    /// subscription the server refuses (bad namespace, missing token, no permission) exits 1.
    Watch {
        #[command(flatten)]
        /// Connection.
        client: ClientArgs,
        /// Identifiers to watch; none means all.
        names: Vec<String>,
        /// Stop after this many pushes.
        #[arg(long)]
        count: Option<usize>,
    },
}

impl ClientArgs {
    /// The client configuration these flags describe, with the files they name read.
    fn config(&self) -> anyhow::Result<ClientConfig> {
        let mut config = ClientConfig::new(&self.server);
        if let Some(namespace) = &self.namespace {
            config = config.namespace(namespace);
        }
        if let Some(tls) = self.tls()? {
            config = config.tls(tls);
        }
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?;
            let token = BearerToken::new(token);
            if token.secret().is_empty() {
                bail!("--token-file {} is empty", path.display());
            }
            config = config.token(token);
        }
        Ok(config)
    }

    /// TLS settings for an `https://` server; `None` for plaintext.
    fn tls(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let https = self.server.starts_with("https://");
        let asked = self.ca_cert.is_some() || self.cert.is_some() || self.tls_server_name.is_some();
        if !https {
            if asked {
                bail!(
                    "--ca-cert, --cert and --tls-server-name need an https:// --server, not {:?}",
                    self.server
                );
            }
            return Ok(None);
        }
        let Some(ca_cert) = &self.ca_cert else {
            bail!(
                "an https:// --server needs --ca-cert: the PEM CA bundle its certificate chains to"
            );
        };
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("--ca-cert", ca_cert)?));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(
                read("--cert", cert)?,
                read("--key", key)?,
            ));
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name);
        }
        Ok(Some(tls))
    }

    async fn channel(&self) -> anyhow::Result<Transport> {
        match connect_transport(&self.config()?).await {
            Ok(transport) => Ok(transport),
            Err(error @ (ClientError::Connect { .. } | ClientError::ConnectTimeout { .. })) => {
                Err(anyhow::Error::new(error).context(format!(
                    "cannot reach {}; is `pixiu-metadata serve` running there?",
                    self.server
                )))
            }
            Err(error) => Err(error.into()),
        }
    }
}

/// Writes a raw value as `get` prints it: the value, then a newline unless it ends with one, so
/// a file published with `--file` reads back byte for byte.
fn write_raw(out: &mut impl std::io::Write, value: &str) -> std::io::Result<()> {
    out.write_all(value.as_bytes())?;
    if !value.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Runs a client command, writing its output to `out`.
pub async fn run_client(command: Command, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let plaintext = match &command {
        Command::Metadata(
            MetadataCommand::Publish { client, .. }
            | MetadataCommand::Get { client, .. }
            | MetadataCommand::List { client, .. }
            | MetadataCommand::Delete { client, .. }
            | MetadataCommand::Watch { client, .. },
        )
        | Command::Definition(
            DefinitionCommand::Publish { client, .. }
            | DefinitionCommand::Get { client, .. }
            | DefinitionCommand::List { client, .. }
            | DefinitionCommand::Delete { client, .. }
            | DefinitionCommand::Watch { client, .. },
        ) => client.server.starts_with("http://"),
        _ => false,
    };
    run_command(command, out).await.map_err(|error| {
        // Plain HTTP/2 to a TLS port fails in the transport, with words that do not say so.
        let text = one_line(&error);
        let transport = ["Unknown:", "Cancelled:", "Internal:"]
            .iter()
            .any(|code| text.starts_with(code))
            && (text.contains("transport error")
                || text.contains("h2 protocol error")
                || text.contains("operation was canceled"));
        if plaintext && transport {
            anyhow::anyhow!(
                "{text} (if the server serves TLS, give an https:// --server and --ca-cert)"
            )
        } else {
            error
        }
    })
}

async fn run_command(command: Command, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    use proto::{
        metadata_service_client::MetadataServiceClient,
        service_definition_service_client::ServiceDefinitionServiceClient,
    };
    match command {
        Command::Serve(_) => bail!("serve is not a client command"),
        Command::Status(args) => status::run(args, out).await?,
        Command::Crds => write!(out, "{}", crate::store::kube::resources::crds_yaml())?,
        Command::Bench(args) => crate::bench::run(args, out).await?,
        Command::Metadata(MetadataCommand::Publish {
            client,
            application,
            revision,
            value,
        }) => {
            let request = Request::new(proto::PublishMetadataRequest {
                application_name: application.clone(),
                revision: revision.clone(),
                metadata_info: value.read()?,
            });
            MetadataServiceClient::new(client.channel().await?)
                .publish(request)
                .await
                .map_err(status_error)?;
            writeln!(out, "published {application}/{revision}")?;
        }
        Command::Completions { shell } => {
            // Into a buffer first: the generator panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "pixiu-metadata",
                &mut script,
            );
            if shell == clap_complete::Shell::Bash {
                script = bash_subcommand_labels(&script);
            }
            out.write_all(&script)?;
        }
        Command::Metadata(MetadataCommand::Get {
            client,
            application,
            revision,
            output,
        }) => {
            let request = Request::new(proto::GetMetadataRequest {
                application_name: application.clone(),
                revision: revision.clone(),
            });
            let response = MetadataServiceClient::new(client.channel().await?)
                .get(request)
                .await
                .map_err(status_error)?;
            let value = response.into_inner().metadata_info;
            match output {
                None => write_raw(out, &value)?,
                Some(output) => {
                    let name = format!("{application}/{revision}");
                    let record = records::got(
                        client.namespace.as_deref(),
                        name,
                        Some((application, revision)),
                        value,
                    );
                    records::print_one(record, output, out)?;
                }
            }
        }
        Command::Metadata(MetadataCommand::List {
            client,
            application,
            names_only,
            limit,
            output,
        }) => {
            let listed = records::list_metadata(&client, application, names_only, limit).await?;
            records::print(&listed, output, out)?;
        }
        Command::Metadata(MetadataCommand::Delete {
            client,
            application,
            revision,
        }) => {
            records::delete_metadata(&client, application.clone(), revision.clone()).await?;
            writeln!(out, "deleted {application}/{revision}")?;
        }
        Command::Definition(DefinitionCommand::List {
            client,
            prefix,
            names_only,
            limit,
            output,
        }) => {
            let listed = records::list_definitions(&client, prefix, names_only, limit).await?;
            records::print(&listed, output, out)?;
        }
        Command::Definition(DefinitionCommand::Delete { client, identifier }) => {
            records::delete_definition(&client, identifier.clone()).await?;
            writeln!(out, "deleted {identifier}")?;
        }
        Command::Metadata(MetadataCommand::Watch {
            client,
            names,
            count,
        }) => {
            watch::run(
                &client,
                names,
                count,
                |m: &proto::Metadata| m.metadata_info.clone(),
                out,
            )
            .await?
        }
        Command::Definition(DefinitionCommand::Publish {
            client,
            identifier,
            value,
        }) => {
            let request = Request::new(proto::PublishServiceDefinitionRequest {
                identifier: identifier.clone(),
                service_definition: value.read()?,
            });
            ServiceDefinitionServiceClient::new(client.channel().await?)
                .publish(request)
                .await
                .map_err(status_error)?;
            writeln!(out, "published {identifier}")?;
        }
        Command::Definition(DefinitionCommand::Get {
            client,
            identifier,
            output,
        }) => {
            let request = Request::new(proto::GetServiceDefinitionRequest {
                identifier: identifier.clone(),
            });
            let response = ServiceDefinitionServiceClient::new(client.channel().await?)
                .get(request)
                .await
                .map_err(status_error)?;
            let value = response.into_inner().service_definition;
            match output {
                None => write_raw(out, &value)?,
                Some(output) => {
                    let record = records::got(client.namespace.as_deref(), identifier, None, value);
                    records::print_one(record, output, out)?;
                }
            }
        }
        Command::Definition(DefinitionCommand::Watch {
            client,
            names,
            count,
        }) => {
            let value_of = |d: &proto::ServiceDefinition| d.service_definition.clone();
            watch::run(&client, names, count, value_of, out).await?;
        }
    }
    Ok(())
}

/// A count or size flag that must be 1 or more (0 would make it refuse or show everything).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// clap_complete's bash script for a binary whose name holds '-' names the subcommands'
/// cases `pixiu__subcmd__metadata__subcmd__…` while its loop sets `pixiu__metadata__subcmd__…`,
/// so nothing below the first word completed. The cases are renamed to what the loop sets.
fn bash_subcommand_labels(script: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(script)
        .replace(
            "pixiu__subcmd__metadata__subcmd__",
            "pixiu__metadata__subcmd__",
        )
        .into_bytes()
}

pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    // A status made by the client itself (`Unknown: transport error`, `Cancelled`) says why
    // only in its sources: the TLS alert, the refused connection.
    let causes = std::iter::successors(std::error::Error::source(&status), |cause| cause.source());
    anyhow::anyhow!(said_once(
        format!("{:?}: {}", status.code(), status.message()),
        causes.map(ToString::to_string)
    ))
}

/// `error` and its causes on one line, each cause left out when the text before already says
/// it (transport errors often repeat their source in their own message).
pub fn one_line(error: &anyhow::Error) -> String {
    let mut chain = error.chain().map(ToString::to_string);
    said_once(chain.next().unwrap_or_default(), chain)
}

/// `first`, then each of `causes` the line does not already hold, joined by ": ".
fn said_once(first: String, causes: impl Iterator<Item = String>) -> String {
    causes.fold(first, |mut line, cause| {
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
        line
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_status_made_by_the_client_says_why_from_its_sources() {
        let mut status = tonic::Status::unknown("transport error");
        status.set_source(Arc::new(std::io::Error::other(
            "received fatal alert: CertificateRequired",
        )));
        assert_eq!(
            status_error(status).to_string(),
            "Unknown: transport error: received fatal alert: CertificateRequired"
        );
        let plain = tonic::Status::not_found("no such record");
        assert_eq!(status_error(plain).to_string(), "NotFound: no such record");
    }

    #[test]
    fn one_line_leaves_out_causes_already_said() {
        let inner = anyhow::anyhow!("tcp connect error");
        let error = inner
            .context("tcp connect error: Connection refused")
            .context("connecting to http://127.0.0.1:1");
        assert_eq!(
            one_line(&error),
            "connecting to http://127.0.0.1:1: tcp connect error: Connection refused"
        );
    }
}
