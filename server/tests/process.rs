//! The `chorus-server` binary as a user runs it: flags, env, SIGTERM drain.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use chorus_testkit::{ChildGuard, free_port};
use chorus_tests::{Event, WsClient, wait_until};

#[tokio::test]
async fn sigterm_sends_reconnect_turns_readyz_503_and_exits_0() {
    let port = free_port();
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_chorus-server"))
            // Flags may come from the environment too.
            .env("CHORUS_LISTEN", format!("127.0.0.1:{port}"))
            .env("CHORUS_NODE_ID", "node-under-test")
            .args(["--drain-seconds", "3", "--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_until("the server to be ready", || async {
        reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut first = WsClient::connect(&url).await.unwrap();
    assert_eq!(first.welcome["node"], "node-under-test");
    let mut second = WsClient::connect(&url).await.unwrap();
    first.subscribe("r").await;
    second.subscribe("r").await;

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    // Clients are told one after the other, spread over the drain window;
    // the first is told at once.
    let (told, other) = match tokio::time::timeout(Duration::from_secs(5), first.frame()).await {
        Ok(frame) => (frame, second),
        Err(_) => (second.frame().await, first),
    };
    assert_eq!(told["op"], "reconnect", "{told}");
    assert_eq!(told["reason"], "draining");

    // While draining: not ready, no new clients, but still alive.
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("draining"));
    assert!(
        WsClient::connect(&url).await.is_err(),
        "upgrades are refused while draining"
    );
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );

    let mut other = other;
    let r = other.frame().await;
    assert_eq!(r["op"], "reconnect");
    assert_eq!(other.event().await, Event::Closed(Some(1001)));

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not exit after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(code.success(), "exit status {code}");
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_chorus-server"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--broker",
        "--delivery",
        "--history-size",
        "--history-ttl",
        "--node-id",
        "--api-key",
        "--api-key-file",
        "--jwt-secret",
        "--jwt-secret-file",
        "--max-frame-bytes",
        "--send-queue",
        "--send-timeout",
        "--max-rooms-per-connection",
        "--max-connections",
        "--max-http-connections",
        "--http-header-timeout",
        "--http-body-timeout",
        "--drain-seconds",
        "--log-format",
        "--redis-password-file",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
    assert!(
        help.contains("CHORUS_LISTEN"),
        "--help names the env variables"
    );
}

#[test]
fn a_bad_flag_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_chorus-server"))
        .args(["--broker", "kafka://x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kafka://x"), "{err}");
}

#[test]
fn a_configuration_that_cannot_work_is_refused_at_start_with_the_reason() {
    let refused = |args: &[&str], says: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_chorus-server"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        err.into_owned()
    };
    refused(
        &["--delivery", "streams"],
        "--delivery streams needs a Redis broker",
    );
    refused(
        &["--upstream-rooms", "orders:*"],
        "--upstream-rooms needs a Redis broker",
    );
    refused(
        &[
            "--broker",
            "redis://127.0.0.1:1",
            "--upstream-rooms",
            "orders:*,no spaces",
        ],
        "`no spaces` is not a room name",
    );
    let err = refused(
        &["--broker", "redis://:hunter2@127.0.0.1:notaport"],
        "bad Redis URL",
    );
    assert!(
        !err.contains("hunter2"),
        "the password is not echoed: {err}"
    );
    refused(&["--api-key-file", "/nonexistent/key"], "/nonexistent/key");
}

#[tokio::test]
async fn text_logs_written_to_a_file_are_plain_and_name_the_delivery_mode() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("chorus-logs-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("chorus.log");
    // As `chorus-server > chorus.log 2>&1` would.
    let file = std::fs::File::create(&path).unwrap();
    let _child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_chorus-server"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--log-format",
                "text",
            ])
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap(),
    );
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    wait_until("the start-up line in the log file", || async {
        read().contains("chorus-server listening")
    })
    .await;
    let log = read();
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file: {log:?}"
    );
    assert!(log.contains("delivery=pubsub"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
