//! What the hub knows of a connection: its bounded send queue and a control
//! block through which the node tells it to close.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::task::AtomicWaker;

use crate::broker::Delivery;
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

/// A connection's bounded send queue.
///
/// Not a `tokio::sync::mpsc` channel on purpose: that one allocates a block
/// of 32 slots (about 1.5 KiB with the channel) for every connection up
/// front and takes a semaphore permit per frame. This is a `VecDeque` that
/// stays unallocated until the first frame, behind a std mutex (push and
/// drain only, never held across `.await`), and the connection task drains
/// everything waiting under one lock.
#[derive(Debug)]
struct SendQueue {
    state: Mutex<QueueState>,
    waker: AtomicWaker,
    capacity: usize,
}

#[derive(Debug)]
struct QueueState {
    frames: VecDeque<Outbound>,
    receiver_gone: bool,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySendError {
    /// The queue holds `capacity` frames: a slow consumer.
    Full,
    /// The connection is gone.
    Closed,
}

/// The hub's end of a send queue.
#[derive(Debug, Clone)]
pub struct QueueTx(Arc<SendQueue>);

impl QueueTx {
    /// Queues a frame without waiting.
    pub fn try_send(&self, out: Outbound) -> Result<(), TrySendError> {
        {
            let mut state = lock(&self.0.state);
            if state.receiver_gone {
                return Err(TrySendError::Closed);
            }
            if state.frames.len() >= self.0.capacity {
                return Err(TrySendError::Full);
            }
            state.frames.push_back(out);
        }
        self.0.waker.wake();
        Ok(())
    }
}

/// A queue keeps at most this much room once drained (an idle connection
/// should not keep the memory of its largest burst).
const KEEP_CAPACITY: usize = 64;

/// The connection task's end of a send queue.
#[derive(Debug)]
pub struct QueueRx(Arc<SendQueue>);

impl QueueRx {
    /// Waits until frames are queued, then moves up to `max` of them into
    /// `out` (oldest first).
    pub async fn recv_many(&mut self, out: &mut Vec<Outbound>, max: usize) -> usize {
        poll_fn(|cx| {
            // Register before looking, so a push in between still wakes us.
            self.0.waker.register(cx.waker());
            let mut state = lock(&self.0.state);
            if state.frames.is_empty() {
                return Poll::Pending;
            }
            let n = state.frames.len().min(max);
            out.extend(state.frames.drain(..n));
            if state.frames.is_empty() && state.frames.capacity() > KEEP_CAPACITY {
                state.frames.shrink_to(KEEP_CAPACITY);
            }
            Poll::Ready(n)
        })
        .await
    }

    /// Waits for the next frame.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let mut one = Vec::with_capacity(1);
        self.recv_many(&mut one, 1).await;
        one.pop()
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        lock(&self.0.state).frames.pop_front()
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.receiver_gone = true;
        // Frames hold shared bytes: release them with the connection.
        state.frames = VecDeque::new();
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
