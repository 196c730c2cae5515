//! Crash safety: the real binary is killed with SIGKILL at random moments while concurrent
//! publishers write; after every restart each acknowledged publish must be present with the
//! acknowledged content, and the store must open.

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use common::metadata_client;
use parking_lot::Mutex;
use pixiu_metadata::pb::metadata::{GetMetadataRequest, PublishMetadataRequest};

const ROUNDS: usize = 20;
const PUBLISHERS: usize = 8;

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(data_dir: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pixiu-metadata"))
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pixiu-metadata");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let addr = loop {
            let mut line = String::new();
            let n = stdout
                .read_line(&mut line)
                .expect("read the server's output");
            assert!(n > 0, "the server exited before listening");
            if let Some(addr) = line.trim().strip_prefix("grpc listening on ") {
                break addr.parse().unwrap();
            }
        };
        // Keep draining, so the server never writes to a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Self { child, addr }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small deterministic generator, so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Gets every record of `expected`, 32 at a time, and checks its value byte for byte.
async fn check_all(
    channel: &tonic::transport::Channel,
    expected: &BTreeMap<(String, String), String>,
    when: &str,
) {
    use futures::StreamExt;
    futures::stream::iter(expected.iter())
        .for_each_concurrent(32, |((app, revision), value)| {
            let mut client = metadata_client(channel.clone());
            async move {
                let got = tokio::time::timeout(
                    Duration::from_secs(30),
                    client.get(GetMetadataRequest {
                        application_name: app.clone(),
                        revision: revision.clone(),
                    }),
                )
                .await
                .unwrap_or_else(|_| panic!("{when}: get {app}/{revision} timed out"))
                .unwrap_or_else(|s| panic!("{when}: {app}/{revision} lost: {s:?}"))
                .into_inner();
                assert_eq!(&got.metadata_info, value, "{when}: {app}/{revision}");
            }
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_publish_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15_u64);
    println!("crash test seed {seed} (set CRASH_SEED to replay)");
    let mut rng = Rng(seed);
    // Every acknowledged (application, revision) -> value.
    let acknowledged: Arc<Mutex<BTreeMap<(String, String), String>>> = Arc::default();
    let mut n_in_flight_total = 0usize;

    for round in 0..ROUNDS {
        let started = std::time::Instant::now();
        let server = Server::start(dir.path());
        let channel = common::channel_to(server.addr).await;
        let up_after = started.elapsed();

        // Everything acknowledged in earlier rounds is there, byte for byte.
        let expected = acknowledged.lock().clone();
        check_all(&channel, &expected, &format!("round {round}")).await;
        let checked_after = started.elapsed();

        // Concurrent publishers, killed after a random time.
        let mut tasks = Vec::new();
        for publisher in 0..PUBLISHERS {
            let mut client = metadata_client(channel.clone());
            let acknowledged = acknowledged.clone();
            let value_len = 16 + (rng.next() % 4096) as usize;
            tasks.push(tokio::spawn(async move {
                let mut n_sent = 0usize;
                for i in 0.. {
                    let app = format!("app-{publisher}");
                    let revision = format!("round{round}-{i}");
                    let value = format!("{app}/{revision}:").repeat(value_len / 16 + 1);
                    n_sent += 1;
                    let request = PublishMetadataRequest {
                        application_name: app.clone(),
                        revision: revision.clone(),
                        metadata_info: value.clone(),
                    };
                    // A publish to a killed server fails at once (the connection resets);
                    // the timeout only keeps a bug from hanging the test.
                    match tokio::time::timeout(Duration::from_secs(30), client.publish(request))
                        .await
                    {
                        Ok(Ok(_)) => {
                            acknowledged.lock().insert((app, revision), value);
                        }
                        Ok(Err(_)) | Err(_) => return n_sent,
                    }
                }
                n_sent
            }));
        }
        let run_for = Duration::from_millis(50 + rng.next() % 400);
        tokio::time::sleep(run_for).await;
        server.kill();
        for task in tasks {
            n_in_flight_total += task.await.unwrap();
        }
        println!(
            "round {round}: up after {up_after:?}, {} records checked after {checked_after:?}, \
             killed after {run_for:?} of publishing, {} acknowledged so far",
            expected.len(),
            acknowledged.lock().len()
        );
    }

    // A last restart checks the final round.
    let server = Server::start(dir.path());
    let channel = common::channel_to(server.addr).await;
    let expected = acknowledged.lock().clone();
    check_all(&channel, &expected, "final").await;
    assert!(expected.len() > ROUNDS, "the publishers made progress");
    println!(
        "crash test: {ROUNDS} SIGKILL rounds, {} publishes sent, {} acknowledged, 0 lost",
        n_in_flight_total,
        expected.len()
    );
    server.kill();
}
