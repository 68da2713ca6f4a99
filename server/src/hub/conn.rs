//! What the hub knows of a connection: its bounded send queue, the writing
//! end of its socket, and a control block through which the node tells it
//! to close.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;

use super::SentUpTo;
use crate::broker::Delivery;
use crate::protocol::Frame;
use crate::sync::lock;

/// Node-local connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What travels through a connection's send queue.
#[derive(Debug)]
pub enum Outbound {
    /// A message of a room: the encoded frame with its room and offset,
    /// shared with every other local recipient.
    Message(Arc<Delivery>),
}

/// Why the node closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The send queue overflowed: close 1008.
    SlowConsumer,
    /// The node is draining: send `reconnect`, then close 1001.
    Draining { after_ms: u64 },
    /// The node sheds this connection to balance the fleet: send
    /// `reconnect` (reason `rebalance`), then close 1001.
    Rebalancing { after_ms: u64 },
}

/// Shared between the connection task and whoever may ask it to close.
///
/// Only the connection's own task waits on [`ConnControl::closed`], and it
/// polls that future on every turn of its loop (every delivery): the check
/// is an atomic load and a waker registration, no lock.
#[derive(Debug, Default)]
pub struct ConnControl {
    reason: Mutex<Option<CloseReason>>,
    /// Set (after `reason`) once a close was requested.
    requested: AtomicBool,
    waker: AtomicWaker,
}

impl ConnControl {
    /// Asks the connection to close. The first reason wins; returns whether
    /// this call was the first.
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut current = lock(&self.reason);
        if current.is_some() {
            return false;
        }
        *current = Some(reason);
        drop(current);
        self.requested.store(true, Ordering::Release);
        self.waker.wake();
        true
    }

    pub fn reason(&self) -> Option<CloseReason> {
        *lock(&self.reason)
    }

    /// Resolves once `close` was called. For the connection's own task.
    pub async fn closed(&self) -> CloseReason {
        poll_fn(|cx| {
            if !self.requested.load(Ordering::Acquire) {
                self.waker.register(cx.waker());
                // A close between the first check and the registration.
                if !self.requested.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
            match self.reason() {
                Some(reason) => Poll::Ready(reason),
                None => Poll::Pending,
            }
        })
        .await
    }
}

/// The hub's handle on a connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    pub tx: QueueTx,
    pub ctl: Arc<ConnControl>,
}

impl ConnHandle {
    /// A handle with a send queue of `capacity` frames, and the queue's receiver.
    pub fn new(capacity: usize) -> (Self, QueueRx) {
        let queue = Arc::new(SendQueue {
            state: Mutex::new(QueueState {
                frames: VecDeque::new(),
                receiver_gone: false,
                idle: false,
                wire: None,
                unsent: VecDeque::new(),
            }),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
        });
        (
            Self {
                tx: QueueTx(queue.clone()),
                ctl: Arc::new(ConnControl::default()),
            },
            QueueRx(queue),
        )
    }
}

/// A writing end other than a TCP socket (tests), as the fan-out and the
/// connection's task share it (behind the send queue's lock); a TCP socket
/// is held inline ([`QueueRx::attach_tcp`]).
pub trait Wire: Send + 'static {
    /// Writes what the socket takes now, without waiting (`WouldBlock` when
    /// it takes nothing).
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Writes what the socket takes; `Pending` (with `cx` woken once it
    /// takes more) when it takes nothing.
    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>>;
}

/// The writing end of the socket as the queue holds it: a TCP socket's
/// inline, so that the fan-out's write touches nothing of the connection's
/// but the queue and the socket (the fan-out goes through every subscriber
/// of a room for each message, and each allocation it follows per
/// subscriber is a cache miss); any other wire boxed (tests).
enum WireEnd {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Other(Box<dyn Wire>),
}

impl WireEnd {
    /// One non-blocking `send` (again when interrupted by a signal). For a
    /// TCP socket straight to the socket, not through tokio's readiness
    /// (one allocation fewer to read): when the socket refuses, the
    /// connection's task writes next through tokio, meets the refusal
    /// itself and waits for the socket properly.
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let res = match self {
                WireEnd::Tcp(w) => socket2::SockRef::from(w.as_ref()).send(buf),
                WireEnd::Other(w) => w.try_write(buf),
            };
            match res {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                res => return res,
            }
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            WireEnd::Tcp(w) => {
                tokio::io::AsyncWrite::poll_write_vectored(std::pin::Pin::new(w), cx, bufs)
            }
            WireEnd::Other(w) => w.poll_write_vectored(cx, bufs),
        }
    }
}

/// A connection's bounded send queue, and the writing end of its socket.
///
/// Not a `tokio::sync::mpsc` channel on purpose: that one allocates a block
/// of 32 slots (about 1.5 KiB with the channel) for every connection up
/// front and takes a semaphore permit per frame. This is a `VecDeque` that
/// stays unallocated until the first frame, behind a std mutex (never held
/// across `.await`; the only system calls made under it are non-blocking
/// writes), and the connection task drains everything waiting under one
/// lock.
///
/// Every byte that goes to the socket goes through here, in order: a
/// message the fan-out writes itself ([`QueueTx::offer`]), the frames the
/// connection's task writes (replies, queued messages), and what the
/// WebSocket library writes (pongs, close frames; [`Outbox`]). Bytes that
/// the socket did not take at once wait in `unsent`, whole frames or the
/// rest of one, and go before anything else.
struct SendQueue {
    state: Mutex<QueueState>,
    waker: AtomicWaker,
    capacity: usize,
}

impl std::fmt::Debug for SendQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendQueue")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

struct QueueState {
    frames: VecDeque<Outbound>,
    receiver_gone: bool,
    /// The connection's task waits with nothing in hand (nothing to write,
    /// no request being handled): a message may go straight to the socket,
    /// exactly where the task would have written it next.
    idle: bool,
    /// The socket, once the connection has one.
    wire: Option<WireEnd>,
    /// Bytes in the socket's order that it has not taken yet.
    unsent: VecDeque<Bytes>,
}

impl QueueState {
    /// Writes `unsent` to the wire until it is empty (`Ready`) or the wire
    /// takes no more (`Pending`, `cx` woken when it can).
    fn poll_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(wire) = self.wire.as_mut() else {
            self.unsent.clear();
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        while !self.unsent.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .unsent
                .iter()
                .take(MAX_SLICES)
                .map(|b| IoSlice::new(b))
                .collect();
            let mut n = match wire.poll_write_vectored(cx, &slices)? {
                Poll::Ready(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(n) => n,
                Poll::Pending => return Poll::Pending,
            };
            drop(slices);
            while n > 0 {
                let Some(front) = self.unsent.front_mut() else {
                    break;
                };
                if n < front.len() {
                    front.advance(n);
                    break;
                }
                n -= front.len();
                self.unsent.pop_front();
            }
        }
        if self.unsent.capacity() > KEEP_CAPACITY {
            self.unsent.shrink_to(KEEP_CAPACITY);
        }
        Poll::Ready(Ok(()))
    }
}

/// Most buffers handed to one `writev`.
const MAX_SLICES: usize = 64;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySendError {
    /// The queue holds `capacity` frames: a slow consumer.
    Full,
    /// The connection is gone.
    Closed,
}

/// What became of a message offered to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Written to the socket by the fan-out, whole.
    Written,
    /// Begun by the fan-out, the rest handed to the connection's task (the
    /// socket took part of it, or nothing).
    HandedOver,
    /// In the send queue, for the connection's task: how many frames wait
    /// for the connection now, queued or being written (the task takes
    /// queued frames in batches, so the queue alone can look short while
    /// the socket still refuses a whole batch).
    Queued(usize),
    /// Not for this connection (it has it already, or it precedes its
    /// subscription).
    Skipped,
}

/// The hub's end of a send queue.
#[derive(Debug, Clone)]
pub struct QueueTx(Arc<SendQueue>);

impl QueueTx {
    /// Queues a frame without waiting.
    pub fn try_send(&self, out: Outbound) -> Result<(), TrySendError> {
        Self::queue(&mut lock(&self.0.state), self.0.capacity, out)?;
        self.0.waker.wake();
        Ok(())
    }

    /// Queues `out`; how many frames the queue holds then.
    fn queue(
        state: &mut QueueState,
        capacity: usize,
        out: Outbound,
    ) -> Result<usize, TrySendError> {
        if state.receiver_gone {
            return Err(TrySendError::Closed);
        }
        if state.frames.len() >= capacity {
            return Err(TrySendError::Full);
        }
        state.frames.push_back(out);
        Ok(state.frames.len())
    }

    /// Hands a room's message to the connection without waiting. When the
    /// connection's task waits with nothing in hand, the message is written
    /// to the socket right here (one non-blocking write of the shared frame,
    /// no wake-up); whatever the socket does not take goes to the
    /// connection's task, and so do messages that find it busy, through the
    /// bounded queue. `sent` is how far the room went out to the connection.
    /// With `direct` false the message is queued whatever the connection
    /// does (the node is behind: the connection's task batches).
    pub fn offer(
        &self,
        d: &Arc<Delivery>,
        sent: &Mutex<SentUpTo>,
        direct: bool,
    ) -> Result<Offered, TrySendError> {
        let mut guard = lock(&self.0.state);
        let state = &mut *guard;
        let direct = direct
            && state.idle
            && !state.receiver_gone
            && state.frames.is_empty()
            && state.unsent.is_empty();
        let wire = match state.wire.as_mut() {
            Some(wire) if direct => wire,
            _ => {
                let queued = Self::queue(state, self.0.capacity, Outbound::Message(d.clone()));
                let waiting = state.unsent.len();
                drop(guard);
                let len = queued?;
                self.0.waker.wake();
                return Ok(Offered::Queued(len + waiting));
            }
        };
        if !lock(sent).advance(&d.epoch, d.offset) {
            return Ok(Offered::Skipped);
        }
        let bytes = d.frame.wire();
        let rest = match wire.try_write(bytes) {
            Ok(n) if n == bytes.len() => return Ok(Offered::Written),
            Ok(n) => bytes.slice(n..),
            // Refused (or failed: the connection's task meets the error).
            Err(_) => bytes.clone(),
        };
        state.unsent.push_back(rest);
        state.idle = false;
        drop(guard);
        self.0.waker.wake();
        Ok(Offered::HandedOver)
    }

    /// How many frames the queue holds at most.
    pub fn capacity(&self) -> usize {
        self.0.capacity
    }
}

/// A queue keeps at most this much room once drained (an idle connection
/// should not keep the memory of its largest burst).
const KEEP_CAPACITY: usize = 64;

/// The connection task's end of a send queue.
#[derive(Debug)]
pub struct QueueRx(Arc<SendQueue>);

impl QueueRx {
    /// Gives the queue the TCP socket's writing end: from now on the
    /// fan-out may write to it.
    pub fn attach_tcp(&self, wire: tokio::net::tcp::OwnedWriteHalf) {
        lock(&self.0.state).wire = Some(WireEnd::Tcp(wire));
    }

    /// Gives the queue some other writing end (tests).
    pub fn attach(&self, wire: Box<dyn Wire>) {
        lock(&self.0.state).wire = Some(WireEnd::Other(wire));
    }

    /// Waits until frames are queued (moving up to `max` of them into
    /// `out`, oldest first, and returning how many) or bytes wait to be
    /// written ([`Self::poll_flush`]). Meanwhile the task is idle: the
    /// fan-out may write to the socket itself.
    pub async fn recv_many(&mut self, out: &mut Vec<Outbound>, max: usize) -> usize {
        poll_fn(|cx| {
            // Register before looking, so a push in between still wakes us.
            self.0.waker.register(cx.waker());
            let mut state = lock(&self.0.state);
            if state.frames.is_empty() && state.unsent.is_empty() {
                state.idle = true;
                return Poll::Pending;
            }
            state.idle = false;
            let n = state.frames.len().min(max);
            out.extend(state.frames.drain(..n));
            if state.frames.is_empty() && state.frames.capacity() > KEEP_CAPACITY {
                state.frames.shrink_to(KEEP_CAPACITY);
            }
            Poll::Ready(n)
        })
        .await
    }

    /// The task has something in hand (a request to answer): until it waits
    /// in [`Self::recv_many`] again, messages queue behind it.
    pub fn hold(&self) {
        lock(&self.0.state).idle = false;
    }

    /// Waits for the next frame.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let mut one = Vec::with_capacity(1);
        while self.recv_many(&mut one, 1).await == 0 {}
        one.pop()
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        lock(&self.0.state).frames.pop_front()
    }

    /// Puts frames after whatever waits for the socket (write them with
    /// [`Self::poll_flush`]).
    pub fn push(&self, frames: impl IntoIterator<Item = Frame>) {
        let mut state = lock(&self.0.state);
        state.idle = false;
        state
            .unsent
            .extend(frames.into_iter().map(|f| f.wire().clone()));
    }

    /// Writes what waits for the socket; `Ready` once it all went.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.0.state).poll_unsent(cx)
    }

    /// No more messages for this connection (its loop ended): the queue
    /// refuses them and lets go of those it holds. What waits for the
    /// socket still goes (the closing handshake follows it).
    pub fn close(&self) {
        let mut state = lock(&self.0.state);
        state.receiver_gone = true;
        state.idle = false;
        // Frames hold shared bytes: release them with the connection.
        state.frames = VecDeque::new();
    }

    /// Lets go of the socket's writing end (the connection is over).
    pub fn detach(&self) {
        let mut state = lock(&self.0.state);
        state.wire = None;
        state.unsent = VecDeque::new();
    }

    /// The writing end through which the WebSocket library writes (its
    /// pongs and close frames), in order with everything else.
    pub fn outbox(&self) -> Outbox {
        Outbox(self.0.clone())
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        self.close();
        self.detach();
    }
}

/// Writes of the WebSocket library, in order with the node's own.
#[derive(Debug)]
pub struct Outbox(Arc<SendQueue>);

impl Outbox {
    /// Takes all of `buf` or none of it (a frame is never split around
    /// bytes the fan-out writes): what the socket does not take at once
    /// waits in the queue, and the connection's task is woken to write it.
    pub fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut state = lock(&self.0.state);
        if state.poll_unsent(cx)?.is_pending() {
            return Poll::Pending;
        }
        let Some(wire) = state.wire.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let n = match wire.try_write(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if n < buf.len() {
            state.unsent.push_back(Bytes::copy_from_slice(&buf[n..]));
            state.idle = false;
            drop(state);
            self.0.waker.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.0.state).poll_unsent(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frame(s: &'static str) -> Outbound {
        Outbound::Message(Arc::new(Delivery {
            room: crate::protocol::RoomName::parse("r").unwrap(),
            offset: 1,
            epoch: "e".into(),
            frame: crate::protocol::Frame::from_static(s),
            published_at_us: 0,
        }))
    }

    fn text(out: Outbound) -> String {
        match out {
            Outbound::Message(d) => d.frame.to_string(),
        }
    }

    #[tokio::test]
    async fn frames_come_out_in_order_in_batches() {
        let (h, mut rx) = ConnHandle::new(8);
        for s in ["a", "b", "c"] {
            h.tx.try_send(frame(s)).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(rx.recv_many(&mut out, 2).await, 2);
        assert_eq!(rx.recv_many(&mut out, 10).await, 1);
        let got: Vec<String> = out.into_iter().map(text).collect();
        assert_eq!(got, ["a", "b", "c"]);
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn full_and_closed_are_reported() {
        let (h, rx) = ConnHandle::new(2);
        h.tx.try_send(frame("1")).unwrap();
        h.tx.try_send(frame("2")).unwrap();
        assert_eq!(h.tx.try_send(frame("3")), Err(TrySendError::Full));
        drop(rx);
        assert_eq!(h.tx.try_send(frame("4")), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn a_close_request_wakes_the_connection_once() {
        let (h, _rx) = ConnHandle::new(1);
        let ctl = h.ctl.clone();
        let task = tokio::spawn(async move { ctl.closed().await });
        tokio::task::yield_now().await;
        assert!(h.ctl.close(CloseReason::SlowConsumer));
        assert!(!h.ctl.close(CloseReason::Draining { after_ms: 0 }));
        assert_eq!(task.await.unwrap(), CloseReason::SlowConsumer);
        // Asked before anyone waits: resolves at once.
        assert_eq!(h.ctl.closed().await, CloseReason::SlowConsumer);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let (h, mut rx) = ConnHandle::new(4);
        let task = tokio::spawn(async move { rx.recv().await.map(text) });
        tokio::task::yield_now().await;
        h.tx.try_send(frame("x")).unwrap();
        assert_eq!(task.await.unwrap().as_deref(), Some("x"));
    }
}
