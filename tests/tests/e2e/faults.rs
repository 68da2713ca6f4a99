//! Step 9: the faults a Redis group meets in a cluster's life, on a
//! durable cluster (`examples/durable.yaml`: streams, storage) with a
//! backend publishing and subscribers following throughout. After each
//! fault the group has one master again, the server pods deliver again
//! without a restart, and every acknowledged message reached every
//! subscriber, or the subscriber was told (`history_gone`).

use super::*;

pub(super) const DURABLE: &str = "chat-durable";

pub(super) fn selector(component: &str) -> String {
    format!("app.kubernetes.io/instance={DURABLE},app.kubernetes.io/component={component}")
}

/// The durable cluster's status conditions, by type: (status, reason).
pub(super) async fn conditions(run: &Run) -> BTreeMap<String, (String, String)> {
    conditions_of(run, DURABLE).await
}

/// MessagingCluster `name`'s status conditions, by type: (status, reason).
pub(super) async fn conditions_of(run: &Run, name: &str) -> BTreeMap<String, (String, String)> {
    let mc = Api::<MessagingCluster>::namespaced(run.client.clone(), &run.ns)
        .get(name)
        .await
        .unwrap();
    mc.status
        .map(|s| {
            s.conditions
                .into_iter()
                .map(|c| (c.type_, (c.status, c.reason)))
                .collect()
        })
        .unwrap_or_default()
}

async fn redis_ready(run: &Run) -> bool {
    conditions(run)
        .await
        .get("RedisReady")
        .is_some_and(|(status, _)| status == "True")
}

/// The reasons of the Events about the durable cluster.
pub(super) async fn events(run: &Run) -> Vec<String> {
    events_of(run, DURABLE).await
}

/// The reasons of the Events about MessagingCluster `mc`.
pub(super) async fn events_of(run: &Run, mc: &str) -> Vec<String> {
    kubectl(&[
        "get",
        "events",
        &run.ns_flag(),
        "--field-selector",
        &format!("involvedObject.name={mc}"),
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ])
    .await
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Waits until the status says the group is whole again, and until every
/// Redis and Sentinel pod is back.
async fn healed(run: &Run, what: &str, started: Instant) {
    eventually(&format!("{what}: RedisReady again"), POD_WAIT, || async {
        redis_ready(run).await.then_some(())
    })
    .await;
    ready_pods(&run.client, &run.ns, &selector("redis"), 3, POD_WAIT).await;
    ready_pods(&run.client, &run.ns, &selector("sentinel"), 3, POD_WAIT).await;
    run.timed(
        &format!("{what}: until the group is whole"),
        started.elapsed(),
    );
}

/// The master pod's name, as `status.redis.master` gives it.
async fn master(run: &Run) -> String {
    eventually("a master in the status", POD_WAIT, || async {
        let mc = Api::<MessagingCluster>::namespaced(run.client.clone(), &run.ns)
            .get(DURABLE)
            .await
            .ok()?;
        let master = mc.status?.redis.master?;
        Some(master.split('.').next()?.to_owned())
    })
    .await
}

/// Server pods by uid, with their restart counts.
async fn servers(run: &Run) -> BTreeMap<String, i32> {
    pods(&run.client, &run.ns, &selector("server"))
        .await
        .iter()
        .map(|p| (p.uid().unwrap(), restarts(p)))
        .collect()
}

/// A backend publishing through the Service, retrying with the same key.
pub(super) struct Publisher {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<(u64, Value)>>,
}

impl Publisher {
    pub(super) fn start(url: String) -> Self {
        Self::every(url, Duration::from_millis(50))
    }

    /// Publishes one message, then waits `pause`, until stopped; each with
    /// an idempotency key, so a retry is delivered once.
    pub(super) fn every(url: String, pause: Duration) -> Self {
        Self::spawn(url, pause, true)
    }

    /// [`Publisher::every`] without idempotency keys: a retry after an
    /// unknown outcome may be delivered twice, but every acknowledged
    /// offset is one subscribers see (on Kafka, a keyed retry that a pod
    /// not serving the room writes again is acknowledged at a position
    /// nobody sees: the readers drop it as a repeat).
    pub(super) fn unkeyed(url: String, pause: Duration) -> Self {
        Self::spawn(url, pause, false)
    }

    fn spawn(url: String, pause: Duration, keyed: bool) -> Self {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0u64;
            while !*stopped.borrow() {
                n += 1;
                let key = keyed.then(|| format!("f-{n}"));
                while !*stopped.borrow() {
                    match http_publish(&url, json!({"n": n}), key.as_deref()).await {
                        Ok(ack) => {
                            acked.push((ack["offset"].as_u64().unwrap(), ack["epoch"].clone()));
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                tokio::time::sleep(pause).await;
            }
            acked
        });
        Self { stop, task }
    }

    pub(super) async fn finish(self) -> Vec<(u64, Value)> {
        let _ = self.stop.send(true);
        self.task.await.unwrap()
    }
}

pub async fn redis_group_faults(run: &Run) {
    let started = Instant::now();
    kubectl(&["apply", &run.ns_flag(), "-f", "examples/durable.yaml"]).await;
    kubectl(&[
        "wait",
        &run.ns_flag(),
        "--for=condition=Ready",
        &format!("mc/{DURABLE}"),
        "--timeout=300s",
    ])
    .await;
    run.timed(
        "durable cluster Ready after apply (PVCs bound)",
        started.elapsed(),
    );
    let service = run.service_ip_of(DURABLE).await;
    let url = format!("http://{service}/api/v1/rooms/e2e-faults/messages");
    let again = format!("ws://{service}:80/ws");
    let followers: Vec<Follower> = (0..2)
        .map(|_| Follower::start(again.clone(), again.clone(), "e2e-faults"))
        .collect();
    all_subscribed(&followers).await;
    publish_marker(&service, "e2e-faults", "faults-start").await;
    all_saw(&followers, "faults-start", Duration::from_secs(30)).await;
    let servers_before = servers(run).await;
    let publisher = Publisher::start(url);

    // A stranger who reaches a sentinel cannot point it anywhere.
    let sentinel = pods(&run.client, &run.ns, &selector("sentinel")).await;
    let ip = pod_ip(&sentinel[0]).unwrap();
    let stranger = run_cmd(
        "redis-cli",
        &[
            "-h", &ip, "-p", "26379", "SENTINEL", "MONITOR", "evil", "10.9.9.9", "6379", "1",
        ],
    )
    .await;
    assert!(
        stranger.contains("NOAUTH"),
        "a sentinel without a password: {stranger}"
    );

    // The master's container dies and is back before Sentinel notices.
    let m = master(run).await;
    let t = Instant::now();
    // The exec itself ends with the container (exit 137): not an error.
    run_cmd(
        "kubectl",
        &[
            "exec",
            &run.ns_flag(),
            &m,
            "-c",
            "redis",
            "--",
            "sh",
            "-c",
            "REDISCLI_AUTH=$REDIS_PASSWORD redis-cli -p 6379 SHUTDOWN NOSAVE",
        ],
    )
    .await;
    eventually("the master's container to restart", POD_WAIT, || async {
        let all = pods(&run.client, &run.ns, &selector("redis")).await;
        all.iter()
            .any(|p| name(p) == m && restarts(p) > 0)
            .then_some(())
    })
    .await;
    healed(run, "master container restarted", t).await;

    // Every Redis pod at once.
    let t = Instant::now();
    kubectl(&[
        "delete",
        "pod",
        &run.ns_flag(),
        "-l",
        &selector("redis"),
        "--wait=false",
    ])
    .await;
    healed(run, "every Redis pod deleted", t).await;

    // The master and every sentinel together: nobody remembers who led.
    // The status says so while it lasts, and the operator repairs it.
    let m = master(run).await;
    let t = Instant::now();
    kubectl(&["delete", "pod", &run.ns_flag(), &m, "--wait=false"]).await;
    kubectl(&[
        "delete",
        "pod",
        &run.ns_flag(),
        "-l",
        &selector("sentinel"),
        "--wait=false",
    ])
    .await;
    eventually(
        "the status to show the group unhealthy",
        POD_WAIT,
        || async { (!redis_ready(run).await).then_some(()) },
    )
    .await;
    healed(run, "master and every sentinel deleted", t).await;
    say(format!(
        "events of {DURABLE}: {}",
        events(run).await.join(", ")
    ));

    // The operator is away while the master pod is deleted: the group
    // heals without it.
    kubectl(&[
        "scale",
        &format!("--namespace={}", run.operator_ns),
        "deployment/chorus",
        "--replicas=0",
    ])
    .await;
    eventually("the operator to stop", POD_WAIT, || async {
        pods(&run.client, &run.operator_ns, OPERATOR)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let m = master(run).await;
    let t = Instant::now();
    kubectl(&["delete", "pod", &run.ns_flag(), &m, "--wait=false"]).await;
    ready_pods(&run.client, &run.ns, &selector("redis"), 3, POD_WAIT).await;
    let marker = "without-the-operator";
    publish_marker(&service, "e2e-faults", marker).await;
    all_saw(&followers, marker, POD_WAIT).await;
    run.timed(
        "master deleted with the operator away: delivery again",
        t.elapsed(),
    );
    kubectl(&[
        "scale",
        &format!("--namespace={}", run.operator_ns),
        "deployment/chorus",
        "--replicas=1",
    ])
    .await;
    healed(run, "operator back", t).await;

    // Delivery goes on, on the same server pods, and nothing acknowledged
    // went missing without the subscribers being told.
    let acked = publisher.finish().await;
    let end = publish_marker(&service, "e2e-faults", "faults-end").await;
    all_saw(&followers, "faults-end", Duration::from_secs(60)).await;
    assert_eq!(servers_before, servers(run).await, "server pods restarted");
    assert!(
        acked.len() > 20,
        "only {} publishes acknowledged",
        acked.len()
    );
    let end_epoch = end["epoch"].clone();
    for (i, f) in followers.into_iter().enumerate() {
        let seen = f.finish().await;
        nothing_silently_missed(i, &seen, &acked);
    }
    say(format!("epoch at the end {end_epoch}"));
    say(format!(
        "{} publishes acknowledged through the faults",
        acked.len()
    ));
}

/// Runs a command and returns its stdout and stderr, whatever its status.
pub(super) async fn run_cmd(program: &str, args: &[&str]) -> String {
    let out = chorus_tests::cluster::run(program, args).await;
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that a subscriber saw every acknowledged publish in `acked`, or
/// was told it could not (`history_gone`), and no frame it did not expect;
/// prints what it saw.
pub(super) fn nothing_silently_missed(i: usize, seen: &Seen, acked: &[(u64, Value)]) {
    let told = seen.told_history_gone(i);
    let received: BTreeSet<(String, u64)> = seen
        .messages
        .iter()
        .map(|(e, o, _)| (e.clone(), *o))
        .collect();
    let missing: Vec<u64> = acked
        .iter()
        .filter(|(o, e)| !received.contains(&(e.as_str().unwrap_or_default().to_owned(), *o)))
        .map(|(o, _)| *o)
        .collect();
    assert!(
        missing.is_empty() || told,
        "subscriber {i} silently missed {} acknowledged messages: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    say(format!(
        "subscriber {i}: {} messages, {} acknowledged ones missing{}",
        seen.messages.len(),
        missing.len(),
        if told { " (told: history_gone)" } else { "" }
    ));
}

/// The PID on this machine of a pod's container's first process, from the
/// node's containerd; `None` when the pod's node is not this machine.
pub(super) async fn container_pid(pod: &Pod, container: &str) -> Option<String> {
    let id = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container)?
        .container_id
        .as_ref()?
        .strip_prefix("containerd://")?
        .to_owned();
    let socket = std::env::var("CHORUS_CONTAINERD_SOCK")
        .unwrap_or_else(|_| "/run/chorus-containerd/containerd.sock".to_owned());
    let tasks = run_cmd(
        "ctr",
        &["--address", &socket, "--namespace", "k8s.io", "task", "ls"],
    )
    .await;
    tasks.lines().find_map(|line| {
        let mut cols = line.split_whitespace();
        (cols.next()? == id).then(|| cols.next().map(str::to_owned))?
    })
}

/// The PID of the process named `program` that a pod's container started
/// (its first process, or a child of it).
pub(super) async fn container_child_pid(
    pod: &Pod,
    container: &str,
    program: &str,
) -> Option<String> {
    let first = container_pid(pod, container).await?;
    let children = run_cmd("pgrep", &["-P", &first, "-x", program]).await;
    let own = run_cmd("ps", &["-o", "comm=", "-p", &first]).await;
    if own.trim() == program {
        return Some(first);
    }
    children.lines().next().map(|l| l.trim().to_owned())
}
