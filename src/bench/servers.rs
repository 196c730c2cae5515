//! The servers a run measures, each started in its own process on loopback (so its CPU and
//! memory can be read from `/proc`) and killed when dropped: ours (this binary's `serve`),
//! the bare tonic echo (`bench echo-server`) and etcd.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
};

/// How long a server may take to print its address or become ready.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A server process, killed on drop.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pid: u32,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its admin HTTP address, when it has one.
    pub admin: Option<SocketAddr>,
    /// How long from spawning it until it was ready.
    pub ready_after: Duration,
}

impl Process {
    /// The process id, as `/proc` names it.
    pub fn pid(&self) -> String {
        self.pid.to_string()
    }

    /// `http://ADDR` of the gRPC port.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The sum of `name`'s samples on its admin port's `/metrics`, when it has an admin port
    /// that answers and the metric has samples.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_sum(&http_get(self.admin?, "/metrics").await?, name)
    }

    /// Stops it as an operator would (SIGTERM, so the next start is not a crash recovery),
    /// killing it if it has not exited within 10 s.
    pub async fn stop(mut self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .await;
        if term.is_ok_and(|s| s.success())
            && tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_ok()
        {
            return;
        }
        let _ = self.child.kill().await;
    }
}

/// Starts `pixiu-metadata serve` (this very binary) on an embedded store in `data_dir` and
/// waits until `/readyz` answers 200.
pub async fn ours(data_dir: &Path, log: &Path) -> anyhow::Result<Process> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut command = Command::new(exe);
    command
        .arg("serve")
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--store", "embedded", "--data-dir"])
        .arg(data_dir)
        .args(["--max-records-per-namespace", "100000000"])
        .args(["--max-streams", "1000000"])
        .env("RUST_LOG", "error");
    let started = Instant::now();
    let (child, lines) = spawn(command, log)?;
    let mut process = from_lines(
        child,
        lines,
        "grpc listening on ",
        Some("admin listening on "),
        log,
    )
    .await?;
    let admin = process.admin.context("serve printed no admin address")?;
    process
        .wait_http(admin, "/readyz", "200 OK", started, log)
        .await?;
    process.ready_after = started.elapsed();
    Ok(process)
}

/// Starts the bare echo server (`bench echo-server`), answering `payload_bytes`, its ADS
/// served as `ads` says.
pub async fn echo(
    payload_bytes: usize,
    ads: super::echo::Ads,
    log: &Path,
) -> anyhow::Result<Process> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut command = Command::new(exe);
    command
        .args([
            "bench",
            "echo-server",
            "--addr",
            "127.0.0.1:0",
            "--payload-bytes",
        ])
        .arg(payload_bytes.to_string())
        .arg("--ads")
        .arg(
            clap::ValueEnum::to_possible_value(&ads)
                .expect("every variant is a value")
                .get_name(),
        );
    let started = Instant::now();
    let (child, lines) = spawn(command, log)?;
    let mut process = from_lines(child, lines, super::echo::LISTENING, None, log).await?;
    process.ready_after = started.elapsed();
    Ok(process)
}

/// The etcd binary: `$ETCD_BIN`, else `etcd` on `$PATH`, else Debian's.
pub fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("etcd"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// Starts a single-member etcd on loopback with its data in `dir` (default durability: fsync
/// on every commit) and waits until `/health` says so.
pub async fn etcd(dir: &Path) -> anyhow::Result<Process> {
    let client_port = crate::loopback::free_port()?;
    let peer_port = crate::loopback::free_port()?;
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut command = Command::new(etcd_binary());
    command
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .arg("--initial-cluster")
        .arg(format!("bench={peer}"))
        .args(["--logger", "zap", "--log-level", "warn"])
        // Room for the 100,000-record data set and the publish scenarios.
        .args(["--quota-backend-bytes", "8589934592"]);
    let started = Instant::now();
    let log = dir.join("etcd.log");
    let (child, _lines) = spawn(command, &log).with_context(|| {
        format!(
            "starting {} (Debian's etcd-server; scripts/test installs it)",
            etcd_binary().display()
        )
    })?;
    let addr = SocketAddr::from(([127, 0, 0, 1], client_port));
    let pid = child.id().context("etcd exited at once")?;
    let mut process = Process {
        child,
        pid,
        addr,
        admin: None,
        ready_after: Duration::ZERO,
    };
    process
        .wait_http(addr, "/health", "\"health\":\"true\"", started, &log)
        .await?;
    process.ready_after = started.elapsed();
    Ok(process)
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

fn spawn(mut command: Command, log: &Path) -> anyhow::Result<(Child, Lines)> {
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    Ok((child, BufReader::new(stdout).lines()))
}

/// Reads the address lines a server prints on standard output; fails with the end of its
/// `log` if it exits first.
async fn from_lines(
    child: Child,
    mut lines: Lines,
    grpc_prefix: &str,
    admin_prefix: Option<&str>,
    log: &Path,
) -> anyhow::Result<Process> {
    let pid = child.id().context("the server exited at once")?;
    let mut addr = None;
    let mut admin = None;
    let read = async {
        while addr.is_none() || (admin_prefix.is_some() && admin.is_none()) {
            let Some(line) = lines.next_line().await? else {
                bail!(
                    "the server exited before printing its address; the end of {}:\n{}",
                    log.display(),
                    log_tail(log)
                );
            };
            if let Some(rest) = line.strip_prefix(grpc_prefix) {
                addr = Some(rest.trim().parse::<SocketAddr>()?);
            } else if let Some(rest) = admin_prefix.and_then(|p| line.strip_prefix(p)) {
                admin = Some(rest.trim().parse::<SocketAddr>()?);
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(START_TIMEOUT, read)
        .await
        .context("the server printed no address in time")??;
    // Keep draining stdout so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Process {
        child,
        pid,
        addr: addr.context("no address")?,
        admin,
        ready_after: Duration::ZERO,
    })
}

impl Process {
    /// Polls `GET path` on `addr` until the answer contains `needle`; fails at once, with the
    /// end of its `log`, if the process exits first (a port taken, a bad flag).
    async fn wait_http(
        &mut self,
        addr: SocketAddr,
        path: &str,
        needle: &str,
        started: Instant,
        log: &Path,
    ) -> anyhow::Result<()> {
        loop {
            if http_contains(addr, path, needle).await {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the server exited with {status} before {addr}{path} was ready; the end of {}:\n{}",
                    log.display(),
                    log_tail(log)
                );
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("{addr}{path} not ready within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// The last lines of a server's log (its standard error), where it says why it stopped.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

async fn http_contains(addr: SocketAddr, path: &str, needle: &str) -> bool {
    http_get(addr, path)
        .await
        .is_some_and(|body| body.contains(needle))
}

/// The whole answer (status line, headers and body) to `GET path`, or `None` when the server
/// does not answer within 2 s.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let get = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        Some(answer)
    };
    tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .ok()
        .flatten()
}

/// The sum of a metric's samples over all its label sets in a Prometheus text exposition, or
/// `None` when it has none.
fn metric_sum(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once('}')?.1,
                None => rest.starts_with(' ').then_some(rest)?,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .reduce(|a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_exits_before_its_address_fails_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'bind: address already in use' >&2; exit 3"]);
        let (child, lines) = spawn(command, &log).unwrap();
        let err = from_lines(child, lines, "grpc listening on ", None, &log)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("exited before printing its address"), "{err}");
        assert!(err.contains("bind: address already in use"), "{err}");
    }

    #[test]
    fn a_metric_is_summed_over_its_label_sets() {
        let exposition = "\
# HELP pixiu_metadata_store_watch_resets Store watches that started over.
# TYPE pixiu_metadata_store_watch_resets counter
pixiu_metadata_store_watch_resets_total{backend=\"embedded\"} 2
pixiu_metadata_store_watch_resets_total{backend=\"etcd\",note=\"a } in a label\"} 3
pixiu_metadata_store_watch_resets_total_other 40
pixiu_metadata_unlabelled 7 1700000000000
";
        let resets = metric_sum(exposition, "pixiu_metadata_store_watch_resets_total");
        assert_eq!(resets, Some(5.0));
        assert_eq!(
            metric_sum(exposition, "pixiu_metadata_unlabelled"),
            Some(7.0)
        );
        assert_eq!(metric_sum(exposition, "pixiu_metadata_store_watch"), None);
        assert_eq!(metric_sum(exposition, "absent"), None);
    }

    #[tokio::test]
    async fn the_address_lines_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "echo 'grpc listening on 127.0.0.1:4000'; echo 'admin listening on 127.0.0.1:4001'; sleep 30",
        ]);
        let (child, lines) = spawn(command, &log).unwrap();
        let process = from_lines(
            child,
            lines,
            "grpc listening on ",
            Some("admin listening on "),
            &log,
        )
        .await
        .unwrap();
        assert_eq!(process.addr, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(process.admin, Some("127.0.0.1:4001".parse().unwrap()));
    }
}
