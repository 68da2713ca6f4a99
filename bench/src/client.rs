//! Wire-protocol clients: connecting, subscribing, and the two workers every
//! scenario is made of — a subscriber that checks and times each message,
//! and a publisher that sends at a fixed rate or as fast as its window of
//! in-flight publishes allows.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::hist::Histogram;
use crate::peers::{CENTRIFUGO_API_KEY, Target};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Microseconds since the bench started; publishers stamp it into each
/// payload and subscribers (in the same process) subtract it from their own
/// clock, so no wall-clock step can distort a latency.
pub fn now_us() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// Connects and reads the `welcome` (for a peer: its own opening
/// exchange). Buffers are small: the idle scenario holds thousands of these
/// in one process. Connections leave from 127.0.0.1 to 127.0.0.8 in turn,
/// so that more than one address's worth of ephemeral ports can be open.
pub async fn connect(url: &str, target: Target) -> Result<Ws> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .context("a ws:// URL")?;
    let addr: std::net::SocketAddr = tokio::net::lookup_host(host)
        .await?
        .next()
        .context("no address")?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    if addr.ip().is_loopback() {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 8;
        socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1 + n as u8], 0)))?;
    }
    let opened = async {
        let tcp = socket.connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(tcp),
            Some(config),
        )
        .await?;
        anyhow::Ok(ws)
    };
    let mut ws = tokio::time::timeout(Duration::from_secs(10), opened)
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect {url}"))?;
    match target {
        Target::Chorus => {
            let welcome = next_json(&mut ws).await?;
            if welcome["op"] != "welcome" {
                bail!("expected welcome, got {welcome}");
            }
        }
        Target::Centrifugo => {
            ws.send(Message::Text(r#"{"id":1,"connect":{}}"#.into()))
                .await?;
            let reply = next_reply(&mut ws, 1).await?;
            if reply.get("connect").is_none() {
                bail!("centrifugo refused the connection: {reply}");
            }
        }
        Target::Socketio => {
            let open = next_text(&mut ws).await?;
            if !open.starts_with('0') {
                bail!("expected the Engine.IO open packet, got {open}");
            }
            ws.send(Message::Text("40".into())).await?;
            let connected = next_text(&mut ws).await?;
            if !connected.starts_with("40") {
                bail!("expected the Socket.IO connect packet, got {connected}");
            }
        }
    }
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> Result<Value> {
    Ok(serde_json::from_str(&next_text(ws).await?)?)
}

async fn next_text(ws: &mut Ws) -> Result<String> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no frame within 10 s")?
            .ok_or_else(|| anyhow!("connection closed"))??;
        match msg {
            Message::Text(t) => return Ok(t.to_string()),
            Message::Close(c) => bail!("closed by server: {c:?}"),
            _ => {}
        }
    }
}

/// The Centrifugo reply with `id` (pushes and pings before it are skipped;
/// a frame may hold several replies, one a line).
async fn next_reply(ws: &mut Ws, id: u64) -> Result<Value> {
    loop {
        let text = next_text(ws).await?;
        for line in text.lines() {
            let v: Value = serde_json::from_str(line)?;
            if v["id"] == id {
                if v.get("error").is_some() {
                    bail!("centrifugo command {id} failed: {v}");
                }
                return Ok(v);
            }
        }
    }
}

/// Sends a request and waits for its `ok` (or fails on its `error`).
pub async fn request(ws: &mut Ws, frame: Value) -> Result<Value> {
    let id = frame["id"].clone();
    ws.send(Message::Text(frame.to_string().into())).await?;
    loop {
        let reply = next_json(ws).await?;
        if reply["id"] == id {
            if reply["op"] == "ok" {
                return Ok(reply);
            }
            bail!("request {frame} failed: {reply}");
        }
    }
}

pub async fn subscribe(ws: &mut Ws, room: &str, target: Target) -> Result<()> {
    match target {
        Target::Chorus => {
            request(ws, json!({"op":"subscribe","id":1,"room":room})).await?;
        }
        Target::Centrifugo => {
            let cmd = json!({"id": 2, "subscribe": {"channel": room}});
            ws.send(Message::Text(cmd.to_string().into())).await?;
            next_reply(ws, 2).await?;
        }
        Target::Socketio => {
            let join = format!("421{}", json!(["join", room]));
            ws.send(Message::Text(join.into())).await?;
            loop {
                let text = next_text(ws).await?;
                if text.starts_with("431") {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// The payload every publisher sends: `{"t":<µs>,"s":<seq>,"p":"xxx…"}`,
/// padded so `data` is `size` bytes.
pub fn payload(t_us: u64, seq: u64, size: usize) -> String {
    let head = format!(r#"{{"t":{t_us},"s":{seq},"p":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(head.len() + pad + 2);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// What a subscriber needs from a `message` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub t_us: u64,
    pub seq: u64,
    /// The room offset (Chorus; the peers send none).
    pub offset: Option<u64>,
}

fn number_after(text: &str, key: &str) -> Option<(u64, usize)> {
    let at = text.find(key)? + key.len();
    let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
    Some((text[at..at + digits].parse().ok()?, at + digits))
}

/// Reads a message without a full JSON parse (the load generator shares
/// the cores with the servers): the servers write `data` verbatim — a
/// Chorus `message` frame, a Centrifugo publication push, a Socket.IO
/// `message` event — and the payload is ours.
pub fn parse_message(text: &str) -> Option<Msg> {
    let chorus = text.starts_with(r#"{"op":"#);
    if chorus && !text.starts_with(r#"{"op":"message""#) {
        return None;
    }
    let (t_us, end) = number_after(text, r#"{"t":"#)?;
    let rest = &text[end..];
    let (seq, end) = number_after(rest, r#","s":"#)?;
    let rest = &rest[end..];
    let offset = if chorus {
        Some(number_after(rest, r#","offset":"#)?.0)
    } else {
        None
    };
    Some(Msg { t_us, seq, offset })
}

/// A growable set of sequence numbers.
#[derive(Debug, Clone, Default)]
pub struct SeqSet {
    words: Vec<u64>,
}

impl SeqSet {
    /// Inserts; returns false if it was already there.
    pub fn insert(&mut self, n: u64) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        !was
    }

    pub fn contains(&self, n: u64) -> bool {
        self.words
            .get((n / 64) as usize)
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }
}

/// Tells subscribers when to stop: once they hold `expect` distinct
/// messages, or at `deadline` whatever they hold.
#[derive(Debug, Clone)]
pub struct StopAt {
    /// Distinct messages expected, per room index.
    pub expect: std::sync::Arc<Vec<u64>>,
    pub deadline: Instant,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct SubReport {
    pub node: usize,
    pub room: usize,
    /// Every `message` frame, duplicates included.
    pub frames: u64,
    pub seen: SeqSet,
    pub duplicates: u64,
    /// Frames whose offset was not above the previous one.
    pub out_of_order: u64,
    /// Offsets skipped (sum of the jumps).
    pub offset_gaps: u64,
    pub latency: Histogram,
    /// Receive time of each delivery (µs), when asked for (failover).
    pub arrivals: Vec<(u64, u64)>,
    pub closed: Option<String>,
    /// The close code, when the server closed with a close frame.
    pub closed_code: Option<u16>,
    pub last_frame_at: u64,
    /// Bytes of the text of every message frame.
    pub bytes: u64,
}

/// Reads `message` frames until told to stop.
pub async fn run_subscriber(
    mut ws: Ws,
    proto: Target,
    node: usize,
    room: usize,
    mut stop: watch::Receiver<Option<StopAt>>,
    keep_arrivals: bool,
) -> SubReport {
    let mut r = SubReport {
        node,
        room,
        ..SubReport::default()
    };
    let mut last_offset: Option<u64> = None;
    let far = Instant::now() + Duration::from_secs(24 * 3600);
    // One timer for the whole run, moved only when the stop target comes:
    // a new timer per frame would cost the bench more than the frame.
    let timer = tokio::time::sleep_until(far);
    tokio::pin!(timer);
    let mut deadline = far;
    loop {
        if let Some(t) = &*stop.borrow() {
            if r.seen.len() >= t.expect.get(room).copied().unwrap_or(0)
                || Instant::now() >= t.deadline
            {
                break;
            }
            if t.deadline != deadline {
                deadline = t.deadline;
                timer.as_mut().reset(deadline);
            }
        }
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let now = now_us();
                    match (proto, text.as_str()) {
                        // Engine.IO ping, Centrifugo ping: answered, or the
                        // peer drops the connection.
                        (Target::Socketio, "2") => {
                            let _ = ws.send(Message::Text("3".into())).await;
                            continue;
                        }
                        (Target::Centrifugo, "{}") => {
                            let _ = ws.send(Message::Text("{}".into())).await;
                            continue;
                        }
                        _ => {}
                    }
                    let mut got = false;
                    for line in text.lines() {
                        let Some(m) = parse_message(line) else { continue };
                        got = true;
                        r.frames += 1;
                        r.bytes += line.len() as u64;
                        if !r.seen.insert(m.seq) {
                            r.duplicates += 1;
                        }
                        if let (Some(prev), Some(offset)) = (last_offset, m.offset) {
                            if offset <= prev {
                                r.out_of_order += 1;
                            } else {
                                r.offset_gaps += offset - prev - 1;
                            }
                        }
                        last_offset = m.offset.or(last_offset);
                        r.latency.record(now.saturating_sub(m.t_us));
                        if keep_arrivals {
                            r.arrivals.push((m.t_us, now));
                        }
                    }
                    if got {
                        r.last_frame_at = now;
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    r.closed_code = c.as_ref().map(|c| u16::from(c.code));
                    r.closed = Some(format!("{c:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    r.closed = Some(e.to_string());
                    break;
                }
                None => {
                    r.closed = Some("connection ended".into());
                    break;
                }
            },
            _ = stop.changed() => {}
            _ = &mut timer => {}
        }
    }
    let _ = ws.close(None).await;
    r
}

/// How a publisher paces itself.
#[derive(Debug, Clone)]
pub struct PubSpec {
    pub url: String,
    /// Rooms to publish to, round-robin: (room index in the scenario, name).
    pub rooms: Vec<(usize, String)>,
    /// Messages per second; `None`: as fast as the window allows.
    pub rate: Option<f64>,
    /// Stop after this many messages…
    pub count: Option<u64>,
    /// …or after publishing this long, whichever comes first.
    pub duration: Option<Duration>,
    pub window: usize,
    pub payload: usize,
    /// This publisher's sequence numbers are `first + k * step`.
    pub first: u64,
    pub step: u64,
    /// What the node runs: how to publish (Chorus and Socket.IO over their
    /// WebSocket, Centrifugo through its HTTP API).
    pub target: Target,
}

/// What one publisher got back.
#[derive(Debug, Default)]
pub struct PubReport {
    pub sent: u64,
    /// (room index, seq) of every publish answered `ok`.
    pub acked: Vec<(usize, u64)>,
    /// Error replies by code.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Publishes never answered before the end.
    pub unanswered: u64,
    /// publish → ok round trip.
    pub ack_latency: Histogram,
    /// Send time (µs) and outcome of every publish, when asked (failover).
    pub timeline: Vec<(u64, bool)>,
    /// How far behind its schedule the publisher fell at most (µs).
    pub max_lag_us: u64,
}

/// How long a publisher holds back after a publish was refused as
/// `rate_limited` (the room pushes back): it sends nothing new meanwhile.
const PUSHBACK_PAUSE: Duration = Duration::from_millis(20);

/// Where a publisher's publishes go, and where their answers come from.
enum Link {
    /// Chorus or Socket.IO: requests and replies on one WebSocket.
    Ws(Box<Ws>, Target),
    /// Centrifugo's HTTP publish API: one request per publish.
    Http {
        http: reqwest::Client,
        url: String,
        pending: futures_util::stream::FuturesUnordered<
            futures_util::future::BoxFuture<'static, (u64, Result<(), String>)>,
        >,
    },
}

impl Link {
    async fn open(spec: &PubSpec) -> Result<Self> {
        Ok(match spec.target {
            Target::Centrifugo => {
                let base = spec
                    .url
                    .split("/connection/")
                    .next()
                    .unwrap_or(&spec.url)
                    .replacen("ws://", "http://", 1);
                Link::Http {
                    http: reqwest::Client::builder()
                        .pool_max_idle_per_host(spec.window)
                        .build()?,
                    url: format!("{base}/api/publish"),
                    pending: Default::default(),
                }
            }
            target => Link::Ws(Box::new(connect(&spec.url, target).await?), target),
        })
    }

    /// Queues a publish (sent by [`Link::flush`]).
    async fn feed(&mut self, id: u64, room: &str, data: String) -> Result<()> {
        match self {
            Link::Ws(ws, Target::Socketio) => {
                let frame = format!(r#"42{id}["publish","{room}",{data}]"#);
                ws.feed(Message::Text(frame.into())).await?;
            }
            Link::Ws(ws, _) => {
                let frame =
                    format!(r#"{{"op":"publish","id":{id},"room":"{room}","data":{data}}}"#);
                ws.feed(Message::Text(frame.into())).await?;
            }
            Link::Http { http, url, pending } => {
                let request = http
                    .post(url.as_str())
                    .header("X-API-Key", CENTRIFUGO_API_KEY)
                    .header("Content-Type", "application/json")
                    .body(format!(r#"{{"channel":"{room}","data":{data}}}"#))
                    .send();
                pending.push(Box::pin(async move {
                    let outcome = match request.await {
                        Ok(resp) if resp.status().is_success() => match resp.text().await {
                            Ok(body) if !body.contains(r#""error""#) => Ok(()),
                            Ok(body) => Err(body),
                            Err(e) => Err(e.to_string()),
                        },
                        Ok(resp) => Err(resp.status().to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    (id, outcome)
                }));
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if let Link::Ws(ws, _) = self {
            ws.flush().await?;
        }
        Ok(())
    }

    /// The next answer: (id, `Ok` or the error code); `None` for frames
    /// that answer nothing (pings are answered here).
    async fn answer(&mut self) -> Result<Option<(u64, Result<(), String>)>> {
        match self {
            Link::Http { pending, .. } => match pending.next().await {
                Some(answer) => Ok(Some(answer)),
                None => std::future::pending().await,
            },
            Link::Ws(ws, target) => {
                let msg = ws
                    .next()
                    .await
                    .ok_or_else(|| anyhow!("publisher connection closed"))??;
                let Message::Text(text) = msg else {
                    return Ok(None);
                };
                if *target == Target::Socketio {
                    if &*text == "2" {
                        ws.send(Message::Text("3".into())).await?;
                    }
                    // An ack: 43<id>[…].
                    let Some(rest) = text.strip_prefix("43") else {
                        return Ok(None);
                    };
                    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                    return Ok(rest[..digits].parse().ok().map(|id| (id, Ok(()))));
                }
                let v: Value = serde_json::from_str(&text)?;
                let Some(id) = v["id"].as_u64() else {
                    return Ok(None);
                };
                if v["op"] == "ok" {
                    return Ok(Some((id, Ok(()))));
                }
                let code = v["code"].as_str().unwrap_or("?").to_string();
                Ok(Some((id, Err(code))))
            }
        }
    }

    async fn close(self) {
        if let Link::Ws(mut ws, _) = self {
            let _ = (*ws).close(None).await;
        }
    }
}

/// Publishes per `spec`, keeping at most `spec.window` publishes in flight.
pub async fn run_publisher(spec: PubSpec, keep_timeline: bool) -> Result<PubReport> {
    let mut link = Link::open(&spec).await?;
    let mut r = PubReport::default();
    // id -> (room index, seq, sent at)
    let mut inflight: std::collections::HashMap<u64, (usize, u64, u64)> = Default::default();
    let start = Instant::now();
    let until = spec.duration.map(|d| start + d);
    let mut next_id: u64 = 1;
    let mut k: u64 = 0;
    let due_of = |k: u64| match spec.rate {
        Some(rate) => start + Duration::from_secs_f64(k as f64 / rate),
        None => start,
    };
    // Once nothing is left to send, replies still owed get a bounded time.
    let mut owed_until: Option<Instant> = None;
    // Refused as `rate_limited`: send nothing new until then.
    let mut paused_until = start;
    loop {
        let now = Instant::now();
        let done = spec.count.is_some_and(|c| k >= c) || until.is_some_and(|u| now >= u);
        let next_due = due_of(k).max(paused_until);
        if done {
            if inflight.is_empty() {
                break;
            }
            let limit = *owed_until.get_or_insert(now + Duration::from_secs(5));
            if now >= limit {
                r.unanswered = inflight.len() as u64;
                break;
            }
        } else if inflight.len() < spec.window && now >= next_due {
            // Send every publish that is due (up to the window), then flush once.
            let mut batch = 0;
            while inflight.len() < spec.window && spec.count.is_none_or(|c| k < c) && batch < 64 {
                let now = Instant::now();
                let due = due_of(k);
                if due > now {
                    break;
                }
                if spec.rate.is_some() {
                    r.max_lag_us = r.max_lag_us.max((now - due).as_micros() as u64);
                }
                let seq = spec.first + k * spec.step;
                let (room_ix, room) = &spec.rooms[(k as usize) % spec.rooms.len()];
                let room_ix = *room_ix;
                let t = now_us();
                link.feed(next_id, room, payload(t, seq, spec.payload))
                    .await?;
                inflight.insert(next_id, (room_ix, seq, t));
                next_id += 1;
                k += 1;
                r.sent += 1;
                batch += 1;
            }
            link.flush().await?;
            continue;
        }
        // Wait for a reply, the next due time or the end.
        let mut wake = now + Duration::from_secs(3600);
        if let Some(limit) = owed_until {
            wake = wake.min(limit);
        }
        if !done {
            if inflight.len() < spec.window {
                wake = wake.min(next_due);
            }
            if let Some(u) = until {
                wake = wake.min(u);
            }
        }
        tokio::select! {
            answer = link.answer() => {
                let Some((id, outcome)) = answer? else { continue };
                let Some((room_ix, seq, t)) = inflight.remove(&id) else { continue };
                let ok = outcome.is_ok();
                match outcome {
                    Ok(()) => {
                        r.acked.push((room_ix, seq));
                        r.ack_latency.record(now_us().saturating_sub(t));
                    }
                    Err(code) => {
                        if code == "rate_limited" {
                            paused_until = Instant::now() + PUSHBACK_PAUSE;
                        }
                        *r.errors.entry(code).or_default() += 1;
                    }
                }
                if keep_timeline {
                    r.timeline.push((t, ok));
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    link.close().await;
    Ok(r)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_asked_size_and_parses_back() {
        let p = payload(123, 45, 64);
        assert_eq!(p.len(), 64);
        let v: Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["s"], 45);
        let frame = format!(
            r#"{{"op":"message","room":"r","data":{p},"offset":7,"epoch":"e","from":"x"}}"#
        );
        assert_eq!(
            parse_message(&frame),
            Some(Msg {
                t_us: 123,
                seq: 45,
                offset: Some(7)
            })
        );
        assert_eq!(parse_message(r#"{"op":"ok","id":1}"#), None);
        let peers = [
            format!(r#"{{"push":{{"channel":"r","pub":{{"data":{p}}}}}}}"#),
            format!(r#"42["message",{p}]"#),
        ];
        for text in peers {
            let m = parse_message(&text).unwrap();
            assert_eq!((m.t_us, m.seq, m.offset), (123, 45, None), "{text}");
        }
    }

    #[test]
    fn seq_set_counts_distinct() {
        let mut s = SeqSet::default();
        assert!(s.insert(3));
        assert!(!s.insert(3));
        assert!(s.insert(1000));
        assert!(s.contains(1000) && !s.contains(999));
        assert_eq!(s.len(), 2);
    }
}
