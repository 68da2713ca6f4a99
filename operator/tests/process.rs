//! The operator process without a cluster: it serves `/healthz` (503: the
//! API server cannot be reached) and `/metrics` on `--metrics-listen`, logs
//! JSON, keeps running while the API server is unreachable (the watches
//! retry), and exits 0 on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::Command,
};

const KUBECONFIG: &str = r#"apiVersion: v1
kind: Config
clusters:
- cluster: {server: "https://127.0.0.1:9"}
  name: unreachable
contexts:
- context: {cluster: unreachable, user: nobody, namespace: default}
  name: unreachable
current-context: unreachable
users:
- name: nobody
  user: {token: not-a-real-token}
"#;

async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

#[tokio::test]
async fn serves_health_and_metrics_logs_json_and_stops_on_sigterm() {
    let kubeconfig = std::env::temp_dir().join(format!(
        "chorus-operator-process-test-{}.yaml",
        std::process::id()
    ));
    std::fs::write(&kubeconfig, KUBECONFIG).unwrap();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut operator = Command::new(env!("CARGO_BIN_EXE_chorus-operator"))
        .args([
            "--no-install-crd",
            "--no-leader-election",
            "--namespace",
            "default",
        ])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("CHORUS_OPERATOR_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(operator.stdout.take().unwrap()).lines();

    let first_line = tokio::time::timeout(Duration::from_secs(10), logs.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first: serde_json::Value =
        serde_json::from_str(&first_line).unwrap_or_else(|e| panic!("{e}: {first_line}"));
    assert_eq!(first["message"], "starting", "{first_line}");
    assert_eq!(first["level"], "INFO");
    // Keep reading, so a full pipe never blocks the operator's logging.
    let log_lines = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Ok(Some(line)) = logs.next_line().await {
            lines.push(line);
        }
        lines
    });

    let mut health = None;
    for _ in 0..100 {
        health = http_get(port, "/healthz").await;
        if health.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = health.expect("/healthz answers");
    // Alive, but of no use without the API server: probes say so.
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(
        health.contains("cannot reach the Kubernetes API server"),
        "{health}"
    );
    let metrics = http_get(port, "/metrics").await.unwrap();
    assert!(
        metrics.contains("# TYPE chorus_operator_reconciles counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE chorus_operator_reconcile_duration_seconds histogram"),
        "{metrics}"
    );

    // Still running although the API server is unreachable.
    assert!(
        operator.try_wait().unwrap().is_none(),
        "operator exited early"
    );

    let pid = operator.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    let exit = tokio::time::timeout(Duration::from_secs(10), operator.wait())
        .await
        .expect("stops within 10 s")
        .unwrap();
    assert!(exit.success(), "exit status {exit}");
    let lines = log_lines.await.unwrap();
    assert!(
        lines.iter().any(|l| l.contains("shutdown requested")),
        "{lines:#?}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}
