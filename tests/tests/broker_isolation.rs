//! One room's trouble never holds up another room's delivery: the Redis
//! broker's Pub/Sub reader only reads and dispatches, so neither a sentinel
//! that stopped answering nor a gap fill waiting for its history read stands
//! between a live message and its subscribers.
//!
//! Each node runs with a long `--redis-timeout` (30 s): anything on the
//! reader's path that waits for the stalled party would hold delivery far
//! longer than the tests wait for a message.
#![allow(clippy::unwrap_used)]

use chorus_testkit::{MASTER_NAME, RedisServer, SentinelGroup};
use chorus_tests::proxy::SilencingProxy;
use chorus_tests::{fleet, wait_until};
use serde_json::json;

#[tokio::test]
async fn a_stalled_sentinel_does_not_delay_delivery() {
    let group = SentinelGroup::start(1000).await;
    // The node's first sentinel is reached through a proxy that can make it
    // accept connections and commands but never answer.
    let proxy = SilencingProxy::start(group.sentinels[0].port).await;
    let url = format!(
        "redis+sentinel://{},{},{}/{MASTER_NAME}",
        proxy.addr(),
        group.sentinels[1].addr(),
        group.sentinels[2].addr()
    );
    let node = fleet(1, &url, &["--redis-timeout", "30s"]).await.remove(0);
    let mut sub = node.client().await;
    sub.subscribe("free").await;
    let mut p = node.client().await;
    assert_eq!(p.publish("free", json!(1)).await["offset"], 1);
    assert_eq!(sub.message().await["offset"], 1);

    proxy.hold_everything();
    wait_until(
        "the node to wait for an answer from the stalled sentinel",
        || async { proxy.held() > 0 },
    )
    .await;
    // The master has not moved: delivery goes on while the node waits.
    for i in 2..=4 {
        assert_eq!(p.publish("free", json!(i)).await["offset"], i);
        assert_eq!(sub.message().await["offset"], i);
    }
}

/// Appends a message to `room` the way a publish does (next offset, history
/// entry) but without its live notification: Redis has it, the nodes never
/// heard of it — as when a node's subscription missed a notification.
async fn append_unannounced(redis: &RedisServer, room: &str) -> u64 {
    let script = r#"
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
local e = redis.call('HGET', KEYS[1], 'e')
redis.call('XADD', KEYS[2], '0-' .. o, 'f',
  '{"op":"message","room":"' .. ARGV[1] .. '","data":"unannounced","offset":' .. o .. ',"epoch":"' .. e .. '"}')
return o
"#;
    redis
        .query(
            redis::cmd("EVAL")
                .arg(script)
                .arg(2)
                .arg(format!("chorus:room:{room}"))
                .arg(format!("chorus:hist:{room}"))
                .arg(room),
        )
        .await
}

#[tokio::test]
async fn a_pending_gap_fill_does_not_delay_delivery_in_other_rooms() {
    let redis = RedisServer::start().await;
    let publisher = fleet(1, &redis.url(), &["--delivery", "streams"])
        .await
        .remove(0);
    // The node reaches Redis through a proxy that can hold back the replies
    // to its reads (its subscription is left alone). No canary goes round
    // after the first, so a held canary publish cannot end the link.
    let proxy = SilencingProxy::start(redis.port).await;
    let flags = [
        "--delivery",
        "streams",
        "--redis-timeout",
        "30s",
        "--canary-interval",
        "1h",
        "--canary-timeout",
        "2h",
    ];
    let node = fleet(1, &proxy.url(), &flags).await.remove(0);
    let mut gapped = node.client().await;
    gapped.subscribe("gapped").await;
    let mut free = node.client().await;
    free.subscribe("free").await;
    let mut p = publisher.client().await;
    assert_eq!(p.publish("gapped", json!(1)).await["offset"], 1);
    assert_eq!(gapped.message().await["offset"], 1);

    assert_eq!(append_unannounced(&redis, "gapped").await, 2);
    proxy.hold_commands();
    // The node sees offset 3 after 1 and reads 2 from history: that read
    // now waits for the proxy.
    assert_eq!(p.publish("gapped", json!(3)).await["offset"], 3);
    assert_eq!(p.publish("free", json!("meanwhile")).await["offset"], 1);
    assert_eq!(free.message().await["data"], "meanwhile");

    // Once the read is answered, the gapped room gets every offset in order.
    proxy.release();
    let filled = gapped.message().await;
    assert_eq!(
        (filled["offset"].as_u64(), filled["data"].as_str()),
        (Some(2), Some("unannounced"))
    );
    assert_eq!(gapped.message().await["offset"], 3);
    assert!(node.metric("chorus_gap_filled_messages_total").await >= 1.0);
}
