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

/// Connects and reads the `welcome`. Buffers are small: the idle scenario
/// holds thousands of these in one process.
pub async fn connect(url: &str) -> Result<Ws> {
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url, Some(config), true),
    )
    .await
    .context("connect timed out")?
    .with_context(|| format!("connect {url}"))?;
    let welcome = next_json(&mut ws).await?;
    if welcome["op"] != "welcome" {
        bail!("expected welcome, got {welcome}");
    }
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no frame within 10 s")?
            .ok_or_else(|| anyhow!("connection closed"))??;
        match msg {
            Message::Text(t) => return Ok(serde_json::from_str(&t)?),
            Message::Close(c) => bail!("closed by server: {c:?}"),
            _ => {}
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

pub async fn subscribe(ws: &mut Ws, room: &str) -> Result<()> {
    request(ws, json!({"op":"subscribe","id":1,"room":room})).await?;
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
    pub offset: u64,
}

fn number_after(text: &str, key: &str) -> Option<(u64, usize)> {
    let at = text.find(key)? + key.len();
    let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
    Some((text[at..at + digits].parse().ok()?, at + digits))
}

/// Reads a `message` frame without a full JSON parse (the load generator
/// shares the cores with the servers): the server writes `data` verbatim
/// before `offset`, and the payload is ours.
pub fn parse_message(text: &str) -> Option<Msg> {
    if !text.starts_with(r#"{"op":"message""#) {
        return None;
    }
    let (t_us, end) = number_after(text, r#""data":{"t":"#)?;
    let rest = &text[end..];
    let (seq, end) = number_after(rest, r#","s":"#)?;
    let rest = &rest[end..];
    let (offset, _) = number_after(rest, r#","offset":"#)?;
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
    pub last_frame_at: u64,
}

/// Reads `message` frames until told to stop.
pub async fn run_subscriber(
    mut ws: Ws,
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
    loop {
        let target = stop.borrow().clone();
        if let Some(t) = &target
            && (r.seen.len() >= t.expect.get(room).copied().unwrap_or(0)
                || Instant::now() >= t.deadline)
        {
            break;
        }
        let deadline = target.map_or(far, |t| t.deadline);
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let now = now_us();
                    let Some(m) = parse_message(&text) else { continue };
                    r.frames += 1;
                    r.last_frame_at = now;
                    if !r.seen.insert(m.seq) {
                        r.duplicates += 1;
                    }
                    if let Some(prev) = last_offset {
                        if m.offset <= prev {
                            r.out_of_order += 1;
                        } else {
                            r.offset_gaps += m.offset - prev - 1;
                        }
                    }
                    last_offset = Some(m.offset);
                    r.latency.record(now.saturating_sub(m.t_us));
                    if keep_arrivals {
                        r.arrivals.push((m.t_us, now));
                    }
                }
                Some(Ok(Message::Close(c))) => {
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
            _ = tokio::time::sleep_until(deadline) => {}
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

/// Publishes per `spec`, keeping at most `spec.window` publishes in flight.
pub async fn run_publisher(spec: PubSpec, keep_timeline: bool) -> Result<PubReport> {
    let mut ws = connect(&spec.url).await?;
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
    loop {
        let now = Instant::now();
        let done = spec.count.is_some_and(|c| k >= c) || until.is_some_and(|u| now >= u);
        if done {
            if inflight.is_empty() {
                break;
            }
            let limit = *owed_until.get_or_insert(now + Duration::from_secs(5));
            if now >= limit {
                r.unanswered = inflight.len() as u64;
                break;
            }
        } else if inflight.len() < spec.window && now >= due_of(k) {
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
                let frame = format!(
                    r#"{{"op":"publish","id":{next_id},"room":"{room}","data":{}}}"#,
                    payload(t, seq, spec.payload)
                );
                ws.feed(Message::Text(frame.into())).await?;
                inflight.insert(next_id, (room_ix, seq, t));
                next_id += 1;
                k += 1;
                r.sent += 1;
                batch += 1;
            }
            ws.flush().await?;
            continue;
        }
        // Wait for a reply, the next due time or the end.
        let mut wake = now + Duration::from_secs(3600);
        if let Some(limit) = owed_until {
            wake = wake.min(limit);
        }
        if !done {
            if inflight.len() < spec.window {
                wake = wake.min(due_of(k));
            }
            if let Some(u) = until {
                wake = wake.min(u);
            }
        }
        tokio::select! {
            msg = ws.next() => {
                let msg = msg.ok_or_else(|| anyhow!("publisher connection closed"))??;
                let Message::Text(text) = msg else { continue };
                let v: Value = serde_json::from_str(&text)?;
                let Some(id) = v["id"].as_u64() else { continue };
                let Some((room_ix, seq, t)) = inflight.remove(&id) else { continue };
                let ok = v["op"] == "ok";
                if ok {
                    r.acked.push((room_ix, seq));
                    r.ack_latency.record(now_us().saturating_sub(t));
                } else {
                    let code = v["code"].as_str().unwrap_or("?").to_string();
                    *r.errors.entry(code).or_default() += 1;
                }
                if keep_timeline {
                    r.timeline.push((t, ok));
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    let _ = ws.close(None).await;
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
                offset: 7
            })
        );
        assert_eq!(parse_message(r#"{"op":"ok","id":1}"#), None);
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
