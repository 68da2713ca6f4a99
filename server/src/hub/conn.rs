//! What the hub knows of a connection: its bounded send queue and a control
//! block through which the node tells it to close.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use crate::broker::Delivery;
use crate::broker::memory::lock;

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
}

/// Shared between the connection task and whoever may ask it to close.
#[derive(Debug, Default)]
pub struct ConnControl {
    reason: Mutex<Option<CloseReason>>,
    notify: Notify,
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
        // notify_one keeps a permit when the task is not waiting right now.
        self.notify.notify_one();
        true
    }

    pub fn reason(&self) -> Option<CloseReason> {
        *lock(&self.reason)
    }

    /// Resolves once `close` was called.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            self.notify.notified().await;
        }
    }
}

/// The hub's handle on a connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    pub tx: mpsc::Sender<Outbound>,
    pub ctl: Arc<ConnControl>,
}

impl ConnHandle {
    /// A handle with a send queue of `capacity` frames, and the queue's receiver.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                ctl: Arc::new(ConnControl::default()),
            },
            rx,
        )
    }
}
