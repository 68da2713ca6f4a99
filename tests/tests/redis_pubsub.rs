//! Fan-out across nodes through a real redis-server (and a Sentinel group).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chorus_testkit::{RedisOptions, RedisServer, SentinelGroup};
use chorus_tests::{Publisher, TestNode, WsClient, wait_until};
use serde_json::{Value, json};

async fn nodes(n: usize, broker: &str, extra: &[&str]) -> Vec<TestNode> {
    chorus_tests::fleet(n, broker, extra).await
}

#[tokio::test]
async fn a_message_published_on_any_node_reaches_subscribers_on_every_node() {
    let redis = RedisServer::start().await;
    let nodes = nodes(3, &redis.url(), &[]).await;
    let mut clients = Vec::new();
    for node in &nodes {
        let mut c = node.client().await;
        let ok = c.subscribe("lobby").await;
        assert_eq!(ok["offset"], 0);
        clients.push(c);
    }
    let epoch = clients[0].subscribe("lobby").await["epoch"].clone();

    // One publish from a client on each node.
    for (i, n) in (0..3).zip(1u64..) {
        let ok = clients[i].publish("lobby", json!({"from_node": i})).await;
        assert_eq!(
            (ok["op"].as_str(), ok["offset"].as_u64()),
            (Some("ok"), Some(n)),
            "{ok}"
        );
        for c in clients.iter_mut() {
            let m = c.message().await;
            assert_eq!(m["offset"], n);
            assert_eq!(m["epoch"], epoch);
            assert_eq!(m["data"]["from_node"], i);
        }
    }

    // HTTP publish on node 0 reaches the subscribers on nodes 1 and 2.
    let resp = reqwest::Client::new()
        .post(nodes[0].http("/api/v1/rooms/lobby/messages"))
        .json(&json!({"data": "from a backend"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["offset"], 4);
    for c in clients.iter_mut() {
        let m = c.message().await;
        assert_eq!(
            (m["offset"].as_u64(), m["data"].as_str()),
            (Some(4), Some("from a backend"))
        );
    }
}

#[tokio::test]
async fn a_node_receives_nothing_for_rooms_it_does_not_serve() {
    let redis = RedisServer::start().await;
    let nodes = nodes(3, &redis.url(), &[]).await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    let mut c = nodes[2].client().await;
    a.subscribe("busy").await;
    b.subscribe("busy").await;
    c.subscribe("quiet").await;
    assert_eq!(
        redis.numsub("chorus:room:busy").await,
        2,
        "one subscription per serving node"
    );
    assert_eq!(redis.numsub("chorus:room:quiet").await, 1);

    for i in 0..20 {
        a.publish("busy", json!(i)).await;
    }
    for _ in 0..20 {
        b.message().await;
    }
    c.sync().await;
    assert!(c.pending().is_empty());
    assert_eq!(
        nodes[2].metric("chorus_messages_delivered_total").await,
        0.0
    );
    assert_eq!(
        nodes[2]
            .metric("chorus_delivery_latency_seconds_count")
            .await,
        0.0,
        "node 2 never got the room's traffic"
    );

    // The last local subscriber leaving unsubscribes the node.
    let r = b
        .request(json!({"op": "unsubscribe", "room": "busy"}))
        .await;
    assert_eq!(r["op"], "ok");
    wait_until("node 1 to unsubscribe", || async {
        redis.numsub("chorus:room:busy").await == 1
    })
    .await;
}

#[tokio::test]
async fn concurrent_publishers_on_different_nodes_produce_one_order_everywhere() {
    let redis = RedisServer::start().await;
    let nodes = nodes(3, &redis.url(), &[]).await;
    let mut subs = Vec::new();
    for node in &nodes {
        let mut c = node.client().await;
        c.subscribe("race").await;
        subs.push(c);
    }
    const EACH: u64 = 200;
    let mut publishers = Vec::new();
    for (p, node) in nodes.iter().take(2).enumerate() {
        let mut c = node.client().await;
        publishers.push(tokio::spawn(async move {
            // Fire every publish without waiting, then collect the replies.
            for i in 0..EACH {
                c.send(
                    json!({"op": "publish", "id": i + 1, "room": "race", "data": {"p": p, "i": i}}),
                )
                .await;
            }
            let mut offsets = Vec::new();
            for _ in 0..EACH {
                let ok = c.frame().await;
                assert_eq!(ok["op"], "ok", "{ok}");
                offsets.push(ok["offset"].as_u64().unwrap());
            }
            offsets
        }));
    }
    let mut acked = HashSet::new();
    for p in publishers {
        for o in p.await.unwrap() {
            assert!(acked.insert(o), "offset {o} acknowledged twice");
        }
    }
    assert_eq!(acked, (1..=2 * EACH).collect::<HashSet<_>>());

    let mut sequences = Vec::new();
    for c in subs.iter_mut() {
        let mut seq = Vec::new();
        for _ in 0..2 * EACH {
            let m = c.message().await;
            seq.push((m["offset"].as_u64().unwrap(), m["data"].clone()));
        }
        sequences.push(seq);
    }
    let offsets: Vec<u64> = sequences[0].iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (1..=2 * EACH).collect::<Vec<_>>(),
        "offsets in order without gaps"
    );
    assert_eq!(sequences[0], sequences[1]);
    assert_eq!(sequences[0], sequences[2]);
    // Each publisher's own messages keep their order.
    for p in 0..2 {
        let mine: Vec<u64> = sequences[0]
            .iter()
            .filter(|(_, d)| d["p"] == p)
            .map(|(_, d)| d["i"].as_u64().unwrap())
            .collect();
        assert_eq!(mine, (0..EACH).collect::<Vec<_>>());
    }
}

/// Publishes until one is accepted; returns its offset.
async fn publish_until_accepted(c: &mut WsClient, room: &str, data: Value) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.publish(room, data.clone()).await;
        if r["op"] == "ok" {
            return r["offset"].as_u64().unwrap();
        }
        // `outcome_unknown`: it was in flight when the link broke.
        assert!(
            r["code"] == "unavailable" || r["code"] == "outcome_unknown",
            "{r}"
        );
        assert!(Instant::now() < deadline, "publishes never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn redis_restart_publishes_fail_fast_then_the_same_connections_recover() {
    let mut redis = RedisServer::start().await;
    let nodes = nodes(2, &redis.url(), &["--redis-timeout", "500ms"]).await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    a.subscribe("r").await;
    b.subscribe("r").await;
    a.publish("r", json!("before")).await;
    assert_eq!(b.message().await["data"], "before");
    a.message().await;

    redis.kill();
    wait_until("/readyz to turn 503", || async {
        reqwest::get(nodes[1].http("/readyz"))
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    let started = Instant::now();
    let r = a.publish("r", json!("during")).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{r}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "unavailable took {:?}",
        started.elapsed()
    );
    let resp = reqwest::Client::new()
        .post(nodes[1].http("/api/v1/rooms/r/messages"))
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(nodes[0].metric("chorus_publish_errors_total").await >= 1.0);
    assert_eq!(nodes[0].metric("chorus_broker_up").await, 0.0);

    redis.restart().await;
    let back = Instant::now();
    let offset = publish_until_accepted(&mut a, "r", json!("after")).await;
    let m = b.message().await;
    assert_eq!(
        (m["data"].as_str(), m["offset"].as_u64()),
        (Some("after"), Some(offset))
    );
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "delivery resumed only after {:?}",
        back.elapsed()
    );
    // Redis lost the room (no persistence): a new epoch, offsets from 1.
    assert_eq!(offset, 1);
    let first = a.message().await;
    assert_eq!(first["data"], "after");
    wait_until("/readyz to turn 200", || async {
        reqwest::get(nodes[1].http("/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(nodes[1].metric("chorus_broker_reconnects_total").await >= 1.0);
}

#[tokio::test]
async fn a_killed_subscription_is_noticed_and_healed() {
    let redis = RedisServer::start().await;
    let nodes = nodes(2, &redis.url(), &[]).await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    a.subscribe("k").await;
    b.subscribe("k").await;
    let killed: i64 = redis
        .query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"))
        .await;
    assert_eq!(killed, 2);
    // Publish until node 1's subscriber hears again, without reconnecting the client.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let offset = publish_until_accepted(&mut a, "k", json!("ping")).await;
        b.sync().await;
        if b.pending().iter().any(|m| m["offset"] == offset) {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 never re-subscribed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(redis.numsub("chorus:room:k").await, 2);
    assert!(nodes[1].metric("chorus_redis_canary_rtt_seconds").await > 0.0);
}

#[tokio::test]
async fn sentinel_failover_keeps_the_same_client_connections_working() {
    let mut group = SentinelGroup::start(1000).await;
    let url = group.broker_url();
    let nodes = nodes(2, &url, &["--redis-timeout", "500ms"]).await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    a.subscribe("f").await;
    b.subscribe("f").await;
    let before = publish_until_accepted(&mut a, "f", json!("before")).await;
    assert_eq!(b.message().await["offset"], before);
    a.message().await;

    group.fail_over().await;

    // Publishes recover without restarting any node, and both nodes deliver
    // to the very same client connections.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut got_a, mut got_b) = (false, false);
    while !(got_a && got_b) {
        let offset = publish_until_accepted(&mut a, "f", json!("after")).await;
        a.sync().await;
        b.sync().await;
        got_a |= a
            .pending()
            .iter()
            .any(|m| m["offset"] == offset && m["data"] == "after");
        got_b |= b
            .pending()
            .iter()
            .any(|m| m["offset"] == offset && m["data"] == "after");
        assert!(
            Instant::now() < deadline,
            "delivery did not resume after the failover (a: {got_a}, b: {got_b})"
        );
    }
    assert_eq!(
        group.replicas[0].numsub("chorus:room:f").await,
        2,
        "both nodes subscribed on the new master"
    );
}

#[tokio::test]
async fn a_silently_dead_subscription_is_caught_by_the_canary_and_healed() {
    use chorus_tests::proxy::SilencingProxy;
    let redis = RedisServer::start().await;
    let proxy = SilencingProxy::start(redis.port).await;
    let publisher = nodes(1, &redis.url(), &[]).await.remove(0);
    let silent = nodes(
        1,
        &proxy.url(),
        &["--canary-interval", "200ms", "--canary-timeout", "1s"],
    )
    .await
    .remove(0);
    let mut p = publisher.client().await;
    let mut s = silent.client().await;
    s.subscribe("quiet").await;
    p.publish("quiet", json!("before")).await;
    assert_eq!(s.message().await["data"], "before");

    proxy.silence_subscribers();
    // The subscription still looks fine to Redis: nothing is closed.
    assert_eq!(redis.numsub("chorus:room:quiet").await, 1);

    // The node notices through the canary, reconnects and re-subscribes; the
    // same client connection hears new messages again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let offset = publish_until_accepted(&mut p, "quiet", json!("after")).await;
        s.sync().await;
        if s.pending().iter().any(|m| m["offset"] == offset) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the silent subscription was never replaced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(silent.metric("chorus_broker_reconnects_total").await >= 1.0);
}

#[tokio::test]
async fn the_redis_password_comes_from_the_url_or_a_file() {
    let redis = RedisServer::start_with(RedisOptions {
        password: Some("s3cret".into()),
        ..RedisOptions::default()
    })
    .await;
    let in_url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let a = nodes(1, &in_url, &[]).await.remove(0);
    let file = std::env::temp_dir().join(format!("chorus-test-pw-{}", redis.port));
    std::fs::write(&file, "s3cret\n").unwrap();
    let plain = format!("redis://127.0.0.1:{}", redis.port);
    let b = nodes(
        1,
        &plain,
        &["--redis-password-file", file.to_str().unwrap()],
    )
    .await
    .remove(0);
    let mut sub = b.client().await;
    sub.subscribe("auth").await;
    let mut publ = a.client().await;
    assert_eq!(publ.publish("auth", json!("hi")).await["op"], "ok");
    assert_eq!(sub.message().await["data"], "hi");

    // A wrong password keeps the node unready, with the reason in /readyz.
    let wrong = TestNode::start(&[
        "--broker",
        &format!("redis://:nope@127.0.0.1:{}", redis.port),
    ])
    .await;
    wait_until("/readyz to name the auth failure", || async {
        let resp = reqwest::get(wrong.http("/readyz")).await.unwrap();
        resp.status() == 503
            && resp
                .text()
                .await
                .unwrap()
                .to_lowercase()
                .contains("password")
    })
    .await;
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_their_room_in_every_broker() {
    let redis = RedisServer::start().await;
    for broker in ["memory://".to_string(), redis.url()] {
        let node = nodes(1, &broker, &[]).await.remove(0);
        let mut sub = node.client().await;
        sub.subscribe("chat:lobby").await;
        let mut c = node.client().await;
        // Room `chat` with key `lobby:m1`, then room `chat:lobby` with key
        // `m1`: two different publishes, though both joined with `:` read the same.
        let first = c
            .request(json!({"op": "publish", "room": "chat", "data": "in chat", "key": "lobby:m1"}))
            .await;
        let second = c
            .request(json!({"op": "publish", "room": "chat:lobby", "data": "in chat:lobby", "key": "m1"}))
            .await;
        assert_eq!(
            (first["op"].as_str(), first["offset"].as_u64()),
            (Some("ok"), Some(1)),
            "{broker}: {first}"
        );
        assert_eq!(
            (second["op"].as_str(), second["offset"].as_u64()),
            (Some("ok"), Some(1)),
            "{broker}: the second publish is the first of its own room: {second}"
        );
        assert_ne!(second["epoch"], first["epoch"], "{broker}");
        let m = sub.message().await;
        assert_eq!(
            (m["data"].as_str(), m["offset"].as_u64()),
            (Some("in chat:lobby"), Some(1)),
            "{broker}"
        );
    }
}

#[tokio::test]
async fn a_publish_without_an_answer_says_its_outcome_is_unknown_and_a_keyed_retry_is_safe() {
    let redis = RedisServer::start().await;
    let node = nodes(1, &redis.url(), &["--redis-timeout", "200ms"])
        .await
        .remove(0);
    let mut sub = node.client().await;
    sub.subscribe("slow").await;
    let mut c = node.client().await;
    let publish = json!({"op": "publish", "room": "slow", "data": "once", "key": "k-1"});
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Redis holds every write for a while: the publish reaches it, but its
    // answer cannot come back within --redis-timeout. (The node then resets
    // its link, so an attempt made meanwhile is refused as `unavailable`.)
    let pause_writes = || async {
        wait_until("the link", || async { node.node.ready().is_ok() }).await;
        let _: String = redis
            .query(redis::cmd("CLIENT").arg("PAUSE").arg(1000).arg("WRITE"))
            .await;
    };
    loop {
        pause_writes().await;
        let r = c.request(publish.clone()).await;
        if r["code"] == "outcome_unknown" {
            break;
        }
        assert_eq!(r["code"], "unavailable", "{r}");
        assert!(Instant::now() < deadline, "never outcome_unknown: {r}");
    }
    // The same over HTTP: 504 with that code.
    loop {
        pause_writes().await;
        let resp = http
            .post(node.http("/api/v1/rooms/slow/messages"))
            .json(&json!({"data": "once", "key": "k-1"}))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let code = resp.json::<Value>().await.unwrap()["error"]["code"].clone();
        if status == 504 {
            assert_eq!(code, "outcome_unknown");
            break;
        }
        assert_eq!((status.as_u16(), code), (503, json!("unavailable")));
        assert!(Instant::now() < deadline, "never 504");
    }
    // Retrying with the same key until it is answered delivers it once.
    let ok = loop {
        let r = c.request(publish.clone()).await;
        if r["op"] == "ok" {
            break r;
        }
        assert!(Instant::now() < deadline, "publishes never recovered: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let m = sub.message().await;
    assert_eq!((&m["data"], &m["offset"]), (&json!("once"), &ok["offset"]));
    sub.sync().await;
    assert!(
        sub.pending().is_empty(),
        "delivered more than once: {:?}",
        sub.pending()
    );
}

#[tokio::test]
async fn a_repeated_subscribe_is_answered_without_losing_queued_messages() {
    let redis = RedisServer::start().await;
    let node = nodes(1, &redis.url(), &[]).await.remove(0);
    let mut sub = node.client().await;
    assert_eq!(sub.subscribe("again").await["offset"], 0);
    let mut publishers = Vec::new();
    for _ in 0..3 {
        publishers.push(Publisher::start(node.client().await, "again"));
    }
    publishers[0].wait_for(20).await;
    // The app subscribes again and again (chorus.js sends exactly this when
    // asked twice) while messages keep coming: each `ok` says how far the
    // client already got, and every message follows exactly once, in order.
    let mut last = 0;
    fn expect(m: Value, last: &mut u64) {
        assert_eq!(m["offset"].as_u64(), Some(*last + 1), "{m}");
        *last += 1;
    }
    for _ in 0..30 {
        let ok = sub.subscribe("again").await;
        while let Some(m) = sub.pending().front().cloned() {
            sub.message().await;
            expect(m, &mut last);
        }
        assert_eq!(
            ok["offset"].as_u64(),
            Some(last),
            "the ok names the last message sent before it: {ok}"
        );
    }
    let mut end = 0;
    for p in publishers {
        end = end.max(p.stop().await);
    }
    while last < end {
        let m = sub.message().await;
        expect(m, &mut last);
    }
    sub.sync().await;
    assert!(sub.pending().is_empty(), "{:?}", sub.pending());
}

/// Publishes `n` and checks that it is acknowledged and received as offset `n`.
async fn publish_and_receive(p: &mut WsClient, sub: &mut WsClient, room: &str, n: u64) {
    assert_eq!(p.publish(room, json!(n)).await["offset"], n);
    assert_eq!(sub.message().await["offset"], n);
}

/// A node on `broker`, a subscriber of room `ledger` with the epoch it was
/// told, and a publisher.
async fn ledger(broker: &str) -> (TestNode, WsClient, Value, WsClient) {
    let node = nodes(1, broker, &["--redis-timeout", "500ms"])
        .await
        .remove(0);
    let mut sub = node.client().await;
    let epoch = sub.subscribe("ledger").await["epoch"].clone();
    let p = node.client().await;
    (node, sub, epoch, p)
}

/// Publishes once Redis is back after losing acknowledged messages of a room
/// last known in `epoch`: the message starts a new epoch at offset 1 rather
/// than reusing an offset. Returns it as the subscriber got it.
async fn publish_after_the_loss(
    p: &mut WsClient,
    sub: &mut WsClient,
    room: &str,
    epoch: &Value,
) -> Value {
    publish_until_accepted(p, room, json!("after")).await;
    let m = sub.message().await;
    assert_eq!(m["data"], "after");
    assert_ne!(
        m["epoch"], *epoch,
        "offset {} given out again under the same epoch",
        m["offset"]
    );
    assert_eq!(m["offset"], 1, "{m}");
    m
}

#[tokio::test]
async fn a_redis_restart_from_an_older_snapshot_changes_the_epoch_instead_of_reusing_offsets() {
    let mut redis = RedisServer::start().await;
    let (node, mut sub, epoch, mut p) = ledger(&redis.url()).await;
    for n in 1..=10 {
        if n == 6 {
            // A snapshot of the room at offset 5; 6..10 are acknowledged
            // after it and are lost when Redis restarts from it.
            let _: String = redis.query(&redis::cmd("SAVE")).await;
        }
        publish_and_receive(&mut p, &mut sub, "ledger", n).await;
    }
    redis.restart().await;
    let m = publish_after_the_loss(&mut p, &mut sub, "ledger", &epoch).await;
    // A client joining now is told the new epoch.
    let mut late = node.client().await;
    let ok = late.subscribe("ledger").await;
    assert_eq!((&ok["epoch"], &ok["offset"]), (&m["epoch"], &json!(1)));
}

#[tokio::test]
async fn a_failover_to_a_replica_that_missed_writes_changes_the_epoch() {
    let mut group = SentinelGroup::start(1000).await;
    let (_node, mut sub, epoch, mut p) = ledger(&group.broker_url()).await;
    for n in 1..=10 {
        publish_and_receive(&mut p, &mut sub, "ledger", n).await;
    }
    group.wait_replicas_synced().await;
    // 11..20 are acknowledged by the master alone.
    let frozen = group.stall_replica().await;
    for n in 11..=20 {
        publish_and_receive(&mut p, &mut sub, "ledger", n).await;
    }
    group.master.kill();
    frozen.await.unwrap();
    group.fail_over().await;
    publish_after_the_loss(&mut p, &mut sub, "ledger", &epoch).await;
}
