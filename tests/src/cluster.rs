//! Helpers for the end-to-end suite on a real Kubernetes cluster
//! (`tests/tests/e2e.rs`): the cluster comes from `KUBECONFIG`, user-facing
//! commands run through the real `kubectl` and the real Helm engine
//! (`scripts/helm.py`), everything else through kube's client.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

/// The repository root (commands run from there, as in the README).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A progress line on stderr, past the test harness's capture.
pub fn say(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "e2e: {line}");
}

/// Runs `program args…` from the repository root.
pub async fn run(program: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(program)
        .args(args)
        .current_dir(repo())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub async fn must(program: &str, args: &[&str]) -> String {
    let out = run(program, args).await;
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl args…`, which must succeed; returns its stdout.
pub async fn kubectl(args: &[&str]) -> String {
    must("kubectl", args).await
}

/// `scripts/helm.py args…` (helm-python-sdk's Helm engine), which must succeed.
pub async fn helm(args: &[&str]) -> String {
    let mut full = vec!["scripts/helm.py"];
    full.extend_from_slice(args);
    must("python3", &full).await
}

/// Polls `check` every 500 ms until it returns `Some`; panics after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Pods matching `selector`, by name order.
pub async fn pods(client: &Client, namespace: &str, selector: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut list = api
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items;
    list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    list
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.pod_ip.clone()
}

pub fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Sum of the restart counts of a pod's containers.
pub fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0)
}

/// `count` pods matching `selector`, all Ready, none terminating.
pub async fn ready_pods(
    client: &Client,
    namespace: &str,
    selector: &str,
    count: usize,
    limit: Duration,
) -> Vec<Pod> {
    eventually(
        &format!("{count} Ready pods with {selector}"),
        limit,
        || async {
            let all = pods(client, namespace, selector).await;
            (all.len() == count && all.iter().all(is_ready)).then_some(all)
        },
    )
    .await
}
