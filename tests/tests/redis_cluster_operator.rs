//! The operator's managed Redis Cluster code
//! (`chorus_operator::redis_cluster`, one pass per reconcile in
//! `redis.mode: cluster`) against real `redis-server --cluster-enabled yes`
//! processes from the test kit that start knowing only themselves, as the
//! pods of a new StatefulSet do: it creates the cluster (three shards of a
//! master and a replica), then grows it to four shards, moving slots a
//! bounded number per pass while chorus-server nodes deliver a busy
//! durable room whose slot moves; and a pass after an operator stopped in
//! the middle of moving slots finishes or rolls back what it finds.
//!
//! Passes run back to back, as the operator's 2 s requeue of an unsettled
//! cluster would run them, until one finds nothing to do.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chorus_operator::redis_cluster::{
    Action, ClusterConfig, ClusterReport, Member, SLOTS, reconcile_cluster,
};
use chorus_server::broker::redis::cluster::room_slot;
use chorus_testkit::{ClusterOptions, RedisCluster};
use chorus_tests::{Publisher, WsClient};

const PASSWORD: &str = "cluster-operator-test";
/// Passes of a busy 2-core machine: generous.
const CONVERGE_LIMIT: Duration = Duration::from_secs(180);

fn options() -> ClusterOptions {
    ClusterOptions {
        password: Some(PASSWORD.into()),
        ..ClusterOptions::default()
    }
}

/// The operator's view: every node of `cluster` as a member, in order.
fn config(cluster: &RedisCluster, shards: usize, replicas_per_shard: usize) -> ClusterConfig {
    let members = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Member::new(format!("rc-{i}"), "127.0.0.1", n.port))
        .collect();
    let mut config = ClusterConfig::new(members, shards, replicas_per_shard);
    config.password = Some(PASSWORD.into());
    config
}

/// Runs passes until one finds the cluster whole with nothing to do;
/// returns that pass's report and every action done on the way.
async fn converge(config: &ClusterConfig) -> (ClusterReport, Vec<Action>) {
    let started = Instant::now();
    let mut done = Vec::new();
    loop {
        let report = reconcile_cluster(config).await;
        // Every shard with its replicas, linked.
        let linked = report.shards.iter().all(|s| {
            s.replicas.len() == config.replicas_per_shard && s.replicas_linked == s.replicas.len()
        });
        if report.converged() && report.whole() && linked {
            return (report, done);
        }
        done.extend(report.actions.iter().map(|(_, a, _)| a.clone()));
        assert!(
            started.elapsed() < CONVERGE_LIMIT,
            "the cluster did not settle: {report:#?}"
        );
        // Gossip spreads meetings and slot owners between passes.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_shape(report: &ClusterReport, shards: usize) {
    assert_eq!(report.slots_covered, SLOTS, "{report:#?}");
    assert_eq!(report.shards.len(), shards, "{report:#?}");
    let even = SLOTS / shards as u32;
    for shard in &report.shards {
        assert!(
            shard.slots == even || shard.slots == even + 1,
            "uneven: {report:#?}"
        );
        assert_eq!(shard.replicas.len(), 1, "a replica per shard: {report:#?}");
        assert_eq!(shard.replicas_linked, 1, "linked: {report:#?}");
    }
}

/// The chorus room channel of `room` (hash-tagged: one slot per room).
fn channel(room: &str) -> String {
    format!("chorus:room:{{{room}}}")
}

/// Reads `room`'s messages until offset `last`: every offset once, in
/// order, from `first`.
async fn read_all(client: &mut WsClient, room: &str, first: u64, last: u64) {
    let mut want = first;
    while want <= last {
        let m = client.message().await;
        if m["room"] != room {
            continue;
        }
        assert_eq!(m["offset"].as_u64(), Some(want), "{m}");
        want += 1;
    }
}

#[tokio::test]
async fn the_operator_creates_a_cluster_and_grows_it_to_four_shards_while_a_busy_room_is_delivered()
{
    let mut cluster = RedisCluster::launch_unjoined(6, options()).await.unwrap();
    let (report, created) = converge(&config(&cluster, 3, 1)).await;
    assert_shape(&report, 3);
    assert_eq!(
        created
            .iter()
            .filter(|a| matches!(a, Action::AddSlots { .. }))
            .count(),
        3,
        "{created:?}"
    );
    cluster.wait_whole(CONVERGE_LIMIT).await.unwrap();
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3);

    let password_file = std::env::temp_dir().join(format!("chorus-rc-pw-{}", masters[0]));
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    // The servers get three seeds, as the operator's ConfigMap gives them.
    let seeds: Vec<String> = cluster.nodes[..3].iter().map(|n| n.addr()).collect();
    let broker = format!("redis+cluster://{}", seeds.join(","));
    let nodes = chorus_tests::fleet(
        2,
        &broker,
        &[
            "--delivery",
            "streams",
            "--redis-password-file",
            password_file.to_str().unwrap(),
        ],
    )
    .await;

    // A busy room whose slot is among those the fourth shard takes (the
    // top of each shard's range), and rooms on every slot range.
    let busy = (0..)
        .map(|i| format!("busy-{i}"))
        .find(|r| (4097..5461).contains(&room_slot(r)))
        .unwrap();
    let busy_slot = room_slot(&busy);
    let before = cluster.master_of(busy_slot).await;
    let rooms: Vec<String> = (0..32).map(|i| format!("room-{i}")).collect();
    let mut watcher = nodes[1].client().await;
    for room in &rooms {
        watcher.subscribe(room).await;
    }
    let mut sub = nodes[1].client().await;
    assert_eq!(sub.subscribe(&busy).await["offset"], 0);
    let publisher = Publisher::start(nodes[0].client().await, busy.clone());
    publisher.wait_for(20).await;

    // Two more pods, a fourth shard: the slots move a pass at a time while
    // the room is busy.
    cluster.add_unjoined(&options()).await.unwrap();
    cluster.add_unjoined(&options()).await.unwrap();
    let mut grown = config(&cluster, 4, 1);
    grown.slots_per_pass = 512;
    let (report, steps) = converge(&grown).await;
    assert_shape(&report, 4);
    let passes_moving = steps
        .iter()
        .filter(|a| matches!(a, Action::MoveSlots { .. }))
        .count();
    assert!(passes_moving >= 4096 / 512, "paced: {steps:?}");
    assert!(
        steps.iter().any(|a| matches!(
            a,
            Action::MoveSlots {
                new_shard: true,
                ..
            }
        )),
        "{steps:?}"
    );
    cluster.wait_whole(CONVERGE_LIMIT).await.unwrap();
    assert_ne!(
        cluster.master_of(busy_slot).await,
        before,
        "the busy room moved"
    );

    // Every acknowledged publish reached the subscriber, in order, once.
    let acked = publisher.stop().await;
    assert!(acked > 20, "published during the moves: {acked}");
    read_all(&mut sub, &busy, 1, acked).await;

    // The rooms spread over the four shards: each master holds a node's
    // subscription to some of them, and only its own.
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 4);
    let mut shards_used = BTreeSet::new();
    let grown_cluster = &cluster;
    for room in &rooms {
        chorus_tests::wait_until(
            "the room to be subscribed on its shard",
            move || async move {
                let owner = grown_cluster.master_of(room_slot(room)).await;
                grown_cluster
                    .shard_numsub(&channel(room))
                    .await
                    .iter()
                    .all(|(port, n)| (*n == 1) == (*port == owner))
            },
        )
        .await;
        shards_used.insert(cluster.master_of(room_slot(room)).await);
    }
    assert_eq!(shards_used.len(), 4, "rooms on every shard");
    for node in nodes {
        node.stop().await;
    }
    let _ = std::fs::remove_file(password_file);
}

/// Writes `count` keys `{tag}:0`… with a tag whose slot the master on
/// `port` serves; returns the slot and the tag.
async fn fill_slot(cluster: &RedisCluster, port: u16, prefix: &str, count: i64) -> (u16, String) {
    for i in 0.. {
        let tag = format!("{prefix}{i}");
        let slot = cluster.slot_of(&tag).await;
        if cluster.master_of(slot).await != port {
            continue;
        }
        for k in 0..count {
            let _: () = cluster
                .node(port)
                .query(redis::cmd("SET").arg(format!("{{{tag}}}:{k}")).arg(k))
                .await;
        }
        return (slot, tag);
    }
    unreachable!()
}

/// Slots a node of `cluster` has in flight (`[slot->-id]` or `[slot-<-id]`
/// on its own line of `CLUSTER NODES`).
async fn in_flight(cluster: &RedisCluster) -> Vec<String> {
    let mut out = Vec::new();
    for node in &cluster.nodes {
        let text: String = node.query(redis::cmd("CLUSTER").arg("NODES")).await;
        let me = text.lines().find(|l| l.contains("myself")).unwrap();
        out.extend(
            me.split_whitespace()
                .filter(|f| f.starts_with('['))
                .map(|f| format!(":{} {f}", node.port)),
        );
    }
    out
}

#[tokio::test]
async fn a_pass_after_an_interrupted_move_finishes_it_or_rolls_it_back() {
    let cluster = RedisCluster::launch_unjoined(3, options()).await.unwrap();
    let (report, _) = converge(&config(&cluster, 3, 0)).await;
    assert_eq!(report.shards.len(), 3);
    cluster.wait_whole(CONVERGE_LIMIT).await.unwrap();
    let masters = cluster.masters().await;
    let (a, b, c) = (masters[0], masters[1], masters[2]);
    let nodes = &cluster;
    let id = move |port: u16| async move {
        nodes
            .node(port)
            .query::<String>(redis::cmd("CLUSTER").arg("MYID"))
            .await
    };

    // Stopped after the keys moved, before SETSLOT NODE.
    let (moved, moved_tag) = fill_slot(&cluster, a, "moved", 20).await;
    let migration = cluster.begin_migration(moved, b).await;
    drop(migration);
    // Stopped after SETSLOT IMPORTING and MIGRATING, before any key moved.
    let (begun, begun_tag) = fill_slot(&cluster, a, "begun", 20).await;
    let setslot = |slot: u16, state: &str, node: String| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(node);
        cmd
    };
    let _: () = cluster
        .node(c)
        .query(&setslot(begun, "IMPORTING", id(a).await))
        .await;
    let _: () = cluster
        .node(a)
        .query(&setslot(begun, "MIGRATING", id(c).await))
        .await;
    // Stopped after SETSLOT IMPORTING only: nothing moved, nothing to finish.
    let (stayed, stayed_tag) = fill_slot(&cluster, b, "stayed", 5).await;
    let _: () = cluster
        .node(c)
        .query(&setslot(stayed, "IMPORTING", id(b).await))
        .await;
    assert_eq!(
        in_flight(&cluster).await.len(),
        5,
        "{:?}",
        in_flight(&cluster).await
    );

    let (report, steps) = converge(&config(&cluster, 3, 0)).await;
    assert_eq!(report.slots_covered, SLOTS);
    let member = |port: u16| cluster.nodes.iter().position(|n| n.port == port).unwrap();
    for step in [
        Action::FinishMove {
            slot: moved,
            from: member(a),
            to: member(b),
        },
        Action::FinishMove {
            slot: begun,
            from: member(a),
            to: member(c),
        },
        Action::Stabilize {
            on: member(c),
            slot: stayed,
        },
    ] {
        assert!(steps.contains(&step), "{step:?} not in {steps:?}");
    }
    assert_eq!(in_flight(&cluster).await, Vec::<String>::new());
    cluster.wait_whole(CONVERGE_LIMIT).await.unwrap();
    // Every key is where its slot is served now (the even shares may have
    // moved the slot on since).
    for (slot, tag, count) in [
        (moved, &moved_tag, 20),
        (begun, &begun_tag, 20),
        (stayed, &stayed_tag, 5),
    ] {
        let port = cluster.master_of(slot).await;
        for k in 0..count {
            let v: Option<i64> = cluster
                .node(port)
                .query(redis::cmd("GET").arg(format!("{{{tag}}}:{k}")))
                .await;
            assert_eq!(v, Some(k), "{tag}:{k} on {port}");
        }
    }
}
