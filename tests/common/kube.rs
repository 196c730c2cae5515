//! A real kube-apiserver (on its own etcd) on loopback for tests, and kubectl against it.
//!
//! Shared by the integration tests (`mod common;`) and the store's unit tests (included by
//! path next to `etcd.rs`), so it depends only on std, tokio, tempfile and the sibling `etcd`
//! module. The binaries come from `scripts/kube-apiserver.sh`, which builds kube-apiserver 1.20
//! from Debian's source and caches it: `$PIXIU_TEST_KUBE_APISERVER` and `$PIXIU_TEST_KUBECTL`
//! (exported by `scripts/test`), else that script's cache. When they are missing the test
//! fails, it is never skipped.
//!
//! The API server runs with `--token-auth-file` (an admin token in `system:masters`),
//! a self-signed serving certificate (`--cert-dir`), `--authorization-mode RBAC` and a
//! service-account key, so TokenRequest works and RBAC is real. There is no
//! controller-manager: namespaces never finish deleting and the aggregated roles grant
//! nothing, so tests write their Roles directly.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use super::etcd::{Etcd, free_port, log_tail};

/// How long the API server may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The admin's bearer token.
pub const ADMIN_TOKEN: &str = "pixiu-test-admin-token";

fn cached(name: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    let path = cache
        .join("pixiu-metadata/kubernetes-1.20.2/bin")
        .join(name);
    path.is_file().then_some(path)
}

fn binary(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "${env} is {}, which does not exist; run ./scripts/kube-apiserver.sh",
            path.display()
        );
        return path;
    }
    cached(name).unwrap_or_else(|| {
        panic!(
            "{name} is missing (looked at ${env} and the cache of scripts/kube-apiserver.sh): \
             these tests need a real Kubernetes API server; run ./scripts/test, or \
             ./scripts/kube-apiserver.sh once to build and cache it"
        )
    })
}

/// The kube-apiserver binary, or a failure telling how to get it.
pub fn kube_apiserver_binary() -> PathBuf {
    binary("PIXIU_TEST_KUBE_APISERVER", "kube-apiserver")
}

/// The kubectl binary, or a failure telling how to get it.
pub fn kubectl_binary() -> PathBuf {
    binary("PIXIU_TEST_KUBECTL", "kubectl")
}

/// etcd and kube-apiserver on loopback, killed on drop.
pub struct KubeApiserver {
    dir: tempfile::TempDir,
    pub etcd: Etcd,
    port: u16,
    child: Option<Child>,
}

impl KubeApiserver {
    /// Starts etcd and the API server and waits until the API server is ready.
    pub async fn start() -> Self {
        let binary = kube_apiserver_binary();
        let _ = kubectl_binary();
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"),
        )
        .expect("token file");
        let key = dir.path().join("service-account.key");
        let made = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("running openssl for the service-account key: {e}"));
        assert!(made.success(), "openssl genrsa failed");
        let etcd = Etcd::start().await;
        let mut server = Self {
            dir,
            etcd,
            port: free_port(),
            child: None,
        };
        server.write_kubeconfig("admin", ADMIN_TOKEN, "default");
        let _ = binary;
        server.spawn().await;
        server
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// Writes `<name>.kubeconfig` for a bearer `token` with `namespace` as the default, and
    /// returns its path.
    pub fn write_kubeconfig(&self, name: &str, token: &str, namespace: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        let ca = self.dir.path().join("certs/apiserver.crt");
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\n    \
             namespace: {namespace}\ncurrent-context: test\n",
            self.url(),
            ca.display()
        );
        std::fs::write(&path, config).expect("kubeconfig");
        path
    }

    /// Kills the API server (SIGKILL) and waits for it to exit; etcd keeps running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the API server again on the same port, certificates and etcd.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "kube-apiserver is already running");
        let dir = self.dir.path();
        let key = dir.join("service-account.key");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("kube-apiserver.log"))
            .expect("kube-apiserver log file");
        let child = Command::new(kube_apiserver_binary())
            .arg(format!("--etcd-servers={}", self.etcd.endpoint()))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.port))
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-key-file={}", key.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                key.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--api-audiences=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            .arg("--enable-priority-and-fairness=false")
            .arg("--watch-cache=true")
            .arg("--logtostderr=true")
            .arg("--v=1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("kube-apiserver log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run ./scripts/kube-apiserver.sh",
                    kube_apiserver_binary().display()
                )
            });
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "kube-apiserver exited with {status} while starting:\n{}",
                    self.log()
                );
            }
            if self.dir.path().join("certs/apiserver.crt").is_file() {
                let out = self
                    .kubectl_output(&["get", "--raw", "/readyz"], None)
                    .await;
                if out.status.success() {
                    return;
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "kube-apiserver not ready within {START_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs kubectl as the admin with `args` (and `stdin`), whatever its outcome.
    pub async fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl_with(&self.kubeconfig(), args, stdin).await
    }

    /// Runs kubectl as the admin; fails the test when kubectl fails. Returns its stdout.
    pub async fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_stdin(args, None).await
    }

    /// Runs kubectl as the admin with `stdin`; fails the test when kubectl fails.
    pub async fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl_output(args, stdin).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Applies `yaml` and waits until every CRD in the cluster is established.
    pub async fn apply_crds(&self, yaml: &str) {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml)).await;
        self.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd",
            "--all",
        ])
        .await;
        self.forget_discovery();
    }

    /// Drops kubectl's discovery cache, so new resource types are found.
    pub fn forget_discovery(&self) {
        let _ = std::fs::remove_dir_all(cache_dir(&self.kubeconfig()));
    }

    /// Creates namespaces (no error when they exist).
    pub async fn create_namespaces(&self, names: &[&str]) {
        for name in names {
            let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
            self.kubectl_stdin(&["apply", "-f", "-"], Some(&yaml)).await;
        }
    }

    /// The tail of the API server's log, for failure messages.
    pub fn log(&self) -> String {
        log_tail(&self.dir.path().join("kube-apiserver.log"), 6000)
    }
}

/// kubectl's discovery cache for the API server of `kubeconfig`: beside it, so API servers
/// that reuse a port never share one.
fn cache_dir(kubeconfig: &Path) -> PathBuf {
    kubeconfig
        .parent()
        .unwrap_or(Path::new("."))
        .join("kubectl-cache")
}

/// Runs kubectl with `kubeconfig`, `args` and `stdin`, whatever its outcome.
pub async fn kubectl_with(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(kubectl_binary());
    command
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--cache-dir={}", cache_dir(kubeconfig).display()))
        .arg("--request-timeout=10s")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stdin = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("running kubectl");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("kubectl stdin");
            pipe.write_all(input.as_bytes()).expect("kubectl stdin");
        }
        child.wait_with_output().expect("kubectl ran")
    })
    .await
    .expect("kubectl task")
}

impl Drop for KubeApiserver {
    fn drop(&mut self) {
        self.kill();
    }
}
