//! `pixiu-metadata bench`: measures this server against etcd and a bare tonic echo on
//! loopback, scenario by scenario, and prints a Markdown table (and JSON, and an SVG chart).
//!
//! Every server runs in its own process, started fresh for each group of runs (so state does
//! not carry over) and killed after it: ours is this binary's `serve` on an embedded store in a
//! temporary directory, the echo is the hidden `bench echo-server`, etcd is the `etcd` binary
//! with its default durability. Server CPU and memory are read from `/proc/<pid>`.
//!
//! Scenarios: `get` (hot key, random keys out of `--records`, and `list`: a page of 100
//! records after a random one, against etcd's `Range` with a limit), `publish-new`,
//! `publish-refresh`, `fanout` (N ADS streams, one publish, delivery latency to each; also
//! against the echo's bare ADS, the transport's floor),
//! `streams` (memory per idle stream), `startup` (spawn to ready with `--records` records).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::{FutureExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::{Channel, Endpoint};

use crate::{
    model::Key,
    pb::metadata::{self as proto, metadata_service_client::MetadataServiceClient},
    store::Store,
};

pub mod calls;
pub mod echo;
pub mod etcdpb;
pub mod fanout;
pub mod h2ads;
pub mod h2streams;
pub mod load;
pub mod procfs;
pub mod report;
pub mod servers;
pub mod stats;
pub mod svg;

use calls::Clients;
use report::{Figures, Report, Row, Server};

/// Every scenario group, in the order they run.
pub const SCENARIOS: [&str; 6] = [
    "get",
    "publish-new",
    "publish-refresh",
    "fanout",
    "streams",
    "startup",
];

/// Flags of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The hidden helper processes the harness starts.
    #[command(subcommand)]
    pub helper: Option<Helper>,
    /// A short run with small numbers, to check the harness works (not for timings).
    #[arg(long)]
    pub quick: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write the fan-out latency chart (SVG) to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Measure a running server at this gRPC address instead of starting one (server CPU,
    /// memory and startup are then not measured).
    #[arg(long)]
    pub target: Option<SocketAddr>,
    /// Scenario groups to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS))]
    pub scenarios: Vec<String>,
    /// Skip etcd.
    #[arg(long)]
    pub no_etcd: bool,
    /// The client of the unary calls (`get`, `publish-*`): gRPC over `h2` directly, alike for
    /// every server, or the clients users run (tonic's for ours and the echo, `etcd-client`
    /// for etcd). Fan-out and stream subscribers always speak over `h2`.
    #[arg(long, value_enum, default_value_t)]
    pub client: calls::ClientKind,
    /// Unary calls in flight at once (get, publish).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// HTTP/2 connections the unary calls share.
    #[arg(long)]
    pub connections: Option<usize>,
    /// How long each unary run is measured (e.g. `10s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Unmeasured time before each unary run.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<Duration>,
    /// Rounds of each unary case: the servers take turns, round after round, and each
    /// server's median round is reported (default 3; 1 with `--quick`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
    /// Size of each value, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// Records stored for `get` random keys and `startup`.
    #[arg(long)]
    pub records: Option<usize>,
    /// Fan-out stream counts, comma-separated (the chart's x axis).
    #[arg(long, value_delimiter = ',')]
    pub fanout_streams: Vec<usize>,
    /// Connections the fan-out streams share.
    #[arg(long)]
    pub fanout_connections: Option<usize>,
    /// Publishes per fan-out run.
    #[arg(long)]
    pub fanout_updates: Option<usize>,
    /// Idle-stream points `STREAMSxCONNECTIONS`, comma-separated (e.g. `10000x100`).
    #[arg(long, value_delimiter = ',')]
    pub streams_points: Vec<String>,
}

/// One server's side of a unary case: its call and the process whose CPU is counted.
struct Contender {
    server: Server,
    op: load::Op,
    pid: Option<String>,
}

/// The median of a case's rounds by throughput, and what the rounds share.
#[derive(Debug)]
struct Median {
    result: load::UnaryResult,
    /// Every round's throughput, in the order they ran.
    throughputs: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

impl Median {
    /// `results` is not empty. With an even number of rounds, the upper middle one.
    fn of(mut results: Vec<load::UnaryResult>) -> Self {
        let throughputs = results.iter().map(|r| r.throughput).collect();
        let errors = results.iter().map(|r| r.errors).sum();
        let first_error = results.iter().find_map(|r| r.first_error.clone());
        results.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
        let middle = results.len() / 2;
        Self {
            result: results.swap_remove(middle),
            throughputs,
            errors,
            first_error,
        }
    }
}

/// Processes the harness starts itself.
#[derive(Debug, Subcommand)]
pub enum Helper {
    /// The bare tonic echo server (unary `Get`, and an ADS fan-out from memory).
    #[command(hide = true)]
    EchoServer {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Size of each answer.
        #[arg(long, default_value_t = 1024)]
        payload_bytes: usize,
        /// How the Aggregated Discovery Service is served.
        #[arg(long, value_enum, default_value_t = echo::Ads::Tonic)]
        ads: echo::Ads,
    },
}

/// The settings of a run, after `--quick` and the flags.
#[derive(Debug, Clone, serde::Serialize)]
struct Settings {
    quick: bool,
    concurrency: usize,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    rounds: usize,
    payload_bytes: usize,
    records: usize,
    fanout_streams: Vec<usize>,
    fanout_connections: usize,
    fanout_updates: usize,
    streams_points: Vec<(usize, usize)>,
    etcd: bool,
    client: calls::ClientKind,
    target: Option<SocketAddr>,
}

fn parse_point(point: &str) -> anyhow::Result<(usize, usize)> {
    let (s, c) = point.split_once('x').with_context(|| {
        format!("bad --streams-points entry {point:?}: want STREAMSxCONNECTIONS")
    })?;
    Ok((s.trim().parse()?, c.trim().parse()?))
}

impl BenchArgs {
    fn settings(&self) -> anyhow::Result<Settings> {
        let q = self.quick;
        let points = if self.streams_points.is_empty() {
            if q {
                vec![(20, 4), (50, 5)]
            } else {
                vec![(1_000, 100), (10_000, 100), (50_000, 10_000)]
            }
        } else {
            self.streams_points
                .iter()
                .map(|p| parse_point(p))
                .collect::<anyhow::Result<_>>()?
        };
        Ok(Settings {
            quick: q,
            concurrency: self.concurrency.unwrap_or(if q { 8 } else { 64 }),
            connections: self.connections.unwrap_or(if q { 2 } else { 4 }),
            duration: self.duration.unwrap_or(if q {
                Duration::from_millis(700)
            } else {
                Duration::from_secs(10)
            }),
            warmup: self.warmup.unwrap_or(if q {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            }),
            rounds: self.rounds.map_or(if q { 1 } else { 3 }, |r| r as usize),
            payload_bytes: self.payload_bytes,
            records: self.records.unwrap_or(if q { 1_000 } else { 100_000 }),
            fanout_streams: if self.fanout_streams.is_empty() {
                if q {
                    vec![20, 50]
                } else {
                    vec![1_000, 2_500, 5_000, 10_000]
                }
            } else {
                self.fanout_streams.clone()
            },
            fanout_connections: self.fanout_connections.unwrap_or(if q { 5 } else { 100 }),
            fanout_updates: self.fanout_updates.unwrap_or(if q { 2 } else { 5 }),
            streams_points: points,
            etcd: !self.no_etcd,
            client: self.client,
            target: self.target,
        })
    }
}

/// A JSON value of `bytes` bytes (more when `bytes` is below ~30), distinct for each `seq`.
pub fn payload(bytes: usize, seq: u64) -> String {
    let head = format!("{{\"seq\":{seq},\"pad\":\"");
    let pad = bytes.saturating_sub(head.len() + 2);
    let mut value = String::with_capacity(head.len() + pad + 2);
    value.push_str(&head);
    value.extend(std::iter::repeat_n('x', pad));
    value.push_str("\"}");
    value
}

/// A gRPC channel (one HTTP/2 connection) to `url`.
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

fn bar(label: String, len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<42} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(label);
    bar
}

/// Runs the harness, or one of its helper processes.
pub async fn run(args: BenchArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    if let Some(Helper::EchoServer {
        addr,
        payload_bytes,
        ads,
    }) = args.helper
    {
        let listener = echo::bind(addr).await?;
        let payload = payload(payload_bytes, 0);
        return match ads {
            echo::Ads::Tonic => echo::serve(listener, payload).await,
            echo::Ads::H2 => h2ads::serve(listener, payload).await,
        };
    }
    let settings = args.settings()?;
    // 10,000 connections need 10,000 descriptors here and in the servers, which inherit it.
    let nofile = rlimit::increase_nofile_limit(1 << 20).unwrap_or(0);
    let scenarios: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    let mut bench = Bench {
        settings: settings.clone(),
        tmp: tempfile::Builder::new().prefix("pixiu-bench").tempdir()?,
        rows: Vec::new(),
    };
    let started = Instant::now();
    for scenario in SCENARIOS
        .iter()
        .filter(|s| scenarios.iter().any(|c| c == *s))
    {
        match *scenario {
            "get" => bench.get().await?,
            "publish-new" => bench.publish(false).await?,
            "publish-refresh" => bench.publish(true).await?,
            "fanout" => bench.fanout().await?,
            "streams" => bench.streams().await?,
            "startup" => bench.startup().await?,
            _ => {}
        }
    }
    let ratios = report::ratios(&bench.rows);
    let goals = report::goals(&bench.rows, &ratios);
    let report = Report {
        environment: serde_json::json!({
            "machine": machine(),
            "settings": settings,
            "nofile_limit": nofile,
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "took_seconds": started.elapsed().as_secs_f64(),
        }),
        scenarios,
        rows: bench.rows,
        ratios,
        goals,
    };
    writeln!(out, "{}", report::markdown(&report))?;
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, fanout_chart(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn fanout_chart(report: &Report) -> String {
    let mut series = Vec::new();
    for (server, colour) in [
        (Server::Ours, "#1f77b4"),
        (Server::Echo, "#7f7f7f"),
        (Server::H2Ads, "#2ca02c"),
        (Server::Etcd, "#d62728"),
    ] {
        for (dashed, what, pick) in [
            (
                false,
                "p99",
                (|f: &Figures| f.p99_us) as fn(&Figures) -> Option<f64>,
            ),
            (true, "p50", |f: &Figures| f.p50_us),
        ] {
            let points = report
                .rows
                .iter()
                .filter(|r| {
                    r.server == server
                        && r.scenario == "fanout"
                        && (server == Server::Etcd || r.case.starts_with("sotw"))
                })
                .filter_map(|r| pick(&r.figures).map(|us| (r.concurrency as f64, us / 1000.0)))
                .collect();
            series.push(svg::Series {
                label: format!("{} {what}", server.ads_label()),
                colour,
                dashed,
                points,
            });
        }
    }
    svg::chart(
        "Fan-out: publish to delivery on every stream",
        "subscribed streams",
        "latency (ms)",
        &series,
    )
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .map(str::to_string);
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory": memory,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).ok(),
        "etcd": servers::etcd_binary().display().to_string(),
    })
}

struct Bench {
    settings: Settings,
    tmp: tempfile::TempDir,
    rows: Vec<Row>,
}

/// Where an unary scenario sends its calls.
enum Target {
    Grpc(Box<servers::Process>),
    External(SocketAddr),
}

impl Target {
    fn url(&self) -> String {
        match self {
            Target::Grpc(p) => p.url(),
            Target::External(addr) => format!("http://{addr}"),
        }
    }
    fn pid(&self) -> Option<String> {
        match self {
            Target::Grpc(p) => Some(p.pid()),
            Target::External(_) => None,
        }
    }
    /// The server's CPU time so far, when it is a process of ours to read.
    fn cpu_seconds(&self) -> Option<f64> {
        self.pid().and_then(|p| procfs::cpu_seconds(&p).ok())
    }
    /// The server's resident memory, when it is a process of ours to read.
    fn rss_bytes(&self) -> Option<u64> {
        self.pid().and_then(|p| procfs::rss_bytes(&p).ok())
    }
    async fn stop(self) {
        if let Target::Grpc(p) = self {
            p.stop().await;
        }
    }
    /// `pixiu_metadata_store_watch_resets_total` so far, when it is a server of ours to ask.
    async fn store_watch_resets(&self) -> Option<u64> {
        match self {
            Target::Grpc(p) => p.metric(STORE_WATCH_RESETS).await.map(|n| n as u64),
            Target::External(_) => None,
        }
    }
}

const STORE_WATCH_RESETS: &str = "pixiu_metadata_store_watch_resets_total";

const GET_APPLICATION: &str = "bench-get";
const ETCD_GET_PREFIX: &str = "/bench/get/";

fn get_revision(i: u64) -> String {
    format!("r{i:07}")
}

/// Records in a page of the `list` case.
const LIST_PAGE: usize = 100;

impl Bench {
    fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.tmp.path().join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A fresh server of ours on an empty (or given) data directory, or the `--target`.
    async fn ours(&self, data_dir: Option<&Path>, name: &str) -> anyhow::Result<Target> {
        if let Some(addr) = self.settings.target {
            return Ok(Target::External(addr));
        }
        let dir = match data_dir {
            Some(dir) => dir.to_path_buf(),
            None => self.dir(name)?,
        };
        let log = self.tmp.path().join(format!("{name}.log"));
        Ok(Target::Grpc(Box::new(servers::ours(&dir, &log).await?)))
    }

    /// Stops a server of ours that served `scenario`, first noting on that scenario's rows of
    /// ours how often its store's followers started over (a follower that falls behind under
    /// load costs throughput and is invisible in the other figures).
    async fn stop_ours(&mut self, scenario: &str, ours: Target) {
        let resets = ours.store_watch_resets().await;
        for row in &mut self.rows {
            if row.scenario == scenario
                && row.server == Server::Ours
                && row.figures.store_watch_resets.is_none()
            {
                row.figures.store_watch_resets = resets;
            }
        }
        ours.stop().await;
    }

    async fn etcd(&self, name: &str) -> anyhow::Result<servers::Process> {
        servers::etcd(&self.dir(name)?).await
    }

    fn shape(&self) -> load::Shape {
        load::Shape {
            concurrency: self.settings.concurrency,
            warmup: self.settings.warmup,
            duration: self.settings.duration,
            first_seq: 0,
        }
    }

    /// Runs one unary case on every contender, [`Settings::rounds`] times in turns (each
    /// contender once, then each again, ...), so a change in the host's load during the case
    /// falls on every server alike, and records each contender's median round by throughput
    /// (its errors are those of all rounds). Each round starts once the servers have settled
    /// ([`load::settle`]).
    async fn unary(&mut self, scenario: &str, case: &str, contenders: Vec<Contender>) {
        let rounds = self.settings.rounds;
        let mut results: Vec<Vec<load::UnaryResult>> = contenders
            .iter()
            .map(|_| Vec::with_capacity(rounds))
            .collect();
        let pids: Vec<String> = contenders.iter().filter_map(|c| c.pid.clone()).collect();
        for round in 1..=rounds {
            for (contender, results) in contenders.iter().zip(&mut results) {
                load::settle(&pids).await;
                let mut label = format!("{scenario} {case} {}", server_label(contender.server));
                if rounds > 1 {
                    label.push_str(&format!(" (round {round}/{rounds})"));
                }
                let progress = bar(label, 100);
                let ticker = progress.clone();
                // Calls of different rounds never repeat one another.
                let shape = load::Shape {
                    first_seq: (round as u64 - 1) << 32,
                    ..self.shape()
                };
                let result = load::run(
                    shape,
                    contender.op.clone(),
                    contender.pid.clone(),
                    move |f| ticker.set_position((f * 100.0) as u64),
                )
                .await;
                progress.finish_and_clear();
                results.push(result);
            }
        }
        for (contender, results) in contenders.iter().zip(results) {
            let median = Median::of(results);
            let result = median.result;
            self.rows.push(Row {
                scenario: scenario.into(),
                case: case.into(),
                server: contender.server,
                concurrency: self.settings.concurrency,
                connections: self.settings.connections,
                figures: Figures {
                    throughput: Some(result.throughput),
                    throughput_rounds: median.throughputs,
                    p50_us: Some(result.latency.p50_us),
                    p99_us: Some(result.latency.p99_us),
                    max_us: Some(result.latency.max_us),
                    server_cpu_us_per_op: result.server_cpu_us_per_op,
                    generator_cpu_us_per_op: result.generator_cpu_us_per_op,
                    errors: median.errors,
                    first_error: median.first_error,
                    ..Default::default()
                },
            });
        }
    }

    /// Writes `records` records of the `get` data set into an embedded store in `dir`.
    async fn preload_ours(&self, dir: &Path) -> anyhow::Result<()> {
        let records = self.settings.records;
        let progress = bar(
            format!("writing {records} records (embedded)"),
            records as u64,
        );
        let store = Arc::new(crate::store::embedded::EmbeddedStore::open(
            dir,
            usize::MAX,
        )?);
        let value = Arc::new(payload(self.settings.payload_bytes, 0));
        let mut puts = futures::stream::iter(0..records as u64)
            .map(|i| {
                let (store, value) = (store.clone(), value.clone());
                async move {
                    let key = Key::metadata("default", GET_APPLICATION, &get_revision(i));
                    store.put(&key, &value, SystemTime::now()).await
                }
            })
            .buffer_unordered(1024);
        while let Some(result) = puts.next().await {
            result?;
            progress.inc(1);
        }
        drop(puts);
        progress.finish_and_clear();
        drop(store);
        Ok(())
    }

    async fn preload_etcd(&self, url: &str) -> anyhow::Result<()> {
        let records = self.settings.records as u64;
        let progress = bar(format!("writing {records} records (etcd)"), records);
        let client = etcd_client::Client::connect([url], None).await?;
        let value = payload(self.settings.payload_bytes, 0);
        // etcd takes at most 128 operations per transaction by default.
        let batches: Vec<(u64, u64)> = (0..records)
            .step_by(128)
            .map(|start| (start, (start + 128).min(records)))
            .collect();
        let mut txns = futures::stream::iter(batches)
            .map(|(start, end)| {
                let mut kv = client.kv_client();
                let value = value.clone();
                async move {
                    let ops: Vec<etcd_client::TxnOp> = (start..end)
                        .map(|i| {
                            etcd_client::TxnOp::put(
                                format!("{ETCD_GET_PREFIX}{}", get_revision(i)),
                                value.clone(),
                                None,
                            )
                        })
                        .collect();
                    kv.txn(etcd_client::Txn::new().and_then(ops))
                        .await
                        .map(|_| end - start)
                }
            })
            .buffer_unordered(8);
        while let Some(result) = txns.next().await {
            progress.inc(result?);
        }
        progress.finish_and_clear();
        Ok(())
    }

    async fn get(&mut self) -> anyhow::Result<()> {
        let records = self.settings.records as u64;
        let connections = self.settings.connections;
        let payload_bytes = self.settings.payload_bytes;
        let dir = self.dir("get-data")?;
        if self.settings.target.is_none() {
            self.preload_ours(&dir).await?;
        }
        let ours = self.ours(Some(&dir), "get").await?;
        if let Target::External(_) = ours {
            // The target has no data set of ours: publish it there.
            let mut client = MetadataServiceClient::new(connect(&ours.url()).await?);
            for i in 0..records {
                client
                    .publish(proto::PublishMetadataRequest {
                        application_name: GET_APPLICATION.into(),
                        revision: get_revision(i),
                        metadata_info: payload(payload_bytes, 0),
                    })
                    .await?;
            }
        }
        let echo = servers::echo(
            payload_bytes,
            echo::Ads::Tonic,
            &self.tmp.path().join("echo.log"),
        )
        .await?;
        let etcd = if self.settings.etcd {
            let etcd = self.etcd("etcd-get").await?;
            self.preload_etcd(&etcd.url()).await?;
            Some(etcd)
        } else {
            None
        };
        let client = self.settings.client;
        let ours_clients = Clients::metadata(client, &ours.url(), connections).await?;
        let echo_clients = Clients::metadata(client, &echo.url(), connections).await?;
        let etcd_clients = match &etcd {
            Some(etcd) => Some(Clients::etcd(client, &etcd.url(), connections).await?),
            None => None,
        };
        for random in [false, true] {
            let case = if random { "random" } else { "hot" };
            let pick = move |worker: usize, seq: u64| {
                if random {
                    stats::SplitMix::new((worker as u64) << 40 | seq).below(records)
                } else {
                    0
                }
            };
            let mut contenders = Vec::with_capacity(3);
            for (server, clients, pid) in [
                (Server::Ours, ours_clients.clone(), ours.pid()),
                (Server::Echo, echo_clients.clone(), Some(echo.pid())),
            ] {
                let op: load::Op = Arc::new(move |worker, seq| {
                    let clients = clients.clone();
                    let request = proto::GetMetadataRequest {
                        application_name: GET_APPLICATION.into(),
                        revision: get_revision(pick(worker, seq)),
                    };
                    async move { clients.get(worker, request).await }.boxed()
                });
                contenders.push(Contender { server, op, pid });
            }
            if let (Some(etcd), Some(clients)) = (&etcd, &etcd_clients) {
                let clients = clients.clone();
                let op: load::Op = Arc::new(move |worker, seq| {
                    let clients = clients.clone();
                    let key = format!("{ETCD_GET_PREFIX}{}", get_revision(pick(worker, seq)));
                    async move { clients.range(worker, key).await }.boxed()
                });
                contenders.push(Contender {
                    server: Server::Etcd,
                    op,
                    pid: Some(etcd.pid()),
                });
            }
            self.unary("get", case, contenders).await;
        }
        self.list_pages(&ours_clients, ours.pid(), etcd.as_ref().zip(etcd_clients))
            .await;
        self.stop_ours("get", ours).await;
        echo.stop().await;
        if let Some(etcd) = etcd {
            etcd.stop().await;
        }
        Ok(())
    }

    /// The `get` group's `list` case: a page of [`LIST_PAGE`] records (names and values) that
    /// starts after a random one of the data set, through `MetadataService/List` and etcd's
    /// `Range` with a limit. The echo has no `List`.
    async fn list_pages(
        &mut self,
        ours: &Clients,
        ours_pid: Option<String>,
        etcd: Option<(&servers::Process, Clients)>,
    ) {
        let starts = (self.settings.records as u64).saturating_sub(LIST_PAGE as u64);
        if starts == 0 {
            return;
        }
        let pick = move |worker: usize, seq: u64| {
            stats::SplitMix::new((worker as u64) << 40 | seq).below(starts)
        };
        let clients = ours.clone();
        let op: load::Op = Arc::new(move |worker, seq| {
            let clients = clients.clone();
            let request = proto::ListMetadataRequest {
                application_name: GET_APPLICATION.into(),
                page_size: LIST_PAGE as u32,
                page_token: format!("{GET_APPLICATION}/{}", get_revision(pick(worker, seq))),
                names_only: false,
            };
            async move { clients.list(worker, request, LIST_PAGE).await }.boxed()
        });
        let mut contenders = vec![Contender {
            server: Server::Ours,
            op,
            pid: ours_pid,
        }];
        if let Some((etcd, clients)) = etcd {
            let end = crate::store::etcd::prefix_end(ETCD_GET_PREFIX.as_bytes());
            let op: load::Op = Arc::new(move |worker, seq| {
                let (clients, end) = (clients.clone(), end.clone());
                // The first key after the picked one, as our page token starts after it.
                let from = format!("{ETCD_GET_PREFIX}{}\0", get_revision(pick(worker, seq)));
                async move { clients.range_page(worker, from, end, LIST_PAGE).await }.boxed()
            });
            contenders.push(Contender {
                server: Server::Etcd,
                op,
                pid: Some(etcd.pid()),
            });
        }
        self.unary("get", "list", contenders).await;
    }

    async fn publish(&mut self, refresh: bool) -> anyhow::Result<()> {
        let scenario = if refresh {
            "publish-refresh"
        } else {
            "publish-new"
        };
        let connections = self.settings.connections;
        let payload_bytes = self.settings.payload_bytes;
        let ours = self.ours(None, scenario).await?;
        let client = self.settings.client;
        let clients = Clients::metadata(client, &ours.url(), connections).await?;
        let value = Arc::new(payload(payload_bytes, 0));
        let refresh_of = move |worker: usize| proto::PublishMetadataRequest {
            application_name: "bench-refresh".into(),
            revision: format!("w{worker}"),
            metadata_info: value.to_string(),
        };
        if refresh {
            // Every worker re-publishes its own record: create them first.
            for worker in 0..self.settings.concurrency {
                clients.publish(worker, refresh_of(worker)).await?;
            }
        }
        // Unique per run, so a `--target` that keeps state still sees new content.
        let run = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let op: load::Op = {
            let clients = clients.clone();
            Arc::new(move |worker, seq| {
                let clients = clients.clone();
                let request = if refresh {
                    refresh_of(worker)
                } else {
                    proto::PublishMetadataRequest {
                        application_name: "bench-new".into(),
                        revision: format!("{run}-w{worker}-{seq}"),
                        metadata_info: payload(payload_bytes, seq),
                    }
                };
                async move { clients.publish(worker, request).await }.boxed()
            })
        };
        let case = if refresh { "identical" } else { "new" };
        let mut contenders = vec![Contender {
            server: Server::Ours,
            op,
            pid: ours.pid(),
        }];
        // Both servers run through the rounds; the one not measured is idle.
        let etcd = if self.settings.etcd && !refresh {
            let etcd = self.etcd("etcd-put").await?;
            let clients = Clients::etcd(client, &etcd.url(), connections).await?;
            let op: load::Op = Arc::new(move |worker, seq| {
                let clients = clients.clone();
                let key = format!("/bench/new/w{worker}-{seq}");
                let value = payload(payload_bytes, seq);
                async move { clients.put(worker, key, value).await }.boxed()
            });
            contenders.push(Contender {
                server: Server::Etcd,
                op,
                pid: Some(etcd.pid()),
            });
            Some(etcd)
        } else {
            None
        };
        self.unary(scenario, case, contenders).await;
        self.stop_ours(scenario, ours).await;
        if let Some(etcd) = etcd {
            etcd.stop().await;
        }
        Ok(())
    }

    /// Each point of the chart: every contender (SotW to ours; Delta to ours at the largest
    /// point; SotW to the bare ADS; etcd's watchers) on a fresh server with its streams open
    /// at once, then the updates in turns, each contender's `k`-th update after the others'
    /// `k-1`-th, so a change in the host's load during the point falls on every server alike.
    async fn fanout(&mut self) -> anyhow::Result<()> {
        let points = self.settings.fanout_streams.clone();
        let largest = points.iter().copied().max().unwrap_or(0);
        for &n in &points {
            let mut contenders = vec![(fanout::Kind::Sotw, Server::Ours)];
            if n == largest {
                contenders.push((fanout::Kind::Delta, Server::Ours));
            }
            contenders.push((fanout::Kind::Sotw, Server::Echo));
            if n == largest {
                contenders.push((fanout::Kind::Sotw, Server::H2Ads));
            }
            if self.settings.etcd {
                contenders.push((fanout::Kind::EtcdWatch, Server::Etcd));
            }
            let mut runs = Vec::with_capacity(contenders.len());
            for (kind, server) in contenders {
                runs.push(self.fanout_open(kind, server, n).await?);
            }
            let updates = self.settings.fanout_updates;
            let progress = bar(
                format!("fanout {n} streams: {} servers in turns", runs.len()),
                (updates * runs.len()) as u64,
            );
            for update in 1..=updates as u64 {
                for run in &mut runs {
                    run.update(update, self.settings.payload_bytes).await?;
                    progress.inc(1);
                }
            }
            progress.finish_and_clear();
            for run in runs {
                self.fanout_close(run).await?;
            }
        }
        Ok(())
    }

    /// Starts a fresh `server` (etcd for etcd's watches; ours or the bare tonic echo for ADS)
    /// and opens `n` streams of `kind` to it.
    async fn fanout_open(
        &mut self,
        kind: fanout::Kind,
        server: Server,
        n: usize,
    ) -> anyhow::Result<FanoutRun> {
        let connections = self.settings.fanout_connections.min(n).max(1);
        let payload_bytes = self.settings.payload_bytes;
        let case_kind = match kind {
            fanout::Kind::Sotw | fanout::Kind::EtcdWatch => "sotw",
            fanout::Kind::Delta => "delta",
        };
        let case = format!("{case_kind}-{n}x{connections}");
        let progress = bar(
            format!("fanout {case} {}: opening", server_label(server)),
            1,
        );
        let (target, mut publish): (Target, Publisher) = match server {
            Server::Etcd => {
                let etcd = self.etcd("etcd-fanout").await?;
                let client = etcd_client::Client::connect([etcd.url()], None).await?;
                (
                    Target::Grpc(Box::new(etcd)),
                    Publisher::Etcd(Box::new(client)),
                )
            }
            Server::Echo | Server::H2Ads => {
                let ads = if server == Server::H2Ads {
                    echo::Ads::H2
                } else {
                    echo::Ads::Tonic
                };
                let log = self
                    .tmp
                    .path()
                    .join(format!("{}-fanout.log", server_label(server)));
                let echo = servers::echo(payload_bytes, ads, &log).await?;
                let client = MetadataServiceClient::new(connect(&echo.url()).await?);
                (Target::Grpc(Box::new(echo)), Publisher::Grpc(client))
            }
            Server::Ours => {
                let ours = self.ours(None, &format!("fanout-{case_kind}")).await?;
                let client = MetadataServiceClient::new(connect(&ours.url()).await?);
                (ours, Publisher::Grpc(client))
            }
        };
        publish.publish(payload(payload_bytes, 0)).await?;
        let rss_before = target.rss_bytes();
        let streams = fanout::open(kind, &target.url(), n, connections).await?;
        progress.finish_and_clear();
        Ok(FanoutRun {
            kind,
            server,
            case,
            connections,
            target,
            publish,
            streams,
            rss_before,
            samples: Vec::new(),
            publish_max_us: 0,
            missing: 0,
            server_cpu: 0.0,
            generator_cpu: 0.0,
        })
    }

    /// Measures the publishes of another key while `run`'s streams are still open (ours and
    /// etcd, SotW), stops its server and records its rows.
    async fn fanout_close(&mut self, mut run: FanoutRun) -> anyhow::Result<()> {
        let unrelated = if run.kind != fanout::Kind::Delta
            && matches!(run.server, Server::Ours | Server::Etcd)
        {
            Some(
                self.unrelated(
                    &run.target,
                    &mut run.publish,
                    &mut run.streams,
                    run.connections,
                )
                .await?,
            )
        } else {
            None
        };
        let rss_after = run.target.rss_bytes();
        let failed = run
            .streams
            .failed
            .load(std::sync::atomic::Ordering::Relaxed);
        let n = run.streams.n;
        drop(run.streams);
        let store_watch_resets = run.target.store_watch_resets().await;
        run.target.stop().await;
        let latency = stats::Latency::of(&mut run.samples);
        let (missing, updates) = (run.missing, self.settings.fanout_updates.max(1) as f64);
        self.rows.push(Row {
            scenario: "fanout".into(),
            case: run.case,
            server: run.server,
            concurrency: n,
            connections: run.connections,
            figures: Figures {
                throughput: None,
                p50_us: Some(latency.p50_us),
                p99_us: Some(latency.p99_us),
                max_us: Some(latency.max_us),
                server_cpu_us_per_op: run.rss_before.map(|_| run.server_cpu * 1e6 / updates),
                generator_cpu_us_per_op: Some(run.generator_cpu * 1e6 / updates),
                rss_bytes: rss_after,
                rss_per_stream_bytes: match (run.rss_before, rss_after) {
                    (Some(b), Some(a)) => Some((a as f64 - b as f64) / n as f64),
                    _ => None,
                },
                store_watch_resets,
                publish_max_us: Some(run.publish_max_us as f64),
                errors: missing + failed,
                first_error: (missing + failed > 0)
                    .then(|| format!("{missing} deliveries missing, {failed} streams ended")),
                ..Default::default()
            },
        });
        self.rows.extend(unrelated);
        Ok(())
    }

    /// What a publish no stream subscribes to costs the server while `streams` are open: a
    /// provider publishing its own record in a mesh of subscribed consumers. Every update
    /// that reaches a stream counts as an error.
    async fn unrelated(
        &self,
        target: &Target,
        publish: &mut Publisher,
        streams: &mut fanout::Streams,
        connections: usize,
    ) -> anyhow::Result<Row> {
        let updates = self.settings.fanout_updates;
        let (mut server_cpu, mut delivered) = (0.0, 0);
        for update in 1..=updates as u64 {
            let server0 = target.cpu_seconds();
            publish
                .publish_elsewhere(payload(self.settings.payload_bytes, update))
                .await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let (Some(before), Some(after)) = (server0, target.cpu_seconds()) {
                server_cpu += after - before;
            }
            delivered += streams.drain();
        }
        Ok(Row {
            scenario: "fanout".into(),
            case: format!("unrelated-{}x{connections}", streams.n),
            server: if matches!(publish, Publisher::Etcd(_)) {
                Server::Etcd
            } else {
                Server::Ours
            },
            concurrency: streams.n,
            connections,
            figures: Figures {
                server_cpu_us_per_op: target.pid().map(|_| server_cpu * 1e6 / updates as f64),
                errors: delivered,
                first_error: (delivered > 0)
                    .then(|| format!("{delivered} streams were sent an update of another key")),
                ..Default::default()
            },
        })
    }

    async fn streams(&mut self) -> anyhow::Result<()> {
        if self.settings.target.is_some() {
            return Ok(());
        }
        for (n, connections) in self.settings.streams_points.clone() {
            self.streams_one(fanout::Kind::Sotw, n, connections).await?;
            if self.settings.etcd {
                self.streams_one(fanout::Kind::EtcdWatch, n, connections)
                    .await?;
            }
        }
        Ok(())
    }

    async fn streams_one(
        &mut self,
        kind: fanout::Kind,
        n: usize,
        connections: usize,
    ) -> anyhow::Result<()> {
        let server = if kind == fanout::Kind::EtcdWatch {
            Server::Etcd
        } else {
            Server::Ours
        };
        let case = format!("{n}x{connections}");
        let progress = bar(format!("streams {case} {}", server_label(server)), 1);
        progress.tick();
        let target = match server {
            Server::Etcd => {
                let etcd = self.etcd("etcd-streams").await?;
                let mut client = etcd_client::Client::connect([etcd.url()], None).await?;
                client
                    .put(
                        fanout::ETCD_KEY,
                        payload(self.settings.payload_bytes, 0),
                        None,
                    )
                    .await?;
                Target::Grpc(Box::new(etcd))
            }
            _ => {
                let ours = self.ours(None, "streams").await?;
                MetadataServiceClient::new(connect(&ours.url()).await?)
                    .publish(proto::PublishMetadataRequest {
                        application_name: fanout::APPLICATION.into(),
                        revision: fanout::REVISION.into(),
                        metadata_info: payload(self.settings.payload_bytes, 0),
                    })
                    .await?;
                ours
            }
        };
        let pid = target.pid().context("streams needs a server it started")?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = procfs::rss_bytes(&pid)?;
        let opened = Instant::now();
        let streams = fanout::open(kind, &target.url(), n, connections).await;
        let open_seconds = opened.elapsed().as_secs_f64();
        let (after, errors, first_error) = match &streams {
            Ok(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                (procfs::rss_bytes(&pid)?, 0, None)
            }
            Err(error) => (before, 1, Some(format!("{error:#}"))),
        };
        drop(streams);
        target.stop().await;
        progress.finish_and_clear();
        self.rows.push(Row {
            scenario: "streams".into(),
            case,
            server,
            concurrency: n,
            connections,
            figures: Figures {
                // Streams opened per second.
                throughput: Some(n as f64 / open_seconds),
                rss_bytes: Some(after),
                rss_per_stream_bytes: Some((after as f64 - before as f64) / n as f64),
                errors,
                first_error,
                ..Default::default()
            },
        });
        Ok(())
    }

    async fn startup(&mut self) -> anyhow::Result<()> {
        if self.settings.target.is_some() {
            return Ok(());
        }
        let records = self.settings.records;
        let runs = if self.settings.quick { 1 } else { 3 };
        let dir = self.tmp.path().join("get-data");
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            self.preload_ours(&dir).await?;
        }
        let mut ours_ms = Vec::new();
        for _ in 0..runs {
            let log = self.tmp.path().join("startup.log");
            let process = servers::ours(&dir, &log).await?;
            ours_ms.push(process.ready_after.as_secs_f64() * 1000.0);
            process.stop().await;
        }
        self.push_startup(Server::Ours, records, &mut ours_ms);
        if self.settings.etcd {
            let dir = self.dir("etcd-startup")?;
            let etcd = servers::etcd(&dir).await?;
            self.preload_etcd(&etcd.url()).await?;
            etcd.stop().await;
            let mut etcd_ms = Vec::new();
            for _ in 0..runs {
                let etcd = servers::etcd(&dir).await?;
                etcd_ms.push(etcd.ready_after.as_secs_f64() * 1000.0);
                etcd.stop().await;
            }
            self.push_startup(Server::Etcd, records, &mut etcd_ms);
        }
        Ok(())
    }

    fn push_startup(&mut self, server: Server, records: usize, ms: &mut [f64]) {
        ms.sort_by(f64::total_cmp);
        self.rows.push(Row {
            scenario: "startup".into(),
            case: records.to_string(),
            server,
            concurrency: 1,
            connections: 0,
            figures: Figures {
                // The median of the runs.
                ready_ms: ms.get(ms.len() / 2).copied(),
                max_us: ms.last().map(|m| m * 1000.0),
                ..Default::default()
            },
        });
    }
}

fn server_label(server: Server) -> &'static str {
    match server {
        Server::Ours => "ours",
        Server::Etcd => "etcd",
        Server::Echo => "echo",
        Server::H2Ads => "h2 ADS",
    }
}

/// One contender of a fan-out point: its server, with `streams` open, and what its updates
/// measured so far.
struct FanoutRun {
    kind: fanout::Kind,
    server: Server,
    case: String,
    connections: usize,
    target: Target,
    publish: Publisher,
    streams: fanout::Streams,
    rss_before: Option<u64>,
    samples: Vec<u64>,
    /// The slowest publish's acknowledgement so far, in microseconds from its start.
    publish_max_us: u64,
    missing: u64,
    server_cpu: f64,
    generator_cpu: f64,
}

impl FanoutRun {
    /// One update: a publish, its delivery to every stream, and the ACKs it causes (their
    /// processing counts in the server's CPU of the update).
    async fn update(&mut self, update: u64, payload_bytes: usize) -> anyhow::Result<()> {
        let server0 = self.target.cpu_seconds();
        let generator0 = procfs::cpu_seconds("self")?;
        let t0 = Instant::now();
        self.publish.publish(payload(payload_bytes, update)).await?;
        let acknowledged = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.publish_max_us = self.publish_max_us.max(acknowledged);
        let result = self
            .streams
            .collect(update, t0, Duration::from_secs(60))
            .await;
        // Let the ACKs arrive and be processed: they are part of an update's cost.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let (Some(before), Some(after)) = (server0, self.target.cpu_seconds()) {
            self.server_cpu += after - before;
        }
        self.generator_cpu += procfs::cpu_seconds("self")? - generator0;
        self.missing += result.missing;
        self.samples.extend(result.latencies_us);
        Ok(())
    }
}

/// The one publisher of a fan-out run.
enum Publisher {
    /// `MetadataService/Publish`: ours, or the echo's.
    Grpc(MetadataServiceClient<Channel>),
    Etcd(Box<etcd_client::Client>),
}

impl Publisher {
    /// Publishes `value` to the record every fan-out stream subscribes to.
    async fn publish(&mut self, value: String) -> anyhow::Result<()> {
        self.publish_to(fanout::APPLICATION, fanout::ETCD_KEY, value)
            .await
    }

    /// Publishes `value` under a key no fan-out stream subscribes to, in the same namespace
    /// (ours) or keyspace (etcd).
    async fn publish_elsewhere(&mut self, value: String) -> anyhow::Result<()> {
        self.publish_to(fanout::OTHER_APPLICATION, fanout::OTHER_ETCD_KEY, value)
            .await
    }

    /// Publishes `value` as `application` (ours) or under `etcd_key` (etcd).
    async fn publish_to(
        &mut self,
        application: &str,
        etcd_key: &str,
        value: String,
    ) -> anyhow::Result<()> {
        match self {
            Publisher::Grpc(client) => {
                client
                    .publish(proto::PublishMetadataRequest {
                        application_name: application.into(),
                        revision: fanout::REVISION.into(),
                        metadata_info: value,
                    })
                    .await?;
            }
            Publisher::Etcd(client) => {
                client.put(etcd_key, value, None).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_case_ranges_over_exactly_the_data_set() {
        let end = crate::store::etcd::prefix_end(ETCD_GET_PREFIX.as_bytes());
        assert_eq!(end, b"/bench/get0");
        let last = format!("{ETCD_GET_PREFIX}{}", get_revision(9_999_999));
        assert!(last.as_bytes() < end.as_slice());
        // The key after the first record is still inside the data set's range.
        let after_first = format!("{ETCD_GET_PREFIX}{}\0", get_revision(0));
        assert!(after_first.as_str() > ETCD_GET_PREFIX && after_first.as_bytes() < end.as_slice());
    }

    #[test]
    fn payloads_have_the_size_and_differ() {
        for bytes in [32, 100, 1024] {
            assert_eq!(payload(bytes, 7).len(), bytes);
        }
        assert_ne!(payload(64, 1), payload(64, 2));
        assert!(serde_json::from_str::<serde_json::Value>(&payload(64, 3)).is_ok());
    }

    #[test]
    fn the_median_round_is_reported_with_every_rounds_errors() {
        let round = |throughput: f64, errors: u64, first_error: Option<&str>| load::UnaryResult {
            ops: 0,
            errors,
            first_error: first_error.map(Into::into),
            throughput,
            latency: stats::Latency::of(&mut []),
            server_cpu_us_per_op: Some(throughput / 1000.0),
            generator_cpu_us_per_op: None,
        };
        let median = Median::of(vec![
            round(300.0, 0, None),
            round(100.0, 2, Some("first")),
            round(200.0, 1, Some("second")),
        ]);
        assert_eq!(median.result.throughput, 200.0);
        assert_eq!(
            median.result.server_cpu_us_per_op,
            Some(0.2),
            "one round's figures"
        );
        assert_eq!(median.throughputs, [300.0, 100.0, 200.0]);
        assert_eq!(median.errors, 3);
        assert_eq!(median.first_error.as_deref(), Some("first"));
        assert_eq!(Median::of(vec![round(5.0, 0, None)]).result.throughput, 5.0);
    }

    #[test]
    fn streams_points_parse() {
        assert_eq!(parse_point("10000x100").unwrap(), (10_000, 100));
        assert!(parse_point("10000").is_err());
    }
}
