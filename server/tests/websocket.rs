//! A node with the embedded broker, driven by real WebSocket and HTTP clients.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chorus_tests::{Event, TestNode, WsClient, wait_until};
use serde_json::{Value, json};

#[tokio::test]
async fn every_subscriber_gets_each_message_with_offsets_from_one() {
    let node = TestNode::start(&[]).await;
    let mut alice = node.client().await;
    let mut bob = node.client().await;
    assert_eq!(
        alice.welcome["node"].as_str().map(str::is_empty),
        Some(false)
    );
    assert!(alice.welcome["version"].is_string());
    assert_ne!(alice.session(), bob.session());

    let sub = alice.subscribe("lobby").await;
    assert_eq!(sub["offset"], 0, "nothing published yet: {sub}");
    bob.subscribe("lobby").await;

    for n in 1..=3u64 {
        let ok = alice
            .publish("lobby", json!({"text": format!("hello {n}")}))
            .await;
        assert_eq!(ok["op"], "ok");
        assert_eq!(ok["offset"], n);
        assert_eq!(ok["epoch"], sub["epoch"]);
    }
    for client in [&mut alice, &mut bob] {
        for n in 1..=3u64 {
            let m = client.message().await;
            assert_eq!(m["room"], "lobby");
            assert_eq!(m["offset"], n);
            assert_eq!(m["epoch"], sub["epoch"]);
            assert_eq!(m["data"], json!({"text": format!("hello {n}")}));
        }
    }
    // The publisher's session is named in `from`.
    let mut carol = node.client().await;
    carol.subscribe("lobby").await;
    let session = bob.session();
    bob.publish("lobby", json!(4)).await;
    let m = carol.message().await;
    assert_eq!(
        (m["offset"].as_u64(), m["from"].as_str()),
        (Some(4), Some(session.as_str()))
    );
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_rooms_are_separate() {
    let node = TestNode::start(&[]).await;
    let mut a = node.client().await;
    let mut b = node.client().await;
    a.subscribe("r1").await;
    b.subscribe("r1").await;
    b.subscribe("r2").await;
    let ok = b.request(json!({"op": "unsubscribe", "room": "r1"})).await;
    assert_eq!(ok["op"], "ok");
    a.publish("r1", json!("only a")).await;
    assert_eq!(a.message().await["data"], "only a");
    b.sync().await;
    assert!(
        b.pending().is_empty(),
        "b left r1 but got {:?}",
        b.pending()
    );

    let again = b.request(json!({"op": "unsubscribe", "room": "r1"})).await;
    assert_eq!(
        (again["op"].as_str(), again["code"].as_str()),
        (Some("error"), Some("not_subscribed"))
    );
    a.publish("r2", json!("to r2")).await;
    assert_eq!(b.message().await["room"], "r2");
    a.sync().await;
    assert!(a.pending().is_empty(), "a is not in r2: {:?}", a.pending());
}

#[tokio::test]
async fn http_publish_reaches_websocket_subscribers_and_checks_the_api_key() {
    let node = TestNode::start(&["--api-key", "s3cret"]).await;
    let mut sub = node.client().await;
    sub.subscribe("news").await;
    let http = reqwest::Client::new();
    let url = node.http("/api/v1/rooms/news/messages");

    let resp = http
        .post(&url)
        .json(&json!({"data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    let resp = http
        .post(&url)
        .bearer_auth("wrong")
        .json(&json!({"data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let resp = http
        .post(&url)
        .bearer_auth("s3cret")
        .json(&json!({"data": {"headline": "hi"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["offset"], 1);
    let m = sub.message().await;
    assert_eq!(
        (m["data"]["headline"].as_str(), m["epoch"].clone()),
        (Some("hi"), body["epoch"].clone())
    );
    assert!(
        m.get("from").is_none(),
        "HTTP publishes have no publisher session: {m}"
    );

    let resp = http
        .post(node.http("/api/v1/rooms/bad%20room/messages"))
        .bearer_auth("s3cret")
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "bad_room"
    );
    let resp = http
        .post(&url)
        .bearer_auth("s3cret")
        .body("{\"nodata\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "bad_frame"
    );
    let big = "x".repeat(70 * 1024);
    let resp = http
        .post(&url)
        .bearer_auth("s3cret")
        .json(&json!({"data": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "too_large"
    );
    let resp = http
        .post(&url)
        .bearer_auth("s3cret")
        .json(&json!({"data": 2, "key": "k".repeat(129)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "bad_frame");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("key"),
        "{err}"
    );
    // None of the refused requests was published: the next offset is 2.
    let resp = http
        .post(&url)
        .bearer_auth("s3cret")
        .json(&json!({"data": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["offset"], 2);
    assert_eq!(sub.message().await["data"], 3);
}

#[tokio::test]
async fn bad_input_gets_its_error_and_the_connection_stays_usable() {
    let node = TestNode::start(&["--max-frame-bytes", "1024"]).await;
    let mut c = node.client().await;

    c.send_text("this is not json").await;
    let e = c.frame().await;
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_frame"))
    );
    assert!(e.get("id").is_none());

    let e = c.request(json!({"op": "dance"})).await;
    assert_eq!(e["code"], "bad_frame");
    assert!(e["message"].as_str().unwrap().contains("dance"));

    let e = c
        .request(json!({"op": "subscribe", "room": "no/slashes"}))
        .await;
    assert_eq!(e["code"], "bad_room");
    let e = c.request(json!({"op": "subscribe", "room": ""})).await;
    assert_eq!(e["code"], "bad_room");

    // Frames over the limit are refused before they are parsed: no id comes back.
    c.send(json!({"op": "publish", "id": 99, "room": "r", "data": "x".repeat(2000)}))
        .await;
    let e = c.frame().await;
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("too_large")),
        "{e}"
    );

    // Still usable.
    c.subscribe("r").await;
    let ok = c.publish("r", json!("fine")).await;
    assert_eq!(ok["offset"], 1);
    assert_eq!(c.message().await["data"], "fine");
    assert_eq!(node.metric("chorus_bad_frames_total").await, 5.0);

    // A binary frame closes the connection with 1003.
    c.send_binary(vec![1, 2, 3]).await;
    assert_eq!(c.event().await, Event::Closed(Some(1003)));
}

#[tokio::test]
async fn upgrades_past_the_connection_limit_get_503() {
    let node = TestNode::start(&["--max-connections", "1"]).await;
    let first = node.client().await;
    let err = WsClient::connect(&node.ws_url())
        .await
        .err()
        .expect("second connection must be refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 503),
        other => panic!("expected HTTP 503, got {other}"),
    }
    assert_eq!(
        node.metric("chorus_connections_refused_total{reason=\"limit\"}")
            .await,
        1.0
    );
    first.close().await;
    wait_until("the slot to be released", || async {
        node.node.connections() == 0
    })
    .await;
    node.client().await;
}

#[tokio::test]
async fn a_client_that_does_not_read_is_dropped_without_stalling_the_room() {
    let node = TestNode::start(&["--send-queue", "64"]).await;
    let mut slow = node.client().await;
    slow.subscribe("busy").await;
    let mut fast = node.client().await;
    fast.subscribe("busy").await;

    const COUNT: u64 = 600;
    let reader = tokio::spawn(async move {
        for n in 1..=COUNT {
            let m = fast.message().await;
            assert_eq!(
                m["offset"], n,
                "the fast reader must see every message in order"
            );
        }
        fast
    });
    // 32 KiB a message: ~19 MB in all, far more than the socket buffers of a
    // client that never reads.
    let payload = "p".repeat(32 * 1024);
    let http = reqwest::Client::new();
    for _ in 0..COUNT {
        let resp = http
            .post(node.http("/api/v1/rooms/busy/messages"))
            .json(&json!({"data": payload}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let _fast = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        node.metric("chorus_slow_consumers_dropped_total").await,
        1.0
    );

    // The slow client, reading at last, finds its stream cut short: a close
    // 1008 (or a reset) after fewer messages than were published.
    let mut seen = 0u64;
    loop {
        match slow.event().await {
            Event::Frame(v) if v["op"] == "message" => seen += 1,
            Event::Frame(v) => panic!("unexpected frame {v}"),
            Event::Closed(code) => {
                assert!(matches!(code, Some(1008) | None), "closed with {code:?}");
                break;
            }
        }
    }
    assert!(
        seen < COUNT,
        "slow client got all {seen} messages: it was never dropped"
    );
    wait_until("the slow connection to be gone", || async {
        node.node.connections() == 1
    })
    .await;
}

/// The fan-out writes a message to a subscriber's socket itself when its
/// connection waits with nothing in hand; a client that stops reading fills
/// its socket, the rest of the write goes to its connection, the next
/// messages to its bounded queue, and it is dropped (1008) as ever, while the
/// readers get every message in order.
#[tokio::test]
async fn under_direct_writes_a_client_that_does_not_read_is_dropped_and_the_room_flows() {
    let node = TestNode::start(&["--send-queue", "64"]).await;
    let mut slow = node.client().await;
    slow.subscribe("busy").await;
    // It reads again once the node has given up on it (its close frame
    // waits behind what its socket holds, for 5 s): messages in order up
    // to where it was cut, then 1008.
    let metrics = node.http("/metrics");
    let slow = tokio::spawn(async move {
        while chorus_tests::metric(&metrics, "chorus_slow_consumers_dropped_total").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut seen = 0u64;
        loop {
            match slow.event().await {
                Event::Frame(v) if v["op"] == "message" => {
                    seen += 1;
                    assert_eq!(v["offset"], seen, "in order up to where it was cut");
                }
                Event::Frame(v) => panic!("unexpected frame {v}"),
                Event::Closed(code) => return (seen, code),
            }
        }
    });

    const COUNT: u64 = 3000;
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut fast = node.client().await;
        fast.subscribe("busy").await;
        readers.push(tokio::spawn(async move {
            for n in 1..=COUNT {
                let m = fast.message().await;
                assert_eq!(m["offset"], n, "every message, in order");
            }
        }));
    }
    // 4 KiB a message: 12 MB in all, more than the socket buffers of a
    // client that never reads.
    let payload = json!("p".repeat(4096));
    let mut publisher = node.client().await;
    let mut published = 0;
    while published < COUNT {
        let reply = publisher.publish("busy", payload.clone()).await;
        if reply["op"] == "ok" {
            published += 1;
        } else {
            // The room pushes back while most of its subscribers are behind.
            assert_eq!(reply["code"], "rate_limited", "{reply}");
        }
    }
    for reader in readers {
        tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        node.metric("chorus_slow_consumers_dropped_total").await,
        1.0
    );
    let direct = node.metric("chorus_direct_writes_total").await;
    assert!(direct > 0.0, "no message was written by the fan-out itself");

    let (seen, code) = slow.await.unwrap();
    assert_eq!(code, Some(1008), "after {seen} messages");
    assert!(seen < COUNT, "slow client got all {seen} messages");
}

/// A room whose subscribers all read more slowly than its publisher
/// publishes pushes back on the publisher (`rate_limited`) instead of
/// acknowledging messages its subscribers cannot take: nobody is shed, and
/// every subscriber gets every acknowledged message, in order.
#[tokio::test]
async fn a_room_whose_subscribers_all_fall_behind_pushes_back_and_sheds_nobody() {
    let node = TestNode::start(&["--send-queue", "256"]).await;
    const COUNT: u64 = 2000;
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut sub = node.client().await;
        sub.subscribe("slowroom").await;
        readers.push(tokio::spawn(async move {
            for n in 1..=COUNT {
                match sub.event().await {
                    Event::Frame(m) => assert_eq!(m["offset"], n, "{m}"),
                    Event::Closed(code) => return Err(format!("closed ({code:?}) at message {n}")),
                }
                // A client that handles each message for a while.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        }));
    }
    // 16 KiB a message: the readers' socket buffers hold a few hundred.
    let payload = json!("p".repeat(16 * 1024));
    let mut publisher = node.client().await;
    let (mut published, mut refused) = (0u64, 0u64);
    while published < COUNT {
        let reply = publisher.publish("slowroom", payload.clone()).await;
        match reply["op"].as_str() {
            Some("ok") => published += 1,
            _ => {
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                refused += 1;
                tokio::task::yield_now().await;
            }
        }
    }
    let mut shed = Vec::new();
    for reader in readers {
        if let Err(e) = reader.await.unwrap() {
            shed.push(e);
        }
    }
    assert!(
        shed.is_empty(),
        "subscribers {shed:?}; {} dropped as slow consumers, publisher refused {refused} times",
        node.metric("chorus_slow_consumers_dropped_total").await
    );
    assert!(refused > 0, "the publisher was never pushed back");
    assert!(node.metric("chorus_publishes_congested_total").await > 0.0);
    assert_eq!(
        node.metric("chorus_slow_consumers_dropped_total").await,
        0.0
    );
}

/// Per-connection order where the fan-out writes to the socket itself and
/// the connection's task writes replies: a client that keeps leaving and
/// rejoining a room flowing without pause, pinging meanwhile, gets after
/// each `ok` with offset N exactly N+1, N+2, … (never a message at or
/// before N, none missing, none twice), and nothing of the room once its
/// `unsubscribe` was answered.
#[tokio::test]
async fn rejoining_a_flowing_room_never_reorders_repeats_or_skips() {
    let node = TestNode::start(&[]).await;
    let publisher = chorus_tests::Publisher::start(node.client().await, "flow");
    let mut other = node.client().await;
    let first = other.subscribe("flow").await["offset"].as_u64().unwrap() + 1;
    let mut c = node.client().await;
    for round in 0..30 {
        let ok = c.subscribe("flow").await;
        assert!(
            c.pending().iter().all(|f| f["op"] != "message"),
            "round {round}: a message before the subscribe's ok: {:?}",
            c.pending()
        );
        let mut expect = ok["offset"].as_u64().unwrap() + 1;
        for _ in 0..5 {
            let m = c.message().await;
            assert_eq!(m["offset"], expect, "round {round}: {m}");
            expect += 1;
            c.sync().await;
        }
        let bye = c
            .request(json!({"op": "unsubscribe", "room": "flow"}))
            .await;
        assert_eq!(bye["op"], "ok", "{bye}");
        // What came before the unsubscribe's ok still follows in order.
        while !c.pending().is_empty() {
            let m = c.message().await;
            assert_eq!(m["offset"], expect, "round {round}: {m}");
            expect += 1;
        }
        c.sync().await;
        assert!(
            c.pending().is_empty(),
            "round {round}: messages after the unsubscribe's ok: {:?}",
            c.pending()
        );
    }
    let last = publisher.stop().await;
    // The room flowed for the other subscriber meanwhile, all of it.
    for n in first..=last {
        assert_eq!(other.message().await["offset"], n);
    }
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let node = TestNode::start(&[]).await;
    let mut a = node.client().await;
    let mut b = node.client().await;
    a.subscribe("m").await;
    b.subscribe("m").await;
    a.publish("m", json!(1)).await;
    a.publish("m", json!(2)).await;
    for c in [&mut a, &mut b] {
        c.message().await;
        c.message().await;
    }
    a.send_text("{").await;
    a.frame().await;
    assert_eq!(node.metric("chorus_connections").await, 2.0);
    assert_eq!(node.metric("chorus_rooms").await, 1.0);
    assert_eq!(node.metric("chorus_messages_published_total").await, 2.0);
    assert_eq!(node.metric("chorus_messages_delivered_total").await, 4.0);
    assert_eq!(node.metric("chorus_bad_frames_total").await, 1.0);
    assert_eq!(
        node.metric("chorus_delivery_latency_seconds_count").await,
        2.0
    );
    assert_eq!(node.metric("chorus_broker_up").await, 1.0);
    let ready = reqwest::get(node.http("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let page = node.get_text("/").await;
    assert!(page.contains("/ws"), "the demo page connects to /ws");
}

#[tokio::test]
async fn drain_sends_reconnect_and_refuses_new_clients() {
    let node = TestNode::start(&["--drain-seconds", "1"]).await;
    let mut a = node.client().await;
    a.subscribe("d").await;
    let n = node.node.clone();
    let drain = tokio::spawn(async move { n.drain().await });
    let r = a.frame().await;
    assert_eq!(r["op"], "reconnect", "{r}");
    assert_eq!(r["reason"], "draining");
    assert!(r["after_ms"].is_u64());
    assert_eq!(a.event().await, Event::Closed(Some(1001)));
    let ready = reqwest::get(node.http("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(WsClient::connect(&node.ws_url()).await.is_err());
    drain.await.unwrap();
    node.stop().await;
}

#[tokio::test]
async fn with_a_jwt_secret_clients_need_a_token_and_keep_to_their_rooms() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let node = TestNode::start(&["--jwt-secret", "test-secret"]).await;
    let token = |claims: Value| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"test-secret"),
        )
        .unwrap()
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;

    match WsClient::connect(&node.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!(
            "a client without a token must get 401, got {:?}",
            other.map(|c| c.welcome)
        ),
    }
    let bad = token(json!({"sub": "mallory", "exp": exp})).replace('.', "x.");
    assert!(
        WsClient::connect(&format!("{}?token={bad}", node.ws_url()))
            .await
            .is_err()
    );

    let alice = token(
        json!({"sub": "alice", "exp": exp, "rooms": ["chat:*"], "publish": ["chat:general"]}),
    );
    let mut c = WsClient::connect(&format!("{}?token={alice}", node.ws_url()))
        .await
        .unwrap();
    c.subscribe("chat:general").await;
    c.subscribe("user:alice").await;
    let e = c.request(json!({"op": "subscribe", "room": "admin"})).await;
    assert_eq!(e["code"], "forbidden");
    let e = c.publish("chat:random", json!(1)).await;
    assert_eq!(e["code"], "forbidden");
    assert_eq!(c.publish("chat:general", json!(1)).await["op"], "ok");
    assert_eq!(c.message().await["room"], "chat:general");
}

#[tokio::test]
async fn publishes_past_the_rate_limit_get_rate_limited() {
    let node = TestNode::start(&["--max-publish-rate", "5"]).await;
    let mut c = node.client().await;
    for i in 0..20 {
        c.send(json!({"op": "publish", "id": i, "room": "r", "data": i}))
            .await;
    }
    let mut codes = Vec::new();
    for _ in 0..20 {
        let f = c.frame().await;
        codes.push(if f["op"] == "ok" {
            "ok".to_string()
        } else {
            f["code"].as_str().unwrap().to_string()
        });
    }
    let ok = codes.iter().filter(|c| *c == "ok").count();
    assert!((5..20).contains(&ok), "{codes:?}");
    assert!(
        codes.iter().all(|c| c == "ok" || c == "rate_limited"),
        "{codes:?}"
    );
    c.sync().await;
}

#[tokio::test]
async fn a_connection_ends_when_its_token_expires() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let node = TestNode::start(&["--jwt-secret", "k"]).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let token = encode(
        &Header::default(),
        &json!({"sub": "u", "exp": exp}),
        &EncodingKey::from_secret(b"k"),
    )
    .unwrap();
    let mut c = WsClient::connect(&format!("{}?token={token}", node.ws_url()))
        .await
        .unwrap();
    c.subscribe("user:u").await;
    match c.read_event(Duration::from_secs(10)).await {
        Some(Event::Closed(code)) => assert_eq!(code, Some(1008)),
        other => panic!("expected a close at expiry, got {other:?}"),
    }
}
