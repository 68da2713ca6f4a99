//! The kit against real `redis-server` and `redis-sentinel` processes: what
//! a test relies on when it kills, restarts or freezes a member.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chorus_testkit::redis::{answers_ping, query};
use chorus_testkit::{Error, RedisOptions, RedisServer, SentinelGroup};

async fn get(redis: &RedisServer, key: &str) -> Option<String> {
    redis.query(redis::cmd("GET").arg(key)).await
}

#[tokio::test]
async fn a_killed_redis_restarts_empty_on_its_port_and_its_directory_goes_on_drop() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let dir = redis.dir().to_owned();
    let _: () = redis.query(redis::cmd("SET").arg("k").arg("v")).await;
    assert_eq!(get(&redis, "k").await.as_deref(), Some("v"));

    redis.kill();
    assert!(!answers_ping(&redis.url()).await);
    redis.restart().await;
    assert_eq!(redis.port, port);
    assert_eq!(get(&redis, "k").await, None, "no persistence");

    let pid = redis.pid().unwrap();
    drop(redis);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} left running"
    );
}

#[tokio::test]
async fn a_frozen_redis_answers_nothing_until_thawed() {
    let redis = RedisServer::start().await;
    redis.freeze();
    let ping = redis::cmd("PING");
    let frozen = tokio::time::timeout(
        Duration::from_millis(300),
        query::<String>(&redis.url(), &ping),
    )
    .await;
    assert!(frozen.is_err(), "a stopped process answered: {frozen:?}");
    redis.thaw();
    assert_eq!(query::<String>(&redis.url(), &ping).await.unwrap(), "PONG");
}

#[tokio::test]
async fn a_password_is_required_and_used_by_the_kit() {
    let redis = RedisServer::start_with(RedisOptions {
        password: Some("s3cret".into()),
        ..RedisOptions::default()
    })
    .await;
    let refused = query::<String>(&redis.url(), &redis::cmd("PING")).await;
    assert_eq!(refused.unwrap_err().code(), Some("NOAUTH"));
    assert!(redis.url_with_auth().contains(":s3cret@"));
    assert_eq!(redis.numsub("nobody").await, 0);
}

#[tokio::test]
async fn a_server_that_exits_at_start_fails_with_the_end_of_its_log() {
    let Err(err) = RedisServer::launch(RedisOptions {
        extra: vec!["--no-such-directive".into(), "1".into()],
        ..RedisOptions::default()
    })
    .await
    else {
        panic!("redis-server accepted an unknown directive");
    };
    assert!(matches!(err, Error::Exited { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("no-such-directive"), "{message}");
}

#[tokio::test]
async fn a_group_agrees_on_its_master_with_one_sentinel_frozen() {
    let group = SentinelGroup::start(1000).await;
    assert_eq!(group.agreed_master().await, Some(group.master.port));
    assert!(
        group
            .broker_url()
            .starts_with("redis+sentinel://127.0.0.1:")
    );

    group.sentinels[0].freeze();
    let ping = redis::cmd("PING");
    let stalled = tokio::time::timeout(
        Duration::from_millis(300),
        query::<String>(&group.sentinels[0].url(), &ping),
    )
    .await;
    assert!(stalled.is_err(), "a frozen sentinel answered");
    // The other two are a quorum.
    assert_eq!(group.agreed_master().await, Some(group.master.port));
    group.sentinels[0].thaw();
    assert_eq!(
        group.sentinels[0].master_port().await,
        Some(group.master.port)
    );
}
