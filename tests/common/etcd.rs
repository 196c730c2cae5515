//! A real etcd on loopback for tests, and a TCP proxy that can cut connections to it.
//!
//! Shared by the integration tests (`mod common;`) and the store's unit tests (included by
//! path), so it depends only on std, tokio, tempfile and the crate's `loopback` module. The
//! etcd binary is Debian's `etcd-server` (`/usr/bin/etcd`, or `$ETCD_BIN`); when it is
//! missing the test fails, it is never skipped.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};

/// How long etcd may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One etcd member on loopback with its own data directory, killed on drop.
pub struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// The etcd binary, or a failure telling how to get it.
pub fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|candidate| candidate.is_file())
    });
    match on_path {
        Some(path) => path,
        None if PathBuf::from("/usr/bin/etcd").is_file() => PathBuf::from("/usr/bin/etcd"),
        None => panic!(
            "the etcd binary is missing (looked at $ETCD_BIN, $PATH and /usr/bin/etcd): these \
             tests need a real etcd; run ./scripts/test, which installs Debian's etcd-server"
        ),
    }
}

/// A loopback port for a child process to bind (see `loopback::free_port`).
pub fn free_port() -> u16 {
    pixiu_metadata::loopback::free_port().expect("a free loopback port")
}

/// The last `bytes` (or a few fewer, to start on a character) of the log file at `path`, for
/// failure messages; empty when it cannot be read.
pub fn log_tail(path: &Path, bytes: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let start = log.len().saturating_sub(bytes);
    let start = (start..log.len())
        .find(|i| log.is_char_boundary(*i))
        .unwrap_or(log.len());
    log[start..].to_string()
}

impl Etcd {
    /// Starts a fresh single-member etcd and waits until it is healthy.
    pub async fn start() -> Self {
        let mut etcd = Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        etcd.spawn().await;
        etcd
    }

    /// `http://127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// Kills etcd (SIGKILL, as a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data directory and ports, and waits until it is healthy.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Sends etcd SIGSTOP (`stop`) or SIGCONT: a hung member, whose connections stay open.
    pub fn freeze(&self, stop: bool) {
        let pid = self.child.as_ref().expect("etcd is running").id();
        let signal = if stop { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Starts etcd again on the same ports with an empty data directory, as after losing
    /// its disk: a new history, from revision 1.
    pub async fn wipe_and_restart(&mut self) {
        self.kill();
        std::fs::remove_dir_all(self.dir.path().join("data")).expect("removing etcd's data");
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log file");
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("default={peer}"))
            .arg("--logger")
            .arg("zap")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run ./scripts/test, which installs Debian's etcd-server",
                    etcd_binary().display()
                )
            });
        self.child = Some(child);
        self.wait_healthy().await;
    }

    async fn wait_healthy(&mut self) {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("etcd exited with {status} while starting:\n{}", self.log());
            }
            if self.healthy().await {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("etcd not healthy within {START_TIMEOUT:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether `GET /health` answers `"health":"true"`.
    pub async fn healthy(&self) -> bool {
        health(self.client_addr()).await
    }

    /// The tail of etcd's log, for failure messages.
    pub fn log(&self) -> String {
        log_tail(&self.dir.path().join("etcd.log"), 4000)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A three-member etcd cluster on loopback, each member with its own data directory; every
/// member is killed on drop.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<(u16, u16)>,
    children: Vec<Option<Child>>,
}

impl EtcdCluster {
    /// Starts `n` members (3 for a cluster that survives one loss) and waits until every one
    /// is healthy.
    pub async fn start(n: usize) -> Self {
        let mut cluster = Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
            members: (0..n).map(|_| (free_port(), free_port())).collect(),
            children: (0..n).map(|_| None).collect(),
        };
        for idx in 0..n {
            cluster.spawn(idx, "new");
        }
        for idx in 0..n {
            cluster.wait_healthy(idx).await;
        }
        cluster
    }

    /// Client URLs of every member, comma-free, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|(client, _)| format!("http://127.0.0.1:{client}"))
            .collect()
    }

    /// Kills member `idx` (SIGKILL).
    pub fn kill(&mut self, idx: usize) {
        if let Some(mut child) = self.children[idx].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `idx` again on its data directory and waits until it is healthy.
    pub async fn restart(&mut self, idx: usize) {
        self.kill(idx);
        self.spawn(idx, "existing");
        self.wait_healthy(idx).await;
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(idx, (_, peer))| format!("m{idx}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, idx: usize, state: &str) {
        let (client_port, peer_port) = self.members[idx];
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("m{idx}.log")))
            .expect("etcd log file");
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg(format!("m{idx}"))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("m{idx}")))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(self.initial_cluster())
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg("pixiu-test")
            .arg("--logger")
            .arg("zap")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run ./scripts/test, which installs Debian's etcd-server",
                    etcd_binary().display()
                )
            });
        self.children[idx] = Some(child);
    }

    async fn wait_healthy(&mut self, idx: usize) {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.members[idx].0));
        loop {
            if let Some(status) = self.children[idx]
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "etcd member m{idx} exited with {status} while starting:\n{}",
                    self.log(idx)
                );
            }
            if health(addr).await {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "etcd member m{idx} not healthy within {START_TIMEOUT:?}:\n{}",
                    self.log(idx)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tail of member `idx`'s log.
    pub fn log(&self, idx: usize) -> String {
        log_tail(&self.dir.path().join(format!("m{idx}.log")), 4000)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for idx in 0..self.children.len() {
            self.kill(idx);
        }
    }
}

/// Whether the etcd member at `addr` answers `GET /health` with `"health":"true"`.
async fn health(addr: SocketAddr) -> bool {
    let check = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        Some(body.contains("\"health\":\"true\""))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Some(true))
    )
}

/// A TCP proxy in front of one address that can cut every connection through it and refuse
/// new ones, to break a client's connections while the server keeps running.
pub struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<parking_lot::Mutex<Vec<AbortHandle>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(parking_lot::Mutex::new(Vec::<AbortHandle>::new()));
        let task = tokio::spawn({
            let cut = cut.clone();
            let connections = connections.clone();
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        // Refused: closed at once.
                        drop(inbound);
                        continue;
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().push(relay.abort_handle());
                }
            }
        });
        Self {
            addr,
            cut,
            connections,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection through the proxy and refuses new ones until [`restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().drain(..) {
            connection.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        for connection in self.connections.lock().drain(..) {
            connection.abort();
        }
    }
}
