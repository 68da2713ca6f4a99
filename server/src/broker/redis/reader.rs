//! The Pub/Sub reader: the only reader of every room's messages on this
//! node. It reads a notification, splits it, and hands it over — straight
//! to the hub, or (history mode) through the [`Tracker`], which delivers it,
//! drops it or holds it behind its room's gap fill. Fills run in tasks of
//! their own (a few at a time, the rest queued in order), so the reader never waits for a history
//! read, a sentinel or anything else: one room's trouble never holds up
//! another room's delivery. Canary arrivals are passed on to the link.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures_util::StreamExt;
use redis::aio::PubSubStream;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use super::error::Error;
use super::scripts;
use super::url::Addr;
use crate::broker::tracker::{FillJob, ReadPage, Tracker};
use crate::broker::{Deliver, Delivery};
use crate::protocol::{Frame, RoomName};

/// Gap fills reading history at once per link; more wait their turn.
const CONCURRENT_FILLS: usize = 8;

pub(super) struct Reader {
    pub stream: PubSubStream,
    pub master: Addr,
    pub deliver: Arc<dyn Deliver>,
    /// History mode: the tracker, and how it reads history.
    pub history: Option<(Arc<Tracker>, ReadPage<Error>)>,
    pub canary_channel: String,
    /// The number of the last canary that came back.
    pub canary: watch::Sender<u64>,
    /// Tells the reader to stop (its link ends).
    pub stop: Arc<Notify>,
}

impl Reader {
    /// Reads until the stream ends, a catch-up fill fails or the link says
    /// stop (`None`); first queues `fills` (the catch-ups after a
    /// reconnect). Ends its fills before it returns.
    pub async fn run(mut self, fills: Vec<FillJob>) -> Option<Error> {
        let mut fills = Fills::new(self.history.clone(), fills);
        let why = loop {
            tokio::select! {
                msg = self.stream.next() => match msg {
                    Some(msg) => {
                        if let Some(job) = self.dispatch(&msg) {
                            fills.push(job);
                        }
                    }
                    None => break Some(Error::SubscriptionClosed(self.master.clone())),
                },
                Some(done) = fills.next_done() => {
                    if let Err(e) = done {
                        break Some(e);
                    }
                }
                () = self.stop.notified() => break None,
            }
        };
        fills.stop().await;
        why
    }

    /// Hands one message over; a gap fill to start, if it opened one.
    fn dispatch(&self, msg: &redis::Msg) -> Option<FillJob> {
        let channel = msg.get_channel_name();
        if let Some(room) = channel.strip_prefix(scripts::ROOM_CHANNEL_PREFIX) {
            let d = delivery(room, msg.get_payload_bytes())?;
            match &self.history {
                None => {
                    self.deliver.deliver(d);
                    None
                }
                Some((tracker, _)) => tracker.live(d),
            }
        } else {
            if channel == self.canary_channel
                && let Some(seq) = std::str::from_utf8(msg.get_payload_bytes())
                    .ok()
                    .and_then(|s| s.parse().ok())
            {
                self.canary.send_replace(seq);
            }
            None
        }
    }
}

/// A link's gap fills: a few running, the rest waiting their turn (one
/// per room at most, as the tracker opens no second fill for a room).
pub(super) struct Fills {
    history: Option<(Arc<Tracker>, ReadPage<Error>)>,
    waiting: VecDeque<FillJob>,
    running: JoinSet<Result<(), Error>>,
    /// The room of each running fill.
    rooms: HashMap<tokio::task::Id, RoomName>,
}

impl Fills {
    /// Fills through `history` (none without history), `waiting` first.
    pub fn new(history: Option<(Arc<Tracker>, ReadPage<Error>)>, waiting: Vec<FillJob>) -> Self {
        let mut fills = Self {
            history,
            waiting: waiting.into(),
            running: JoinSet::new(),
            rooms: HashMap::new(),
        };
        fills.start();
        fills
    }

    pub fn push(&mut self, job: FillJob) {
        self.waiting.push_back(job);
        self.start();
    }

    /// The next fill to end (`None` while none runs), and starts the next
    /// waiting one. A fill fails only when it could not catch a room up
    /// after a reconnect.
    pub async fn next_done(&mut self) -> Option<Result<(), Error>> {
        let done = self.running.join_next_with_id().await?;
        let result = match done {
            Ok((id, result)) => {
                self.rooms.remove(&id);
                result
            }
            Err(e) => {
                self.rooms.remove(&e.id());
                tracing::error!(error = %e, "a gap fill panicked");
                Ok(())
            }
        };
        self.start();
        Some(result)
    }

    /// Stops every fill; the rooms they were filling (waiting or running),
    /// whose live messages the tracker holds for them.
    pub async fn stop(mut self) -> Vec<RoomName> {
        self.running.shutdown().await;
        let mut rooms: Vec<RoomName> = self.rooms.into_values().collect();
        rooms.extend(self.waiting.iter().map(|job| job.room().clone()));
        rooms
    }

    /// Starts waiting fills while there is room.
    fn start(&mut self) {
        let Some((tracker, read)) = &self.history else {
            return;
        };
        while self.running.len() < CONCURRENT_FILLS {
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            let (tracker, read) = (tracker.clone(), read.clone());
            let room = job.room().clone();
            let failed = room.clone();
            let task = self.running.spawn(async move {
                tracker.fill(job, &read).await.map_err(|e| Error::CatchUp {
                    room: failed,
                    source: Box::new(e),
                })
            });
            self.rooms.insert(task.id(), room);
        }
    }
}

/// A room notification as a delivery (`None`, logged, when malformed).
pub(super) fn delivery(room: &str, payload: &[u8]) -> Option<Delivery> {
    let Some(n) = scripts::split_notification(payload) else {
        tracing::warn!(room, "ignoring a malformed notification");
        return None;
    };
    let (Ok(room), Some(frame)) = (RoomName::parse(room), Frame::from_utf8(n.frame)) else {
        tracing::warn!(
            room,
            "ignoring a notification for a bad room or with bad UTF-8"
        );
        return None;
    };
    Some(Delivery {
        room,
        offset: n.offset,
        epoch: n.epoch.into(),
        frame,
        published_at_us: n.published_at_us,
    })
}
