//! Where a subscription starts: the room's position, and for a client that
//! comes back with `since`, the messages it missed.
//!
//! A recovery answers in the subscribe's `ok` whether everything missed
//! follows (`recovered`, `missed`) or the history no longer has it
//! (`history_gone`). The missed messages then go out a page at a time
//! ([`Replay`]), each page read from history only once the page before it
//! has left for the socket, so a replaying client that does not read pins at
//! most one page.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::Node;
use crate::broker::{BrokerError, History, Position};
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode, Frame, RoomName, ServerFrame, Since};

/// Messages read from history per round trip while replaying.
pub const REPLAY_PAGE: usize = 500;
/// Bytes of frames in one replay page (a larger message comes alone): what a
/// replaying client that does not read pins, beside its socket buffers.
pub const REPLAY_PAGE_BYTES: usize = 256 * 1024;

/// A subscription's start: what its `ok` says, and what follows the `ok`
/// before live messages.
#[derive(Debug)]
pub struct Subscribed {
    /// The room's last offset, in `epoch`: live messages after it follow.
    pub offset: u64,
    pub epoch: Arc<str>,
    /// `None` without `since`.
    pub recovery: Option<Recovery>,
    /// The first page of the missed messages, to send right after the `ok`.
    pub replayed: Vec<Frame>,
    /// The rest of them, to read and send page by page.
    pub replay: Option<Replay>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Everything missed follows the `ok` (this many messages).
    Done(u64),
    /// The history no longer covers what was missed.
    Gone,
}

impl Subscribed {
    fn at(pos: Position, recovery: Option<Recovery>) -> Self {
        Self {
            offset: pos.offset,
            epoch: pos.epoch,
            recovery,
            replayed: Vec::new(),
            replay: None,
        }
    }

    /// The subscribe's `ok`.
    pub fn ok(&self, id: u64) -> Frame {
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

/// What is left of a replay: the missed messages of a recovering
/// subscription, read and sent one page at a time.
#[derive(Debug)]
pub struct Replay {
    room: RoomName,
    epoch: Arc<str>,
    /// The last offset sent.
    after: u64,
    /// The last offset to replay: the room's offset in the `ok`.
    until: u64,
}

/// A page of history as [`Replay::next_page`] reads it.
pub type Page = Result<Option<History>, BrokerError>;

impl Replay {
    /// The next page: at most [`REPLAY_PAGE`] messages and about
    /// [`REPLAY_PAGE_BYTES`]. The future holds nothing of the caller's.
    pub fn next_page(&self, node: &Node) -> BoxFuture<'static, Page> {
        let want = (self.until - self.after).min(REPLAY_PAGE as u64) as usize;
        node.broker
            .history(&self.room, self.after, want, REPLAY_PAGE_BYTES)
    }

    /// Adds the frames of `page` to `out` if it carries on from where the
    /// replay is (same epoch, no message trimmed in between); `false` when
    /// it does not, or could not be read.
    pub fn take(&mut self, page: Page, out: &mut Vec<Frame>, metrics: &Metrics) -> bool {
        let Ok(Some(page)) = page else {
            return false;
        };
        if page.epoch != self.epoch || !page.covers(self.after) {
            return false;
        }
        let start = self.after;
        let before = out.len();
        for m in page
            .messages
            .into_iter()
            .take_while(|m| m.offset <= self.until)
        {
            self.after = m.offset;
            out.push(m.frame);
        }
        if let Some(span) = page.read {
            // Nothing more of the room up to where the read went.
            self.after = self.after.max(span.through.min(self.until));
        }
        metrics.replayed.inc_by((out.len() - before) as u64);
        // A page that moved nothing on would be asked for again forever.
        self.after > start
    }

    /// Whether everything was sent.
    pub fn done(&self) -> bool {
        self.after >= self.until
    }
}

impl Node {
    /// Where a connection that has (or is told it has) the room's messages
    /// up to `pos` starts, given where it says it left off (`since`). With
    /// `since`, the missed messages are read from history (durable delivery)
    /// when it still covers them.
    pub async fn recover(
        &self,
        room: &RoomName,
        since: Option<Since>,
        pos: Position,
    ) -> Result<Subscribed, BrokerError> {
        let Some(since) = since else {
            return Ok(Subscribed::at(pos, None));
        };
        let gone = |pos| {
            self.metrics.history_gone.inc();
            Ok(Subscribed::at(pos, Some(Recovery::Gone)))
        };
        if *since.epoch != *pos.epoch || since.offset > pos.offset {
            return gone(pos);
        }
        if since.offset == pos.offset {
            return Ok(Subscribed::at(pos, Some(Recovery::Done(0))));
        }
        if !self.broker.durable() {
            return gone(pos);
        }
        // The first page now, so that `ok` can say whether the history still
        // covers what was missed; the rest follows page by page.
        let mut replay = Replay {
            room: room.clone(),
            epoch: pos.epoch.clone(),
            after: since.offset,
            until: pos.offset,
        };
        let mut replayed = Vec::new();
        let page = replay.next_page(self).await?;
        let page_span = page.as_ref().and_then(|p| p.read);
        if !replay.take(Ok(page), &mut replayed, &self.metrics) {
            return gone(pos);
        }
        // Offsets that skip (Kafka) do not say how many were missed: those
        // of the first page, when more follow.
        let missed = match page_span {
            Some(_) => replayed.len() as u64,
            None => pos.offset - since.offset,
        };
        Ok(Subscribed {
            replayed,
            replay: (!replay.done()).then_some(replay),
            ..Subscribed::at(pos, Some(Recovery::Done(missed)))
        })
    }
}
