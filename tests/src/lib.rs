//! Helpers for integration tests: real WebSocket clients, in-process
//! `chorus-server` nodes on ephemeral ports, a silencing proxy, the Helm
//! chart as Helm renders it. External
//! processes (Redis, Sentinel, the `chorus-server` binary) come from
//! `chorus-testkit`.
#![allow(clippy::unwrap_used)]

pub mod chart;
pub mod cluster;
pub mod proxy;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chorus_server::{Config, Node};
use chorus_testkit::ChorusServer;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

/// The `chorus-server` binary at `exe` (a test's
/// `env!("CARGO_BIN_EXE_chorus-server")`) started with `args` and `env` on a
/// free port, once it is ready.
pub async fn spawn_server(exe: &str, args: &[&str], env: &[(&str, &str)]) -> ChorusServer {
    ChorusServer::launch(Path::new(exe), args, env, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `n` nodes on one broker (node ids `node-0`…), each started with `extra`
/// flags and ready (its broker link up) before the next starts.
pub async fn fleet(n: usize, broker: &str, extra: &[&str]) -> Vec<TestNode> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = format!("node-{i}");
        let mut flags = vec!["--broker", broker, "--node-id", &id];
        flags.extend_from_slice(extra);
        let node = TestNode::start(&flags).await;
        wait_until("the node to connect to its broker", || async {
            node.node.ready().is_ok()
        })
        .await;
        out.push(node);
    }
    out
}

/// A `chorus-server` node running inside the test process.
pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestNode {
    /// Starts a node with `chorus-server` flags (`--listen` is chosen here).
    pub async fn start(flags: &[&str]) -> Self {
        let mut args = vec!["chorus-server"];
        args.extend_from_slice(flags);
        let config = Config::try_parse_from(args).unwrap();
        let node = Node::start(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(chorus_server::run(listener, node.clone(), async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            node,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A connected client that has read its `welcome`.
    pub async fn client(&self) -> WsClient {
        WsClient::connect(&self.ws_url()).await.unwrap()
    }

    /// Drains and stops the node, waiting for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    /// Stops the node at once, without a drain (as if the process died).
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// The value of a metric line (`name` or `name{labels}`) in `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(&self.http("/metrics"), name).await
    }

    /// `POST /api/v1/rooms/{room}/messages` with `body` (`{"data", "key"?}`):
    /// the status and the JSON answer.
    pub async fn post_message(&self, room: &str, body: Value) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(self.http(&format!("/api/v1/rooms/{room}/messages")))
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// The body of `GET path` (the demo page, say), whatever the status.
    pub async fn get_text(&self, path: &str) -> String {
        reqwest::get(self.http(path))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Reads one sample from a Prometheus endpoint; panics when it is missing.
pub async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
}

/// What a client saw next.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Frame(Value),
    Closed(Option<u16>),
}

/// A real WebSocket client speaking the Chorus protocol.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
    /// Frames read while waiting for a reply, handed out by `next_*` later.
    pending: VecDeque<Value>,
    next_id: u64,
}

impl WsClient {
    pub async fn connect(url: &str) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let mut client = Self {
            ws,
            welcome: Value::Null,
            pending: VecDeque::new(),
            next_id: 1,
        };
        let welcome = client.raw_frame().await;
        assert_eq!(
            welcome["op"], "welcome",
            "first frame must be welcome: {welcome}"
        );
        client.welcome = welcome;
        Ok(client)
    }

    pub fn session(&self) -> String {
        self.welcome["session"].as_str().unwrap().to_string()
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_string())).await.unwrap();
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::binary(data)).await.unwrap();
    }

    /// The next event from the socket (pending frames first).
    pub async fn event(&mut self) -> Event {
        if let Some(v) = self.pending.pop_front() {
            return Event::Frame(v);
        }
        self.read_event(WAIT)
            .await
            .unwrap_or_else(|| panic!("nothing received within {WAIT:?}"))
    }

    /// The next event, or `None` when nothing comes within `wait`.
    pub async fn read_event(&mut self, wait: Duration) -> Option<Event> {
        loop {
            let msg = tokio::time::timeout(wait, self.ws.next()).await.ok()?;
            return Some(match msg {
                None => Event::Closed(None),
                Some(Err(_)) => Event::Closed(None),
                Some(Ok(Message::Text(t))) => Event::Frame(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(frame))) => {
                    // Answer the close frame at once, as browsers do (the
                    // library only queued the reply).
                    let _ = self.ws.flush().await;
                    Event::Closed(frame.map(|f: CloseFrame| u16::from(f.code)))
                }
                Some(Ok(_)) => continue,
            });
        }
    }

    async fn raw_frame(&mut self) -> Value {
        match self.read_event(WAIT).await {
            Some(Event::Frame(v)) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame (pending first); panics on close or timeout.
    pub async fn frame(&mut self) -> Value {
        match self.event().await {
            Event::Frame(v) => v,
            Event::Closed(code) => panic!("connection closed ({code:?}) while waiting for a frame"),
        }
    }

    /// The next `message` frame; other frames in between are an error.
    pub async fn message(&mut self) -> Value {
        let v = self.frame().await;
        assert_eq!(v["op"], "message", "expected a message, got {v}");
        v
    }

    /// Sends a request with a fresh id and returns the reply with that id;
    /// messages that arrive meanwhile are kept for `message()`.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        frame["id"] = json!(id);
        self.send(frame).await;
        loop {
            let v = self.raw_frame().await;
            if v["id"] == json!(id) && v["op"] != "message" {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    pub async fn subscribe(&mut self, room: &str) -> Value {
        let reply = self.request(json!({"op": "subscribe", "room": room})).await;
        assert_eq!(reply["op"], "ok", "subscribe {room}: {reply}");
        reply
    }

    pub async fn publish(&mut self, room: &str, data: Value) -> Value {
        self.request(json!({"op": "publish", "room": room, "data": data}))
            .await
    }

    /// Round-trips a ping: every frame the server queued before the pong is
    /// kept in `pending`, so after this returns, "nothing pending" means the
    /// server sent nothing else.
    pub async fn sync(&mut self) {
        let reply = self.request(json!({"op": "ping"})).await;
        assert_eq!(reply["op"], "pong");
    }

    pub fn pending(&self) -> &VecDeque<Value> {
        &self.pending
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Polls `check` until it returns true or `WAIT` passes.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    chorus_testkit::wait::until(what, WAIT, async || check().await.then_some(()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Publishes to `room` one message after another (`{"n": 1}`, `{"n": 2}`, …)
/// until stopped; the last acknowledged offset is in `acked`.
pub struct Publisher {
    pub acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<WsClient>,
}

impl Publisher {
    pub fn start(mut client: WsClient, room: impl Into<String>) -> Self {
        let room = room.into();
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                let ok = client.publish(&room, json!({"n": n})).await;
                if ok["op"] == "ok" {
                    a.store(ok["offset"].as_u64().unwrap(), Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client
        });
        Self { acked, stop, task }
    }

    /// Waits until `offset` was acknowledged.
    pub async fn wait_for(&self, offset: u64) {
        self.wait_for_within(offset, WAIT).await;
    }

    /// [`Self::wait_for`] with a bound of its own (after a broker restart,
    /// say, when the first publishes time out while clients reconnect).
    pub async fn wait_for_within(&self, offset: u64, limit: Duration) {
        let acked = self.acked.clone();
        chorus_testkit::wait::until(
            &format!("offset {offset} to be published"),
            limit,
            async || (acked.load(Ordering::SeqCst) >= offset).then_some(()),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Stops publishing; returns the last acknowledged offset.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        self.acked.load(Ordering::SeqCst)
    }
}
