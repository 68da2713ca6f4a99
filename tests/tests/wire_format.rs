//! The `message` frame is defined once, in `chorus_server::protocol`: the
//! Lua script that finishes frames in Redis must produce exactly what
//! `protocol::encode_message` does, byte for byte — in the Pub/Sub
//! notification, in the room's history and on the subscriber's socket.
#![allow(clippy::unwrap_used)]

use chorus_server::protocol::{MessageFrame, encode_message};
use chorus_testkit::RedisServer;
use chorus_tests::TestNode;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

const ROOM: &str = "wire:1";

/// An `XRANGE` entry: its id and its fields (`f`: the frame).
type HistoryEntry = (String, Vec<(String, Vec<u8>)>);
/// Whitespace, a number written as `2.50`, escapes and non-ASCII: a
/// re-encoding anywhere would change these bytes.
const DATA: &str = r#"{"a": [1, 2.50], "t": "h\u00e9 \"q\" é"}"#;

#[tokio::test]
async fn the_lua_script_finishes_frames_exactly_as_the_protocol_encodes_them() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(&["--broker", &redis.url(), "--delivery", "streams"]).await;
    chorus_tests::wait_until("the node to connect", || async {
        node.node.ready().is_ok()
    })
    .await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut notifications = client.get_async_pubsub().await.unwrap();
    notifications
        .subscribe(format!("chorus:room:{ROOM}"))
        .await
        .unwrap();
    let mut notifications = notifications.into_on_message();

    let (mut ws, _) = tokio_tungstenite::connect_async(node.ws_url())
        .await
        .unwrap();
    let welcome = text(&mut ws).await;
    let session = serde_json::from_str::<Value>(&welcome).unwrap()["session"]
        .as_str()
        .unwrap()
        .to_string();
    send(
        &mut ws,
        &format!(r#"{{"op":"subscribe","id":1,"room":"{ROOM}"}}"#),
    )
    .await;
    assert!(text(&mut ws).await.contains(r#""op":"ok""#));

    // A WebSocket publish (with `from`), then an HTTP one (without).
    send(
        &mut ws,
        &format!(r#"{{"op":"publish","id":2,"room":"{ROOM}","data":{DATA}}}"#),
    )
    .await;
    let http = reqwest::Client::new()
        .post(node.http(&format!("/api/v1/rooms/{ROOM}/messages")))
        .body(format!(r#"{{"data": {DATA}}}"#));
    let mut seen = Vec::new();
    let mut http = Some(http);
    while seen.len() < 2 {
        let frame = text(&mut ws).await;
        let v: Value = serde_json::from_str(&frame).unwrap();
        if v["op"] == "message" {
            seen.push((frame, v));
            if let Some(http) = http.take() {
                assert_eq!(http.send().await.unwrap().status(), 200);
            }
        }
    }

    let data = RawValue::from_string(DATA.to_string()).unwrap();
    for (i, (on_socket, v)) in seen.iter().enumerate() {
        // "<published_at_us> <offset> <epoch> <frame>": the offset and the
        // epoch as the script had them, apart from the frame it spliced.
        let payload = notifications
            .next()
            .await
            .unwrap()
            .get_payload_bytes()
            .to_vec();
        let parts: Vec<&[u8]> = payload.splitn(4, |b| *b == b' ').collect();
        let offset: u64 = std::str::from_utf8(parts[1]).unwrap().parse().unwrap();
        let epoch = std::str::from_utf8(parts[2]).unwrap();
        let notified = parts[3];
        assert_eq!(
            (v["offset"].as_u64(), v["epoch"].as_str()),
            (Some(offset), Some(epoch))
        );
        let expected = encode_message(&MessageFrame {
            room: ROOM,
            data: &data,
            offset,
            epoch,
            from: (i == 0).then_some(session.as_str()),
        });
        let kept: Vec<HistoryEntry> = redis
            .query(
                redis::cmd("XRANGE")
                    .arg(format!("chorus:hist:{ROOM}"))
                    .arg(format!("0-{offset}"))
                    .arg(format!("0-{offset}")),
            )
            .await;
        assert_eq!(notified, expected.as_bytes(), "Pub/Sub notification");
        assert_eq!(kept[0].1[0].1, expected.as_bytes(), "history entry");
        assert_eq!(
            on_socket.as_str(),
            expected.as_str(),
            "sent to the subscriber"
        );
    }
}

async fn send<S>(ws: &mut S, text: &str)
where
    S: SinkExt<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    ws.send(Message::text(text.to_string())).await.unwrap();
}

async fn text<S>(ws: &mut S) -> String
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(chorus_tests::WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}
