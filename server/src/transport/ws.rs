//! The WebSocket endpoint and the connection loop.
//!
//! One task per connection. It reads client frames, writes what the node
//! queued for it (batched: every frame waiting in the queue goes out in one
//! flush, so one write syscall carries many messages), keeps up to
//! [`MAX_INFLIGHT`] publishes in flight with their replies in request order,
//! and obeys the node's close requests (slow consumer, drain).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;

use crate::auth::Session;
use crate::broker::{BrokerError, Position, PublishRequest};
use crate::hub::{CloseReason, ConnHandle, ConnId, Outbound, QueueRx};
use crate::node::{Node, Slot};
use crate::protocol::{self, ClientFrame, ErrorCode, RoomName, SUBPROTOCOL, ServerFrame, Since};

/// Publishes one connection may have waiting for the broker; further frames
/// are not read until one completes (backpressure on the client).
const MAX_INFLIGHT: usize = 64;
/// Most queued frames written in one flush.
const MAX_BATCH: usize = 256;
/// Socket read buffer. Small on purpose: it is allocated for every
/// connection up front (the library default is 128 KiB), and the library
/// zeroes it on every read attempt — including the one the connection loop
/// makes each time it wakes to write a delivery. Client frames are small;
/// a larger one is read in several chunks.
const READ_BUFFER: usize = 1024;
/// Bytes buffered before a write reaches the socket even without a flush.
const WRITE_BUFFER: usize = 64 * 1024;
/// How long a closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
pub struct UpgradeQuery {
    token: Option<String>,
}

/// `GET /ws`: checks the drain, auth and the connection limit, then upgrades.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    Query(query): Query<UpgradeQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if node.is_draining() {
        node.metrics.connections_refused.inc();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: connect to another node\n",
        )
            .into_response();
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_token);
    let session = match node.auth.authenticate(query.token.as_deref().or(bearer)) {
        Ok(session) => session,
        Err(e) => {
            return (StatusCode::UNAUTHORIZED, format!("unauthorized: {e}\n")).into_response();
        }
    };
    let Some(slot) = node.reserve_slot() else {
        node.metrics.connections_refused.inc();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached: connect to another node\n",
        )
            .into_response();
    };
    let max_frame = node.config.max_frame_bytes as usize;
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        // Frames over the limit get `too_large` and the connection stays; far
        // larger ones are cut off by the library (close 1009) before we buffer them.
        .max_message_size(max_frame.saturating_mul(4).max(1 << 20))
        .max_frame_size(max_frame.saturating_mul(4).max(1 << 20))
        .on_upgrade(move |socket| connection(node, socket, session, slot))
}

/// Why a connection ended (logged once per connection).
#[derive(Debug)]
enum End {
    ClientClosed,
    ClientGone,
    SlowConsumer,
    Drained,
    BinaryFrame,
    TokenExpired,
    SocketError(String),
}

impl End {
    fn as_str(&self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::ClientGone => "client_gone",
            End::SlowConsumer => "slow_consumer",
            End::Drained => "drained",
            End::BinaryFrame => "binary_frame",
            End::TokenExpired => "token_expired",
            End::SocketError(_) => "socket_error",
        }
    }
}

async fn connection(node: Arc<Node>, mut socket: WebSocket, auth: Session, slot: Slot) {
    let (handle, queue) = ConnHandle::new(node.config.send_queue as usize);
    let id = node.register(handle.ctl.clone());
    let session: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
    tracing::info!(conn = id.0, %session, user = auth.user(), "connection opened");
    let mut conn = Conn {
        node: node.clone(),
        id,
        session: session.clone(),
        auth,
        handle,
        rooms: HashMap::new(),
        rate: RateLimit::new(node.config.max_publish_rate),
    };
    // The socket lives here, not in `run`'s state: a future that owns a
    // parameter keeps it twice (368 bytes each, in every connection's task).
    let end = conn.run(&mut socket, queue).await;
    for room in std::mem::take(&mut conn.rooms).into_keys() {
        node.hub.leave(&*node.broker, &room, id);
    }
    node.unregister(id);
    drop(slot);
    match &end {
        End::SocketError(e) => {
            tracing::info!(conn = id.0, %session, reason = end.as_str(), error = %e, "connection closed")
        }
        _ => tracing::info!(conn = id.0, %session, reason = end.as_str(), "connection closed"),
    }
}

type Reply = BoxFuture<'static, String>;

struct Conn {
    node: Arc<Node>,
    id: ConnId,
    session: Arc<str>,
    auth: Session,
    handle: ConnHandle,
    /// The rooms the client is in, each with how far its messages went out.
    rooms: HashMap<RoomName, SentUpTo>,
    rate: RateLimit,
}

/// Token bucket for a connection's publishes (`--max-publish-rate`; 0 = off):
/// the rate per second, with a burst of one second's worth.
struct RateLimit {
    per_second: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        Self {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            last: std::time::Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.per_second);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Conn {
    async fn run(&mut self, socket: &mut WebSocket, mut queue: QueueRx) -> End {
        let ctl = self.handle.ctl.clone();
        // One close-request future for the connection's life: re-creating
        // it each turn of the loop would register and unregister a waiter
        // on every delivery.
        let closed = ctl.closed();
        tokio::pin!(closed);
        let welcome = protocol::encode(&ServerFrame::Welcome {
            session: &self.session,
            node: &self.node.node_id,
            version: env!("CARGO_PKG_VERSION"),
        });
        if let Err(e) = socket.send(Message::Text(welcome.into())).await {
            return End::SocketError(e.to_string());
        }
        let mut inflight: FuturesOrdered<Reply> = FuturesOrdered::new();
        let mut out: Vec<Message> = Vec::new();
        let mut batch: Vec<Outbound> = Vec::new();
        // A client's token is good until its `exp`; the connection ends
        // then. Boxed, and only for tokens with an expiry: an anonymous idle
        // connection carries no timer.
        let mut expiry = self.auth.expires_at().map(|at| {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            Box::pin(tokio::time::sleep(left))
        });
        loop {
            tokio::select! {
                biased;
                reason = &mut closed => return Box::pin(close(socket, reason)).await,
                () = async { if let Some(timer) = expiry.as_mut() { timer.await } }, if expiry.is_some() => {
                    let frame = CloseFrame { code: close_code::POLICY, reason: Utf8Bytes::from_static("token expired: reconnect with a fresh token") };
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
                    return End::TokenExpired;
                }
                _ = queue.recv_many(&mut batch, MAX_BATCH) => {
                    for item in batch.drain(..) {
                        out.extend(self.outbound(item));
                    }
                }
                Some(reply) = inflight.next(), if !inflight.is_empty() => out.push(Message::Text(reply.into())),
                msg = socket.recv(), if inflight.len() < MAX_INFLIGHT => match msg {
                    None => return End::ClientGone,
                    Some(Err(e)) => return End::SocketError(e.to_string()),
                    Some(Ok(Message::Text(text))) => {
                        if let Some(reply) = self.handle_text(text, &mut inflight, &mut out).await {
                            out.push(Message::Text(reply.into()));
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        self.node.metrics.bad_frames.inc();
                        let frame = CloseFrame {
                            code: close_code::UNSUPPORTED,
                            reason: Utf8Bytes::from_static("binary frames are not supported: send JSON text frames"),
                        };
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
                        return End::BinaryFrame;
                    }
                    Some(Ok(Message::Close(_))) => return End::ClientClosed,
                    // Pings are answered by the library.
                    Some(Ok(_)) => {}
                },
            }
            if !out.is_empty() {
                let write = async {
                    for msg in out.drain(..) {
                        socket.feed(msg).await?;
                    }
                    socket.flush().await
                };
                tokio::select! {
                    biased;
                    reason = &mut closed => return Box::pin(close(socket, reason)).await,
                    res = write => if let Err(e) = res { return End::SocketError(e.to_string()) },
                }
            }
        }
    }

    /// Handles one text frame; returns an immediate reply, or queues a
    /// deferred one in `inflight`.
    async fn handle_text(
        &mut self,
        text: Utf8Bytes,
        inflight: &mut FuturesOrdered<Reply>,
        out: &mut Vec<Message>,
    ) -> Option<String> {
        let max = self.node.config.max_frame_bytes as usize;
        if text.len() > max {
            self.node.metrics.bad_frames.inc();
            return Some(error(
                None,
                ErrorCode::TooLarge,
                &format!("frame is larger than {max} bytes"),
            ));
        }
        let frame = match protocol::decode(&text) {
            Ok(frame) => frame,
            Err(e) => {
                self.node.metrics.bad_frames.inc();
                return Some(error(e.id, e.code, &e.message));
            }
        };
        match frame {
            ClientFrame::Ping { id } => Some(protocol::encode(&ServerFrame::Pong { id })),
            ClientFrame::Subscribe { id, room, since } => {
                // Boxed: subscribing is rare, and its future would otherwise
                // be part of every connection's task for its whole life.
                Box::pin(self.subscribe(id, room, since, out)).await;
                None
            }
            ClientFrame::Unsubscribe { id, room } => Some(if self.rooms.remove(&room).is_some() {
                self.node.hub.leave(&*self.node.broker, &room, self.id);
                protocol::encode(&ServerFrame::ok(id))
            } else {
                error(
                    Some(id),
                    ErrorCode::NotSubscribed,
                    &format!("not subscribed to `{room}`"),
                )
            }),
            ClientFrame::Publish {
                id,
                room,
                data,
                key,
            } => {
                if !self.rate.allow() {
                    return Some(error(
                        Some(id),
                        ErrorCode::RateLimited,
                        &format!(
                            "more than {} publishes per second",
                            self.node.config.max_publish_rate
                        ),
                    ));
                }
                if !self.auth.may_publish(room.as_str()) {
                    return Some(error(
                        Some(id),
                        ErrorCode::Forbidden,
                        &format!("may not publish to `{room}`"),
                    ));
                }
                let fut = self.node.publish(PublishRequest {
                    room,
                    data,
                    from: Some(self.session.clone()),
                    key,
                });
                inflight.push_back(
                    async move {
                        match fut.await {
                            Ok(p) => protocol::encode(&ServerFrame::Ok {
                                id,
                                offset: Some(p.offset),
                                epoch: Some(&p.epoch),
                                recovered: None,
                                missed: None,
                                code: None,
                            }),
                            Err(e) => broker_error(Some(id), &e),
                        }
                    }
                    .boxed(),
                );
                None
            }
        }
    }

    /// Subscribes (joining the room before anything else, so nothing
    /// published from now on is missed), answers `ok`, and with `since`
    /// replays what the client missed right after the `ok`.
    ///
    /// A repeated subscribe to a room the client is already in changes
    /// nothing: its `ok` carries the offset the client was last sent, and
    /// the messages still queued for it follow.
    async fn subscribe(
        &mut self,
        id: u64,
        room: RoomName,
        since: Option<Since>,
        out: &mut Vec<Message>,
    ) {
        if !self.auth.may_subscribe(room.as_str()) {
            let e = error(
                Some(id),
                ErrorCode::Forbidden,
                &format!("may not subscribe to `{room}`"),
            );
            out.push(Message::Text(e.into()));
            return;
        }
        let node = self.node.clone();
        let already = self.rooms.get(&room).map(SentUpTo::position);
        let joined_now = already.is_none();
        if joined_now
            && let Err(e) = node
                .hub
                .join(&*node.broker, &room, self.id, self.handle.clone())
                .await
        {
            out.push(Message::Text(broker_error(Some(id), &e).into()));
            return;
        }
        let position = match already {
            Some(sent) => Ok(sent),
            None => node.broker.position(&room).await,
        };
        let outcome = match position {
            Ok(pos) => self.recover(&room, since, pos).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok((reply, replay)) => {
                // After `ok` with offset N (replayed through N, if asked)
                // the client gets exactly what follows: a message that was
                // published before but reaches this node just after the
                // join is not sent again.
                self.rooms
                    .entry(room)
                    .or_insert_with(|| SentUpTo::new(&reply.epoch))
                    .raise(&reply.epoch, reply.offset);
                out.push(Message::Text(reply.encode(id).into()));
                out.extend(replay);
            }
            Err(e) => {
                if joined_now {
                    node.hub.leave(&*node.broker, &room, self.id);
                }
                out.push(Message::Text(broker_error(Some(id), &e).into()));
            }
        }
    }

    /// What the `ok` of a subscribe says, and the frames to replay.
    async fn recover(
        &mut self,
        room: &RoomName,
        since: Option<Since>,
        pos: Position,
    ) -> Result<(SubscribeOk, Vec<Message>), BrokerError> {
        let plain = SubscribeOk {
            offset: pos.offset,
            epoch: pos.epoch.clone(),
            recovery: None,
        };
        let Some(since) = since else {
            return Ok((plain, Vec::new()));
        };
        let gone = |this: &Self| {
            this.node.metrics.history_gone.inc();
            Ok((
                SubscribeOk {
                    recovery: Some(Recovery::Gone),
                    ..plain.clone()
                },
                Vec::new(),
            ))
        };
        if *since.epoch != *pos.epoch || since.offset > pos.offset {
            return gone(self);
        }
        if since.offset == pos.offset {
            return Ok((
                SubscribeOk {
                    recovery: Some(Recovery::Done(0)),
                    ..plain.clone()
                },
                Vec::new(),
            ));
        }
        if !self.node.broker.durable() {
            return gone(self);
        }
        let max = self.node.config.history_size.max(1) as usize;
        let mut replay = Vec::new();
        let mut after = since.offset;
        while after < pos.offset {
            let Some(page) = self
                .node
                .broker
                .history(room, after, REPLAY_PAGE.min(max))
                .await?
            else {
                return gone(self);
            };
            if page.epoch != pos.epoch
                || !page.covers(after)
                || page.messages.is_empty()
                || replay.len() >= max
            {
                return gone(self);
            }
            for m in page.messages {
                after = m.offset;
                replay.push(Message::Text(m.frame));
            }
        }
        self.node.metrics.replayed.inc_by(replay.len() as u64);
        let missed = pos.offset - since.offset;
        Ok((
            SubscribeOk {
                recovery: Some(Recovery::Done(missed)),
                ..plain
            },
            replay,
        ))
    }

    /// A queued message as it goes out, unless the client already has it
    /// (or it precedes the subscription, or the client left the room).
    fn outbound(&mut self, out: Outbound) -> Option<Message> {
        match out {
            Outbound::Message(d) => self
                .rooms
                .get_mut(&d.room)?
                .advance(&d.epoch, d.offset)
                .then(|| Message::Text(d.frame.clone())),
        }
    }
}

/// How far a room's messages went out to the client: the offset (in an
/// epoch) the `ok` told it, a replay sent it through, or the last live
/// message it was sent.
struct SentUpTo {
    epoch: Arc<str>,
    offset: u64,
    /// Just subscribed (or replayed): live messages at or below the mark
    /// precede the subscription or were replayed, and are dropped, until the
    /// first one above it. Past that window every message goes out, so a
    /// room whose offsets went back (a broker that lost writes) is seen by
    /// the client, never dropped as duplicates.
    fresh: bool,
}

impl SentUpTo {
    fn new(epoch: &Arc<str>) -> Self {
        Self {
            epoch: epoch.clone(),
            offset: 0,
            fresh: true,
        }
    }

    fn position(&self) -> Position {
        Position {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    /// The client has the room's messages through `offset` (an `ok` or a
    /// replay): opens the window in which older live ones are dropped.
    fn raise(&mut self, epoch: &Arc<str>, offset: u64) {
        if *self.epoch == **epoch {
            self.offset = self.offset.max(offset);
        } else {
            self.epoch = epoch.clone();
            self.offset = offset;
        }
        self.fresh = true;
    }

    /// Whether a live message goes out; if so, it is the new mark.
    fn advance(&mut self, epoch: &Arc<str>, offset: u64) -> bool {
        if self.fresh {
            if *self.epoch == **epoch && offset <= self.offset {
                return false;
            }
            self.fresh = false;
        }
        if *self.epoch != **epoch {
            self.epoch = epoch.clone();
        }
        self.offset = offset;
        true
    }
}

/// Messages read from history per round trip while replaying.
const REPLAY_PAGE: usize = 500;

#[derive(Clone)]
struct SubscribeOk {
    offset: u64,
    epoch: Arc<str>,
    recovery: Option<Recovery>,
}

#[derive(Clone, Copy)]
enum Recovery {
    /// Everything missed follows the `ok` (this many messages).
    Done(u64),
    /// The history no longer covers what was missed.
    Gone,
}

impl SubscribeOk {
    fn encode(&self, id: u64) -> String {
        let (recovered, missed, code) = match self.recovery {
            None => (None, None, None),
            Some(Recovery::Done(n)) => (Some(true), Some(n), None),
            Some(Recovery::Gone) => (Some(false), Some(0), Some(ErrorCode::HistoryGone)),
        };
        protocol::encode(&ServerFrame::Ok {
            id,
            offset: Some(self.offset),
            epoch: Some(&self.epoch),
            recovered,
            missed,
            code,
        })
    }
}

fn error(id: Option<u64>, code: ErrorCode, message: &str) -> String {
    protocol::encode(&ServerFrame::Error { id, code, message })
}

fn broker_error(id: Option<u64>, e: &BrokerError) -> String {
    error(id, e.code(), &e.public_message())
}

/// Closes on the node's request: `reconnect` + 1001 for a drain, 1008 for a
/// slow consumer (best effort: its socket may be stuck).
async fn close(socket: &mut WebSocket, reason: CloseReason) -> End {
    let (frames, end) = match reason {
        CloseReason::SlowConsumer => (
            vec![Message::Close(Some(CloseFrame {
                code: close_code::POLICY,
                reason: Utf8Bytes::from_static("slow consumer: send queue full"),
            }))],
            End::SlowConsumer,
        ),
        CloseReason::Draining { after_ms } => (
            vec![
                Message::Text(
                    protocol::encode(&ServerFrame::Reconnect {
                        reason: "draining",
                        after_ms,
                    })
                    .into(),
                ),
                Message::Close(Some(CloseFrame {
                    code: close_code::AWAY,
                    reason: Utf8Bytes::from_static("server draining: reconnect"),
                })),
            ],
            End::Drained,
        ),
    };
    let send = async {
        for f in frames {
            socket.feed(f).await?;
        }
        socket.flush().await
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, send).await;
    end
}
