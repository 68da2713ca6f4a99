//! Protocol hygiene: one JSON object per frame and per HTTP body, the
//! documented JSON error body for every refusal.
#![allow(clippy::unwrap_used)]

use chorus_tests::{Event, TestNode, WAIT, wait_until};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Asserts an HTTP API refusal: its status and the documented
/// `{"error": {"code", "message"}}` body.
async fn assert_api_error(resp: reqwest::Response, status: u16, code: &str) {
    assert_eq!(resp.status(), status);
    let text = resp.text().await.unwrap();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{status}: the body is not the JSON error body: {text:?}"));
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn json_arrays_are_refused_as_bad_frame_over_websocket_and_http() {
    let node = TestNode::start(&[]).await;
    let mut c = node.client().await;
    // serde reads a struct from an array by position: each of these would
    // be a ping, a subscribe and a publish.
    for array in [
        r#"["ping",1]"#,
        r#"["subscribe",2,"lobby"]"#,
        r#"["publish",3,"lobby","hi"]"#,
    ] {
        c.send_text(array).await;
        let e = c.frame().await;
        assert_eq!(
            (e["op"].as_str(), e["code"].as_str()),
            (Some("error"), Some("bad_frame")),
            "{array} → {e}"
        );
    }
    let http = reqwest::Client::new();
    let url = node.http("/api/v1/rooms/lobby/messages");
    let resp = http.post(&url).body(r#"["hi"]"#).send().await.unwrap();
    assert_api_error(resp, 400, "bad_frame").await;
    // Nothing of the above was subscribed or published.
    let ok = c.subscribe("lobby").await;
    assert_eq!(ok["offset"], 0, "{ok}");
    c.sync().await;
    assert!(c.pending().is_empty(), "{:?}", c.pending());
    let resp = http
        .post(&url)
        .body(r#" {"data":"hi"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["offset"], 1);
}

#[tokio::test]
async fn oversized_bodies_and_undecodable_room_paths_get_the_json_error_body() {
    let node = TestNode::start(&["--max-frame-bytes", "1024"]).await;
    let http = reqwest::Client::new();
    let url = node.http("/api/v1/rooms/lobby/messages");
    // Over the frame limit, and far over it (past the library's default
    // body limit, which answered in plain text).
    for size in [2_000, 3 << 20] {
        let body = json!({"data": "x".repeat(size)}).to_string();
        let resp = http.post(&url).body(body).send().await.unwrap();
        assert_api_error(resp, 413, "too_large").await;
    }
    // Percent-encoding that does not decode to UTF-8, and a `%` that is not
    // an escape at all.
    for path in ["/api/v1/rooms/%FF/messages", "/api/v1/rooms/a%zz/messages"] {
        let resp = http
            .post(node.http(path))
            .body(r#"{"data":1}"#)
            .send()
            .await
            .unwrap();
        assert_api_error(resp, 400, "bad_room").await;
    }
    let resp = http
        .get(node.http("/api/v1/rooms/%FF/history"))
        .send()
        .await
        .unwrap();
    assert_api_error(resp, 400, "bad_room").await;
    let resp = http
        .get(node.http("/api/v1/rooms/lobby/history?since=abc"))
        .send()
        .await
        .unwrap();
    assert_api_error(resp, 400, "bad_frame").await;
}

/// A WebSocket connection made by hand on a TCP socket, past its `welcome`,
/// to send frames no real client library would.
async fn raw_websocket(node: &TestNode) -> TcpStream {
    let mut tcp = TcpStream::connect(node.addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        node.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let (opcode, payload) = read_frame(&mut tcp).await.unwrap();
    assert_eq!(opcode, 1);
    assert!(String::from_utf8(payload).unwrap().contains("welcome"));
    tcp
}

/// A client frame: FIN set, the given opcode, masked with a zero key (so
/// the payload goes as is).
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![
        (u8::from(fin) << 7) | opcode,
        0x80 | payload.len() as u8,
        0,
        0,
        0,
        0,
    ];
    f.extend_from_slice(payload);
    f
}

/// Reads one server frame (unmasked): its opcode and payload; `None` at
/// the end of the stream.
async fn read_frame(tcp: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let b0 = tcp.read_u8().await.ok()?;
    let b1 = tcp.read_u8().await.ok()?;
    let len = match b1 & 0x7f {
        126 => u64::from(tcp.read_u16().await.ok()?),
        127 => tcp.read_u64().await.ok()?,
        n => u64::from(n),
    };
    let mut payload = vec![0; len as usize];
    tcp.read_exact(&mut payload).await.ok()?;
    Some((b0 & 0x0f, payload))
}

/// Reads frames to the end of the stream; the code of the close frame
/// among them (`None` when the stream just ended).
async fn close_code_at_the_end(tcp: &mut TcpStream) -> Option<u16> {
    let mut code = None;
    let read = async {
        while let Some((opcode, payload)) = read_frame(tcp).await {
            if opcode == 8 {
                code = Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.unwrap();
    code
}

#[tokio::test]
async fn protocol_errors_end_with_the_close_code_they_call_for() {
    let node = TestNode::start(&["--max-frame-bytes", "1024"]).await;
    let oversized = {
        // A text frame announcing 2 MiB: over the limit (1 MiB) the node
        // reads at all, refused before its payload.
        let mut f = vec![0x81, 0x80 | 127];
        f.extend_from_slice(&(2u64 << 20).to_be_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(b"{\"op\":");
        f
    };
    let cases: [(&str, Vec<u8>, u16); 5] = [
        (
            "text that is not UTF-8",
            client_frame(true, 1, &[0xff, 0xfe, 0xfd]),
            1007,
        ),
        (
            "a message fragmented across a cut in the middle of a character",
            [
                client_frame(false, 1, &[b'"', 0xe2]),
                client_frame(true, 0, &[0x28, b'"']),
            ]
            .concat(),
            1007,
        ),
        (
            "a continuation with no message to continue",
            client_frame(true, 0, b"{}"),
            1002,
        ),
        ("a reserved data opcode", client_frame(true, 3, b"{}"), 1002),
        ("an oversized frame", oversized, 1009),
    ];
    for (what, bytes, want) in cases {
        let mut tcp = raw_websocket(&node).await;
        tcp.write_all(&bytes).await.unwrap();
        assert_eq!(close_code_at_the_end(&mut tcp).await, Some(want), "{what}");
    }
    // A reserved control opcode, after a good frame that is still answered.
    let mut tcp = raw_websocket(&node).await;
    tcp.write_all(&client_frame(true, 1, br#"{"op":"ping","id":1}"#))
        .await
        .unwrap();
    let (_, pong) = read_frame(&mut tcp).await.unwrap();
    assert!(String::from_utf8(pong).unwrap().contains("pong"));
    tcp.write_all(&client_frame(true, 0xb, b"")).await.unwrap();
    assert_eq!(close_code_at_the_end(&mut tcp).await, Some(1002));
}

#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let node = TestNode::start(&[]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(node.ws_url())
        .await
        .unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"));
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    // The closing handshake completes: the node echoes the close frame.
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the node's close frame, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .is_none()
    );
    wait_until("the connection to be gone", || async {
        node.node.connections() == 0
    })
    .await;
}

#[tokio::test]
async fn a_slow_consumer_gets_the_documented_1008_close_frame() {
    let node = TestNode::start(&["--send-queue", "8"]).await;
    let mut slow = node.client().await;
    slow.subscribe("busy").await;
    // Publish large messages until the node gives up on the client that
    // does not read. The room's only subscriber is behind, so the room
    // pushes back on its publisher meanwhile (429, `rate_limited`).
    let http = reqwest::Client::new();
    let payload = json!({"data": "p".repeat(32 * 1024)}).to_string();
    let (mut published, mut tries) = (0u64, 0u64);
    while node.metric("chorus_slow_consumers_dropped_total").await < 1.0 {
        for _ in 0..16 {
            let resp = http
                .post(node.http("/api/v1/rooms/busy/messages"))
                .body(payload.clone())
                .send()
                .await
                .unwrap();
            match resp.status().as_u16() {
                200 => published += 1,
                429 => {}
                other => panic!("publish answered {other}"),
            }
            tries += 1;
        }
        assert!(tries < 100_000, "the client was never dropped");
    }
    // The node leaves the client's rooms at once, and holds the close frame
    // behind what the client's socket still holds. The client sends a frame
    // the node will not act on any more, then reads at last: it finds the
    // messages its socket held, then the close frame — 1008, not a bare end
    // of the stream or a reset.
    wait_until("the slow client to be taken out of its room", || async {
        node.metric("chorus_rooms").await == 0.0
    })
    .await;
    slow.send(json!({"op": "ping", "id": 99})).await;
    let mut seen = 0u64;
    loop {
        match slow.event().await {
            Event::Frame(v) if v["op"] == "message" => seen += 1,
            Event::Frame(v) => panic!("unexpected frame {v}"),
            Event::Closed(code) => {
                assert_eq!(code, Some(1008), "after {seen} of {published} messages");
                break;
            }
        }
    }
    assert!(seen < published);
}
