//! The WebSocket endpoint and the connection loop.
//!
//! One task per connection. It reads client frames, writes what the node
//! queued for it (batched: every frame waiting in the queue goes out in one
//! flush, so one write syscall carries many messages), keeps up to
//! [`MAX_INFLIGHT`] publishes in flight with their replies in request order,
//! streams replays a page at a time, and obeys the node's close requests
//! (slow consumer, drain). What a connection holds beyond its socket is one
//! batch or one replay page: a write the socket does not take within
//! `--send-timeout` makes a slow consumer. Every close it initiates
//! completes the WebSocket closing handshake.

use std::collections::HashMap;
use std::pin::Pin;
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
use tokio::time::Sleep;

use crate::auth::Grants;
use crate::broker::{Broker, BrokerError, History, Position, PublishRequest};
use crate::hub::{CloseReason, ConnHandle, ConnId, Outbound, QueueRx};
use crate::metrics::Metrics;
use crate::node::{Node, Slot};
use crate::protocol::{
    self, ClientFrame, ErrorCode, Frame, RoomName, SUBPROTOCOL, ServerFrame, Since,
};

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
/// How long a closing handshake may take before the socket is dropped: the
/// close frame waits behind what the socket still holds for a slow reader.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    let task = node.track();
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        // Frames over the limit get `too_large` and the connection stays; far
        // larger ones are cut off by the library (close 1009) before we buffer them.
        .max_message_size(max_frame.saturating_mul(4).max(1 << 20))
        .max_frame_size(max_frame.saturating_mul(4).max(1 << 20))
        .on_upgrade(move |socket| async move {
            connection(node, socket, session, slot).await;
            drop(task);
        })
}

/// Why a connection ended (logged once per connection), and so which close
/// frame it ends with.
#[derive(Debug)]
enum End {
    ClientClosed,
    ClientGone,
    SlowConsumer,
    Drained {
        after_ms: u64,
    },
    BinaryFrame,
    TokenExpired,
    /// A replay could not be read to its end (closed 1011).
    ReplayFailed,
    /// The client broke the WebSocket protocol.
    ProtocolError {
        code: u16,
        reason: &'static str,
        error: String,
    },
    SocketError(String),
}

impl End {
    fn as_str(&self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::ClientGone => "client_gone",
            End::SlowConsumer => "slow_consumer",
            End::Drained { .. } => "drained",
            End::BinaryFrame => "binary_frame",
            End::TokenExpired => "token_expired",
            End::ReplayFailed => "replay_failed",
            End::ProtocolError { .. } => "protocol_error",
            End::SocketError(_) => "socket_error",
        }
    }

    /// The close frame the node sends (code, reason); `None` when the
    /// client closed (its close frame was answered already) or is gone.
    fn close_frame(&self) -> Option<(u16, &'static str)> {
        Some(match self {
            End::SlowConsumer => (close_code::POLICY, "slow consumer: send queue full"),
            End::Drained { .. } => (close_code::AWAY, "server draining: reconnect"),
            End::BinaryFrame => (
                close_code::UNSUPPORTED,
                "binary frames are not supported: send JSON text frames",
            ),
            End::TokenExpired => (
                close_code::POLICY,
                "token expired: reconnect with a fresh token",
            ),
            End::ReplayFailed => (
                close_code::ERROR,
                "replay interrupted: subscribe again with since",
            ),
            End::ProtocolError { code, reason, .. } => (*code, *reason),
            End::ClientClosed | End::ClientGone | End::SocketError(_) => return None,
        })
    }

    /// What the node asked for.
    fn requested(reason: CloseReason) -> Self {
        match reason {
            CloseReason::SlowConsumer => End::SlowConsumer,
            CloseReason::Draining { after_ms } => End::Drained { after_ms },
        }
    }

    /// A failed read: the client broke the protocol — 1007 for text that is
    /// not UTF-8, 1009 for a frame or message over the size limit, 1002 for
    /// any other violation (bad continuation, reserved opcode or bits,
    /// unmasked frame, …) — or the socket failed.
    fn read_error(e: axum::Error) -> Self {
        use tungstenite::Error as WsError;
        use tungstenite::error::ProtocolError;
        let (code, reason) = match std::error::Error::source(&e)
            .and_then(|inner| inner.downcast_ref::<WsError>())
        {
            // The client closed the TCP connection without a close frame.
            Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                return End::ClientGone;
            }
            Some(WsError::Utf8(_)) => (close_code::INVALID, "text frame is not valid UTF-8"),
            Some(WsError::Capacity(_)) => (close_code::SIZE, "frame or message too large"),
            Some(WsError::Protocol(_)) => (close_code::PROTOCOL, "WebSocket protocol violation"),
            _ => return End::SocketError(e.to_string()),
        };
        End::ProtocolError {
            code,
            reason,
            error: e.to_string(),
        }
    }
}

async fn connection(node: Arc<Node>, mut socket: WebSocket, auth: Grants, slot: Slot) {
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
        replay: None,
        expiry: None,
        rate: RateLimit::new(node.config.max_publish_rate),
    };
    // The socket lives here, not in `run`'s state: a future that owns a
    // parameter keeps it twice (368 bytes each, in every connection's task).
    let end = conn.run(&mut socket, queue).await;
    // Out of its rooms (and its send queue gone with `run`) before the
    // closing handshake, which may wait on a slow client.
    for room in std::mem::take(&mut conn.rooms).into_keys() {
        node.hub.leave(&*node.broker, &room, id);
    }
    drop(conn);
    if let Some((code, reason)) = end.close_frame() {
        let before = match end {
            End::Drained { after_ms } => Some(Message::Text(
                protocol::encode(&ServerFrame::Reconnect {
                    reason: "draining",
                    after_ms,
                })
                .into(),
            )),
            _ => None,
        };
        shut(&mut socket, before, code, reason).await;
    }
    node.unregister(id);
    drop(slot);
    match &end {
        End::SocketError(error) | End::ProtocolError { error, .. } => {
            tracing::info!(conn = id.0, %session, reason = end.as_str(), %error, "connection closed")
        }
        _ => tracing::info!(conn = id.0, %session, reason = end.as_str(), "connection closed"),
    }
}

type Reply = BoxFuture<'static, Frame>;

struct Conn {
    node: Arc<Node>,
    id: ConnId,
    session: Arc<str>,
    auth: Grants,
    handle: ConnHandle,
    /// The rooms the client is in, each with how far its messages went out.
    rooms: HashMap<RoomName, SentUpTo>,
    /// A replay still going out (boxed: most connections never replay).
    replay: Option<Box<Replay>>,
    /// Fires at the token's `exp` (reset by `refresh`); `None` for tokens
    /// without one, so an anonymous idle connection carries no timer.
    expiry: Option<Pin<Box<Sleep>>>,
    rate: RateLimit,
}

/// What is left of a replay: the missed messages of a recovering
/// subscription go out one page at a time, each read from history only once
/// the page before it has left for the socket.
struct Replay {
    room: RoomName,
    epoch: Arc<str>,
    /// The last offset sent.
    after: u64,
    /// The last offset to replay: the room's offset in the `ok`.
    until: u64,
}

impl Replay {
    /// Adds `page` to `out` if it carries on from `after` (same epoch, no
    /// message trimmed in between); `false` when it does not.
    fn take(&mut self, page: History, out: &mut Vec<Message>, metrics: &Metrics) -> bool {
        if page.epoch != self.epoch || !page.covers(self.after) || page.messages.is_empty() {
            return false;
        }
        let before = out.len();
        for m in page
            .messages
            .into_iter()
            .take_while(|m| m.offset <= self.until)
        {
            self.after = m.offset;
            out.push(Message::Text(m.frame.into()));
        }
        metrics.replayed.inc_by((out.len() - before) as u64);
        true
    }

    /// The next page: at most [`REPLAY_PAGE`] messages and about
    /// [`REPLAY_PAGE_BYTES`].
    fn next_page(
        &self,
        broker: &dyn Broker,
    ) -> BoxFuture<'static, Result<Option<History>, BrokerError>> {
        let want = (self.until - self.after).min(REPLAY_PAGE as u64) as usize;
        broker.history(&self.room, self.after, want, REPLAY_PAGE_BYTES)
    }

    fn done(&self) -> bool {
        self.after >= self.until
    }
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
        let send_timeout = self.node.config.send_timeout;
        let mut inflight: FuturesOrdered<Reply> = FuturesOrdered::new();
        let mut out: Vec<Message> = vec![Message::Text(welcome.into())];
        let mut batch: Vec<Outbound> = Vec::new();
        self.expiry = expiry_timer(&self.auth);
        loop {
            if !out.is_empty() {
                // A client that takes nothing for `--send-timeout` is a slow
                // consumer, whether or not more traffic would overflow its
                // queue: what it holds is this batch, no more.
                tokio::select! {
                    biased;
                    end = stopped(closed.as_mut(), &mut self.expiry) => return end,
                    res = write_all(socket, &mut out, send_timeout) => match res {
                        Ok(()) => {}
                        Err(WriteError::Stalled) => {
                            if ctl.close(CloseReason::SlowConsumer) {
                                self.node.metrics.slow_consumers.inc();
                            }
                            return End::SlowConsumer;
                        }
                        Err(WriteError::Socket(e)) => return End::SocketError(e.to_string()),
                    },
                }
            } else if let Some(replay) = self.replay.as_deref_mut() {
                // The next page of a replay, now that the last one went out.
                // Live messages wait in the send queue meanwhile (a queue that
                // overflows makes a slow consumer, as ever), and the client's
                // next requests in its socket.
                let page = replay.next_page(&*self.node.broker);
                let page = tokio::select! {
                    biased;
                    end = stopped(closed.as_mut(), &mut self.expiry) => return end,
                    page = page => page,
                };
                let metrics = &self.node.metrics;
                let taken = page
                    .ok()
                    .flatten()
                    .is_some_and(|page| replay.take(page, &mut out, metrics));
                if !taken {
                    // Its `ok` promised these messages: the client must
                    // subscribe again with `since` (from another node, maybe).
                    return End::ReplayFailed;
                }
                if replay.done() {
                    self.replay = None;
                }
            } else {
                tokio::select! {
                    biased;
                    end = stopped(closed.as_mut(), &mut self.expiry) => return end,
                    _ = queue.recv_many(&mut batch, MAX_BATCH) => {
                        for item in batch.drain(..) {
                            out.extend(self.outbound(item));
                        }
                    }
                    Some(reply) = inflight.next(), if !inflight.is_empty() => out.push(Message::Text(reply.into())),
                    msg = socket.recv(), if inflight.len() < MAX_INFLIGHT => match msg {
                        None => return End::ClientGone,
                        Some(Err(e)) => return End::read_error(e),
                        Some(Ok(Message::Text(text))) => {
                            if let Some(reply) = self.handle_text(text, &mut inflight, &mut out).await {
                                out.push(Message::Text(reply.into()));
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            self.node.metrics.bad_frames.inc();
                            return End::BinaryFrame;
                        }
                        Some(Ok(Message::Close(_))) => {
                            // The library queued the echo of the client's close
                            // frame: send it, completing the closing handshake
                            // (the server then closes the TCP connection first).
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.flush()).await;
                            return End::ClientClosed;
                        }
                        // Pings are answered by the library.
                        Some(Ok(_)) => {}
                    },
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
    ) -> Option<Frame> {
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
            ClientFrame::Refresh { id, token } => Some(self.refresh(id, &token.0)),
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

    /// Takes a fresh token for the connection: same user, and every room the
    /// connection is in still allowed; its `exp` is the connection's end
    /// from now on. Refused (`unauthorized`, `forbidden`), the connection
    /// keeps its current token, and ends at that one's `exp`.
    fn refresh(&mut self, id: u64, token: &str) -> Frame {
        let fresh = match self.node.auth.authenticate(Some(token)) {
            Ok(fresh) => fresh,
            Err(e) => return error(Some(id), ErrorCode::Unauthorized, &e.to_string()),
        };
        if fresh.user() != self.auth.user() {
            return error(
                Some(id),
                ErrorCode::Forbidden,
                "the token is for another user: connect again with it",
            );
        }
        if let Some(room) = self.rooms.keys().find(|r| !fresh.may_subscribe(r.as_str())) {
            return error(
                Some(id),
                ErrorCode::Forbidden,
                &format!("the token does not allow `{room}`: unsubscribe from it first"),
            );
        }
        self.auth = fresh;
        self.expiry = expiry_timer(&self.auth);
        protocol::encode(&ServerFrame::ok(id))
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
        let max_rooms = node.config.max_rooms_per_connection as usize;
        if joined_now && self.rooms.len() >= max_rooms {
            let e = error(
                Some(id),
                ErrorCode::TooManyRooms,
                &format!(
                    "a connection may be in at most {max_rooms} rooms: unsubscribe from one first"
                ),
            );
            out.push(Message::Text(e.into()));
            return;
        }
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
        // The first page now, so that `ok` can say whether the history still
        // covers what was missed; the rest follows page by page.
        let mut replay = Replay {
            room: room.clone(),
            epoch: pos.epoch.clone(),
            after: since.offset,
            until: pos.offset,
        };
        let mut frames = Vec::new();
        let page = replay.next_page(&*self.node.broker).await?;
        let metrics = &self.node.metrics;
        if !page.is_some_and(|page| replay.take(page, &mut frames, metrics)) {
            return gone(self);
        }
        if !replay.done() {
            self.replay = Some(Box::new(replay));
        }
        let missed = pos.offset - since.offset;
        Ok((
            SubscribeOk {
                recovery: Some(Recovery::Done(missed)),
                ..plain
            },
            frames,
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
                .then(|| Message::Text(d.frame.clone().into())),
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
/// Bytes of frames in one replay page (a larger message comes alone): what a
/// replaying client that does not read pins, beside its socket buffers.
const REPLAY_PAGE_BYTES: usize = 256 * 1024;

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
    fn encode(&self, id: u64) -> Frame {
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

fn error(id: Option<u64>, code: ErrorCode, message: &str) -> Frame {
    protocol::encode(&ServerFrame::Error { id, code, message })
}

fn broker_error(id: Option<u64>, e: &BrokerError) -> Frame {
    error(id, e.code(), &e.public_message())
}

/// A timer for the session's `exp`; `None` for a session without one.
fn expiry_timer(session: &Grants) -> Option<Pin<Box<Sleep>>> {
    session.expires_at().map(|at| {
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        Box::pin(tokio::time::sleep(left))
    })
}

/// The connection must end for a reason other than the client's frames: the
/// node asks (slow consumer, drain), or the token expires.
async fn stopped(
    closed: Pin<&mut impl Future<Output = CloseReason>>,
    expiry: &mut Option<Pin<Box<Sleep>>>,
) -> End {
    let expired = async {
        match expiry.as_mut() {
            Some(timer) => timer.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        reason = closed => End::requested(reason),
        () = expired => End::TokenExpired,
    }
}

enum WriteError {
    /// The socket took no frame for the whole send timeout.
    Stalled,
    Socket(axum::Error),
}

/// Writes `out` (emptying it) in one flush; each frame, and the flush, must
/// be taken by the socket within `limit`.
async fn write_all(
    socket: &mut WebSocket,
    out: &mut Vec<Message>,
    limit: Duration,
) -> Result<(), WriteError> {
    for msg in out.drain(..) {
        within(limit, socket.feed(msg)).await?;
    }
    within(limit, socket.flush()).await
}

/// A socket write, given at most `limit` when it cannot complete at once. The
/// timer is set only then: most writes go straight into the buffer, and this
/// is on every delivery's path.
async fn within<F>(limit: Duration, mut write: F) -> Result<(), WriteError>
where
    F: Future<Output = Result<(), axum::Error>> + Unpin,
{
    let done = match (&mut write).now_or_never() {
        Some(done) => done,
        None => tokio::time::timeout(limit, write)
            .await
            .map_err(|_| WriteError::Stalled)?,
    };
    done.map_err(WriteError::Socket)
}

/// Sends `before` (if any) and a close frame, then completes the closing
/// handshake: reads on, discarding, until the client's close frame or the
/// end of the stream, so that the client finds the close frame behind
/// whatever its socket still holds, and the connection ends with a FIN
/// rather than a reset. All of it within [`CLOSE_TIMEOUT`] (a client that
/// reads nothing never gets the frame; its socket is dropped then).
async fn shut(socket: &mut WebSocket, before: Option<Message>, code: u16, reason: &'static str) {
    let handshake = async {
        if let Some(msg) = before {
            socket.feed(msg).await?;
        }
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        socket.send(Message::Close(Some(frame))).await?;
        while let Some(msg) = socket.recv().await {
            if let Message::Close(_) = msg? {
                break;
            }
        }
        Ok::<(), axum::Error>(())
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}
