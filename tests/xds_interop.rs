//! Interop with a real gRPC xDS client: grpcio's `xds:///` resolver, run by
//! `tests/python/xds_interop.py`, resolves LDS -> RDS -> CDS -> EDS from the Envoy resources
//! of the server's `--envoy-config-dir`, calls a backend, then follows an endpoints change.
//!
//! The interpreter comes from the virtualenv `./scripts/test` installs (`PIXIU_TEST_PYTHON`,
//! with grpcio and xds-protos). Without it this test fails; it never skips.

mod common;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::TestServer;
use pixiu_metadata::config::{Backend, Config};

/// How long the Python client may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

fn python() -> PathBuf {
    let Some(path) = std::env::var_os("PIXIU_TEST_PYTHON") else {
        panic!(
            "PIXIU_TEST_PYTHON is not set. Run ./scripts/test: it installs a Python with grpcio \
             and xds-protos into .venv/ and exports PIXIU_TEST_PYTHON (or set it yourself)."
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "PIXIU_TEST_PYTHON={} does not exist",
        path.display()
    );
    path
}

/// Runs `command`, killing it after [`CLIENT_TIMEOUT`]; returns (success, stdout, stderr).
///
/// Blocks the calling thread: call it from a multi-threaded runtime so the in-process server
/// keeps running.
fn run(mut command: Command) -> (bool, String, String) {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {shown}: {error}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = tokio::time::Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    if status.is_none() {
        panic!(
            "{shown} did not finish within {CLIENT_TIMEOUT:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
    }
    (status.is_some_and(|s| s.success()), stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_xds_client_resolves_calls_and_follows_endpoint_changes() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.envoy.config_dir = Some(dir.path().to_path_buf());
    config.envoy.poll_interval = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    // Connect once so the server is known to be up before the client starts.
    drop(server.channel().await);

    let mut command = Command::new(python);
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/xds_interop.py"))
        .arg(server.addr.to_string())
        .arg(dir.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    let (success, stdout, stderr) = run(command);
    println!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(
        success,
        "xds_interop.py failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    assert!(stdout.contains("-> backend-2") && stdout.trim_end().ends_with("OK"));
    server.stop().await;
}
