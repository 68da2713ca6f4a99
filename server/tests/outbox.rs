//! The transactional outbox against a real PostgreSQL (the test kit's
//! `Postgres`): what a backend's transactions become for the subscribers
//! of their rooms.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use chorus_server::outbox::schema::MIGRATION;
use chorus_testkit::{Postgres, RedisServer};
use chorus_tests::{TestNode, WsClient, spawn_server, wait_until};
use serde_json::{Value, json};
use tokio_postgres::{Client, GenericClient, Transaction};

/// A node relaying `pg`'s outbox (`--outbox-init`: the first one creates
/// the table), once its relay is connected.
async fn relay_node(pg: &Postgres, broker: &str, extra: &[&str]) -> TestNode {
    let dsn = pg.dsn();
    let mut flags = vec!["--broker", broker, "--outbox", &dsn, "--outbox-init"];
    flags.extend_from_slice(extra);
    let node = TestNode::start(&flags).await;
    wait_for_relay(&node).await;
    wait_until("the node to connect to its broker", || async {
        node.node.ready().is_ok()
    })
    .await;
    node
}

async fn wait_for_relay(node: &TestNode) {
    wait_until("the outbox relay to connect", || async {
        node.node.metrics.outbox_up.get() == 1
    })
    .await;
}

/// `INSERT INTO chorus_outbox (room, data)`, in a transaction of its own
/// or in `db`'s; the row's id.
async fn insert(db: &impl GenericClient, room: &str, data: Value) -> i64 {
    db.query_one(
        "INSERT INTO chorus_outbox (room, data) VALUES ($1, $2::text::jsonb) RETURNING id",
        &[&room, &data.to_string()],
    )
    .await
    .unwrap()
    .get(0)
}

async fn rows_left(db: &Client) -> i64 {
    db.query_one("SELECT count(*) FROM chorus_outbox", &[])
        .await
        .unwrap()
        .get(0)
}

async fn wait_for_empty_outbox(db: &Client) {
    wait_until("the outbox to be emptied", || async {
        rows_left(db).await == 0
    })
    .await;
}

/// The next `n` messages of a client: `(offset, data)`.
async fn messages(client: &mut WsClient, n: usize) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let m = client.message().await;
        out.push((m["offset"].as_u64().unwrap(), m["data"].clone()));
    }
    out
}

/// Asserts that nothing else was sent to the client.
async fn nothing_more(client: &mut WsClient) {
    client.sync().await;
    assert!(
        client.pending().is_empty(),
        "unexpected frames: {:?}",
        client.pending()
    );
}

#[tokio::test]
async fn a_transaction_that_rolls_back_is_never_delivered() {
    let pg = Postgres::start().await;
    let node = relay_node(&pg, "memory://", &[]).await;
    let mut sub = node.client().await;
    sub.subscribe("orders:1").await;
    let mut db = pg.client().await;

    let tx = db.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO chorus_outbox (room, data) VALUES ('orders:1', '{\"status\": \"never\"}')",
        &[],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    insert(&db, "orders:1", json!({"status": "paid"})).await;

    assert_eq!(
        messages(&mut sub, 1).await,
        [(1, json!({"status": "paid"}))]
    );
    wait_for_empty_outbox(&db).await;
    nothing_more(&mut sub).await;
}

/// Two open transactions with a row for `room` each: `early` inserted
/// first (the lower id, `"inserted first"`), then `late` (`"committed
/// first"`, for the tests commit it first).
async fn early_and_late<'a>(
    first: &'a mut Client,
    second: &'a mut Client,
    room: &str,
) -> (Transaction<'a>, Transaction<'a>) {
    let early = first.transaction().await.unwrap();
    let low = insert(&early, room, json!("inserted first")).await;
    let late = second.transaction().await.unwrap();
    let high = insert(&late, room, json!("committed first")).await;
    assert!(low < high);
    (early, late)
}

#[tokio::test]
async fn a_lower_id_that_commits_last_is_delivered_last_and_not_skipped() {
    let pg = Postgres::start().await;
    let node = relay_node(&pg, "memory://", &[]).await;
    let mut sub = node.client().await;
    sub.subscribe("room").await;
    let (mut first, mut second) = (pg.client().await, pg.client().await);
    let (early, late) = early_and_late(&mut first, &mut second, "room").await;
    late.commit().await.unwrap();
    // Delivered while the lower id is still open: nothing waits for it.
    assert_eq!(messages(&mut sub, 1).await, [(1, json!("committed first"))]);
    early.commit().await.unwrap();
    assert_eq!(messages(&mut sub, 1).await, [(2, json!("inserted first"))]);
    nothing_more(&mut sub).await;
}

/// Keeps every relay off `room`'s partition (the relays' advisory lock on
/// it, held by `db`'s session) until `db` calls `pg_advisory_unlock_all()`.
async fn keep_relays_off(db: &Client, room: &str) {
    db.execute(
        "SELECT pg_advisory_lock(('chorus_outbox'::regclass::oid::int8 << 32)
                                 | ((hashtext($1) & 2147483647) % 64))",
        &[&room],
    )
    .await
    .unwrap();
}

/// The relay reads both rows at once (it is kept off the room until both
/// transactions have committed): it still publishes them in commit order,
/// not in id order.
#[tokio::test]
async fn rows_read_together_are_relayed_in_commit_order_not_id_order() {
    let pg = Postgres::start().await;
    let node = relay_node(&pg, "memory://", &["--outbox-poll-interval", "100ms"]).await;
    let mut sub = node.client().await;
    sub.subscribe("both").await;
    let holder = pg.client().await;
    keep_relays_off(&holder, "both").await;
    let (mut first, mut second) = (pg.client().await, pg.client().await);
    let (early, late) = early_and_late(&mut first, &mut second, "both").await;
    late.commit().await.unwrap();
    early.commit().await.unwrap();
    holder
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    assert_eq!(
        messages(&mut sub, 2).await,
        [(1, json!("committed first")), (2, json!("inserted first"))]
    );
    nothing_more(&mut sub).await;
}

/// Least privilege: the backend's role may only insert into the table
/// (and draw its ids), the relay's may read, stamp and delete; neither
/// owns anything. The commit trigger stamps the backend's rows as the
/// table's owner.
#[tokio::test]
async fn a_backend_that_may_only_insert_is_relayed_by_a_relay_that_owns_nothing() {
    let pg = Postgres::start().await;
    pg.execute(MIGRATION).await;
    pg.execute(
        "CREATE ROLE shop LOGIN;
         GRANT INSERT ON chorus_outbox TO shop;
         GRANT USAGE ON SEQUENCE chorus_outbox_id_seq TO shop;
         CREATE ROLE relay LOGIN;
         GRANT SELECT, UPDATE, DELETE ON chorus_outbox TO relay;
         GRANT USAGE ON SEQUENCE chorus_outbox_commit_seq TO relay;",
    )
    .await;
    let as_role = |role: &str| pg.dsn().replacen("chorus@", &format!("{role}@"), 1);
    let node = TestNode::start(&["--outbox", &as_role("relay")]).await;
    wait_for_relay(&node).await;
    let mut sub = node.client().await;
    sub.subscribe("orders:7").await;
    let mut shop = chorus_testkit::postgres::connect(&as_role("shop"))
        .await
        .unwrap();
    let tx = shop.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO chorus_outbox (room, data) VALUES ('orders:7', '\"paid\"')",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(messages(&mut sub, 1).await, [(1, json!("paid"))]);
    wait_for_empty_outbox(&pg.client().await).await;
}

/// `chorus.outbox_notify = off` (here per session; per role or database
/// works the same) sends no NOTIFY with a commit, so outbox commits do not
/// take turns on NOTIFY's lock: a listener hears only the commit made
/// with it on, and the relay finds the other row by polling.
#[tokio::test]
async fn a_backend_with_notify_off_sends_no_notification_and_is_relayed_by_polling() {
    let pg = Postgres::start().await;
    let node = relay_node(&pg, "memory://", &["--outbox-poll-interval", "100ms"]).await;
    let mut sub = node.client().await;
    sub.subscribe("quiet").await;
    let (listener, mut connection) = tokio_postgres::connect(&pg.dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                heard_tx.send(n.channel().to_owned()).unwrap();
            }
        }
    });
    listener
        .batch_execute("LISTEN \"public.chorus_outbox\"")
        .await
        .unwrap();

    let quiet = pg.client().await;
    quiet
        .batch_execute("SET chorus.outbox_notify = off")
        .await
        .unwrap();
    insert(&quiet, "quiet", json!("polled")).await;
    assert_eq!(messages(&mut sub, 1).await, [(1, json!("polled"))]);
    insert(&pg.client().await, "quiet", json!("notified")).await;
    assert_eq!(messages(&mut sub, 1).await, [(2, json!("notified"))]);
    assert_eq!(heard.recv().await.unwrap(), "public.chorus_outbox");
    listener.batch_execute("SELECT 1").await.unwrap();
    assert!(heard.try_recv().is_err(), "a second notification");
}

/// What an operator watches in `/metrics`: rows waiting and for how long
/// while no relay can take them (here kept off their room), then relayed,
/// counted and timed.
#[tokio::test]
async fn pending_rows_and_lag_show_in_metrics_until_relayed() {
    let pg = Postgres::start().await;
    let node = relay_node(&pg, "memory://", &["--outbox-poll-interval", "100ms"]).await;
    assert_eq!(node.metric("chorus_outbox_up").await, 1.0);
    let holder = pg.client().await;
    keep_relays_off(&holder, "held").await;
    let db = pg.client().await;
    for n in 0..3 {
        insert(&db, "held", json!(n)).await;
    }
    wait_until("three rows pending, for some time", || async {
        node.metric("chorus_outbox_pending_rows").await == 3.0
            && node.metric("chorus_outbox_lag_seconds").await > 0.0
    })
    .await;
    assert_eq!(node.metric("chorus_outbox_relayed_total").await, 0.0);
    holder
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    wait_until("the rows relayed and the gauges back at 0", || async {
        node.metric("chorus_outbox_relayed_total").await == 3.0
            && node.metric("chorus_outbox_pending_rows").await == 0.0
            && node.metric("chorus_outbox_lag_seconds").await == 0.0
    })
    .await;
    assert_eq!(
        node.metric("chorus_outbox_relay_latency_seconds_count")
            .await,
        3.0
    );
}

/// Transactions that insert their message first and commit in an order of
/// their own (a counter row they update last serialises their commits, so
/// its value is each one's place in the commit order): the room gets them
/// in that order, whatever their ids.
#[tokio::test]
async fn concurrent_transactions_reach_the_room_in_commit_order() {
    const WRITERS: i64 = 24;
    let pg = Postgres::start().await;
    let node = relay_node(&pg, "memory://", &[]).await;
    pg.execute("CREATE TABLE commits (n bigint NOT NULL); INSERT INTO commits VALUES (0)")
        .await;
    let mut sub = node.client().await;
    sub.subscribe("busy").await;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut db = pg.client().await;
        writers.push(tokio::spawn(async move {
            let tx = db.transaction().await.unwrap();
            let id = insert(&tx, "busy", Value::Null).await;
            // Commit in another order than the ids were handed out.
            tokio::time::sleep(Duration::from_millis(((w * 7) % 11) as u64 * 3)).await;
            let n: i64 = tx
                .query_one("UPDATE commits SET n = n + 1 RETURNING n", &[])
                .await
                .unwrap()
                .get(0);
            tx.execute(
                "UPDATE chorus_outbox SET data = jsonb_build_object('commit', $1::int8, 'id', id) WHERE id = $2",
                &[&n, &id],
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
            (n, id)
        }));
    }
    let mut order = Vec::new();
    for w in writers {
        order.push(w.await.unwrap());
    }
    order.sort();
    let ids: Vec<i64> = order.iter().map(|(_, id)| *id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_ne!(ids, sorted, "the ids should not be in commit order already");

    let got = messages(&mut sub, WRITERS as usize).await;
    let commits: Vec<i64> = got
        .iter()
        .map(|(_, d)| d["commit"].as_i64().unwrap())
        .collect();
    assert_eq!(commits, (1..=WRITERS).collect::<Vec<_>>());
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (1..=WRITERS as u64).collect::<Vec<_>>());
}

/// Two transactions of one room commit at the same time: the first is
/// held in its commit (by a gate, a later deferred trigger of its own)
/// while the second commits. The relay, kept off the room's partition
/// until both have committed, reads both at once and publishes them in the
/// order their `COMMIT`s returned. (Here the second commit waits for the
/// first: a room's commits take turns, so a stamp taken at commit is the
/// commit order. Were the second to go through while the first still
/// commits, it would have to come first.)
#[tokio::test]
async fn commits_to_one_room_take_turns_so_the_relay_never_reorders_them() {
    let pg = Postgres::start().await;
    let node = relay_node(&pg, "memory://", &["--outbox-poll-interval", "100ms"]).await;
    let mut sub = node.client().await;
    sub.subscribe("turns").await;
    pg.execute(
        "CREATE TABLE gate (n int);
         CREATE FUNCTION wait_at_gate() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER gate AFTER INSERT ON gate DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION wait_at_gate();",
    )
    .await;
    let test = pg.client().await;
    test.batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    keep_relays_off(&test, "turns").await;
    let lock_waits = async || -> i64 {
        test.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    let commit = |sql: &'static str, mut db: Client| {
        tokio::spawn(async move {
            let tx = db.transaction().await.unwrap();
            tx.batch_execute(sql).await.unwrap();
            tx.commit().await.unwrap();
        })
    };
    let first = commit(
        "INSERT INTO chorus_outbox (room, data) VALUES ('turns', '\"first\"'); INSERT INTO gate VALUES (1);",
        pg.client().await,
    );
    wait_until("the first transaction to wait at the gate", || async {
        lock_waits().await == 1
    })
    .await;
    let second = commit(
        "INSERT INTO chorus_outbox (room, data) VALUES ('turns', '\"second\"');",
        pg.client().await,
    );
    wait_until("the second commit to wait, or to return", || async {
        lock_waits().await == 2 || second.is_finished()
    })
    .await;
    let commit_order = if second.is_finished() {
        ["second", "first"]
    } else {
        ["first", "second"]
    };
    test.batch_execute("SELECT pg_advisory_unlock(4242)")
        .await
        .unwrap();
    first.await.unwrap();
    second.await.unwrap();
    test.batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    assert_eq!(
        messages(&mut sub, 2).await,
        [(1, json!(commit_order[0])), (2, json!(commit_order[1]))]
    );
    nothing_more(&mut sub).await;
}

/// The relay dies after publishing a batch and before its delete commits
/// (a backend holds the rows' locks, so the delete waits): a second relay
/// publishes the rows again with the same keys and the broker delivers
/// none of them twice.
#[tokio::test]
async fn a_relay_killed_between_publish_and_delete_loses_nothing_and_shows_nothing_twice() {
    let pg = Postgres::start().await;
    let redis = RedisServer::start().await;
    pg.execute(MIGRATION).await;
    let watcher = TestNode::start(&["--broker", &redis.url()]).await;
    wait_until("the watcher to connect", || async {
        watcher.node.ready().is_ok()
    })
    .await;
    let mut sub = watcher.client().await;
    sub.subscribe("feed").await;
    let mut db = pg.client().await;
    for n in 1..=3 {
        insert(&db, "feed", json!(n)).await;
    }
    let locker = db.transaction().await.unwrap();
    locker
        .execute("SELECT id FROM chorus_outbox FOR UPDATE", &[])
        .await
        .unwrap();

    let mut doomed = spawn_server(
        env!("CARGO_BIN_EXE_chorus-server"),
        &["--broker", &redis.url(), "--outbox", &pg.dsn()],
        &[],
    )
    .await;
    assert_eq!(
        messages(&mut sub, 3).await,
        [(1, json!(1)), (2, json!(2)), (3, json!(3))]
    );
    let waiting_delete = "SELECT count(*) FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM chorus_outbox%'";
    let observer = pg.client().await;
    wait_until("the relay's delete to wait for the rows", || async {
        observer
            .query_one(waiting_delete, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    doomed.kill();
    locker.rollback().await.unwrap();
    wait_until("the dead relay's session to end", || async {
        observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chorus-server outbox relay'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
    assert_eq!(
        rows_left(&db).await,
        3,
        "the dead relay's delete must not count"
    );

    let heir = relay_node(&pg, &redis.url(), &[]).await;
    wait_for_empty_outbox(&db).await;
    assert_eq!(heir.node.metrics.outbox_relayed.get(), 3);
    insert(&db, "feed", json!(4)).await;
    assert_eq!(messages(&mut sub, 1).await, [(4, json!(4))]);
    nothing_more(&mut sub).await;
}

/// Two relays (two nodes) with small batches share the partitions: every
/// row reaches its room once, in commit order, whichever relay took it.
#[tokio::test]
async fn two_relays_at_once_deliver_each_row_once_in_commit_order() {
    const PER_ROOM: i64 = 60;
    let rooms = ["r:a", "r:b", "r:c", "r:d"];
    let pg = Postgres::start().await;
    let redis = RedisServer::start().await;
    let relays = [
        relay_node(&pg, &redis.url(), &["--outbox-batch", "4"]).await,
        relay_node(&pg, &redis.url(), &["--outbox-batch", "4"]).await,
    ];
    let mut subs = Vec::new();
    for node in &relays {
        let mut sub = node.client().await;
        for room in rooms {
            sub.subscribe(room).await;
        }
        subs.push(sub);
    }
    // One writer per room, one transaction after the other (so the commit
    // order is the order written), sometimes two rows at once.
    let mut writers = Vec::new();
    for room in rooms {
        let mut db = pg.client().await;
        writers.push(tokio::spawn(async move {
            let mut n = 1;
            while n <= PER_ROOM {
                let tx = db.transaction().await.unwrap();
                let rows = if n % 3 == 0 { 2 } else { 1 };
                for k in n..(n + rows).min(PER_ROOM + 1) {
                    tx.execute(
                        "INSERT INTO chorus_outbox (room, data) VALUES ($1, jsonb_build_object('n', $2::int8))",
                        &[&room, &k],
                    )
                    .await
                    .unwrap();
                }
                tx.commit().await.unwrap();
                n += rows;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let total = PER_ROOM as usize * rooms.len();
    let mut seen_by_node = Vec::new();
    for sub in &mut subs {
        let mut per_room: BTreeMap<String, Vec<(u64, i64)>> = BTreeMap::new();
        for _ in 0..total {
            let m = sub.message().await;
            per_room
                .entry(m["room"].as_str().unwrap().to_owned())
                .or_default()
                .push((
                    m["offset"].as_u64().unwrap(),
                    m["data"]["n"].as_i64().unwrap(),
                ));
        }
        for room in rooms {
            let want: Vec<(u64, i64)> = (1..=PER_ROOM).map(|n| (n as u64, n)).collect();
            assert_eq!(per_room[room], want, "{room}");
        }
        nothing_more(sub).await;
        seen_by_node.push(per_room);
    }
    wait_for_empty_outbox(&pg.client().await).await;
    // Counted once each relay's delete has committed.
    wait_until("every row to be counted once", || async {
        let relayed: u64 = relays
            .iter()
            .map(|n| n.node.metrics.outbox_relayed.get())
            .sum();
        assert!(relayed <= total as u64, "{relayed} relayed");
        relayed == total as u64
    })
    .await;
}

#[tokio::test]
async fn the_relay_resumes_after_the_database_restarts() {
    let mut pg = Postgres::start().await;
    let node = relay_node(&pg, "memory://", &[]).await;
    let mut sub = node.client().await;
    sub.subscribe("status").await;
    insert(&pg.client().await, "status", json!("before")).await;
    assert_eq!(messages(&mut sub, 1).await, [(1, json!("before"))]);

    pg.kill();
    wait_until("the relay to see the database gone", || async {
        node.node.metrics.outbox_up.get() == 0
    })
    .await;
    pg.restart().await;
    // Committed before the relay is back (so no notification reaches it).
    insert(&pg.client().await, "status", json!("meanwhile")).await;
    wait_for_relay(&node).await;
    insert(&pg.client().await, "status", json!("after")).await;
    assert_eq!(
        messages(&mut sub, 2).await,
        [(2, json!("meanwhile")), (3, json!("after"))]
    );
    wait_for_empty_outbox(&pg.client().await).await;
    nothing_more(&mut sub).await;
}

/// Outbox rows and WebSocket publishes to one room, interleaved (in step
/// at first, then side by side): both nodes' subscribers see one order of
/// offsets, the same on each, with each source's messages in order.
#[tokio::test]
async fn outbox_and_websocket_publishes_share_one_offset_order_on_every_node() {
    const IN_STEP: i64 = 10;
    const EACH: i64 = 30;
    let pg = Postgres::start().await;
    let redis = RedisServer::start().await;
    let relay = relay_node(&pg, &redis.url(), &[]).await;
    let other = TestNode::start(&["--broker", &redis.url()]).await;
    wait_until("the second node to connect", || async {
        other.node.ready().is_ok()
    })
    .await;
    let mut on_relay = relay.client().await;
    let mut on_other = other.client().await;
    for sub in [&mut on_relay, &mut on_other] {
        sub.subscribe("mixed").await;
    }
    let mut publisher = other.client().await;
    let db = pg.client().await;
    let mut seen = Vec::new();
    for n in 1..=IN_STEP {
        assert_eq!(
            publisher.publish("mixed", json!({"ws": n})).await["op"],
            "ok"
        );
        insert(&db, "mixed", json!({"outbox": n})).await;
        seen.extend(messages(&mut on_relay, 2).await);
    }
    let outbox = tokio::spawn(async move {
        for n in IN_STEP + 1..=EACH {
            insert(&db, "mixed", json!({"outbox": n})).await;
        }
    });
    for n in IN_STEP + 1..=EACH {
        assert_eq!(
            publisher.publish("mixed", json!({"ws": n})).await["op"],
            "ok"
        );
    }
    outbox.await.unwrap();

    let total = 2 * EACH as usize;
    seen.extend(messages(&mut on_relay, total - seen.len()).await);
    assert_eq!(
        messages(&mut on_other, total).await,
        seen,
        "both nodes see one order"
    );
    let offsets: Vec<u64> = seen.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (1..=total as u64).collect::<Vec<_>>());
    for source in ["outbox", "ws"] {
        let ns: Vec<i64> = seen
            .iter()
            .filter_map(|(_, d)| d[source].as_i64())
            .collect();
        assert_eq!(ns, (1..=EACH).collect::<Vec<_>>(), "{source} in order");
    }
    nothing_more(&mut on_relay).await;
    nothing_more(&mut on_other).await;
}
