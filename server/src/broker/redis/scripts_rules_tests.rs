//! The scripts run against a real redis-server do what the pure rules of
//! `broker::continuity` say (the rules must run in Redis, atomically with the
//! counter; this ties the Lua to them).
#![allow(clippy::unwrap_used)]

use chorus_testkit::RedisServer;
use redis::aio::MultiplexedConnection;

use super::*;
use crate::broker::continuity::{Cursor, lacks_acknowledged, starts_new_epoch};

async fn connect(redis: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A room hash with epoch `e`, offset 5 and, when given, fence `r`.
async fn set_room(conn: &mut MultiplexedConnection, key: &str, epoch: &str, fence: Option<&str>) {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(key).arg("e").arg(epoch).arg("o").arg(5);
    if let Some(fence) = fence {
        cmd.arg("r").arg(fence);
    }
    let _: i64 = cmd.query_async(conn).await.unwrap();
}

#[tokio::test]
async fn publishes_and_position_reads_start_a_new_epoch_as_the_fence_rule_says() {
    let redis = RedisServer::start().await;
    let mut conn = connect(&redis).await;
    // (the room's epoch and fence, if it has an epoch; the master's fence)
    let cases: [(Option<Option<&str>>, &str); 7] = [
        (None, ""),
        (None, "f1"),
        (Some(Some("")), ""),
        (Some(Some("f1")), "f1"),
        (Some(Some("f0")), "f1"),
        (Some(None), "f1"),
        (Some(Some("")), "f1"),
    ];
    for (i, (room, master_fence)) in cases.into_iter().enumerate() {
        let want = starts_new_epoch(room.is_some(), room.flatten(), master_fence);
        for script in ["position", "publish"] {
            let key = format!("chorus:room:{script}-{i}");
            if let Some(fence) = room {
                set_room(&mut conn, &key, "old", fence).await;
            }
            let (offset, epoch): (u64, String) = if script == "position" {
                POSITION
                    .key(&key)
                    .key("")
                    .arg("fresh")
                    .arg(60)
                    .arg(master_fence)
                    .invoke_async(&mut conn)
                    .await
                    .unwrap()
            } else {
                let mut inv = PUBLISH.key(&key);
                inv.key("").key("").key("");
                for arg in ["ch", "{", "}", "1", "fresh", "60", "0", "60", "0", "", ""] {
                    inv.arg(arg);
                }
                let (offset, epoch, _): (u64, String, u8) =
                    inv.arg(master_fence).invoke_async(&mut conn).await.unwrap();
                (offset - 1, epoch)
            };
            let case = format!("{script}: room {room:?}, master fence {master_fence:?}");
            assert_eq!(epoch == "fresh", want, "{case}");
            assert_eq!(offset, if want { 0 } else { 5 }, "{case}");
        }
    }
}

#[tokio::test]
async fn the_epoch_check_resets_an_epoch_as_its_rule_says() {
    let redis = RedisServer::start().await;
    let mut conn = connect(&redis).await;
    let seen = Cursor::new("e1", 10);
    let cases = [
        None,
        Some(Cursor::new("e1", 7)),
        Some(Cursor::new("e1", 10)),
        Some(Cursor::new("e1", 12)),
        Some(Cursor::new("e2", 3)),
    ];
    for (i, bus) in cases.into_iter().enumerate() {
        let key = format!("chorus:room:check-{i}");
        if let Some(bus) = &bus {
            let _: i64 = redis::cmd("HSET")
                .arg(&key)
                .arg("e")
                .arg(&*bus.epoch)
                .arg("o")
                .arg(bus.offset)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let (reset, last, epoch): (u8, u64, String) = EPOCH_CHECK
            .key(&key)
            .key("")
            .arg(&*seen.epoch)
            .arg(seen.offset)
            .arg("fresh")
            .invoke_async(&mut conn)
            .await
            .unwrap();
        let want = lacks_acknowledged(bus.as_ref(), &seen);
        assert_eq!(reset == 1, want, "{bus:?}");
        assert_eq!(epoch == "fresh", want, "{bus:?}");
        assert_eq!(last, bus.as_ref().map_or(0, |b| b.offset), "{bus:?}");
    }
}

#[tokio::test]
async fn in_the_cluster_keyspace_unused_keys_name_the_room_hash_and_are_left_alone() {
    let redis = RedisServer::start().await;
    let mut conn = connect(&redis).await;
    let keys = Keyspace::Tagged;
    let (room, unused, channel) = (keys.room_key("r"), keys.unused("r"), keys.room_channel("r"));
    for want in 1..=2u64 {
        let mut inv = PUBLISH.key(&room);
        inv.key(&unused).key(&unused).key(&unused);
        let args = [
            channel.as_str(),
            "{",
            "}",
            "1",
            "fresh",
            "60",
            "0",
            "60",
            "0",
            "",
            "",
            "",
            keys.publish_command(),
        ];
        for arg in args {
            inv.arg(arg);
        }
        let (offset, epoch, _): (u64, String, u8) = inv.invoke_async(&mut conn).await.unwrap();
        assert_eq!((offset, epoch.as_str()), (want, "fresh"));
    }
    let (offset, epoch): (u64, String) = POSITION
        .key(&room)
        .key(&unused)
        .arg("other")
        .arg(60)
        .arg("")
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((offset, epoch.as_str()), (2, "fresh"));
}
