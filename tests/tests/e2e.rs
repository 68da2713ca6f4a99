//! The end-to-end suite: a platform team's day with Chorus on a real
//! Kubernetes cluster, through the real API server, with the operator
//! running in the cluster from its image under the chart's ServiceAccount
//! and RBAC.
//!
//! Runs with `CHORUS_E2E=1` and `KUBECONFIG` pointing at a cluster that has
//! the Chorus images (`scripts/cluster.sh up` makes one on this machine;
//! `scripts/test.sh` runs this after the rest of the suite), with `kubectl`
//! on `PATH` and helm-python-sdk installed. Without `CHORUS_E2E=1` it says
//! it is skipped.
//!
//! One test, in steps that build on each other, each printed with its
//! time: install the chart, apply `examples/basic.yaml` in a namespace that
//! enforces Pod Security "restricted", exchange messages across pods, scale
//! out and in, fail the Redis master over (with the chart's broker-down
//! alert evaluated on the pods' real metrics, [`alerts`]), upgrade the
//! operator, switch to streams and roll the servers under load, refuse
//! invalid manifests, delete the cluster; then `examples/durable.yaml`
//! through the faults of a Redis group's life ([`faults`]), the
//! operator's autopilot ([`autopilot`]: insights, scaling on connections,
//! a silently cut backplane repaired); then `examples/kafka.yaml` on a real
//! Kafka on this machine, through a Kafka outage ([`kafka`]); and
//! `examples/redis-cluster.yaml` growing from 3 to 4 shards under traffic
//! ([`redis_cluster`]). On failure it prints the
//! operator's log, the events and the pod states; it deletes what it
//! created (unless `CHORUS_E2E_KEEP=1` and a step failed).
//! `CHORUS_E2E_ONLY=11` (step numbers, comma-separated) runs only those
//! steps after the install, to work on one.
#![allow(clippy::unwrap_used)]

#[path = "e2e/alerts.rs"]
mod alerts;
#[path = "e2e/autopilot.rs"]
mod autopilot;
#[path = "e2e/faults.rs"]
mod faults;
#[path = "e2e/kafka.rs"]
mod kafka;
#[path = "e2e/redis_cluster.rs"]
mod redis_cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_crds::MessagingCluster;
use chorus_tests::WsClient;
use chorus_tests::cluster::{
    eventually, helm, is_ready, kubectl, name, pod_ip, pods, ready_pods, repo, restarts, run, say,
};
use futures_util::{FutureExt, SinkExt, StreamExt};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod, Secret, Service},
};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

const MC: &str = "chat";
const SERVERS: &str = "app.kubernetes.io/instance=chat,app.kubernetes.io/component=server";
const REDIS: &str = "app.kubernetes.io/instance=chat,app.kubernetes.io/component=redis";
const SENTINELS: &str = "app.kubernetes.io/instance=chat,app.kubernetes.io/component=sentinel";
/// The operator's pods, as the chart labels them.
const OPERATOR: &str = "app.kubernetes.io/name=chorus-operator";
/// The chart's alert for a server pod that cannot reach Redis.
const BROKER_DOWN: &str = "ChorusBrokerDown";
/// Bound on anything that involves pods starting or stopping.
const POD_WAIT: Duration = Duration::from_secs(240);

fn enabled() -> bool {
    let on = std::env::var("CHORUS_E2E").as_deref() == Ok("1");
    if !on {
        say("skipped (set CHORUS_E2E=1 and KUBECONFIG; scripts/test.sh does)");
    }
    on
}

/// What the run created, deleted at the end whatever happened.
struct Run {
    client: Client,
    /// Where the fleet lives.
    ns: String,
    /// Where the operator is installed.
    operator_ns: String,
    release: String,
    timings: Mutex<Vec<(String, Duration)>>,
}

impl Run {
    fn timed(&self, what: &str, took: Duration) {
        say(format!("{what}: {:.1} s", took.as_secs_f64()));
        self.timings.lock().unwrap().push((what.to_owned(), took));
    }

    /// `kubectl patch mc/chat --type=merge -p <patch>`.
    async fn patch(&self, patch: &str) {
        kubectl(&[
            "patch",
            &self.ns_flag(),
            "mc/chat",
            "--type=merge",
            "-p",
            patch,
        ])
        .await;
    }

    fn ns_flag(&self) -> String {
        format!("--namespace={}", self.ns)
    }

    async fn mc(&self) -> MessagingCluster {
        Api::<MessagingCluster>::namespaced(self.client.clone(), &self.ns)
            .get(MC)
            .await
            .unwrap()
    }

    async fn servers(&self) -> Vec<Pod> {
        pods(&self.client, &self.ns, SERVERS).await
    }

    async fn service_ip(&self) -> String {
        self.service_ip_of(MC).await
    }

    /// The cluster IP of `Service <name>`.
    async fn service_ip_of(&self, name: &str) -> String {
        let svc: Service = Api::namespaced(self.client.clone(), &self.ns)
            .get(name)
            .await
            .unwrap();
        svc.spec.unwrap().cluster_ip.unwrap()
    }

    async fn redis_password(&self) -> String {
        let secret: Secret = Api::namespaced(self.client.clone(), &self.ns)
            .get("chat-redis-auth")
            .await
            .unwrap();
        String::from_utf8(secret.data.unwrap()["password"].0.clone()).unwrap()
    }

    /// The Redis pod `status.redis.master` names (by its DNS name,
    /// `<pod>.<service>.<namespace>.svc:6379`), and its IP.
    async fn status_master(&self) -> Option<(String, String)> {
        let master = self.mc().await.status?.redis.master?;
        let pod = master.split('.').next()?.to_owned();
        let redis = pods(&self.client, &self.ns, REDIS).await;
        let ip = redis.iter().find(|p| name(p) == pod).and_then(pod_ip)?;
        Some((pod, ip))
    }

    /// `ROLE` of the Redis server at `ip`, asked from outside the cluster.
    async fn role(&self, ip: &str) -> Option<String> {
        let url = format!("redis://:{}@{ip}:6379", self.redis_password().await);
        let client = redis::Client::open(url).ok()?;
        let mut conn = tokio::time::timeout(
            Duration::from_secs(3),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.ok()?;
        match role.first()? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    }

    async fn print_diagnostics(&self) {
        say("---- diagnostics ----");
        for args in [
            vec!["get", "pods", "-A", "-o", "wide"],
            vec!["get", "mc", "-A", "-o", "yaml"],
            vec!["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            let out = run("kubectl", &args).await;
            say(format!(
                "kubectl {}:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let selector = OPERATOR;
        let op_ns = format!("--namespace={}", self.operator_ns);
        let out = run(
            "kubectl",
            &[
                "logs",
                &op_ns,
                "-l",
                selector,
                "--tail=300",
                "--all-containers",
            ],
        )
        .await;
        say(format!(
            "operator log:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
        for pod in self.servers().await.iter().take(3) {
            let out = run(
                "kubectl",
                &["logs", &self.ns_flag(), &name(pod), "--tail=40"],
            )
            .await;
            say(format!(
                "log of {}:\n{}",
                name(pod),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
    }

    /// Deletes what the run created, waiting for the fleet's namespace to
    /// go so a next run on the same cluster starts clean.
    async fn clean_up(&self) {
        let _ = run(
            "python3",
            &[
                "scripts/helm.py",
                "uninstall",
                &self.release,
                "--namespace",
                &self.operator_ns,
                "--ignore-not-found",
            ],
        )
        .await;
        for ns in [&self.ns, &self.operator_ns] {
            let _ = run(
                "kubectl",
                &[
                    "delete",
                    "namespace",
                    ns,
                    "--ignore-not-found",
                    "--timeout=120s",
                ],
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_platform_teams_day_on_a_real_cluster() {
    if !enabled() {
        return;
    }
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG points to a reachable cluster");
    let id = format!(
        "{:x}",
        std::process::id()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as u32)
    );
    let run = Run {
        client,
        ns: format!("chorus-e2e-{id}"),
        operator_ns: format!("chorus-system-e2e-{id}"),
        release: "chorus".to_owned(),
        timings: Mutex::default(),
    };
    say(format!(
        "running against the cluster of KUBECONFIG={} in namespaces {} and {}",
        std::env::var("KUBECONFIG").unwrap_or_default(),
        run.operator_ns,
        run.ns
    ));
    let started = Instant::now();
    let outcome = AssertUnwindSafe(steps(&run)).catch_unwind().await;
    if outcome.is_err() {
        run.print_diagnostics().await;
    }
    if outcome.is_err() && std::env::var("CHORUS_E2E_KEEP").as_deref() == Ok("1") {
        say("CHORUS_E2E_KEEP=1: leaving the namespaces for inspection");
    } else {
        run.clean_up().await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    say("---- timings ----");
    for (what, took) in run.timings.lock().unwrap().iter() {
        say(format!("{what}: {:.1} s", took.as_secs_f64()));
    }
    say(format!(
        "all steps passed in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
}

async fn steps(run: &Run) {
    step("1. helm install", install_chart(run)).await;
    // The namespace of the clusters every later step applies.
    kubectl(&["create", "namespace", &run.ns]).await;
    step("8. invalid manifests are refused", invalid_manifests(run)).await;
    step("2. kubectl apply examples/basic.yaml", apply_basic(run)).await;
    step("3. messages across pods", messages_across_pods(run)).await;
    step("4. scale out and in", scale(run)).await;
    step("5. Redis master failover", failover(run)).await;
    step("1b. helm upgrade leaves Redis alone", upgrade_operator(run)).await;
    step("6. streams and a rolling restart", streams_roll(run)).await;
    step("7. delete the MessagingCluster", delete_cluster(run)).await;
    step("9. Redis group faults", faults::redis_group_faults(run)).await;
    step("10. the operator's autopilot", autopilot::autopilot(run)).await;
    step(
        "11. delivery: kafka on an external Kafka",
        kafka::kafka_delivery(run),
    )
    .await;
    step(
        "12. a managed Redis Cluster grows from 3 to 4 shards under traffic",
        redis_cluster::redis_cluster(run),
    )
    .await;
}

/// Whether `CHORUS_E2E_ONLY` (step numbers, comma-separated, e.g. `11` or
/// `5,9`) asks for this step; every step when unset. Step 1 (the operator's
/// install) always runs: the others need it.
fn wanted(what: &str) -> bool {
    let number = what.split('.').next().unwrap_or(what).trim();
    match std::env::var("CHORUS_E2E_ONLY") {
        Ok(only) if !only.trim().is_empty() => {
            number == "1" || only.split(',').any(|n| n.trim() == number)
        }
        _ => true,
    }
}

async fn step(what: &str, body: impl std::future::Future<Output = ()>) {
    if !wanted(what) {
        say(format!("{what}: skipped (CHORUS_E2E_ONLY)"));
        return;
    }
    say(format!("{what} ..."));
    let started = Instant::now();
    body.await;
    say(format!(
        "{what}: ok ({:.1} s)",
        started.elapsed().as_secs_f64()
    ));
}

// ---- 1. the chart ---------------------------------------------------------

async fn install_chart(run: &Run) {
    let started = Instant::now();
    // A cluster that ran another build keeps that build's CRD, and Helm's
    // install would conflict with the operator over it: bring it to this
    // build's, as docs/kubernetes.md says for an install over an older CRD.
    let crd = chorus_tests::cluster::run(
        "kubectl",
        &["get", "crd", "messagingclusters.chorus.dev", "-o", "name"],
    )
    .await;
    if crd.status.success() {
        kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=chorus-operator",
            "-f",
            "charts/chorus/crds/messagingclusters.yaml",
        ])
        .await;
    }
    helm(&[
        "install",
        &run.release,
        "charts/chorus",
        "--namespace",
        &run.operator_ns,
        "--create-namespace",
        "--wait",
        "--timeout",
        "180",
    ])
    .await;
    let deployments: Api<Deployment> = Api::namespaced(run.client.clone(), &run.operator_ns);
    let operator = deployments.get("chorus").await.unwrap();
    let spec = operator.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("chorus"),
        "the operator runs under the chart's ServiceAccount"
    );
    let image = spec.containers[0].image.clone().unwrap();
    assert_eq!(
        image,
        format!("chorus-operator:{}", env!("CARGO_PKG_VERSION"))
    );
    ready_pods(&run.client, &run.operator_ns, OPERATOR, 1, POD_WAIT).await;
    run.timed(
        "helm install until the operator is Ready",
        started.elapsed(),
    );
}

// ---- 8. refusals ----------------------------------------------------------

/// Creates `spec` (raw JSON, so it may break the types too) as
/// MessagingCluster `name`; returns the API server's refusal message.
async fn refusal(api: &Api<DynamicObject>, name: &str, spec: Value) -> String {
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "chorus.dev/v1alpha1", "kind": "MessagingCluster",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => panic!("the API server accepted invalid MessagingCluster {name}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        Err(e) => panic!("creating {name}: {e}"),
    }
}

async fn invalid_manifests(run: &Run) {
    let raw: Api<DynamicObject> = Api::namespaced_with(
        run.client.clone(),
        &run.ns,
        &ApiResource::erase::<MessagingCluster>(&()),
    );
    // The CRD is the operator's (applied at start-up) and the chart's.
    let message = eventually("the CRD to be served", POD_WAIT, || async {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "chorus.dev/v1alpha1", "kind": "MessagingCluster",
            "metadata": {"name": "bad-replicas"}, "spec": {"replicas": -1}
        }))
        .unwrap();
        match raw.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(s)) if s.code == 422 => Some(s.message),
            Err(kube::Error::Api(s)) if s.code == 404 => None,
            other => panic!("unexpected answer to an invalid manifest: {other:?}"),
        }
    })
    .await;
    assert!(message.contains("spec.replicas"), "{message}");
    let message = refusal(&raw, "bad-redis", json!({"redis": {"mode": "external"}})).await;
    assert!(message.contains("spec.redis.external"), "{message}");
    let message = refusal(&raw, "bad-delivery", json!({"delivery": "carrier-pigeon"})).await;
    assert!(message.contains("spec.delivery"), "{message}");
    let message = refusal(&raw, "bad-sentinels", json!({"redis": {"sentinels": 2}})).await;
    assert!(message.contains("spec.redis.sentinels"), "{message}");
    let message = refusal(&raw, "bad-kafka", json!({"delivery": "kafka"})).await;
    assert!(message.contains("spec.kafka"), "{message}");
    // And as a user sees it: kubectl exits non-zero naming the field.
    let bad = repo().join("target/e2e-bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: chorus.dev/v1alpha1\nkind: MessagingCluster\nmetadata: {name: bad}\nspec: {replicas: -3}\n",
    )
    .unwrap();
    let out = chorus_tests::cluster::run(
        "kubectl",
        &["apply", &run.ns_flag(), "-f", bad.to_str().unwrap()],
    )
    .await;
    assert!(
        !out.status.success(),
        "kubectl apply of replicas: -3 succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.replicas"), "{stderr}");
}

// ---- 2. the basic example -------------------------------------------------

async fn apply_basic(run: &Run) {
    // Every pod of the fleet must be admitted at Pod Security "restricted".
    kubectl(&[
        "label",
        "namespace",
        &run.ns,
        "pod-security.kubernetes.io/enforce=restricted",
    ])
    .await;
    let started = Instant::now();
    kubectl(&["apply", &run.ns_flag(), "-f", "examples/basic.yaml"]).await;
    kubectl(&[
        "wait",
        &run.ns_flag(),
        "--for=condition=Ready",
        "mc/chat",
        "--timeout=300s",
    ])
    .await;
    run.timed("fleet Ready after kubectl apply", started.elapsed());

    // Every object the cluster owns exists, owned by it.
    let mc = run.mc().await;
    let uid = mc.uid().unwrap();
    let pdbs = kubectl(&["get", &run.ns_flag(), "poddisruptionbudgets", "-o", "name"]).await;
    assert!(!pdbs.trim().is_empty(), "no PodDisruptionBudget");
    let objects = [
        "configmap/chat-server",
        "deployment/chat-server",
        "service/chat",
        "statefulset/chat-redis",
        "service/chat-redis",
        "statefulset/chat-sentinel",
        "configmap/chat-redis-group",
        "service/chat-sentinel",
        "secret/chat-redis-auth",
    ];
    for object in objects.iter().copied().chain(pdbs.lines()) {
        let owner = kubectl(&[
            "get",
            &run.ns_flag(),
            object,
            "-o",
            "jsonpath={.metadata.ownerReferences[?(@.controller==true)].uid}",
        ])
        .await;
        assert_eq!(owner, uid, "{object} is not owned by MessagingCluster chat");
    }
    let c = &run.client;
    let ns = &run.ns;
    let service = Api::<Service>::namespaced(c.clone(), ns)
        .get("chat")
        .await
        .unwrap();
    assert_eq!(
        service.spec.unwrap().session_affinity.as_deref(),
        Some("ClientIP")
    );

    // All pods Ready: 3 servers, 3 Redis, 3 sentinels.
    ready_pods(c, ns, SERVERS, 3, POD_WAIT).await;
    ready_pods(c, ns, REDIS, 3, POD_WAIT).await;
    ready_pods(c, ns, SENTINELS, 3, POD_WAIT).await;

    // The master the status names is a real Redis pod that says it is master.
    let (master, ip) = eventually("status.redis.master to name a Redis pod", POD_WAIT, || {
        run.status_master()
    })
    .await;
    assert_eq!(
        run.role(&ip).await.as_deref(),
        Some("master"),
        "{master} ({ip}) is named master in the status"
    );
    // The status catches up with every pod within a few passes.
    eventually("the status to count every pod", POD_WAIT, || async {
        let s = run.mc().await.status?;
        (s.ready_replicas == 3 && s.redis.ready_replicas == 3 && s.redis.sentinels_ready == 3)
            .then_some(())
    })
    .await;
    say(format!("master: {master} ({ip})"));
}

// ---- 3. messages ---------------------------------------------------------

async fn http_publish(url: &str, data: Value, key: Option<&str>) -> Result<Value, String> {
    let mut body = json!({ "data": data });
    if let Some(key) = key {
        body["key"] = json!(key);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let reply = http
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = reply.status();
    let text = reply.text().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
    } else {
        Err(format!("{status}: {text}"))
    }
}

async fn messages_across_pods(run: &Run) {
    let servers = run.servers().await;
    assert_eq!(servers.len(), 3);
    let mut clients = Vec::new();
    for pod in &servers {
        let ip = pod_ip(pod).unwrap();
        let c = WsClient::connect(&format!("ws://{ip}:8080/ws"))
            .await
            .unwrap();
        assert_eq!(c.welcome["node"], name(pod), "welcome names the pod");
        clients.push(c);
    }
    let service = run.service_ip().await;
    clients.push(
        WsClient::connect(&format!("ws://{service}:80/ws"))
            .await
            .unwrap(),
    );
    let nodes: BTreeSet<String> = clients
        .iter()
        .map(|c| c.welcome["node"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(nodes.len(), 3, "clients on three different pods: {nodes:?}");
    for c in &mut clients {
        c.subscribe("e2e-lobby").await;
    }
    // A publish on one pod reaches every pod, with one offset.
    let reply = clients[0]
        .publish("e2e-lobby", json!({"text": "hello"}))
        .await;
    assert_eq!(reply["op"], "ok", "{reply}");
    let offset = reply["offset"].clone();
    for c in &mut clients {
        let m = c.message().await;
        assert_eq!(m["data"]["text"], "hello");
        assert_eq!(m["offset"], offset, "same offset on every pod");
    }
    // A backend's HTTP publish through the Service reaches all of them.
    let ack = http_publish(
        &format!("http://{service}/api/v1/rooms/e2e-lobby/messages"),
        json!({"text": "from a backend"}),
        None,
    )
    .await
    .unwrap();
    for c in &mut clients {
        let m = c.message().await;
        assert_eq!(m["data"]["text"], "from a backend");
        assert_eq!(m["offset"], ack["offset"]);
        assert_eq!(m["epoch"], ack["epoch"]);
    }
    for c in clients {
        c.close().await;
    }
}

// ---- a subscriber that follows the fleet -----------------------------------

/// What a [`Follower`] saw.
#[derive(Default, Debug)]
struct Seen {
    /// (epoch, offset, data) of every message, in arrival order.
    messages: Vec<(String, u64, Value)>,
    /// Nodes it was connected to, in order.
    nodes: Vec<String>,
    /// Whether the current connection's subscription was acknowledged.
    subscribed: bool,
    /// Subscribes answered `unavailable` and sent again.
    retried_subscribes: usize,
    reconnect_frames: usize,
    /// When each `reconnect` frame came.
    reconnects_at: Vec<Instant>,
    /// `ok` replies to re-subscriptions with `since`.
    recoveries: Vec<Value>,
    errors: Vec<String>,
}

impl Seen {
    /// Whether it was told it missed history (`history_gone`); panics on
    /// any other error or unexpected frame.
    fn told_history_gone(&self, i: usize) -> bool {
        let unexpected: Vec<&String> = self
            .errors
            .iter()
            .filter(|e| !e.starts_with("history_gone"))
            .collect();
        assert!(unexpected.is_empty(), "subscriber {i}: {unexpected:?}");
        self.errors.iter().any(|e| e.starts_with("history_gone"))
    }

    fn has(&self, marker: &str) -> Option<u64> {
        self.messages
            .iter()
            .find(|(_, _, d)| d["marker"] == marker)
            .map(|(_, o, _)| *o)
    }
}

/// A subscriber like `/chorus.js`: connects to one pod, and whenever its
/// connection ends (a `reconnect` frame, a close, an error) connects again
/// through the Service and re-subscribes with the last epoch and offset it
/// saw.
struct Follower {
    seen: Arc<Mutex<Seen>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Follower {
    fn start(first_url: String, again_url: String, room: &'static str) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(follow(first_url, again_url, room, seen.clone(), stopped));
        Self { seen, stop, task }
    }

    /// The node it is connected and subscribed to right now.
    fn node(&self) -> Option<String> {
        let s = self.seen.lock().unwrap();
        s.subscribed.then(|| s.nodes.last().cloned()).flatten()
    }

    async fn finish(mut self) -> Seen {
        let _ = self.stop.send(true);
        (&mut self.task).await.unwrap();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

async fn follow(
    first_url: String,
    again_url: String,
    room: &'static str,
    seen: Arc<Mutex<Seen>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut url = first_url;
    let mut since: Option<(String, u64)> = None;
    while !*stopped.borrow() {
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            url = again_url.clone();
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        url = again_url.clone();
        let mut subscribe = json!({"op": "subscribe", "id": 1, "room": room});
        if let Some((epoch, offset)) = &since {
            subscribe["since"] = json!({"epoch": epoch, "offset": offset});
        }
        if ws.send(Message::text(subscribe.to_string())).await.is_err() {
            continue;
        }
        loop {
            let next = tokio::select! {
                next = ws.next() => next,
                _ = stopped.changed() => return,
            };
            let text = match next {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            // A broker briefly unavailable (a Redis failover) answers the
            // subscribe with `unavailable`: retry it, as chorus.js does.
            if frame["op"] == "error" && frame["id"] == 1 && frame["code"] == "unavailable" {
                seen.lock().unwrap().retried_subscribes += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut again = json!({"op": "subscribe", "id": 1, "room": room});
                if let Some((epoch, offset)) = &since {
                    again["since"] = json!({"epoch": epoch, "offset": offset});
                }
                if ws.send(Message::text(again.to_string())).await.is_err() {
                    break;
                }
                continue;
            }
            let mut s = seen.lock().unwrap();
            match frame["op"].as_str() {
                Some("welcome") => {
                    s.nodes.push(frame["node"].as_str().unwrap().to_owned());
                    s.subscribed = false;
                }
                Some("ok") if frame["id"] == 1 => {
                    s.subscribed = true;
                    if since.is_some() {
                        s.recoveries.push(frame.clone());
                    }
                    if frame["code"] == "history_gone" {
                        s.errors.push(format!("history_gone: {frame}"));
                    }
                    if since.is_none() {
                        since = Some((
                            frame["epoch"].as_str().unwrap_or_default().to_owned(),
                            frame["offset"].as_u64().unwrap_or(0),
                        ));
                    }
                }
                Some("message") => {
                    let epoch = frame["epoch"].as_str().unwrap().to_owned();
                    let offset = frame["offset"].as_u64().unwrap();
                    since = Some((epoch.clone(), offset));
                    s.messages.push((epoch, offset, frame["data"].clone()));
                }
                // Durable delivery: messages that fell out of the history
                // (or were lost with a Redis master) before this node could
                // deliver them; the next message follows `offset`.
                Some("gap") if frame["code"] == "history_gone" => {
                    s.errors.push(format!("history_gone: {frame}"));
                    since = Some((
                        frame["epoch"].as_str().unwrap_or_default().to_owned(),
                        frame["offset"].as_u64().unwrap_or(0),
                    ));
                }
                Some("reconnect") => {
                    s.reconnect_frames += 1;
                    s.reconnects_at.push(Instant::now());
                }
                _ => s.errors.push(format!("unexpected frame: {frame}")),
            }
        }
        let _ = ws.close(None).await;
    }
}

/// Waits until every follower is connected and subscribed.
async fn all_subscribed(followers: &[Follower]) {
    eventually(
        "every subscriber to subscribe",
        Duration::from_secs(30),
        || async { followers.iter().all(|f| f.node().is_some()).then_some(()) },
    )
    .await;
}

/// Publishes `marker` through the Service until it is acknowledged; returns
/// the acknowledgement.
async fn publish_marker(service: &str, room: &str, marker: &str) -> Value {
    let url = format!("http://{service}/api/v1/rooms/{room}/messages");
    eventually(&format!("publishing {marker}"), POD_WAIT, || async {
        http_publish(&url, json!({"marker": marker}), Some(marker))
            .await
            .ok()
    })
    .await
}

/// The offset at which each follower saw `marker`, once all have, within
/// `limit`.
async fn saw_within(followers: &[Follower], marker: &str, limit: Duration) -> Option<Vec<u64>> {
    let deadline = Instant::now() + limit;
    loop {
        let offsets = followers
            .iter()
            .map(|f| f.seen.lock().unwrap().has(marker))
            .collect::<Option<Vec<_>>>();
        if offsets.is_some() || Instant::now() >= deadline {
            return offsets;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every follower has seen `marker`; returns the offsets.
async fn all_saw(followers: &[Follower], marker: &str, limit: Duration) -> Vec<u64> {
    match saw_within(followers, marker, limit).await {
        Some(offsets) => offsets,
        None => {
            for (i, f) in followers.iter().enumerate() {
                let s = f.seen.lock().unwrap();
                say(format!(
                    "subscriber {i}: nodes {:?}, {} messages (last {:?}), {} reconnect frames, recoveries {:?}, errors {:?}",
                    s.nodes,
                    s.messages.len(),
                    s.messages.last(),
                    s.reconnect_frames,
                    s.recoveries,
                    s.errors
                ));
            }
            panic!("not every subscriber got {marker} within {limit:?}")
        }
    }
}

// ---- 4. scale ---------------------------------------------------------------

async fn scale(run: &Run) {
    let started = Instant::now();
    kubectl(&["scale", &run.ns_flag(), "mc/chat", "--replicas=5"]).await;
    let servers = ready_pods(&run.client, &run.ns, SERVERS, 5, POD_WAIT).await;
    run.timed("scale 3 -> 5 until 5 pods Ready", started.elapsed());
    let deployment = Api::<Deployment>::namespaced(run.client.clone(), &run.ns)
        .get("chat-server")
        .await
        .unwrap();
    assert_eq!(deployment.spec.unwrap().replicas, Some(5));

    let service = run.service_ip().await;
    let again = format!("ws://{service}:80/ws");
    let followers: Vec<(String, Follower)> = servers
        .iter()
        .map(|p| {
            let url = format!("ws://{}:8080/ws", pod_ip(p).unwrap());
            (name(p), Follower::start(url, again.clone(), "e2e-scale"))
        })
        .collect();
    let (names, followers): (Vec<_>, Vec<_>) = followers.into_iter().unzip();
    all_subscribed(&followers).await;
    publish_marker(&service, "e2e-scale", "before-scale-in").await;
    all_saw(&followers, "before-scale-in", Duration::from_secs(30)).await;

    let started = Instant::now();
    kubectl(&["scale", &run.ns_flag(), "mc/chat", "--replicas=2"]).await;
    let remaining = ready_pods(&run.client, &run.ns, SERVERS, 2, POD_WAIT).await;
    let remaining: BTreeSet<String> = remaining.iter().map(name).collect();
    // Clients of removed pods were told to reconnect, and did, to a pod
    // that stays.
    for (pod, f) in names.iter().zip(&followers) {
        if remaining.contains(pod) {
            continue;
        }
        eventually(
            &format!("the client of removed pod {pod} to reconnect elsewhere"),
            POD_WAIT,
            || async {
                let moved = f.node().is_some_and(|n| remaining.contains(&n));
                (moved && f.seen.lock().unwrap().reconnect_frames >= 1).then_some(())
            },
        )
        .await;
    }
    run.timed("scale 5 -> 2 until every client moved", started.elapsed());
    let ack = publish_marker(&service, "e2e-scale", "after-scale-in").await;
    let offsets = all_saw(&followers, "after-scale-in", Duration::from_secs(30)).await;
    assert!(
        offsets.iter().all(|o| Some(*o) == ack["offset"].as_u64()),
        "{offsets:?} vs {ack}"
    );
    for f in followers {
        let seen = f.finish().await;
        assert!(seen.errors.is_empty(), "{:?}", seen.errors);
        // Recovery after the move: nothing was published meanwhile, so
        // every re-subscription recovered completely.
        for r in &seen.recoveries {
            assert_eq!(r["recovered"], true, "{r}");
        }
    }
}

// ---- 5. failover ------------------------------------------------------------

async fn failover(run: &Run) {
    let (master, ip) = run.status_master().await.expect("a master in the status");
    let servers_before: BTreeMap<String, i32> = run
        .servers()
        .await
        .iter()
        .map(|p| (p.uid().unwrap(), restarts(p)))
        .collect();
    let service = run.service_ip().await;
    let again = format!("ws://{service}:80/ws");
    let followers: Vec<Follower> = run
        .servers()
        .await
        .iter()
        .map(|p| {
            let url = format!("ws://{}:8080/ws", pod_ip(p).unwrap());
            Follower::start(url, again.clone(), "e2e-failover")
        })
        .collect();
    all_subscribed(&followers).await;
    publish_marker(&service, "e2e-failover", "before-failover").await;
    all_saw(&followers, "before-failover", Duration::from_secs(30)).await;
    let alerts = alerts::Alerts::watch_servers(run).await;
    alerts.wait_clear(BROKER_DOWN).await;

    say(format!("deleting the Redis master {master} ({ip})"));
    let master_uid = pods(&run.client, &run.ns, REDIS)
        .await
        .iter()
        .find(|p| name(p) == master)
        .and_then(|p| p.uid())
        .unwrap();
    let deleted = Instant::now();
    kubectl(&["delete", "pod", &run.ns_flag(), &master, "--wait=false"]).await;
    // Once the old master is gone for good, publish until a message reaches
    // a subscriber on every server pod.
    eventually("the old master pod to be gone", POD_WAIT, || async {
        let all = pods(&run.client, &run.ns, REDIS).await;
        (!all
            .iter()
            .any(|p| p.uid().as_deref() == Some(master_uid.as_str())))
        .then_some(())
    })
    .await;
    run.timed("failover: old master pod gone", deleted.elapsed());
    let url = format!("http://{service}/api/v1/rooms/e2e-failover/messages");
    let mut n = 0;
    eventually("deliveries to resume on every server pod", POD_WAIT, || {
        n += 1;
        let marker = format!("after-failover-{n}");
        let url = url.clone();
        let followers = &followers;
        async move {
            http_publish(&url, json!({"marker": marker}), Some(&marker))
                .await
                .ok()?;
            saw_within(followers, &marker, Duration::from_secs(2)).await
        }
    })
    .await;
    run.timed(
        "failover: master deleted until delivery on every pod",
        deleted.elapsed(),
    );

    let (new_master, new_ip) = eventually("the status to name a new master", POD_WAIT, || async {
        run.status_master().await.filter(|(pod, _)| *pod != master)
    })
    .await;
    assert_eq!(run.role(&new_ip).await.as_deref(), Some("master"));
    say(format!("new master: {new_master} ({new_ip})"));
    run.timed(
        "failover: master deleted until the status names the new one",
        deleted.elapsed(),
    );
    // No server pod was restarted or replaced.
    let servers_after: BTreeMap<String, i32> = run
        .servers()
        .await
        .iter()
        .map(|p| (p.uid().unwrap(), restarts(p)))
        .collect();
    assert_eq!(servers_before, servers_after, "server pods restarted");
    // The group heals: the deleted pod comes back as a replica.
    ready_pods(&run.client, &run.ns, REDIS, 3, POD_WAIT).await;
    alerts.wait_clear(BROKER_DOWN).await;

    // A deleted master hands over before it stops, too fast for any alert.
    // Now the master is killed instead: it hangs first (as a stuck process
    // does) until Sentinel promotes a replica, then dies. The chart's
    // broker-down alert expression, evaluated on the pods' real metrics,
    // holds while the pods have no master and clears after the failover,
    // once they deliver again.
    let (master, _) = run.status_master().await.expect("a master in the status");
    let pod = pods(&run.client, &run.ns, REDIS)
        .await
        .into_iter()
        .find(|p| name(p) == master)
        .unwrap();
    if let Some(pid) = faults::container_child_pid(&pod, "redis", "redis-server").await {
        let killed_at = chorus_testkit::prometheus::now();
        let t = Instant::now();
        faults::run_cmd("kill", &["-STOP", &pid]).await;
        let held = eventually(
            &format!("{BROKER_DOWN}'s expression to hold while the master hangs"),
            POD_WAIT,
            || async {
                let held = alerts.held_for_since(BROKER_DOWN, killed_at).await;
                (!held.is_empty()).then_some(held)
            },
        )
        .await;
        eventually("Sentinel to promote a replica", POD_WAIT, || async {
            run.status_master()
                .await
                .filter(|(pod, _)| *pod != master)
                .map(|_| ())
        })
        .await;
        faults::run_cmd("kill", &["-KILL", &pid]).await;
        let servers: BTreeSet<String> = run.servers().await.iter().map(name).collect();
        assert!(
            held.is_subset(&servers),
            "{BROKER_DOWN} held for {held:?} of {servers:?}"
        );
        alerts.wait_clear(BROKER_DOWN).await;
        run.timed(
            "master hung, failed over, killed: broker-down alert held and cleared",
            t.elapsed(),
        );
        let marker = "after-master-killed";
        publish_marker(&service, "e2e-failover", marker).await;
        all_saw(&followers, marker, POD_WAIT).await;
        // The killed container is restarted by the kubelet and rejoins.
        let restarted = restarts(&pod);
        eventually(
            "the killed Redis container to restart",
            POD_WAIT,
            || async {
                let all = pods(&run.client, &run.ns, REDIS).await;
                all.iter()
                    .any(|p| name(p) == master && restarts(p) > restarted)
                    .then_some(())
            },
        )
        .await;
        ready_pods(&run.client, &run.ns, REDIS, 3, POD_WAIT).await;
    } else {
        say("the Redis pods' containerd is not on this machine: the kill is skipped");
    }
    for f in followers {
        let seen = f.finish().await;
        assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    }
}

// ---- 1b. operator upgrade -----------------------------------------------------

async fn upgrade_operator(run: &Run) {
    let redis_and_sentinels = || async {
        let mut out = BTreeMap::new();
        for selector in [REDIS, SENTINELS] {
            for p in pods(&run.client, &run.ns, selector).await {
                out.insert(name(&p), (p.uid().unwrap(), restarts(&p)));
            }
        }
        out
    };
    let before = redis_and_sentinels().await;
    let old_pods: BTreeSet<String> = pods(&run.client, &run.operator_ns, OPERATOR)
        .await
        .iter()
        .map(|p| p.uid().unwrap())
        .collect();
    helm(&[
        "upgrade",
        &run.release,
        "charts/chorus",
        "--namespace",
        &run.operator_ns,
        "--set",
        "logging.level=debug\\,kube=info",
        "--set",
        "podAnnotations.chorus\\.dev/e2e=upgraded",
        "--wait",
        "--timeout",
        "180",
    ])
    .await;
    // The new operator pod runs and has reconciled the cluster.
    let operator = eventually("the upgraded operator pod", POD_WAIT, || async {
        let all = pods(&run.client, &run.operator_ns, OPERATOR).await;
        all.into_iter()
            .find(|p| is_ready(p) && !old_pods.contains(&p.uid().unwrap()))
    })
    .await;
    let metrics = format!("http://{}:9090/metrics", pod_ip(&operator).unwrap());
    eventually("the upgraded operator to reconcile", POD_WAIT, || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(r#"chorus_operator_reconciles_total{result="ok"} "#))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| *v >= 2.0)
    })
    .await;
    assert_eq!(
        before,
        redis_and_sentinels().await,
        "the operator upgrade restarted or replaced Redis or Sentinel pods"
    );
}

// ---- 6. streams and a rolling restart ----------------------------------------

async fn streams_roll(run: &Run) {
    // Switching delivery rolls the servers once.
    let started = Instant::now();
    run.patch(r#"{"spec": {"delivery": "streams", "drainSeconds": 10}}"#)
        .await;
    eventually("every server pod in streams mode", POD_WAIT, || async {
        let servers = run.servers().await;
        let ok = servers.len() == 2
            && servers.iter().all(is_ready)
            && futures_util::future::join_all(servers.iter().map(|p| async {
                let url = format!(
                    "http://{}:8080/api/v1/rooms/probe/history",
                    pod_ip(p).unwrap()
                );
                reqwest::get(&url)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }))
            .await
            .into_iter()
            .all(|ok| ok);
        ok.then_some(())
    })
    .await;
    run.timed(
        "switch to streams until every pod serves history",
        started.elapsed(),
    );

    let service = run.service_ip().await;
    let again = format!("ws://{service}:80/ws");
    let first: Vec<Pod> = run.servers().await;
    let old_nodes: BTreeSet<String> = first.iter().map(name).collect();
    let followers: Vec<Follower> = first
        .iter()
        .flat_map(|p| {
            let url = format!("ws://{}:8080/ws", pod_ip(p).unwrap());
            [
                Follower::start(url.clone(), again.clone(), "e2e-durable"),
                Follower::start(url, again.clone(), "e2e-durable"),
            ]
        })
        .collect();
    all_subscribed(&followers).await;
    publish_marker(&service, "e2e-durable", "start").await;
    all_saw(&followers, "start", Duration::from_secs(30)).await;

    // A backend publishes steadily; a publish answered with an error is
    // retried with the same key, so what is acknowledged is exactly once.
    let (stop_publisher, publisher_stopped) = watch::channel(false);
    let url = format!("http://{service}/api/v1/rooms/e2e-durable/messages");
    let publisher = tokio::spawn(async move {
        let mut acked: Vec<(u64, Value)> = Vec::new();
        let mut failures = 0u32;
        let mut n = 0u64;
        while !*publisher_stopped.borrow() {
            n += 1;
            let key = format!("n-{n}");
            loop {
                match http_publish(&url, json!({"n": n}), Some(&key)).await {
                    Ok(ack) => {
                        acked.push((ack["offset"].as_u64().unwrap(), ack["epoch"].clone()));
                        break;
                    }
                    Err(_) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        (acked, failures)
    });

    let started = Instant::now();
    run.patch(r#"{"spec": {"limits": {"sendQueue": 2048}}}"#)
        .await;
    // The roll is over when two new pods serve and every subscriber has
    // moved to one of them.
    eventually(
        "the roll to finish and every subscriber to move",
        POD_WAIT,
        || async {
            let servers = run.servers().await;
            let new: BTreeSet<String> = servers
                .iter()
                .filter(|p| is_ready(p) && !old_nodes.contains(&name(p)))
                .map(name)
                .collect();
            (servers.len() == 2
                && new.len() == 2
                && followers
                    .iter()
                    .all(|f| f.node().is_some_and(|n| new.contains(&n))))
            .then_some(())
        },
    )
    .await;
    run.timed(
        "rolling restart until every subscriber moved",
        started.elapsed(),
    );
    let _ = stop_publisher.send(true);
    let (acked, failures) = publisher.await.unwrap();
    let end = publish_marker(&service, "e2e-durable", "end").await;
    all_saw(&followers, "end", Duration::from_secs(30)).await;
    let end_offset = end["offset"].as_u64().unwrap();

    // Nothing acknowledged is lost, nothing is delivered twice, order kept.
    assert!(
        acked.len() > 20,
        "only {} publishes acknowledged",
        acked.len()
    );
    let epoch = end["epoch"].clone();
    assert!(acked.iter().all(|(_, e)| *e == epoch), "the epoch changed");
    let acked_offsets: BTreeSet<u64> = acked.iter().map(|(o, _)| *o).collect();
    for (i, f) in followers.into_iter().enumerate() {
        let seen = f.finish().await;
        assert!(seen.errors.is_empty(), "subscriber {i}: {:?}", seen.errors);
        assert!(
            seen.reconnect_frames >= 1,
            "subscriber {i} was never told to reconnect"
        );
        assert!(
            !seen.recoveries.is_empty(),
            "subscriber {i} never recovered"
        );
        for r in &seen.recoveries {
            assert_eq!(r["recovered"], true, "subscriber {i}: {r}");
        }
        let offsets: Vec<u64> = seen.messages.iter().map(|(_, o, _)| *o).collect();
        let first = offsets[0];
        let expected: Vec<u64> = (first..=end_offset).collect();
        assert_eq!(
            offsets, expected,
            "subscriber {i} saw a gap, a duplicate or a reordering"
        );
        assert!(acked_offsets.iter().all(|o| offsets.contains(o)));
    }
    say(format!(
        "{} publishes acknowledged during the roll ({failures} retried), none lost",
        acked.len()
    ));
}

// ---- 7. deletion ------------------------------------------------------------

async fn delete_cluster(run: &Run) {
    let started = Instant::now();
    kubectl(&[
        "delete",
        &run.ns_flag(),
        "mc/chat",
        "--wait=true",
        "--timeout=120s",
    ])
    .await;
    let selector = "app.kubernetes.io/instance=chat";
    let c = &run.client;
    let ns = &run.ns;
    eventually(
        "everything the cluster owned to be collected",
        POD_WAIT,
        || async {
            let left = kubectl(&[
                "get",
                &run.ns_flag(),
                "deployments,statefulsets,services,configmaps,secrets,poddisruptionbudgets,pods",
                "-l",
                selector,
                "-o",
                "name",
            ])
            .await;
            left.trim().is_empty().then_some(())
        },
    )
    .await;
    run.timed("delete until everything is collected", started.elapsed());
    let namespace: Namespace = Api::all(c.clone()).get(ns).await.unwrap();
    assert!(namespace.meta().deletion_timestamp.is_none());
}
