//! Crash safety: the real binary is killed with SIGKILL at random moments while concurrent
//! publishers write; after every restart each acknowledged publish must be present with the
//! acknowledged content, and the store must open. A second test does the same to lease
//! refreshes, which the server keeps in memory between checkpoints: after every restart each
//! record's lease must run from no earlier than its last acknowledged refresh.

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
use pixiu_metadata::pb::metadata::{
    GetMetadataRequest, ListMetadataRequest, PublishMetadataRequest,
};

const ROUNDS: usize = 20;
const PUBLISHERS: usize = 8;

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(data_dir: &std::path::Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    fn start_with(data_dir: &std::path::Path, args: &[&str]) -> Self {
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
            .args(args)
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
    /// Seeded from `CRASH_SEED`, else `default`; the seed is printed so a failure replays.
    fn seeded(test: &str, default: u64) -> Self {
        let seed = std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        println!("{test} seed {seed} (set CRASH_SEED to replay)");
        Self(seed)
    }

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
    let mut rng = Rng::seeded("crash test", 0x9e37_79b9_7f4a_7c15);
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

/// Milliseconds since the epoch, now.
fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// Every stored record's lease stamp, by application (one revision each).
async fn leases(channel: &tonic::transport::Channel) -> BTreeMap<String, i64> {
    let mut client = metadata_client(channel.clone());
    let page = tokio::time::timeout(
        Duration::from_secs(30),
        client.list(ListMetadataRequest {
            page_size: 1000,
            names_only: true,
            ..Default::default()
        }),
    )
    .await
    .expect("list within 30 s")
    .expect("list")
    .into_inner();
    assert!(page.next_page_token.is_empty(), "one page holds them all");
    page.records
        .into_iter()
        .map(|r| (r.application_name, r.refreshed_at_ms))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_refresh_loses_its_lease_across_sigkill() {
    // A 4 s lease: refreshes stay in memory for 2 s after each checkpoint, and a round's
    // kill (at 0.3-2.8 s) usually lands while the last refreshes were kept in memory only.
    const TTL: &str = "4s";
    const ROUNDS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::seeded("refresh crash test", 0x2545_f491_4f6c_dd1d);
    // Application -> when the last acknowledged refresh of its record was sent.
    let refreshed: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let mut n_refreshes = 0usize;

    for round in 0..ROUNDS {
        let server = Server::start_with(dir.path(), &["--metadata-ttl", TTL]);
        let channel = common::channel_to(server.addr).await;
        let listed_at = now_ms();
        let stored = leases(&channel).await;
        for (app, sent_ms) in refreshed.lock().iter() {
            let stamp = stored
                .get(app)
                .unwrap_or_else(|| panic!("round {round}: {app} expired although refreshed"));
            assert!(
                *stamp >= *sent_ms,
                "round {round}: {app}'s lease runs from {stamp}, before its last acknowledged \
                 refresh sent at {sent_ms}"
            );
            assert!(
                *stamp <= listed_at + 1_000,
                "round {round}: {app}'s lease stamp {stamp} is in the future"
            );
        }

        let mut tasks = Vec::new();
        for publisher in 0..PUBLISHERS {
            let mut client = metadata_client(channel.clone());
            let refreshed = refreshed.clone();
            tasks.push(tokio::spawn(async move {
                let app = format!("app-{publisher}");
                let mut n = 0usize;
                loop {
                    let request = PublishMetadataRequest {
                        application_name: app.clone(),
                        revision: "r".into(),
                        metadata_info: format!("{app} metadata"),
                    };
                    let sent_ms = now_ms();
                    match tokio::time::timeout(Duration::from_secs(30), client.publish(request))
                        .await
                    {
                        Ok(Ok(_)) => {
                            refreshed.lock().insert(app.clone(), sent_ms);
                            n += 1;
                        }
                        Ok(Err(_)) | Err(_) => return n,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        let run_for = Duration::from_millis(300 + rng.next() % 2_500);
        tokio::time::sleep(run_for).await;
        server.kill();
        for task in tasks {
            n_refreshes += task.await.unwrap();
        }
        println!(
            "round {round}: killed after {run_for:?}, {n_refreshes} refreshes acknowledged so far"
        );
    }
    let server = Server::start_with(dir.path(), &["--metadata-ttl", TTL]);
    let channel = common::channel_to(server.addr).await;
    let stored = leases(&channel).await;
    for (app, sent_ms) in refreshed.lock().iter() {
        assert!(
            stored.get(app).is_some_and(|stamp| stamp >= sent_ms),
            "final: {app}"
        );
    }
    assert_eq!(stored.len(), PUBLISHERS);
    assert!(
        n_refreshes > ROUNDS * PUBLISHERS,
        "the publishers made progress"
    );
    println!(
        "refresh crash test: {ROUNDS} SIGKILL rounds, {n_refreshes} refreshes acknowledged, no lease moved back"
    );
    server.kill();
}
