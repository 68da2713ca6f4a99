//! The session layer: one connection's protocol state, between the
//! transport and the node (after mini-redis's `cmd/subscribe.rs`).
//!
//! The transport reads a client frame and hands its text to
//! [`Session::handle`]; the session decodes it, checks it against the
//! connection's grants and limits, asks the [`Node`] (subscribe, leave,
//! publish) and answers with encoded frames for the transport to write —
//! at once, or later for a publish waiting for the broker ([`Pending`]).
//! The session also decides which of the room messages queued for the
//! connection go out ([`Session::outbound`]: none twice, none from before its
//! subscription), pages a replay, and knows when the connection must end
//! (the node asks, or the token expires: [`Session::stopped`]).
//!
//! Nothing here touches a socket: `transport::connection` drives a session
//! over any `Sink`/`Stream` of WebSocket messages, and its tests over
//! channels.

mod rate;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use tokio::time::Sleep;

use crate::auth::Grants;
use crate::broker::{BrokerError, PublishRequest};
use crate::hub::{
    CloseReason, ConnControl, ConnHandle, ConnId, Member, Outbound, QueueRx, SentUpTo,
};
use crate::metrics::Metrics;
use crate::node::{Node, Page, Replay};
use crate::protocol::{self, ClientFrame, ErrorCode, Frame, RoomName, ServerFrame, Since};
use crate::sync::lock;
use rate::RateLimit;

/// A reply that waits for the broker (a publish's `ok`). The transport sends
/// these in request order.
pub type Pending = BoxFuture<'static, Frame>;

/// Why a session must end, other than the client's doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The node asks (slow consumer, drain).
    Requested(CloseReason),
    /// The token's `exp` passed without a `refresh`.
    TokenExpired,
}

pub struct Session {
    node: Arc<Node>,
    id: ConnId,
    /// The session id the client is told in `welcome`, and subscribers in
    /// `from`.
    name: Arc<str>,
    grants: Grants,
    /// The connection's send queue and control block, as the hub holds them.
    handle: ConnHandle,
    /// The rooms the client is in, each with how far its messages went out
    /// (shared with the hub, whose fan-out may write them itself).
    rooms: HashMap<RoomName, Arc<Mutex<SentUpTo>>>,
    /// A replay still going out (boxed: most connections never replay).
    replay: Option<Box<Replay>>,
    /// Fires at the token's `exp` (reset by `refresh`); `None` for tokens
    /// without one, so an anonymous idle connection carries no timer.
    expiry: Option<Pin<Box<Sleep>>>,
    rate: RateLimit,
}

impl Session {
    /// A session for a connection with `grants`, registered with the node
    /// (so that a drain reaches it); and the receiving end of its send queue.
    pub fn open(node: Arc<Node>, grants: Grants) -> (Self, QueueRx) {
        let (handle, queue) = ConnHandle::new(node.config.send_queue as usize);
        let id = node.register(handle.ctl.clone());
        let session = Self {
            id,
            name: format!("{:016x}", rand::random::<u64>()).into(),
            expiry: expiry_timer(&grants),
            grants,
            handle,
            rooms: HashMap::new(),
            replay: None,
            rate: RateLimit::new(node.config.max_publish_rate),
            node,
        };
        (session, queue)
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn user(&self) -> Option<&str> {
        self.grants.user()
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The block through which the node asks the connection to close.
    pub fn control(&self) -> Arc<ConnControl> {
        self.handle.ctl.clone()
    }

    /// The first frame the client gets.
    pub fn welcome(&self) -> Frame {
        protocol::encode(&ServerFrame::Welcome {
            session: &self.name,
            node: &self.node.node_id,
            version: env!("CARGO_PKG_VERSION"),
        })
    }

    /// Resolves when the connection must end for a reason other than the
    /// client's frames. `closed` is the connection's [`ConnControl::closed`],
    /// kept by the caller for the connection's life (re-creating it on every
    /// turn would register and unregister a waiter on every delivery).
    pub async fn stopped(&mut self, closed: Pin<&mut impl Future<Output = CloseReason>>) -> Stop {
        let expired = async {
            match self.expiry.as_mut() {
                Some(timer) => timer.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            reason = closed => Stop::Requested(reason),
            () = expired => Stop::TokenExpired,
        }
    }

    /// The client takes nothing: the connection is a slow consumer (counted
    /// once, however it was found out).
    pub fn slow_consumer(&self) {
        if self.handle.ctl.close(CloseReason::SlowConsumer) {
            self.node.metrics.slow_consumers.inc();
        }
    }

    /// Handles one text frame: immediate replies go into `out` (a
    /// subscribe's `ok` with the first page of its replay), a reply that
    /// waits for the broker is returned.
    pub async fn handle(&mut self, text: &str, out: &mut Vec<Frame>) -> Option<Pending> {
        let max = self.node.config.max_frame_bytes as usize;
        if text.len() > max {
            self.node.metrics.bad_frames.inc();
            let message = format!("frame is larger than {max} bytes");
            out.push(self.error(None, ErrorCode::TooLarge, &message));
            return None;
        }
        let frame = match protocol::decode(text) {
            Ok(frame) => frame,
            Err(e) => {
                self.node.metrics.bad_frames.inc();
                out.push(self.error(e.id, e.code, &e.message));
                return None;
            }
        };
        match frame {
            ClientFrame::Ping { id } => out.push(protocol::encode(&ServerFrame::Pong { id })),
            ClientFrame::Refresh { id, token } => out.push(self.refresh(id, &token.0)),
            ClientFrame::Subscribe { id, room, since } => {
                // Boxed: subscribing is rare, and its future would otherwise
                // be part of every connection's task for its whole life.
                Box::pin(self.subscribe(id, room, since, out)).await;
            }
            ClientFrame::Unsubscribe { id, room } => out.push(self.unsubscribe(id, &room)),
            ClientFrame::Publish {
                id,
                room,
                data,
                key,
            } => match self.publish(id, room, data, key) {
                Ok(pending) => return Some(pending),
                Err(refused) => out.push(refused),
            },
        }
        None
    }

    /// Subscribes, answers `ok`, and with `since` puts what the client
    /// missed right after the `ok` (the first page; the rest follows through
    /// [`Session::next_page`]).
    ///
    /// A repeated subscribe to a room the client is already in changes
    /// nothing: its `ok` carries the offset the client was last sent, and
    /// the messages still queued for it follow.
    async fn subscribe(
        &mut self,
        id: u64,
        room: RoomName,
        since: Option<Since>,
        out: &mut Vec<Frame>,
    ) {
        if !self.grants.may_subscribe(room.as_str()) {
            let message = format!("may not subscribe to `{room}`");
            out.push(self.error(Some(id), ErrorCode::Forbidden, &message));
            return;
        }
        let node = self.node.clone();
        let (sent, subscribed) = match self.rooms.get(&room).cloned() {
            Some(sent) => {
                let position = lock(&sent).position();
                (sent, node.recover(&room, since, position).await)
            }
            None => {
                let max_rooms = node.config.max_rooms_per_connection as usize;
                if self.rooms.len() >= max_rooms {
                    let message = format!(
                        "a connection may be in at most {max_rooms} rooms: unsubscribe from one first"
                    );
                    out.push(self.error(Some(id), ErrorCode::TooManyRooms, &message));
                    return;
                }
                let member = Member {
                    handle: self.handle.clone(),
                    sent: Arc::default(),
                };
                let sent = member.sent.clone();
                (sent, node.subscribe(self.id, member, &room, since).await)
            }
        };
        match subscribed {
            Ok(sub) => {
                // After `ok` with offset N (replayed through N, if asked)
                // the client gets exactly what follows: a message that was
                // published before but reaches this node just after the
                // join is not sent again. (Until this task waits idle again,
                // the hub queues the room's messages rather than write them.)
                lock(&sent).raise(&sub.epoch, sub.offset);
                self.rooms.entry(room).or_insert(sent);
                out.push(sub.ok(id));
                out.extend(sub.replayed);
                if let Some(replay) = sub.replay {
                    self.replay = Some(Box::new(replay));
                }
            }
            Err(e) => out.push(broker_error(&node.metrics, Some(id), &e)),
        }
    }

    fn unsubscribe(&mut self, id: u64, room: &RoomName) -> Frame {
        if self.rooms.remove(room).is_none() {
            let message = format!("not subscribed to `{room}`");
            return self.error(Some(id), ErrorCode::NotSubscribed, &message);
        }
        self.node.leave(self.id, room);
        protocol::encode(&ServerFrame::ok(id))
    }

    /// Checks the rate and the grants, then hands the message to the node;
    /// the reply waits for the broker.
    fn publish(
        &mut self,
        id: u64,
        room: RoomName,
        data: Box<RawValue>,
        key: Option<String>,
    ) -> Result<Pending, Frame> {
        if !self.rate.allow() {
            let rate = self.node.config.max_publish_rate;
            let message = format!("more than {rate} publishes per second");
            return Err(self.error(Some(id), ErrorCode::RateLimited, &message));
        }
        if !self.grants.may_publish(room.as_str()) {
            let message = format!("may not publish to `{room}`");
            return Err(self.error(Some(id), ErrorCode::Forbidden, &message));
        }
        if self.node.congested(&room) {
            let message = format!(
                "room `{room}` is congested: its subscribers on this node are behind; retry"
            );
            return Err(self.error(Some(id), ErrorCode::RateLimited, &message));
        }
        let published = self.node.publish(PublishRequest {
            room,
            data,
            from: Some(self.name.clone()),
            key,
        });
        // For the error frame, should the broker fail it.
        let metrics = self.node.metrics.clone();
        Ok(async move {
            match published.await {
                Ok(p) => protocol::encode(&ServerFrame::Ok {
                    id,
                    offset: Some(p.offset),
                    epoch: Some(&p.epoch),
                    recovered: None,
                    missed: None,
                    code: None,
                }),
                Err(e) => broker_error(&metrics, Some(id), &e),
            }
        }
        .boxed())
    }

    /// Takes a fresh token for the connection: same user, and every room the
    /// connection is in still allowed; its `exp` is the connection's end
    /// from now on. Refused (`unauthorized`, `forbidden`), the connection
    /// keeps its current token, and ends at that one's `exp`.
    fn refresh(&mut self, id: u64, token: &str) -> Frame {
        let fresh = match self.node.auth.authenticate(Some(token)) {
            Ok(fresh) => fresh,
            Err(e) => return self.error(Some(id), ErrorCode::Unauthorized, &e.to_string()),
        };
        if fresh.user() != self.grants.user() {
            return self.error(
                Some(id),
                ErrorCode::Forbidden,
                "the token is for another user: connect again with it",
            );
        }
        if let Some(room) = self.rooms.keys().find(|r| !fresh.may_subscribe(r.as_str())) {
            let message = format!("the token does not allow `{room}`: unsubscribe from it first");
            return self.error(Some(id), ErrorCode::Forbidden, &message);
        }
        self.grants = fresh;
        self.expiry = expiry_timer(&self.grants);
        protocol::encode(&ServerFrame::ok(id))
    }

    /// The connection leaves its rooms and the node forgets it (a drain no
    /// longer reaches it; the transport may still be closing its socket).
    /// Done again, it does nothing; dropping the session does it too.
    pub fn close(&mut self) {
        for room in std::mem::take(&mut self.rooms).into_keys() {
            self.node.leave(self.id, &room);
        }
        self.replay = None;
        self.node.unregister(self.id);
    }

    /// A queued message as it goes out, unless the client already has it
    /// (or it precedes the subscription, or the client left the room).
    pub fn outbound(&mut self, queued: Outbound) -> Option<Frame> {
        match queued {
            Outbound::Message(d) => lock(self.rooms.get(&d.room)?)
                .advance(&d.epoch, d.offset)
                .then(|| d.frame.clone()),
        }
    }

    /// The next page of a replay in progress, to read once the last one went
    /// out (the future borrows nothing of the session).
    pub fn next_page(&self) -> Option<BoxFuture<'static, Page>> {
        self.replay.as_ref().map(|r| r.next_page(&self.node))
    }

    /// Puts the frames of a page read by [`Session::next_page`] into `out`.
    /// `false` when the replay cannot go on (the history moved on or could
    /// not be read): its `ok` promised these messages, so the client must
    /// subscribe again with `since`.
    pub fn take_page(&mut self, page: Page, out: &mut Vec<Frame>) -> bool {
        let Some(replay) = self.replay.as_deref_mut() else {
            return true;
        };
        if !replay.take(page, out, &self.node.metrics) {
            self.replay = None;
            return false;
        }
        if replay.done() {
            self.replay = None;
        }
        true
    }
}

impl Session {
    /// An error frame for the client, counted in `chorus_errors_total`.
    fn error(&self, id: Option<u64>, code: ErrorCode, message: &str) -> Frame {
        error(&self.node.metrics, id, code, message)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

/// An error frame, counted in `chorus_errors_total`.
fn error(metrics: &Metrics, id: Option<u64>, code: ErrorCode, message: &str) -> Frame {
    metrics.error(code);
    protocol::encode(&ServerFrame::Error { id, code, message })
}

/// A broker failure as the client is told it (counted like any error frame).
fn broker_error(metrics: &Metrics, id: Option<u64>, e: &BrokerError) -> Frame {
    error(metrics, id, e.code(), &e.public_message())
}

/// A timer for the token's `exp`; `None` without one.
fn expiry_timer(grants: &Grants) -> Option<Pin<Box<Sleep>>> {
    grants.expires_at().map(|at| {
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        Box::pin(tokio::time::sleep(left))
    })
}
