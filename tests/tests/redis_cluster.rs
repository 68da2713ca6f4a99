//! Sharded Pub/Sub on a real Redis Cluster (three shards of a master and a
//! replica, from the test kit): nodes deliver across each other through
//! `SSUBSCRIBE`/`SPUBLISH` on the shard that serves each room, follow a
//! slot that moves and a master that fails over, and recover durable rooms
//! on every shard.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};

use chorus_server::broker::redis::cluster::room_slot;
use chorus_testkit::{ClusterOptions, RedisCluster};
use chorus_tests::{TestNode, WsClient, wait_until};
use serde_json::json;

async fn nodes(n: usize, cluster: &RedisCluster, extra: &[&str]) -> Vec<TestNode> {
    chorus_tests::fleet(n, &cluster.broker_url(), extra).await
}

/// `per_master` room names for each master, by the master's port.
async fn rooms_by_master(cluster: &RedisCluster, per_master: usize) -> BTreeMap<u16, Vec<String>> {
    let slots = cluster.slots().await;
    let mut out: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let room = format!("room-{i}");
        let slot = room_slot(&room);
        let port = slots
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .unwrap()
            .2;
        let rooms = out.entry(port).or_default();
        if rooms.len() < per_master {
            rooms.push(room);
        }
        if out.len() == slots.len().min(3) && out.values().all(|r| r.len() == per_master) {
            return out;
        }
    }
    unreachable!()
}

/// Calls of `command` a node ran so far (`INFO commandstats`).
async fn calls(cluster: &RedisCluster, port: u16, command: &str) -> u64 {
    let stats: String = cluster
        .node(port)
        .query(redis::cmd("INFO").arg("commandstats"))
        .await;
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Reads `count` messages and returns their `(room, offset)` in arrival order.
async fn read_messages(client: &mut WsClient, count: usize) -> Vec<(String, u64)> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let m = client.message().await;
        out.push((
            m["room"].as_str().unwrap().to_string(),
            m["offset"].as_u64().unwrap(),
        ));
    }
    out
}

#[tokio::test]
async fn rooms_spread_over_every_shard_and_each_is_delivered_in_one_order_on_every_node() {
    let cluster = RedisCluster::start().await;
    let nodes = nodes(3, &cluster, &[]).await;
    let rooms = rooms_by_master(&cluster, 2).await;
    assert_eq!(rooms.len(), 3, "a room on each shard: {rooms:?}");
    let all: Vec<String> = rooms.values().flatten().cloned().collect();

    let mut subs = Vec::new();
    for node in &nodes {
        let mut c = node.client().await;
        for room in &all {
            assert_eq!(c.subscribe(room).await["offset"], 0);
        }
        subs.push(c);
    }
    // Each node subscribed each room once, on the shard serving it only.
    for (port, own) in &rooms {
        for room in &all {
            let numsub = cluster
                .shard_numsub(&format!("chorus:room:{{{room}}}"))
                .await;
            let want = if own.contains(room) { 3 } else { 0 };
            let here = numsub.iter().find(|(p, _)| p == port).unwrap().1;
            assert_eq!(here, want, "{room} on {port}: {numsub:?}");
        }
    }

    let before: HashMap<u16, u64> = {
        let mut m = HashMap::new();
        for port in rooms.keys() {
            m.insert(*port, calls(&cluster, *port, "evalsha").await);
        }
        m
    };
    // Two publishers on two nodes fire at every room at once.
    const EACH: u64 = 30;
    let mut publishers = Vec::new();
    for (p, node) in nodes.iter().take(2).enumerate() {
        let mut c = node.client().await;
        let all = all.clone();
        publishers.push(tokio::spawn(async move {
            let mut id = 0;
            for i in 0..EACH {
                for room in &all {
                    id += 1;
                    c.send(
                        json!({"op": "publish", "id": id, "room": room, "data": {"p": p, "i": i}}),
                    )
                    .await;
                }
            }
            for _ in 0..id {
                let ok = c.frame().await;
                assert_eq!(ok["op"], "ok", "{ok}");
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let total = all.len() * 2 * EACH as usize;
    for c in subs.iter_mut() {
        let seen = read_messages(c, total).await;
        let mut per_room: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (room, offset) in seen {
            per_room.entry(room).or_default().push(offset);
        }
        // Every node hands each room's messages over in offset order: the
        // one order the room's shard gave them.
        for (room, offsets) in &per_room {
            assert_eq!(*offsets, (1..=2 * EACH).collect::<Vec<_>>(), "{room}");
        }
    }
    // Each shard's Redis ran the publish script for its own rooms' messages
    // only (one EVALSHA per publish), none of the others'.
    for (port, own) in &rooms {
        let ran = calls(&cluster, *port, "evalsha").await - before[port];
        assert_eq!(
            ran,
            own.len() as u64 * 2 * EACH,
            "publish scripts on {port}"
        );
    }
}

/// Reads messages until `through` arrives; asserts they are contiguous from
/// `first` in one epoch.
async fn read_contiguous(c: &mut WsClient, first: u64, through: u64) -> String {
    let mut epoch = String::new();
    for want in first..=through {
        let m = c.message().await;
        assert_eq!(
            m["offset"].as_u64(),
            Some(want),
            "expected offset {want}, got {m}"
        );
        let e = m["epoch"].as_str().unwrap();
        if epoch.is_empty() {
            epoch = e.to_string();
        }
        assert_eq!(e, epoch, "{m}");
    }
    epoch
}

/// Publishes `count` messages one after another; every one acknowledged.
async fn publish_n(c: &mut WsClient, room: &str, count: u64) {
    for _ in 0..count {
        let ok = c.publish(room, json!("m")).await;
        assert_eq!(ok["op"], "ok", "{ok}");
    }
}

/// Waits until a node subscribed `room` on the master on `port` (and on no
/// other).
async fn wait_subscribed_on(cluster: &RedisCluster, room: &str, port: u16) {
    let channel = format!("chorus:room:{{{room}}}");
    wait_until(
        &format!("{room} to be subscribed on {port} only"),
        || async {
            let numsub = cluster.shard_numsub(&channel).await;
            numsub.iter().all(|(p, n)| (*n > 0) == (*p == port))
        },
    )
    .await;
}

/// The slot of `room` and a master other than the one serving it.
async fn slot_and_another_master(cluster: &RedisCluster, room: &str) -> (u16, u16) {
    let slot = room_slot(room);
    let from = cluster.master_of(slot).await;
    let masters = cluster.masters().await;
    (slot, *masters.iter().find(|p| **p != from).unwrap())
}

#[tokio::test]
async fn a_busy_durable_room_is_delivered_whole_while_its_slot_moves() {
    let cluster = RedisCluster::start().await;
    let nodes = nodes(2, &cluster, &["--delivery", "streams"]).await;
    let room = "busy";
    let (slot, to) = slot_and_another_master(&cluster, room).await;
    let mut sub = nodes[1].client().await;
    sub.subscribe(room).await;
    let mut publisher = nodes[0].client().await;

    publish_n(&mut publisher, room, 20).await;
    // The room's keys move; its old master answers ASK for them until the
    // slot is handed over: publishes go on through the new master.
    let migration = cluster.begin_migration(slot, to).await;
    publish_n(&mut publisher, room, 20).await;
    assert!(calls(&cluster, to, "asking").await >= 20, "ASK followed");
    migration.finish(&cluster).await;
    publish_n(&mut publisher, room, 20).await;

    // Nothing lost, nothing twice, one epoch (history moved with the room).
    read_contiguous(&mut sub, 1, 60).await;
    wait_subscribed_on(&cluster, room, to).await;
    publish_n(&mut publisher, room, 1).await;
    read_contiguous(&mut sub, 61, 61).await;
}

#[tokio::test]
async fn a_room_whose_slot_moved_is_subscribed_on_its_new_shard() {
    let cluster = RedisCluster::start().await;
    let nodes = nodes(2, &cluster, &[]).await;
    let room = "moving";
    let (slot, to) = slot_and_another_master(&cluster, room).await;
    let mut sub = nodes[1].client().await;
    sub.subscribe(room).await;
    let mut publisher = nodes[0].client().await;
    publish_n(&mut publisher, room, 5).await;
    let epoch = read_contiguous(&mut sub, 1, 5).await;

    cluster.migrate_slot(slot, to).await;
    // The old master pushed SUNSUBSCRIBE; the node subscribed the room on
    // the new one.
    wait_subscribed_on(&cluster, room, to).await;
    let ok = publisher.publish(room, json!("after")).await;
    assert_eq!(ok["op"], "ok", "{ok}");
    let m = sub.message().await;
    assert_eq!(m["data"], "after");
    // pubsub mode: the room changed masters, so its counter is trusted no
    // further than a failover's (a new epoch, clients are told).
    assert_ne!(m["epoch"], epoch.as_str(), "{m}");
    assert_eq!(
        (m["offset"].as_u64(), &m["epoch"]),
        (ok["offset"].as_u64(), &ok["epoch"])
    );
}

#[tokio::test]
async fn a_shard_whose_master_dies_delivers_again_once_its_replica_takes_over() {
    let mut cluster = RedisCluster::start().await;
    let nodes = nodes(2, &cluster, &["--redis-timeout", "500ms"]).await;
    let rooms = rooms_by_master(&cluster, 1).await;
    let mut sub = nodes[1].client().await;
    let all: Vec<&String> = rooms.values().flatten().collect();
    for room in &all {
        sub.subscribe(room).await;
    }
    let mut publisher = nodes[0].client().await;
    let victim = all[0].clone();
    let slot = room_slot(&victim);

    let promoted = cluster.kill_master_of(slot).await;
    // The nodes find the new master and subscribe its rooms there.
    for node in &nodes {
        wait_until("the node to be ready again", || async {
            node.node.ready().is_ok()
        })
        .await;
    }
    wait_subscribed_on(&cluster, &victim, promoted).await;
    for room in &all {
        let ok = publisher.publish(room, json!(room)).await;
        assert_eq!(ok["op"], "ok", "{room}: {ok}");
        let m = sub.message().await;
        assert_eq!(
            (m["room"].as_str(), &m["data"]),
            (Some(room.as_str()), &json!(room))
        );
    }
}

#[tokio::test]
async fn a_durable_client_that_was_away_gets_what_it_missed_on_every_shard() {
    let cluster = RedisCluster::start().await;
    let nodes = nodes(2, &cluster, &["--delivery", "streams"]).await;
    let rooms = rooms_by_master(&cluster, 1).await;
    let all: Vec<String> = rooms.values().flatten().cloned().collect();
    let mut publisher = nodes[0].client().await;
    let mut sub = nodes[1].client().await;
    let mut since = HashMap::new();
    for room in &all {
        let ok = sub.subscribe(room).await;
        publish_n(&mut publisher, room, 3).await;
        let epoch = read_contiguous(&mut sub, 1, 3).await;
        assert_eq!(ok["epoch"], epoch.as_str());
        since.insert(room.clone(), epoch);
    }
    sub.close().await;
    for room in &all {
        publish_n(&mut publisher, room, 10).await;
    }

    // Back on the other node: each room from where it was left.
    let mut back = nodes[0].client().await;
    for room in &all {
        let ok = back
            .request(json!({"op": "subscribe", "room": room, "since": {"epoch": since[room], "offset": 3}}))
            .await;
        assert_eq!(
            (ok["recovered"].as_bool(), ok["missed"].as_u64()),
            (Some(true), Some(10)),
            "{room}: {ok}"
        );
        read_contiguous(&mut back, 4, 13).await;
    }
}

#[tokio::test]
async fn every_shard_has_a_canary_and_a_stalled_shard_is_noticed_then_healed() {
    // A node timeout well past the stall: the stalled master is not failed over.
    let cluster = RedisCluster::launch(ClusterOptions {
        node_timeout: std::time::Duration::from_secs(30),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let nodes = nodes(
        1,
        &cluster,
        &[
            "--canary-interval",
            "100ms",
            "--canary-timeout",
            "1s",
            "--redis-timeout",
            "500ms",
        ],
    )
    .await;
    for port in cluster.masters().await {
        let channels: Vec<String> = cluster
            .node(port)
            .query(
                redis::cmd("PUBSUB")
                    .arg("SHARDCHANNELS")
                    .arg("chorus:canary:*"),
            )
            .await;
        assert_eq!(channels.len(), 1, "one canary on {port}: {channels:?}");
    }
    assert!(nodes[0].metric("chorus_redis_canary_rtt_seconds").await > 0.0);

    let rooms = rooms_by_master(&cluster, 1).await;
    let (stalled, room) = rooms
        .iter()
        .next()
        .map(|(p, r)| (*p, r[0].clone()))
        .unwrap();
    cluster.node(stalled).freeze();
    wait_until("the node to notice the stalled shard", || async {
        nodes[0]
            .node
            .ready()
            .is_err_and(|why| why.contains(&format!(":{stalled}")))
    })
    .await;
    cluster.node(stalled).thaw();
    wait_until("the node to be ready again", || async {
        nodes[0].node.ready().is_ok()
    })
    .await;
    let mut c = nodes[0].client().await;
    c.subscribe(&room).await;
    let ok = c.publish(&room, json!("healed")).await;
    assert_eq!(ok["op"], "ok", "{ok}");
    assert_eq!(c.message().await["data"], "healed");
}
