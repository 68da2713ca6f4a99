//! The connection loop without a socket: a session served over a pair of
//! channels (axum's `examples/testing-websockets`), on a node with the
//! memory broker — or a durable test broker for recovery. The frames the
//! node writes as bytes (its own and the fan-out's) reach the same channel
//! through a [`Wire`] that reads them back into messages.
#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_channel::mpsc;
use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;
use crate::auth::{AuthConfig, Authenticator, Claims, Grants};
use crate::broker::{
    Broker, BrokerError, Deliver, Delivery, Health, History, MemoryBroker, Position,
    PublishRequest, Published,
};
use crate::config::Config;
use crate::hub::{Hub, Wire};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::protocol::RoomName;

const WAIT: Duration = Duration::from_secs(10);

/// The server's end of a WebSocket made of two channels.
struct ChannelSocket {
    to_client: mpsc::Sender<Message>,
    from_client: mpsc::Receiver<Result<Message, WsError>>,
}

impl Stream for ChannelSocket {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.from_client).poll_next(cx)
    }
}

impl Sink<Message> for ChannelSocket {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.to_client)
            .poll_ready(cx)
            .map_err(|e| WsError::Io(std::io::Error::other(e)))
    }

    fn start_send(mut self: Pin<&mut Self>, msg: Message) -> Result<(), WsError> {
        Pin::new(&mut self.to_client)
            .start_send(msg)
            .map_err(|e| WsError::Io(std::io::Error::other(e)))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.to_client)
            .poll_flush(cx)
            .map_err(|e| WsError::Io(std::io::Error::other(e)))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.to_client)
            .poll_close(cx)
            .map_err(|e| WsError::Io(std::io::Error::other(e)))
    }
}

/// The node's writes, read back into text messages for the client's
/// channel: a write takes the whole frames the channel has room for (a
/// socket that takes part of a write), none when it is full.
struct ChannelWire(mpsc::Sender<Message>);

impl ChannelWire {
    /// Sends the frames at the start of `buf` while the channel takes them;
    /// the bytes they took.
    fn send_frames(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        use tungstenite::protocol::frame::FrameHeader;
        let mut taken = 0;
        while taken < buf.len() {
            match self.0.poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
                }
                Poll::Pending if taken == 0 => return Poll::Pending,
                Poll::Pending => break,
            }
            let mut cursor = std::io::Cursor::new(&buf[taken..]);
            let (_, len) = FrameHeader::parse(&mut cursor)
                .unwrap()
                .expect("whole frames");
            let start = taken + cursor.position() as usize;
            let end = start + len as usize;
            let text = std::str::from_utf8(&buf[start..end]).unwrap();
            self.0.start_send(Message::Text(text.into())).unwrap();
            taken = end;
        }
        Poll::Ready(Ok(taken))
    }
}

impl Wire for ChannelWire {
    fn try_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.send_frames(&mut Context::from_waker(std::task::Waker::noop()), buf) {
            Poll::Ready(res) => res,
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        // Each buffer starts with a whole frame: write the first.
        match bufs.first() {
            Some(buf) => self.send_frames(cx, buf),
            None => Poll::Ready(Ok(0)),
        }
    }
}

/// The client's end, and the task serving the connection.
struct Client {
    tx: mpsc::Sender<Result<Message, WsError>>,
    rx: mpsc::Receiver<Message>,
    session: String,
    next_id: u64,
    /// Frames read while waiting for a reply.
    pending: Vec<Value>,
    task: JoinHandle<()>,
}

/// Connects a client with `grants`; the server can write `buffer` frames
/// ahead of the client's reading (its socket's send buffer).
async fn connect_with(node: &Arc<Node>, grants: Grants, buffer: usize) -> Client {
    let (to_client, rx) = mpsc::channel(buffer);
    let (tx, from_client) = mpsc::channel(16);
    let node = node.clone();
    let task = tokio::spawn(async move {
        let (mut session, mut queue) = Session::open(node, grants);
        queue.attach(Box::new(ChannelWire(to_client.clone())));
        let mut socket = ChannelSocket {
            to_client,
            from_client,
        };
        serve(&mut socket, &mut session, &mut queue).await;
    });
    let mut client = Client {
        tx,
        rx,
        session: String::new(),
        next_id: 1,
        pending: Vec::new(),
        task,
    };
    let welcome = client.frame().await;
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    client.session = welcome["session"].as_str().unwrap().to_owned();
    client
}

async fn connect(node: &Arc<Node>) -> Client {
    connect_with(node, Grants::anonymous(), 4096).await
}

impl Client {
    async fn send(&mut self, msg: Result<Message, WsError>) {
        self.tx.send(msg).await.unwrap();
    }

    async fn next(&mut self) -> Option<Message> {
        tokio::time::timeout(WAIT, self.rx.next())
            .await
            .expect("the server sent nothing")
    }

    /// The next text frame (frames kept by `request` first).
    async fn frame(&mut self) -> Value {
        if !self.pending.is_empty() {
            return self.pending.remove(0);
        }
        match self.next().await {
            Some(Message::Text(text)) => serde_json::from_str(text.as_str()).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Sends a request with a fresh id; its reply (frames before it are kept).
    async fn request(&mut self, mut frame: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        frame["id"] = json!(id);
        self.send(Ok(Message::Text(frame.to_string().into()))).await;
        loop {
            let v = match self.next().await {
                Some(Message::Text(text)) => serde_json::from_str::<Value>(text.as_str()).unwrap(),
                other => panic!("expected a reply, got {other:?}"),
            };
            if v["id"] == json!(id) {
                return v;
            }
            self.pending.push(v);
        }
    }

    async fn subscribe(&mut self, room: &str, since: Option<Value>) -> Value {
        let mut frame = json!({"op": "subscribe", "room": room});
        if let Some(since) = since {
            frame["since"] = since;
        }
        let ok = self.request(frame).await;
        assert_eq!(ok["op"], "ok", "{ok}");
        ok
    }

    /// Reads on to the server's close frame: its code (text frames before it
    /// are skipped), or `None` when the socket ends without one.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Some(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Some(_) => continue,
                None => return None,
            }
        }
    }

    /// Answers the close frame and waits for the connection's task to end.
    async fn finish(mut self) {
        let _ = self.tx.send(Ok(Message::Close(None))).await;
        drop(self.tx);
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn memory_node(config: Config) -> Arc<Node> {
    Node::start(config).await.unwrap()
}

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

async fn publish(node: &Arc<Node>, to: &str, n: u64) -> Published {
    node.publish(PublishRequest {
        room: room(to),
        data: RawValue::from_string(json!({ "n": n }).to_string()).unwrap(),
        from: None,
        key: None,
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn subscribe_publish_and_unsubscribe_without_a_socket() {
    let node = memory_node(Config::defaults()).await;
    let mut a = connect(&node).await;
    let mut b = connect(&node).await;
    assert_eq!(a.subscribe("lobby", None).await["offset"], 0);
    assert_eq!(b.subscribe("lobby", None).await["offset"], 0);
    assert_eq!(node.hub.subscribers(&room("lobby")), 2);

    let ok = a
        .request(json!({"op": "publish", "room": "lobby", "data": {"text": "hi"}}))
        .await;
    assert_eq!(
        (ok["op"].as_str(), ok["offset"].as_u64()),
        (Some("ok"), Some(1))
    );
    let publisher = a.session.clone();
    for client in [&mut a, &mut b] {
        let m = client.frame().await;
        assert_eq!(
            (&m["op"], &m["offset"], &m["data"]["text"]),
            (&json!("message"), &json!(1), &json!("hi")),
            "{m}"
        );
        assert_eq!(m["from"], json!(publisher), "{m}");
        assert_eq!(m["epoch"], ok["epoch"]);
    }

    let pong = a.request(json!({"op": "ping"})).await;
    assert_eq!(pong["op"], "pong");
    let bad = a.request(json!({"op": "dance"})).await;
    assert_eq!(
        (&bad["op"], &bad["code"]),
        (&json!("error"), &json!("bad_frame"))
    );
    let ok = a
        .request(json!({"op": "unsubscribe", "room": "lobby"}))
        .await;
    assert_eq!(ok["op"], "ok");
    let again = a
        .request(json!({"op": "unsubscribe", "room": "lobby"}))
        .await;
    assert_eq!(again["code"], "not_subscribed");
    assert_eq!(node.hub.subscribers(&room("lobby")), 1);

    publish(&node, "lobby", 2).await;
    assert_eq!(b.frame().await["offset"], 2);
    b.finish().await;
    assert_eq!(node.hub.subscribers(&room("lobby")), 0, "left at the end");
    a.finish().await;
}

/// `n` messages published to `r`, then a client that subscribes with
/// `since` the start of the room's epoch; and its `ok`.
async fn missed_then_back(node: &Arc<Node>, n: u64) -> (Client, Value) {
    for i in 1..=n {
        publish(node, "r", i).await;
    }
    let epoch = node.broker.position(&room("r")).await.unwrap().epoch;
    let mut c = connect(node).await;
    let since = json!({"epoch": &*epoch, "offset": 0});
    let ok = c.subscribe("r", Some(since)).await;
    (c, ok)
}

#[tokio::test]
async fn a_recovering_subscriber_gets_what_it_missed_page_by_page_then_live_messages() {
    let (node, broker) = durable_node(usize::MAX).await;
    let missed = (2 * crate::node::REPLAY_PAGE + 200) as u64;
    let (mut c, ok) = missed_then_back(&node, missed).await;
    assert_eq!(
        (&ok["recovered"], &ok["missed"], &ok["offset"]),
        (&json!(true), &json!(missed), &json!(missed)),
        "{ok}"
    );
    for want in 1..=missed {
        let m = c.frame().await;
        assert_eq!(m["offset"], want, "{m}");
    }
    assert_eq!(
        broker.pages.load(Ordering::SeqCst),
        3,
        "read in pages of 500"
    );
    publish(&node, "r", missed + 1).await;
    assert_eq!(c.frame().await["offset"], missed + 1, "then live ones");
    c.finish().await;
}

#[tokio::test]
async fn a_replay_that_cannot_be_read_to_its_end_closes_1011() {
    let (node, _) = durable_node(1).await;
    let (mut c, ok) = missed_then_back(&node, crate::node::REPLAY_PAGE as u64 + 1).await;
    assert_eq!(ok["recovered"], true, "{ok}");
    assert_eq!(c.close_code().await, Some(close_code::ERROR));
    c.finish().await;
    assert_eq!(node.hub.subscribers(&room("r")), 0);
}

#[tokio::test]
async fn a_client_whose_queue_overflows_is_dropped_with_1008_and_leaves_its_rooms() {
    let mut config = Config::defaults();
    config.send_queue = 4;
    let node = memory_node(config).await;
    // A socket that takes one frame ahead of the client's reading.
    let mut c = connect_with(&node, Grants::anonymous(), 1).await;
    c.subscribe("r", None).await;
    for n in 1..=50 {
        publish(&node, "r", n).await;
    }
    // What the socket held, then the close frame behind it.
    assert_eq!(c.close_code().await, Some(close_code::POLICY));
    assert_eq!(node.metrics.slow_consumers.get(), 1);
    assert_eq!(node.hub.subscribers(&room("r")), 0);
    c.finish().await;
}

#[tokio::test(start_paused = true)]
async fn a_socket_that_takes_nothing_for_the_send_timeout_is_a_slow_consumer() {
    let node = memory_node(Config::defaults()).await;
    let mut c = connect_with(&node, Grants::anonymous(), 1).await;
    c.subscribe("r", None).await;
    for n in 1..=5 {
        publish(&node, "r", n).await;
    }
    // The client reads nothing for longer than --send-timeout (the clock is
    // paused: this sleep takes no time).
    tokio::time::sleep(node.config.send_timeout + Duration::from_secs(1)).await;
    assert_eq!(node.metrics.slow_consumers.get(), 1);
    assert_eq!(c.close_code().await, Some(close_code::POLICY));
    c.finish().await;
}

#[tokio::test]
async fn protocol_violations_and_binary_frames_close_with_their_codes() {
    use tungstenite::error::{CapacityError, ProtocolError};
    let node = memory_node(Config::defaults()).await;
    let cases: Vec<(Result<Message, WsError>, Option<u16>)> = vec![
        (
            Ok(Message::Binary(vec![1, 2].into())),
            Some(close_code::UNSUPPORTED),
        ),
        (
            Err(tungstenite::Error::Utf8("bad".into())),
            Some(close_code::INVALID),
        ),
        (
            Err(tungstenite::Error::Capacity(
                CapacityError::MessageTooLong {
                    size: 2 << 20,
                    max_size: 1 << 20,
                },
            )),
            Some(close_code::SIZE),
        ),
        (
            Err(tungstenite::Error::Protocol(
                ProtocolError::UnmaskedFrameFromClient,
            )),
            Some(close_code::PROTOCOL),
        ),
        // The client closed: its close frame is answered by the library, the
        // node sends none of its own.
        (Ok(Message::Close(None)), None),
        (
            Err(tungstenite::Error::Protocol(
                ProtocolError::ResetWithoutClosingHandshake,
            )),
            None,
        ),
    ];
    for (input, code) in cases {
        let mut c = connect(&node).await;
        c.subscribe("r", None).await;
        let what = format!("{input:?}");
        c.send(input).await;
        assert_eq!(c.close_code().await, code, "{what}");
        c.finish().await;
        assert_eq!(node.hub.subscribers(&room("r")), 0, "{what}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_token_closes_its_connection_1008_at_its_exp() {
    let mut config = Config::defaults();
    config.jwt_secret = Some("a-secret-of-at-least-32-bytes-long".into());
    let node = Node::start(config).await.unwrap();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 5;
    let claims = Claims {
        sub: "alice".into(),
        exp,
        rooms: None,
        publish: None,
    };
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"a-secret-of-at-least-32-bytes-long"),
    )
    .unwrap();
    let grants = node.auth.authenticate(Some(&token)).unwrap();
    let mut c = connect_with(&node, grants, 64).await;
    c.subscribe("r", None).await;
    assert_eq!(c.close_code().await, Some(close_code::POLICY));
    c.finish().await;
}

#[tokio::test]
async fn a_drain_sends_reconnect_then_closes_1001() {
    let mut config = Config::defaults();
    config.drain_seconds = 0;
    let node = memory_node(config).await;
    let mut c = connect(&node).await;
    c.subscribe("r", None).await;
    let drain = tokio::spawn({
        let node = node.clone();
        async move { node.drain().await }
    });
    let reconnect = c.frame().await;
    assert_eq!(
        (&reconnect["op"], &reconnect["reason"]),
        (&json!("reconnect"), &json!("draining")),
        "{reconnect}"
    );
    assert_eq!(c.close_code().await, Some(close_code::AWAY));
    c.finish().await;
    drain.await.unwrap();
}

/// A memory broker that keeps every message as history (as streams delivery
/// does in Redis), counts the pages read, and fails every page from
/// `fail_from_page` on.
struct Durable {
    inner: MemoryBroker,
    kept: Arc<Kept>,
    pages: AtomicUsize,
    fail_from_page: usize,
}

/// Every message delivered, then handed on to the hub.
struct Kept {
    hub: Arc<Hub>,
    messages: Mutex<Vec<Delivery>>,
}

impl Deliver for Kept {
    fn deliver(&self, d: Delivery) {
        self.messages.lock().unwrap().push(d.clone());
        self.hub.deliver(d);
    }

    fn lost(&self, room: &RoomName, epoch: &Arc<str>, upto: u64) {
        self.hub.lost(room, epoch, upto);
    }
}

async fn durable_node(fail_from_page: usize) -> (Arc<Node>, Arc<Durable>) {
    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new(metrics.clone()));
    let kept = Arc::new(Kept {
        hub: hub.clone(),
        messages: Mutex::new(Vec::new()),
    });
    let broker = Arc::new(Durable {
        inner: MemoryBroker::new(kept.clone()),
        kept,
        pages: AtomicUsize::new(0),
        fail_from_page,
    });
    // Subscribed for good: every message is delivered, so kept.
    broker.inner.subscribe(&room("r")).await.unwrap();
    let auth = Authenticator::new(AuthConfig::default()).unwrap();
    let node = Node::assemble(Config::defaults(), hub, broker.clone(), metrics, auth);
    (node, broker)
}

impl Broker for Durable {
    fn publish(&self, req: PublishRequest) -> BoxFuture<'static, Result<Published, BrokerError>> {
        self.inner.publish(req)
    }

    fn subscribe(&self, room: &RoomName) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.subscribe(room)
    }

    fn unsubscribe(&self, room: &RoomName) {
        self.inner.unsubscribe(room);
    }

    fn position(&self, room: &RoomName) -> BoxFuture<'static, Result<Position, BrokerError>> {
        self.inner.position(room)
    }

    fn durable(&self) -> bool {
        true
    }

    fn history(
        &self,
        room: &RoomName,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Option<History>, BrokerError>> {
        let page = self.pages.fetch_add(1, Ordering::SeqCst);
        if page >= self.fail_from_page {
            let e = BrokerError::Unavailable("history unreadable".into());
            return std::future::ready(Err(e)).boxed();
        }
        let kept = self.kept.messages.lock().unwrap();
        let in_room = || kept.iter().filter(|m| m.room == *room);
        let mut bytes = 0;
        let messages = in_room()
            .filter(|m| m.offset > after)
            .take(limit)
            .take_while(|m| {
                bytes += m.frame.len();
                bytes <= max_bytes || bytes == m.frame.len()
            })
            .cloned()
            .collect();
        let history = History {
            epoch: in_room()
                .last()
                .map(|m| m.epoch.clone())
                .unwrap_or_default(),
            last: in_room().last().map_or(0, |m| m.offset),
            messages,
            read: None,
        };
        std::future::ready(Ok(Some(history))).boxed()
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.inner.health()
    }

    fn kind(&self) -> &'static str {
        "durable-test"
    }
}

#[test]
fn every_close_reason_has_a_metric_series() {
    let ends = [
        End::ClientClosed,
        End::ClientGone,
        End::SlowConsumer,
        End::Drained {
            after_ms: 0,
            reason: "draining",
        },
        End::Drained {
            after_ms: 0,
            reason: "rebalance",
        },
        End::BinaryFrame,
        End::TokenExpired,
        End::ReplayFailed,
        End::ProtocolError {
            code: 1002,
            reason: "",
            error: String::new(),
        },
        End::SocketError(String::new()),
    ];
    let reasons: Vec<&str> = ends.iter().map(End::as_str).collect();
    assert_eq!(reasons, crate::metrics::CLOSES);
}
