//! The Python examples (examples/python/) against the real server: the consumer subscribes to
//! an interface's providers over ADS before the provider exists, the provider publishes and
//! registers, the consumer receives the provider's metadata on the same channel.
//!
//! The interpreter comes from the virtualenv `./scripts/test` installs (`PIXIU_TEST_PYTHON`);
//! without it this test fails, it never skips.

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::TestServer;

fn python() -> PathBuf {
    let Some(path) = std::env::var_os("PIXIU_TEST_PYTHON") else {
        panic!(
            "PIXIU_TEST_PYTHON is not set. Run ./scripts/test: it installs a Python with grpcio, \
             grpcio-tools and xds-protos into .venv/ and exports PIXIU_TEST_PYTHON."
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

fn example(name: &str) -> Command {
    let mut command = Command::new(python());
    command
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/python")
                .join(name),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_provider_and_consumer_examples_work() {
    let server = TestServer::memory().await;
    let addr = server.addr.to_string();
    let mut consumer = example("consumer.py")
        .args([
            &addr,
            "--namespace",
            "shop",
            "--interface",
            "org.example.Greeter",
        ])
        .args(["--expect", "greeter/rev-1", "--timeout", "60"])
        .spawn()
        .expect("start consumer.py");
    let (lines_tx, lines) = mpsc::channel();
    let stdout = consumer.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("consumer.py: {line}");
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut stderr = consumer.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut seen = Vec::new();
    let wait_for = |wanted: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            match lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let found = line.contains(wanted);
                    seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("consumer.py never printed {wanted:?}; it printed {seen:#?}");
    };
    wait_for("subscribed to the providers", &mut seen);

    let provider = example("provider.py")
        .args([&addr, "--namespace", "shop", "--application", "greeter"])
        .args(["--revision", "rev-1", "--interface", "org.example.Greeter"])
        .output()
        .expect("run provider.py");
    println!(
        "provider.py: {}\n{}",
        String::from_utf8_lossy(&provider.stdout),
        String::from_utf8_lossy(&provider.stderr)
    );
    assert!(provider.status.success(), "provider.py failed");
    assert!(
        String::from_utf8_lossy(&provider.stdout)
            .contains("registered org.example.Greeter -> greeter")
    );

    wait_for("provider: greeter", &mut seen);
    wait_for("metadata greeter/rev-1: {", &mut seen);
    wait_for("consumer: received 1 expected metadata", &mut seen);
    let status = consumer.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "consumer.py failed: {status}\n{stderr}");
    server.stop().await;
}
