//! Durable delivery across a Sentinel failover: every acknowledged publish
//! is delivered, or its loss is announced (new epoch + `history_gone`).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_testkit::SentinelGroup;
use chorus_tests::{Event, WsClient, wait_until};
use serde_json::json;

type Key = (String, u64); // (epoch, offset)

const FLAGS: &[&str] = &["--delivery", "streams", "--redis-timeout", "500ms"];

#[tokio::test]
async fn no_acknowledged_publish_is_lost_silently_in_a_failover() {
    let mut group = SentinelGroup::start(1000).await;
    let url = group.broker_url();
    let nodes = chorus_tests::fleet(2, &url, FLAGS).await;
    let mut subs = Vec::new();
    for node in &nodes {
        let mut c = node.client().await;
        c.subscribe("ledger").await;
        subs.push(c);
    }

    // Publisher: one publish after another, remembering what was acknowledged.
    let acked: Arc<Mutex<BTreeMap<Key, u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publisher = nodes[0].client().await;
    let (acked2, stop2) = (acked.clone(), stop.clone());
    let pub_task = tokio::spawn(async move {
        let mut n = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            n += 1;
            let ok = publisher.publish("ledger", json!({"n": n})).await;
            if ok["op"] == "ok" {
                let key = (
                    ok["epoch"].as_str().unwrap().to_string(),
                    ok["offset"].as_u64().unwrap(),
                );
                acked2.lock().unwrap().insert(key, n);
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    let count = || acked.lock().unwrap().len();
    wait_until("50 acknowledged publishes", || async { count() >= 50 }).await;
    group.fail_over().await;
    let before = count();
    wait_until(
        "50 more acknowledged publishes after the failover",
        || async { count() >= before + 50 },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    pub_task.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let mut epochs: BTreeMap<String, (u64, u64, usize)> = BTreeMap::new();
    for (e, o) in acked.keys() {
        let x = epochs.entry(e.clone()).or_insert((u64::MAX, 0, 0));
        x.0 = x.0.min(*o);
        x.1 = x.1.max(*o);
        x.2 += 1;
    }
    println!("acked epochs (first, last, count): {epochs:?}");

    let mut report = Vec::new();
    for (i, mut sub) in subs.into_iter().enumerate() {
        let (received, gone) = drain(&mut sub).await;
        let mut delivered = 0;
        let mut announced = 0;
        for (key, n) in &acked {
            match received.get(key) {
                Some(got) => {
                    assert_eq!(got, n, "subscriber {i}: {key:?} carried another message");
                    delivered += 1;
                }
                None => {
                    assert!(
                        gone.contains(&key.0),
                        "subscriber {i}: acknowledged {key:?} (n={n}) was lost without an epoch change"
                    );
                    announced += 1;
                }
            }
        }
        report.push(format!(
            "subscriber {i}: {delivered} delivered, {announced} lost with history_gone"
        ));
    }
    println!(
        "acknowledged publishes: {}; {}",
        acked.len(),
        report.join("; ")
    );
}

/// Reads until quiet. When the epoch changes, re-subscribes with `since` the
/// last message of the old epoch, as a client should; returns what arrived
/// and the epochs the server declared gone.
async fn drain(sub: &mut WsClient) -> (HashMap<Key, u64>, Vec<String>) {
    let mut received = HashMap::new();
    let mut gone = Vec::new();
    let mut last: Option<Key> = None;
    // The old epoch a re-subscribe with `since` was sent for.
    let mut asked: Option<String> = None;
    let mut next_id = 1000;
    loop {
        let frame = match sub.read_event(Duration::from_millis(1500)).await {
            None => break,
            Some(Event::Closed(code)) => panic!("subscriber closed: {code:?}"),
            Some(Event::Frame(v)) => v,
        };
        if frame["op"] == "ok" {
            if let Some(epoch) = asked.take()
                && frame["code"] == "history_gone"
            {
                gone.push(epoch);
            }
            continue;
        }
        assert_eq!(frame["op"], "message", "{frame}");
        let key: Key = (
            frame["epoch"].as_str().unwrap().to_string(),
            frame["offset"].as_u64().unwrap(),
        );
        if let Some((epoch, offset)) = &last
            && *epoch != key.0
        {
            asked = Some(epoch.clone());
            next_id += 1;
            sub.send(json!({"op": "subscribe", "id": next_id, "room": "ledger", "since": {"epoch": epoch, "offset": offset}}))
                .await;
        }
        received.insert(key.clone(), frame["data"]["n"].as_u64().unwrap());
        last = Some(key);
    }
    (received, gone)
}

#[tokio::test]
async fn acknowledged_messages_the_new_master_lacks_change_the_epoch() {
    let mut group = SentinelGroup::start(1000).await;
    let url = group.broker_url();
    let node = chorus_tests::fleet(1, &url, FLAGS).await.remove(0);
    let mut publisher = node.client().await;
    let epoch = publisher.subscribe("ledger").await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let mut n = 0u64;
    for _ in 0..20 {
        n += 1;
        assert_eq!(
            publisher.publish("ledger", json!({"n": n})).await["op"],
            "ok"
        );
    }
    group.wait_replicas_synced().await;
    // Acknowledged by the master from here on, but the replica cannot get
    // them before the master dies.
    let frozen = group.stall_replica().await;
    for _ in 0..10 {
        n += 1;
        assert_eq!(
            publisher.publish("ledger", json!({"n": n})).await["offset"],
            n
        );
    }
    group.master.kill();
    frozen.await.unwrap();
    let acked_last = n;
    group.fail_over().await;

    // A client that saw up to `acked_last - 5` asks for the rest: the new
    // master lacks them, so the room has a new epoch and the answer is
    // history_gone — not a silent hole.
    let mut away = node.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ok = loop {
        let ok = away
            .request(json!({"op": "subscribe", "room": "ledger", "since": {"epoch": epoch, "offset": acked_last - 5}}))
            .await;
        if ok["op"] == "ok" {
            break ok;
        }
        assert_eq!(ok["code"], "unavailable", "{ok}");
        assert!(
            std::time::Instant::now() < deadline,
            "the node never reached the new master"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (ok["recovered"].as_bool(), ok["code"].as_str()),
        (Some(false), Some("history_gone")),
        "{ok}"
    );
    assert_ne!(ok["epoch"], epoch, "the room got a new epoch");
    assert_eq!(node.metric("chorus_epoch_resets_total").await, 1.0);
    let next = publisher.publish("ledger", json!({"n": n + 1})).await;
    assert_eq!(
        next["epoch"], ok["epoch"],
        "new messages carry the new epoch"
    );
}
