//! The `pixiu-metadata` binary's client commands, end to end, against a server started in
//! this process on `127.0.0.1:0`.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::{TestServer, pki};
use pixiu_metadata::{
    config::{Backend, Config},
    security::tls::TlsPaths,
};

const BIN: &str = env!("CARGO_BIN_EXE_pixiu-metadata");
const TIMEOUT: Duration = Duration::from_secs(30);

/// The binary with a clean environment for its own `PIXIU_METADATA_*` settings.
fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("PIXIU_METADATA_SERVER")
        .env_remove("PIXIU_METADATA_NAMESPACE")
        .env_remove("PIXIU_METADATA_CA_CERT")
        .env_remove("PIXIU_METADATA_CERT")
        .env_remove("PIXIU_METADATA_KEY")
        .env_remove("PIXIU_METADATA_TLS_SERVER_NAME")
        .env_remove("PIXIU_METADATA_CLIENT_TOKEN_FILE")
        .env_remove("PIXIU_METADATA_ADMIN_TOKEN_FILE")
        .env("RUST_LOG", "warn")
        // As many developers' shells have it: errors must still be one line, not a backtrace.
        .env("RUST_BACKTRACE", "1");
    command
}

/// Waits for `child` while reading its output (so a large output cannot fill the pipe and
/// stall it), killing it and failing the test after [`TIMEOUT`].
fn wait(child: Child, shown: &str) -> Output {
    let pid = child.id();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output().unwrap()));
    match finished.recv_timeout(TIMEOUT) {
        Ok(output) => output,
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let output = finished.recv().unwrap();
            panic!(
                "{shown} did not finish within {TIMEOUT:?}\n{}",
                show(&output)
            );
        }
    }
}

fn show(output: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the binary with `args` (and `stdin`, if any) to completion.
///
/// Blocks the thread: the tests run on a multi-threaded runtime so the in-process server keeps
/// serving.
fn cli_with_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    let shown = format!("pixiu-metadata {}", args.join(" "));
    let mut child = command(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
    }
    let output = wait(child, &shown);
    println!("$ {shown}\n{}", show(&output));
    output
}

fn cli(args: &[&str]) -> Output {
    cli_with_stdin(args, None)
}

/// Runs the binary and returns its standard output, failing unless it succeeded.
fn cli_ok(args: &[&str]) -> String {
    let output = cli(args);
    assert!(
        output.status.success(),
        "pixiu-metadata {} failed\n{}",
        args.join(" "),
        show(&output)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_get_metadata_and_definitions() {
    let server = TestServer::memory().await;
    let url = server.url();
    let value = r#"{"app":"app","services":{"g/org.example.Greeter:1.0.0:tri":{"params":{"说明":"问候 👋"}}}}"#;

    let out = cli_ok(&[
        "metadata", "publish", "--server", &url, "-a", "app", "-r", "rev", "--value", value,
    ]);
    assert_eq!(out, "published app/rev\n");
    let out = cli_ok(&[
        "metadata",
        "get",
        "--server",
        &url,
        "--application",
        "app",
        "--revision",
        "rev",
    ]);
    assert_eq!(out, format!("{value}\n"), "get prints the raw value");

    // --file - reads standard input, byte for byte (multi-line here).
    let multiline = "line one\nzweite Zeile ü\n";
    let output = cli_with_stdin(
        &[
            "metadata", "publish", "--server", &url, "-a", "app", "-r", "rev2", "--file", "-",
        ],
        Some(multiline),
    );
    assert!(output.status.success(), "{}", show(&output));
    let out = cli_ok(&[
        "metadata", "get", "--server", &url, "-a", "app", "-r", "rev2",
    ]);
    assert_eq!(
        out, multiline,
        "a value that ends with a newline reads back byte for byte"
    );

    // --file PATH.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("definition.json");
    let definition = r#"{"canonicalName":"org.example.Greeter","methods":[{"name":"greet","parameterTypes":["java.lang.String"],"returnType":"java.lang.String"}]}"#;
    std::fs::write(&path, definition).unwrap();
    let identifier = "org.example.Greeter:1.0.0::provider:app";
    let out = cli_ok(&[
        "definition",
        "publish",
        "--server",
        &url,
        "-i",
        identifier,
        "--file",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out, format!("published {identifier}\n"));
    let out = cli_ok(&["definition", "get", "--server", &url, "-i", identifier]);
    assert_eq!(out, format!("{definition}\n"));

    // --namespace isolates.
    cli_ok(&[
        "metadata",
        "publish",
        "--server",
        &url,
        "-n",
        "team-a",
        "-a",
        "app",
        "-r",
        "ns",
        "--value",
        "in team-a",
    ]);
    let out = cli_ok(&[
        "metadata", "get", "--server", &url, "-n", "team-a", "-a", "app", "-r", "ns",
    ]);
    assert_eq!(out, "in team-a\n");
    let output = cli(&["metadata", "get", "--server", &url, "-a", "app", "-r", "ns"]);
    assert!(!output.status.success(), "{}", show(&output));
    server.stop().await;
}

/// Runs the binary and returns its standard error, failing if it succeeded.
fn cli_err(args: &[&str]) -> String {
    let output = cli(args);
    assert!(
        !output.status.success(),
        "pixiu-metadata {} should have failed\n{}",
        args.join(" "),
        show(&output)
    );
    String::from_utf8(output.stderr).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_speak_tls_and_authenticate() {
    // A server with TLS that identifies clients by certificate (mTLS) or bearer token, and an
    // admin port that wants a token.
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let server_ca = pki::Ca::new("server CA");
    let client_ca = pki::Ca::new("client CA");
    pki::write_server_files(dir.path(), &server_ca.server(), &client_ca);
    std::fs::write(path("server-ca.crt"), server_ca.pem()).unwrap();
    std::fs::write(
        path("tokens.toml"),
        "[[token]]\nname = \"deployer\"\nnamespace = \"team-b\"\ntoken = \"deployer-secret\"\n",
    )
    .unwrap();
    std::fs::write(path("deployer.token"), "deployer-secret\n").unwrap();
    std::fs::write(path("wrong.token"), "not-a-token\n").unwrap();
    std::fs::write(path("admin.token"), "admin-secret\n").unwrap();
    let workload = client_ca.workload("team-a", "greeter");
    std::fs::write(path("client.crt"), &workload.cert).unwrap();
    std::fs::write(path("client.key"), &workload.key).unwrap();
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.security.tls = Some(TlsPaths {
        cert: path("server.crt"),
        key: path("server.key"),
        client_ca: Some(path("ca.crt")),
    });
    config.security.token_file = Some(path("tokens.toml"));
    config.security.admin_token_file = Some(path("admin.token"));
    let server = TestServer::start(config).await;
    let url = format!("https://{}", server.addr);
    let file = |name: &str| path(name).to_str().unwrap().to_string();
    let (ca, token, wrong, cert, key) = (
        file("server-ca.crt"),
        file("deployer.token"),
        file("wrong.token"),
        file("client.crt"),
        file("client.key"),
    );
    // Every command below runs against the TLS port, trusting the server's CA.
    let tls = |args: &[&str]| -> Output {
        let tls = [
            "--server",
            &url,
            "--ca-cert",
            &ca,
            "--tls-server-name",
            "localhost",
        ];
        cli(&[args, &tls[..]].concat())
    };
    let ok = |args: &[&str]| {
        let output = tls(args);
        assert!(output.status.success(), "{}", show(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    let refused = |args: &[&str]| {
        let output = tls(args);
        assert!(!output.status.success(), "{}", show(&output));
        String::from_utf8(output.stderr).unwrap()
    };
    let get = ["metadata", "get", "-a", "app", "-r", "r1"];
    let by_token = ["--token-file", token.as_str()];
    let by_cert = ["--cert", cert.as_str(), "--key", key.as_str()];

    // A token acts in its own namespace: publish, get, list and watch all carry it.
    let publish = ["metadata", "publish", "-a", "app", "-r", "r1"];
    let out = ok(&[&publish[..], &["--value", "by token"], &by_token].concat());
    assert_eq!(out, "published app/r1\n");
    assert_eq!(ok(&[&get[..], &by_token].concat()), "by token\n");
    let list = ok(&[&["metadata", "list", "-o", "json"][..], &by_token].concat());
    assert!(list.contains("\"namespace\": \"team-b\""), "{list}");
    let watch = ok(&[
        &["metadata", "watch", "app/r1", "--count", "1"][..],
        &by_token,
    ]
    .concat());
    assert!(watch.contains("\"by token\""), "{watch}");

    // A client certificate acts in its SPIFFE ID's namespace, where team-b's record is not.
    let err = refused(&[&get[..], &by_cert].concat());
    assert!(err.contains("NotFound"), "{err}");
    ok(&[&publish[..], &["--value", "by cert"], &by_cert].concat());
    assert_eq!(ok(&[&get[..], &by_cert].concat()), "by cert\n");

    // Without credentials, with a wrong token, or without the server's CA: refused.
    let err = refused(&get);
    assert!(err.contains("Unauthenticated"), "{err}");
    let err = refused(&[&get[..], &["--token-file", &wrong]].concat());
    assert!(err.contains("Unauthenticated"), "{err}");
    assert!(
        !err.contains("not-a-token"),
        "the token is never printed: {err}"
    );
    let err = cli_err(&["metadata", "get", "-a", "app", "-r", "r1", "--server", &url]);
    assert!(err.contains("--ca-cert"), "{err}");
    let plain = server.url();
    let err = cli_err(&[
        "metadata",
        "get",
        "-a",
        "app",
        "-r",
        "r1",
        "--server",
        &plain,
        "--ca-cert",
        &ca,
    ]);
    assert!(err.contains("https://"), "{err}");
    // Plain HTTP/2 to the TLS port: the transport's words, and what to do.
    let err = cli_err(&[
        "metadata", "get", "-a", "app", "-r", "r1", "--server", &plain,
    ]);
    assert!(err.contains("give an https:// --server"), "{err}");

    // The admin port: status with its token, refused without.
    let admin = server.admin_url();
    let admin_token = file("admin.token");
    let status = cli_ok(&[
        "status",
        "--admin",
        &admin,
        "--admin-token-file",
        &admin_token,
        "-o",
        "json",
    ]);
    assert!(status.trim_start().starts_with('['), "{status}");
    let err = cli_err(&["status", "--admin", &admin]);
    assert!(err.contains("401"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero_with_a_helpful_message() {
    let server = TestServer::memory().await;
    let url = server.url();

    let output = cli(&[
        "metadata", "get", "--server", &url, "-a", "ghost", "-r", "r404",
    ]);
    assert!(!output.status.success(), "{}", show(&output));
    assert!(output.stdout.is_empty(), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("ghost") && stderr.contains("r404"),
        "the error names the code and the key\n{}",
        show(&output)
    );
    assert_eq!(stderr.lines().count(), 1, "one line\n{}", show(&output));
    assert!(stderr.starts_with("Error: "), "{}", show(&output));

    // Zero records or a zero-byte value limit is a usage error, not an empty answer.
    for args in [
        &["metadata", "list", "--server", &url, "--limit", "0"][..],
        &["serve", "--max-value-bytes", "0"][..],
    ] {
        let output = cli(args);
        assert_eq!(output.status.code(), Some(2), "{}", show(&output));
        assert!(String::from_utf8_lossy(&output.stderr).contains("0 is not in 1.."));
    }

    // A watch the server refuses (a namespace holding '/') ends with the reason instead of
    // reconnecting for ever.
    let stderr = cli_err(&[
        "metadata", "watch", "--server", &url, "-n", "a/b", "--count", "1",
    ]);
    assert!(
        stderr.contains("Error: InvalidArgument") && stderr.contains("namespace"),
        "{stderr}"
    );

    let output = cli(&[
        "definition",
        "get",
        "--server",
        &url,
        "-i",
        "org.example.Missing",
    ]);
    assert!(!output.status.success(), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NotFound"), "{}", show(&output));

    let output = cli(&[
        "metadata", "publish", "--server", &url, "-a", "", "-r", "r", "--value", "v",
    ]);
    assert!(!output.status.success(), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("InvalidArgument"), "{}", show(&output));

    // Nobody listens on port 1: the message says what to check.
    let output = cli(&[
        "metadata",
        "get",
        "--server",
        "http://127.0.0.1:1",
        "-a",
        "a",
        "-r",
        "r",
    ]);
    assert!(!output.status.success(), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach http://127.0.0.1:1") && stderr.contains("serve"),
        "{}",
        show(&output)
    );

    // A value is required.
    let output = cli(&[
        "metadata", "publish", "--server", &url, "-a", "a", "-r", "r",
    ]);
    assert!(!output.status.success(), "{}", show(&output));
    server.stop().await;
}

/// Reads `child`'s standard output line by line on a thread.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_push(lines: &mpsc::Receiver<String>, child: &mut Child) -> serde_json::Value {
    match lines.recv_timeout(Duration::from_secs(10)) {
        Ok(line) => serde_json::from_str(&line).unwrap_or_else(|error| {
            panic!("watch printed a line that is not JSON: {line:?}: {error}")
        }),
        Err(_) => {
            let _ = child.kill();
            let mut stderr = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
            panic!("watch printed nothing within 10s\n--- stderr ---\n{stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_the_current_state_then_pushes() {
    let server = TestServer::memory().await;
    let url = server.url();
    cli_ok(&[
        "metadata", "publish", "--server", &url, "-a", "app", "-r", "rev", "--value", "v1",
    ]);

    let mut watch = command(&[
        "metadata", "watch", "--server", &url, "--count", "2", "app/rev",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let lines = lines_of(&mut watch);

    let first = next_push(&lines, &mut watch);
    println!("watch: {first}");
    assert_eq!(
        first["resources"],
        serde_json::json!({"app/rev": "v1"}),
        "the current state comes first"
    );

    // A new value for the watched key is pushed (a revision collision overwrites).
    cli_ok(&[
        "metadata", "publish", "--server", &url, "-a", "app", "-r", "rev", "--value", "v2",
    ]);
    let second = next_push(&lines, &mut watch);
    println!("watch: {second}");
    assert_eq!(second["resources"], serde_json::json!({"app/rev": "v2"}));
    assert_ne!(second["version"], first["version"]);

    // --count 2: it exits by itself, successfully.
    let output = wait(watch, "pixiu-metadata metadata watch");
    assert!(output.status.success(), "{}", show(&output));
    server.stop().await;
}

#[test]
fn help_describes_the_commands() {
    let out = cli_ok(&["--help"]);
    for command in ["serve", "metadata", "definition"] {
        assert!(out.contains(command), "--help lacks {command}:\n{out}");
    }
    let out = cli_ok(&["serve", "--help"]);
    for flag in [
        "--grpc-addr",
        "--store",
        "--data-dir",
        "--default-namespace",
        "PIXIU_METADATA_GRPC_ADDR",
    ] {
        assert!(out.contains(flag), "serve --help lacks {flag}:\n{out}");
    }
    let out = cli_ok(&["metadata", "publish", "--help"]);
    for flag in [
        "--server",
        "--application",
        "--revision",
        "--value",
        "--file",
    ] {
        assert!(
            out.contains(flag),
            "metadata publish --help lacks {flag}:\n{out}"
        );
    }
    let out = cli_ok(&["--version"]);
    assert!(out.starts_with("pixiu-metadata "), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_delete_and_output_formats() {
    let server = TestServer::memory().await;
    let url = server.url();
    let s = url.as_str();
    for (app, revision) in [("greeter", "r1"), ("greeter", "r2"), ("billing", "b1")] {
        let value = format!("{{\"app\":\"{app}\",\"revision\":\"{revision}\"}}");
        cli_ok(&[
            "metadata", "publish", "--server", s, "-a", app, "-r", revision, "--value", &value,
        ]);
    }
    cli_ok(&[
        "definition",
        "publish",
        "--server",
        s,
        "-i",
        "org.Greeter:1.0.0::provider:greeter",
        "--value",
        "{\"canonicalName\":\"org.Greeter\"}",
    ]);

    // The table: a header, one row per record, no values.
    let table = cli_ok(&["metadata", "list", "--server", s]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE"), "{table}");
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[1].contains("billing/b1"), "sorted by name: {table}");
    assert!(
        !table.contains("\"app\""),
        "no values in the table: {table}"
    );
    // Filtered by application, as JSON with the raw values.
    let json = cli_ok(&[
        "metadata", "list", "--server", s, "-a", "greeter", "-o", "json",
    ]);
    let listed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["greeter/r1", "greeter/r2"]);
    assert_eq!(
        listed[0]["value"],
        "{\"app\":\"greeter\",\"revision\":\"r1\"}"
    );
    assert!(listed[0]["refreshed_at"].as_str().unwrap().ends_with('Z'));
    // Pages are followed and --limit is honoured.
    let limited = cli_ok(&[
        "metadata", "list", "--server", s, "--limit", "2", "-o", "yaml",
    ]);
    let limited: serde_json::Value = serde_norway::from_str(&limited).unwrap();
    assert_eq!(limited.as_array().unwrap().len(), 2);
    // One record as YAML.
    let yaml = cli_ok(&[
        "metadata", "get", "--server", s, "-a", "greeter", "-r", "r2", "-o", "yaml",
    ]);
    let got: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(got["revision"], "r2");
    assert_eq!(got["value"], "{\"app\":\"greeter\",\"revision\":\"r2\"}");
    assert!(
        got.get("namespace").is_none(),
        "no -n, so not known: {yaml}"
    );

    // Delete, then it is gone and a second delete says so.
    assert_eq!(
        cli_ok(&[
            "metadata", "delete", "--server", s, "-a", "greeter", "-r", "r1"
        ]),
        "deleted greeter/r1\n"
    );
    let names_only = cli_ok(&[
        "metadata",
        "list",
        "--server",
        s,
        "--names-only",
        "-o",
        "json",
    ]);
    let listed: serde_json::Value = serde_json::from_str(&names_only).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(listed[0].get("value").is_none(), "{names_only}");
    // The sizes are the values', although the values were left out.
    for record in listed.as_array().unwrap() {
        assert!(record["value_bytes"].as_u64().unwrap() > 10, "{names_only}");
    }
    let again = cli(&[
        "metadata", "delete", "--server", s, "-a", "greeter", "-r", "r1",
    ]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("NotFound"),
        "{}",
        show(&again)
    );

    // Definitions the same way.
    let defs = cli_ok(&[
        "definition",
        "list",
        "--server",
        s,
        "--prefix",
        "org.",
        "-o",
        "json",
    ]);
    let defs: serde_json::Value = serde_json::from_str(&defs).unwrap();
    assert_eq!(defs[0]["name"], "org.Greeter:1.0.0::provider:greeter");
    cli_ok(&[
        "definition",
        "delete",
        "--server",
        s,
        "-i",
        "org.Greeter:1.0.0::provider:greeter",
    ]);
    assert_eq!(
        cli_ok(&["definition", "list", "--server", s]),
        "no records\n"
    );
    server.stop().await;
}

#[test]
fn shell_completions_are_generated() {
    let bash = cli_ok(&["completions", "bash"]);
    assert!(bash.contains("_pixiu__metadata()"), "{bash}");
    assert!(bash.contains("complete -F _pixiu__metadata"), "{bash}");
    assert!(bash.contains("publish"), "subcommands are completed");
    // Completed by bash itself, below the first word too.
    let complete = |words: &str| {
        let script = format!(
            "{bash}\nCOMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _pixiu__metadata pixiu-metadata \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; \
             echo \"${{COMPREPLY[@]}}\""
        );
        let output = Command::new("bash")
            .args(["--norc", "-c", &script])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", show(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    assert!(complete("pixiu-metadata me").contains("metadata"));
    assert_eq!(complete("pixiu-metadata metadata pu").trim(), "publish");
    assert!(complete("pixiu-metadata serve --grpc-a").contains("--grpc-addr"));
    assert!(complete("pixiu-metadata bench echo-server --").contains("--"));
    let zsh = cli_ok(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef pixiu-metadata"), "{zsh}");
}
