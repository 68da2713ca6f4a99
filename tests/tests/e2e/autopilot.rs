//! Step 10: what the operator sees and does on its own, on the durable
//! cluster of step 9 with a backend publishing and subscribers following
//! throughout.
//!
//! - `status.fleet` counts the clients, per pod, with deliveries and each
//!   pod's canary round trip; without session affinity the Service spreads
//!   clients that share one IP.
//! - `autoscaling.connectionsPerPod`: more clients than the pods should
//!   hold grow the fleet at once, and the operator moves clients onto the
//!   new pods; when most clients leave it shrinks back to `minReplicas`
//!   after its wait, the removed pods draining first.
//! - A drain by eviction of every server pod tells the clients to
//!   reconnect spread over time, not in a burst.
//! - A pod whose backplane is cut silently (its packets from Redis
//!   dropped inside its network namespace, no reset, every other health
//!   check green) is seen through its canary and restarted, with an Event.
//!
//! Through all of it no subscriber silently misses an acknowledged
//! message.

use super::faults::{
    DURABLE, Publisher, conditions, container_pid, events, nothing_silently_missed, run_cmd,
    selector,
};
use super::*;
use chorus_crds::FleetStatus;

const ROOM: &str = "e2e-auto";
/// Clients opened for the scale-out, and the target per pod: 450 at 100
/// per pod need 5 pods.
const CLIENTS: usize = 450;
const PER_POD: i64 = 100;
/// Clients kept for the scale-in: 50 need one pod, `minReplicas` is 3.
const KEPT: usize = 50;

async fn fleet(run: &Run) -> Option<FleetStatus> {
    Api::<MessagingCluster>::namespaced(run.client.clone(), &run.ns)
        .get(DURABLE)
        .await
        .ok()?
        .status?
        .fleet
}

async fn spec_replicas(run: &Run) -> i32 {
    Api::<MessagingCluster>::namespaced(run.client.clone(), &run.ns)
        .get(DURABLE)
        .await
        .unwrap()
        .spec
        .replicas
}

async fn patch_durable(run: &Run, patch: &str) {
    kubectl(&[
        "patch",
        &run.ns_flag(),
        &format!("mc/{DURABLE}"),
        "--type=merge",
        "-p",
        patch,
    ])
    .await;
}

/// Checks that a subscriber's messages never skip an offset within an
/// epoch unless it was told (`history_gone`): at-least-once, so a message
/// may come twice after a reconnect, never be missing.
fn no_gap(i: usize, seen: &Seen) {
    let told = seen.told_history_gone(i);
    let mut last: Option<(&str, u64)> = None;
    for (epoch, offset, _) in &seen.messages {
        if let Some((e, o)) = last
            && e == epoch.as_str()
        {
            assert!(
                *offset <= o + 1 || told,
                "subscriber {i} jumped from offset {o} to {offset} in epoch {e} without being told"
            );
        }
        if last.is_none_or(|(e, o)| e != epoch.as_str() || *offset > o) {
            last = Some((epoch, *offset));
        }
    }
}

/// A node drain, as `kubectl drain` does it, for the server pods: each is
/// evicted through the Eviction API, which the PodDisruptionBudget lets
/// through one at a time (a refusal is retried, as kubectl does). There is
/// one node here, so the node is not cordoned: the replacements start on
/// it. Each evicted pod drains: its clients are told to `reconnect` spread
/// over `drainSeconds`, not all at once.
async fn drain_by_eviction(run: &Run, followers: &[Follower]) {
    let t = Instant::now();
    let before: Vec<usize> = followers
        .iter()
        .map(|f| f.seen.lock().unwrap().reconnects_at.len())
        .collect();
    let api: Api<Pod> = Api::namespaced(run.client.clone(), &run.ns);
    let old = pods(&run.client, &run.ns, &selector("server")).await;
    for pod in &old {
        let pod_name = name(pod);
        eventually(
            &format!("the eviction of {pod_name} to be allowed"),
            POD_WAIT,
            || async {
                match api.evict(&pod_name, &Default::default()).await {
                    Ok(_) => Some(()),
                    Err(e) => {
                        say(format!("eviction of {pod_name}: {e}"));
                        None
                    }
                }
            },
        )
        .await;
    }
    let old: BTreeSet<String> = old.iter().filter_map(|p| p.uid()).collect();
    eventually("3 new server pods Ready", POD_WAIT, || async {
        let all = pods(&run.client, &run.ns, &selector("server")).await;
        (all.len() == 3
            && all
                .iter()
                .all(|p| is_ready(p) && !old.contains(&p.uid().unwrap_or_default())))
        .then_some(all)
    })
    .await;
    eventually(
        "every client to subscribe again after the drain",
        POD_WAIT,
        || async { followers.iter().all(|f| f.node().is_some()).then_some(()) },
    )
    .await;
    run.timed("every server pod evicted and replaced", t.elapsed());
    // The reconnects, by second since the drain began.
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for (f, skip) in followers.iter().zip(before) {
        for at in f.seen.lock().unwrap().reconnects_at.iter().skip(skip) {
            *per_second
                .entry(at.duration_since(t).as_secs())
                .or_default() += 1;
        }
    }
    let total: usize = per_second.values().sum();
    let busiest = per_second.values().copied().max().unwrap_or(0);
    say(format!(
        "reconnects told during the drain, by second since it began: {per_second:?} ({total} in all)"
    ));
    assert!(
        total >= followers.len(),
        "only {total} reconnects for {} clients",
        followers.len()
    );
    assert!(
        busiest * 2 <= total,
        "a burst: {busiest} of {total} reconnects in one second"
    );
}

pub async fn autopilot(run: &Run) {
    // Five server pods must fit the one node: small requests. Short drains
    // keep the scale-in quick. These roll the servers once. Without session
    // affinity the clients (all from this machine's IP) spread over the
    // pods, and the operator can move them after a scale-out.
    patch_durable(
        run,
        r#"{"spec":{"drainSeconds":10,"resources":{"requests":{"cpu":"50m","memory":"64Mi"}},"service":{"sessionAffinity":{"type":"None"}}}}"#,
    )
    .await;
    kubectl(&[
        "rollout",
        "status",
        &run.ns_flag(),
        &format!("deployment/{DURABLE}-server"),
        "--timeout=240s",
    ])
    .await;
    ready_pods(&run.client, &run.ns, &selector("server"), 3, POD_WAIT).await;

    let service = run.service_ip_of(DURABLE).await;
    let again = format!("ws://{service}:80/ws");
    let mut followers: Vec<Follower> = (0..CLIENTS)
        .map(|_| Follower::start(again.clone(), again.clone(), ROOM))
        .collect();
    eventually(
        "every subscriber to subscribe",
        Duration::from_secs(90),
        || async { followers.iter().all(|f| f.node().is_some()).then_some(()) },
    )
    .await;
    // Five messages a second: 2,250 deliveries a second to this process.
    let publisher = Publisher::every(
        format!("http://{service}/api/v1/rooms/{ROOM}/messages"),
        Duration::from_millis(200),
    );

    // Insights: the status counts every client and shows each pod.
    let t = Instant::now();
    let seen = eventually(
        "status.fleet to count every client on 3 pods, with deliveries and canaries",
        POD_WAIT,
        || async {
            let f = fleet(run).await?;
            (f.connections >= CLIENTS as i64
                && f.pods_reporting == 3
                && f.deliveries_per_second > 0
                && f.pods
                    .iter()
                    .all(|p| p.canary_rtt.is_some() && p.connections > 0))
            .then_some(f)
        },
    )
    .await;
    run.timed(
        "clients connected until status.fleet counts them",
        t.elapsed(),
    );
    say(format!(
        "status.fleet: {}",
        serde_json::to_string(&seen).unwrap()
    ));
    assert_eq!(
        seen.pods.iter().map(|p| p.connections).sum::<i64>(),
        seen.connections
    );

    // Scale-out on connections, then the clients spread onto the new pods.
    let t = Instant::now();
    patch_durable(
        run,
        &json!({"spec": {"autoscaling": {
            "minReplicas": 3, "maxReplicas": 5, "connectionsPerPod": PER_POD
        }}})
        .to_string(),
    )
    .await;
    eventually("the operator to scale to 5", POD_WAIT, || async {
        (spec_replicas(run).await == 5).then_some(())
    })
    .await;
    ready_pods(&run.client, &run.ns, &selector("server"), 5, POD_WAIT).await;
    run.timed("450 clients at 100 per pod: 3 -> 5 pods Ready", t.elapsed());
    // Balanced as the operator defines it: no pod more than 20 % (or 5
    // connections) above the mean, and the new pods hold clients.
    let spread = eventually(
        "the operator to balance the clients over the 5 pods",
        Duration::from_secs(300),
        || async {
            let f = fleet(run).await?;
            let mean = f.connections as f64 / 5.0;
            (f.pods_reporting == 5
                && f.connections >= CLIENTS as i64
                && f.pods.iter().all(|p| {
                    let c = p.connections as f64;
                    c > 0.0 && (c <= mean * 1.2 || c - mean < 5.0)
                }))
            .then_some(f)
        },
    )
    .await;
    run.timed("scale-out until the clients spread", t.elapsed());
    say(format!(
        "connections per pod after the rebalance: {:?}",
        spread
            .pods
            .iter()
            .map(|p| p.connections)
            .collect::<Vec<_>>()
    ));
    let reasons = events(run).await;
    for reason in ["Autoscaled", "Rebalanced"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} Event in {reasons:?}"
        );
    }

    // Most clients leave: back to minReplicas after the wait, the removed
    // pods draining their clients onto the ones that stay.
    let t = Instant::now();
    let leaving: Vec<Follower> = followers.drain(KEPT..).collect();
    for (i, f) in leaving.into_iter().enumerate() {
        no_gap(KEPT + i, &f.finish().await);
    }
    eventually("the operator to scale back to 3", POD_WAIT, || async {
        (spec_replicas(run).await == 3).then_some(())
    })
    .await;
    let remaining = ready_pods(&run.client, &run.ns, &selector("server"), 3, POD_WAIT).await;
    let remaining: BTreeSet<String> = remaining.iter().map(name).collect();
    eventually(
        "the kept clients to sit on the 3 remaining pods",
        POD_WAIT,
        || async {
            followers
                .iter()
                .all(|f| f.node().is_some_and(|n| remaining.contains(&n)))
                .then_some(())
        },
    )
    .await;
    run.timed("clients leave: 5 -> 3 pods, clients moved", t.elapsed());

    drain_by_eviction(run, &followers).await;

    // A silent cut of one pod's backplane.
    let victim = pods(&run.client, &run.ns, &selector("server"))
        .await
        .into_iter()
        .next()
        .unwrap();
    if let Some(pid) = container_pid(&victim, "server").await {
        let t = Instant::now();
        let out = run_cmd(
            "nsenter",
            &[
                "--target", &pid, "--net", "iptables", "-A", "INPUT", "-p", "tcp", "--sport",
                "6379", "-j", "DROP",
            ],
        )
        .await;
        say(format!(
            "dropping what {} receives from Redis (pid {pid}) {out}",
            name(&victim)
        ));
        let victim_uid = victim.uid().unwrap();
        let unhealthy_seen = Mutex::new(None);
        let victim_unready = Mutex::new(None);
        eventually(
            "the operator to restart the pod whose backplane is cut",
            Duration::from_secs(300),
            || async {
                if let Some((status, reason)) = conditions(run).await.get("FleetHealthy")
                    && status == "False"
                {
                    unhealthy_seen.lock().unwrap().get_or_insert(reason.clone());
                }
                let all = pods(&run.client, &run.ns, &selector("server")).await;
                if all
                    .iter()
                    .any(|p| p.uid().as_deref() == Some(victim_uid.as_str()) && !is_ready(p))
                {
                    victim_unready.lock().unwrap().get_or_insert(t.elapsed());
                }
                let gone = all
                    .iter()
                    .all(|p| p.uid().as_deref() != Some(victim_uid.as_str()));
                (gone && all.len() == 3 && all.iter().all(is_ready)).then_some(())
            },
        )
        .await;
        let unhealthy_seen = unhealthy_seen.into_inner().unwrap();
        run.timed("backplane cut until the pod is replaced", t.elapsed());
        say(format!("FleetHealthy while cut: {unhealthy_seen:?}"));
        assert!(
            unhealthy_seen.is_some(),
            "FleetHealthy never turned False while a pod could not deliver"
        );
        let victim_unready = victim_unready.into_inner().unwrap();
        say(format!("the cut pod unready after {victim_unready:?}"));
        assert!(
            victim_unready.is_some(),
            "the pod whose backplane was cut never turned unready"
        );
        assert!(
            events(run).await.iter().any(|r| r == "ServerPodRestarted"),
            "no ServerPodRestarted Event"
        );
    } else {
        say("the server pods' containerd is not on this machine: the backplane cut is skipped");
    }

    // Nothing acknowledged went missing for the clients that stayed.
    let acked = publisher.finish().await;
    publish_marker(&service, ROOM, "autopilot-end").await;
    all_saw(&followers, "autopilot-end", Duration::from_secs(60)).await;
    for (i, f) in followers.into_iter().enumerate() {
        let seen = f.finish().await;
        no_gap(i, &seen);
        nothing_silently_missed(i, &seen, &acked);
    }
    say(format!(
        "{} publishes acknowledged through the autopilot step",
        acked.len()
    ));
}
