//! What each room a node serves was handed so far, and the gap fills in
//! progress (durable delivery). Broker-agnostic: a broker with history feeds
//! it live messages from its reader and runs the fills it asks for with its
//! own history reads. The rules themselves are [`super::continuity`]'s.
//!
//! The reader never waits here: [`Tracker::live`] delivers, drops or holds a
//! message under a std mutex (map operations only, never across `.await`)
//! and, on a gap, returns a [`FillJob`] for the broker to run off the
//! reader's path ([`Tracker::fill`]). While a room's fill runs, the fill
//! alone hands the room's messages over — the missing ones from history, then
//! the live ones held meanwhile — so the room keeps its order, and every
//! other room is delivered as it comes.
//!
//! Held live messages are bounded per room ([`MAX_HELD`]); past that they are
//! not kept, and the fill reads them from history too.

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::continuity::{self, Cursor, Fill, Live, Step};
use super::{Deliver, Delivery, History};
use crate::metrics::Metrics;
use crate::protocol::RoomName;
use crate::sync::lock;

/// Live messages held per room while its fill runs; newer ones are read
/// from history after it.
pub const MAX_HELD: usize = 256;

/// Bytes of frames read from history per round trip while filling a gap (a
/// larger message comes alone): a long gap of large messages is read, and
/// handed to the subscribers' bounded queues, a page at a time, never whole.
pub const PAGE_BYTES: usize = 1024 * 1024;

pub struct Tracker {
    /// Std mutex: map updates only, never held across `.await` or while
    /// delivering.
    rooms: Mutex<Rooms>,
    deliver: Arc<dyn Deliver>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Rooms {
    map: HashMap<RoomName, Track>,
    /// Numbers each track, so that a fill of a room that was forgotten (or
    /// whose fills were stopped) meanwhile stops instead of delivering.
    next_generation: u64,
}

struct Track {
    cursor: Cursor,
    generation: u64,
    /// Set while a fill runs: the live messages waiting for it.
    held: Option<Held>,
}

#[derive(Default)]
struct Held {
    queue: VecDeque<Delivery>,
    /// The newest live message not kept because the queue was full.
    dropped: Option<Cursor>,
}

/// A fill to run (with [`Tracker::fill`]), off the reader's path.
#[derive(Debug)]
pub struct FillJob {
    room: RoomName,
    generation: u64,
    fill: Fill,
    on_failure: OnFailure,
}

impl FillJob {
    pub fn room(&self) -> &RoomName {
        &self.room
    }
}

/// What a failed history read means for a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// A gap in the live feed: what could not be read is told lost, and the
    /// live messages go on.
    ReportLost,
    /// A catch-up after a reconnect: the room keeps its cursor, and the fill
    /// fails (the broker retries on its next link).
    Retry,
}

/// Reads one page of a room's history: after this offset, at most this many
/// messages and about this many bytes.
pub type ReadPage<E> = Arc<
    dyn Fn(RoomName, u64, usize, usize) -> BoxFuture<'static, Result<History, E>> + Send + Sync,
>;

impl Tracker {
    pub fn new(deliver: Arc<dyn Deliver>, metrics: Arc<Metrics>) -> Self {
        Self {
            rooms: Mutex::new(Rooms::default()),
            deliver,
            metrics,
        }
    }

    /// Starts tracking a room at `cursor` (where it stood just before this
    /// node subscribed), unless it is tracked already.
    pub fn baseline(&self, room: &RoomName, cursor: Cursor) {
        let mut rooms = lock(&self.rooms);
        if !rooms.map.contains_key(room) {
            let generation = rooms.next();
            rooms.map.insert(
                room.clone(),
                Track {
                    cursor,
                    generation,
                    held: None,
                },
            );
        }
    }

    pub fn forget(&self, room: &RoomName) {
        lock(&self.rooms).map.remove(room);
    }

    /// Forgets every room but those `keep` names.
    pub fn retain(&self, keep: impl Fn(&RoomName) -> bool) {
        lock(&self.rooms).map.retain(|room, _| keep(room));
    }

    pub fn cursor(&self, room: &RoomName) -> Option<Cursor> {
        lock(&self.rooms).map.get(room).map(|t| t.cursor.clone())
    }

    pub fn cursors(&self) -> Vec<(RoomName, Cursor)> {
        lock(&self.rooms)
            .map
            .iter()
            .map(|(room, t)| (room.clone(), t.cursor.clone()))
            .collect()
    }

    /// A live message: delivered now, dropped (already delivered), held
    /// behind the room's fill, or the start of a fill — returned, for the
    /// caller to run off its path. Never waits.
    pub fn live(&self, d: Delivery) -> Option<FillJob> {
        let mut rooms = lock(&self.rooms);
        let Some(track) = rooms.map.get_mut(&d.room) else {
            drop(rooms);
            self.deliver.deliver(d);
            return None;
        };
        if let Some(held) = &mut track.held {
            held.hold(d);
            return None;
        }
        match continuity::live(Some(&track.cursor), &d.epoch, d.offset) {
            Live::Deliver => {
                track.cursor = Cursor::new(d.epoch.clone(), d.offset);
                drop(rooms);
                self.deliver.deliver(d);
                None
            }
            Live::Duplicate => None,
            Live::Gap { to, .. } => {
                let job = FillJob {
                    room: d.room.clone(),
                    generation: track.generation,
                    fill: Fill::new(&track.cursor, to),
                    on_failure: OnFailure::ReportLost,
                };
                let mut held = Held::default();
                held.hold(d);
                track.held = Some(held);
                Some(job)
            }
        }
    }

    /// After a reconnect: the room continues from `from` and catches up to
    /// `upto` — the returned fill, when there is something to catch up.
    /// Call while no fill runs, before live messages flow again.
    pub fn resume(&self, room: &RoomName, from: Cursor, upto: u64) -> Option<FillJob> {
        let mut rooms = lock(&self.rooms);
        let track = rooms.map.get_mut(room)?;
        track.cursor = from;
        track.held = None;
        (upto > track.cursor.offset).then(|| {
            track.held = Some(Held::default());
            FillJob {
                room: room.clone(),
                generation: track.generation,
                fill: Fill::new(&track.cursor, upto),
                on_failure: OnFailure::Retry,
            }
        })
    }

    /// The fills were stopped (the link they read through ended): the live
    /// messages they held are let go — they are caught up from history after
    /// the next epoch check, like everything else published meanwhile.
    pub fn stop_fills(&self) {
        self.stop_fills_of(|_| true);
    }

    /// [`Tracker::stop_fills`] for the rooms `which` says (the fills a
    /// broker with several links ran on the one that ended).
    pub fn stop_fills_of(&self, which: impl Fn(&RoomName) -> bool) {
        let mut rooms = lock(&self.rooms);
        let mut generation = rooms.next_generation;
        for (room, track) in rooms.map.iter_mut() {
            if which(room) && track.held.take().is_some() {
                generation += 1;
                track.generation = generation;
            }
        }
        rooms.next_generation = generation;
    }

    /// Runs a fill to its end: reads the missing messages page by page and
    /// hands them over in order, tells the subscribers about those history no
    /// longer keeps, then hands over the live messages held meanwhile (which
    /// may start another fill, run here too). Fails only when a
    /// [`OnFailure::Retry`] fill cannot read history.
    pub async fn fill<E: Display>(&self, mut job: FillJob, read: &ReadPage<E>) -> Result<(), E> {
        loop {
            while let Some((after, limit)) = job.fill.want() {
                let page = match read(job.room.clone(), after, limit, PAGE_BYTES).await {
                    Ok(page) => page,
                    Err(e) if job.on_failure == OnFailure::Retry => return Err(e),
                    Err(e) => {
                        // What the pages before the failure did not deliver
                        // is lost; the live messages go on.
                        tracing::warn!(room = %job.room, error = %e, "cannot read history to fill a gap");
                        break;
                    }
                };
                if !self.hand_over_page(&mut job, page) {
                    return Ok(());
                }
            }
            let epoch = job.fill.epoch().clone();
            let upto = job.fill.upto();
            if let Some((from, to)) = job.fill.clone().finish() {
                if !self.owns(&job) {
                    return Ok(());
                }
                self.report_lost(&job.room, &epoch, from, to);
            }
            self.set_cursor(&job, &epoch, upto);
            match self.release_held(&job) {
                Some(next) => job = next,
                None => return Ok(()),
            }
        }
    }

    /// Hands over one page as the fill's rules say; `false` when the fill no
    /// longer owns the room.
    fn hand_over_page(&self, job: &mut FillJob, page: History) -> bool {
        if !self.owns(job) {
            return false;
        }
        let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
        let steps = job.fill.page(&page.epoch, &offsets);
        let mut messages: Vec<Option<Delivery>> = page.messages.into_iter().map(Some).collect();
        let epoch = job.fill.epoch().clone();
        let mut last = None;
        for step in steps {
            match step {
                Step::Deliver(i) => {
                    if let Some(m) = messages.get_mut(i).and_then(Option::take) {
                        last = Some(m.offset);
                        self.metrics.gap_filled.inc();
                        self.deliver.deliver(m);
                    }
                }
                Step::Lost { from, to } => {
                    last = Some(to);
                    self.report_lost(&job.room, &epoch, from, to);
                }
            }
        }
        if let Some(offset) = last {
            self.set_cursor(job, &epoch, offset);
        }
        true
    }

    /// Hands over the live messages held while the fill ran, in order; when
    /// they skip offsets (or some were not kept), the next fill to run.
    fn release_held(&self, job: &FillJob) -> Option<FillJob> {
        loop {
            let (mut cursor, mut batch) = {
                let mut rooms = lock(&self.rooms);
                let track = rooms.map.get_mut(&job.room)?;
                if track.generation != job.generation {
                    return None;
                }
                let held = track.held.as_mut()?;
                if held.queue.is_empty() {
                    let behind = held.dropped.take().filter(|d| {
                        d.epoch != track.cursor.epoch || d.offset > track.cursor.offset
                    });
                    let Some(dropped) = behind else {
                        track.held = None;
                        return None;
                    };
                    // Read what was not kept from history.
                    let from = if dropped.epoch == track.cursor.epoch {
                        track.cursor.clone()
                    } else {
                        Cursor::new(dropped.epoch.clone(), 0)
                    };
                    return Some(self.next_job(job, Fill::new(&from, dropped.offset)));
                }
                (track.cursor.clone(), std::mem::take(&mut held.queue))
            };
            while let Some(d) = batch.pop_front() {
                match continuity::live(Some(&cursor), &d.epoch, d.offset) {
                    Live::Deliver => {
                        cursor = Cursor::new(d.epoch.clone(), d.offset);
                        self.deliver.deliver(d);
                    }
                    Live::Duplicate => {}
                    Live::Gap { to, .. } => {
                        let fill = Fill::new(&cursor, to);
                        batch.push_front(d);
                        let mut rooms = lock(&self.rooms);
                        let track = rooms.map.get_mut(&job.room)?;
                        track.cursor = cursor;
                        let held = track.held.as_mut()?;
                        // Put the rest back in front of what came meanwhile.
                        while let Some(d) = batch.pop_back() {
                            held.queue.push_front(d);
                        }
                        return Some(self.next_job(job, fill));
                    }
                }
            }
            let mut rooms = lock(&self.rooms);
            let track = rooms.map.get_mut(&job.room)?;
            if track.generation != job.generation {
                return None;
            }
            track.cursor = cursor;
        }
    }

    fn next_job(&self, job: &FillJob, fill: Fill) -> FillJob {
        FillJob {
            room: job.room.clone(),
            generation: job.generation,
            fill,
            on_failure: OnFailure::ReportLost,
        }
    }

    /// Whether the fill still owns the room's delivery.
    fn owns(&self, job: &FillJob) -> bool {
        lock(&self.rooms)
            .map
            .get(&job.room)
            .is_some_and(|t| t.generation == job.generation && t.held.is_some())
    }

    fn set_cursor(&self, job: &FillJob, epoch: &Arc<str>, offset: u64) {
        let mut rooms = lock(&self.rooms);
        if let Some(track) = rooms.map.get_mut(&job.room)
            && track.generation == job.generation
        {
            track.cursor.advance(epoch, offset);
        }
    }

    /// Messages `from..=to` of the room will never reach this node's
    /// subscribers: they are told so, in the messages' place.
    fn report_lost(&self, room: &RoomName, epoch: &Arc<str>, from: u64, to: u64) {
        tracing::warn!(%room, from, to, "messages missing from history: subscribers are told history_gone");
        self.metrics.lost_from_history.inc_by(to + 1 - from);
        self.deliver.lost(room, epoch, to);
    }
}

impl Rooms {
    fn next(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

impl Held {
    fn hold(&mut self, d: Delivery) {
        if self.queue.len() < MAX_HELD {
            self.queue.push_back(d);
        } else {
            match &mut self.dropped {
                Some(c) => c.advance(&d.epoch, d.offset),
                None => self.dropped = Some(Cursor::new(d.epoch.clone(), d.offset)),
            }
        }
    }
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;
