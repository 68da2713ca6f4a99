//! Step 12: `redis.mode: cluster` (`examples/redis-cluster.yaml`: three
//! shards of a master and a replica, streams): the operator creates the
//! Redis Cluster and the cluster comes up Ready; messages cross server pods
//! through sharded Pub/Sub; then `shards` goes from 3 to 4 with a backend
//! publishing and subscribers on every server pod: the status shows four
//! shards serving slots and nothing left to move, Ready, and every
//! acknowledged publish reached every subscriber.

use super::faults::{Publisher, events_of, nothing_silently_missed, run_cmd};
use super::*;

const SHARDED: &str = "chat-sharded";
const ROOM: &str = "e2e-sharded";

fn selector(component: &str) -> String {
    format!("app.kubernetes.io/instance={SHARDED},app.kubernetes.io/component={component}")
}

async fn cluster_status(run: &Run) -> Option<chorus_crds::RedisClusterStatus> {
    let mc = Api::<MessagingCluster>::namespaced(run.client.clone(), &run.ns)
        .get(SHARDED)
        .await
        .ok()?;
    mc.status?.redis.cluster
}

async fn ready(run: &Run) -> bool {
    let Ok(mc) = Api::<MessagingCluster>::namespaced(run.client.clone(), &run.ns)
        .get(SHARDED)
        .await
    else {
        return false;
    };
    mc.status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Waits until the status shows `shards` shards, each serving slots with
/// its replica linked, nothing left to move, and the cluster Ready.
async fn shards_settled(run: &Run, shards: usize) -> chorus_crds::RedisClusterStatus {
    eventually(
        &format!("{shards} shards serving slots, Ready"),
        Duration::from_secs(600),
        || async {
            let status = cluster_status(run).await?;
            let whole = status.state.as_deref() == Some("ok")
                && status.slots_covered == 16384
                && status.slots_to_move == 0
                && status.shards.len() == shards
                && status
                    .shards
                    .iter()
                    .all(|s| s.slots > 0 && s.replicas_linked == 1);
            (whole && ready(run).await).then_some(status)
        },
    )
    .await
}

pub async fn redis_cluster(run: &Run) {
    let started = Instant::now();
    kubectl(&["apply", &run.ns_flag(), "-f", "examples/redis-cluster.yaml"]).await;
    let status = shards_settled(run, 3).await;
    run.timed(
        "Redis Cluster of 3 shards Ready after apply",
        started.elapsed(),
    );
    say(format!("shards: {:?}", status.shards));
    ready_pods(
        &run.client,
        &run.ns,
        &selector("redis-cluster"),
        6,
        POD_WAIT,
    )
    .await;

    // A subscriber on every server pod; a backend publishing through the
    // Service: messages cross pods through the shard serving the room.
    let service = run.service_ip_of(SHARDED).await;
    let again = format!("ws://{service}:80/ws");
    let servers = ready_pods(&run.client, &run.ns, &selector("server"), 3, POD_WAIT).await;
    let followers: Vec<Follower> = servers
        .iter()
        .map(|p| {
            let url = format!("ws://{}:8080/ws", pod_ip(p).unwrap());
            Follower::start(url, again.clone(), ROOM)
        })
        .collect();
    all_subscribed(&followers).await;
    publish_marker(&service, ROOM, "sharded-start").await;
    all_saw(&followers, "sharded-start", Duration::from_secs(30)).await;
    let publisher = Publisher::start(format!("http://{service}/api/v1/rooms/{ROOM}/messages"));

    // A fourth shard with traffic running.
    let started = Instant::now();
    kubectl(&[
        "patch",
        &run.ns_flag(),
        &format!("mc/{SHARDED}"),
        "--type=merge",
        "-p",
        r#"{"spec": {"redis": {"cluster": {"shards": 4}}}}"#,
    ])
    .await;
    let status = shards_settled(run, 4).await;
    run.timed(
        "shards 3 -> 4 until every slot moved and Ready",
        started.elapsed(),
    );
    say(format!("shards: {:?}", status.shards));
    let reasons = events_of(run, SHARDED).await;
    for wanted in ["RedisClusterCreated", "RedisShardAdded", "RedisSlotsMoved"] {
        assert!(
            reasons.iter().any(|r| r == wanted),
            "no {wanted}: {reasons:?}"
        );
    }
    // The servers never restarted for it: they learn shards from the cluster.
    let after = pods(&run.client, &run.ns, &selector("server")).await;
    assert_eq!(
        after.iter().map(name).collect::<BTreeSet<_>>(),
        servers.iter().map(name).collect::<BTreeSet<_>>(),
        "server pods replaced"
    );

    let acked = publisher.finish().await;
    publish_marker(&service, ROOM, "sharded-end").await;
    all_saw(&followers, "sharded-end", Duration::from_secs(60)).await;
    assert!(
        acked.len() > 20,
        "only {} publishes acknowledged",
        acked.len()
    );
    for (i, f) in followers.into_iter().enumerate() {
        let seen = f.finish().await;
        nothing_silently_missed(i, &seen, &acked);
        assert!(seen.errors.is_empty(), "subscriber {i}: {:?}", seen.errors);
    }
    say(format!(
        "{} publishes acknowledged while the cluster grew, none lost",
        acked.len()
    ));
    say(run_cmd("kubectl", &["get", &run.ns_flag(), "mc", SHARDED]).await);
    kubectl(&[
        "delete",
        &run.ns_flag(),
        &format!("mc/{SHARDED}"),
        "--wait=true",
        "--timeout=120s",
    ])
    .await;
}
