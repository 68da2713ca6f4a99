//! History reads (durable delivery): pages of a room's stream, where rooms
//! stand, and the epoch check after a reconnect. The gap fills themselves
//! are the broker-agnostic [`Tracker`]'s; this module gives it its reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use redis::aio::ConnectionLike;

use super::connection::Master;
use super::error::{Error, bounded};
use super::scripts::{self, Keyspace};
use super::url::Addr;
use crate::broker::continuity::{self, Check, Cursor, Resume};
use crate::broker::tracker::{FillJob, ReadPage, Tracker};
use crate::broker::{Delivery, History, new_epoch};
use crate::metrics::Metrics;
use crate::protocol::{Frame, RoomName};
use crate::sync::lock;

/// Reads the room's epoch, last offset and up to `limit` kept messages after
/// `after` (no more than `max_bytes` of frames, but at least one), in one
/// round trip.
#[allow(clippy::too_many_arguments)]
pub(super) async fn read(
    conn: &mut impl ConnectionLike,
    addr: &Addr,
    keys: Keyspace,
    room: &RoomName,
    after: u64,
    limit: usize,
    max_bytes: usize,
    op_timeout: Duration,
) -> Result<History, Error> {
    let mut inv = scripts::HISTORY.key(keys.room_key(room.as_str()));
    inv.key(keys.history_key(room.as_str()))
        .arg(after)
        .arg(limit.max(1))
        .arg(max_bytes);
    let (last, epoch, entries) = bounded(
        addr,
        "history script",
        op_timeout,
        inv.invoke_async::<(Option<u64>, Option<String>, Vec<(String, Vec<u8>)>)>(conn),
    )
    .await?;
    let epoch: Arc<str> = epoch.unwrap_or_default().into();
    let mut messages = Vec::with_capacity(entries.len());
    for (id, frame) in entries {
        let Some(offset) = scripts::entry_offset(&id) else {
            continue;
        };
        let Some(frame) = Frame::from_utf8(&frame) else {
            continue;
        };
        messages.push(Delivery {
            room: room.clone(),
            offset,
            epoch: epoch.clone(),
            frame,
            published_at_us: 0,
        });
    }
    Ok(History {
        epoch,
        last: last.unwrap_or(0),
        messages,
        read: None,
    })
}

/// The tracker's history reads, through the master's connection.
pub(super) fn pages(master: &Master, op_timeout: Duration) -> ReadPage<Error> {
    let master = master.clone();
    Arc::new(move |room, after, limit, max_bytes| {
        let mut conn = master.conn.clone();
        let addr = master.addr.clone();
        async move {
            read(
                &mut conn,
                &addr,
                Keyspace::Plain,
                &room,
                after,
                limit,
                max_bytes,
                op_timeout,
            )
            .await
        }
        .boxed()
    })
}

/// The rooms' epochs and last offsets (a room not created yet: no epoch,
/// offset 0), in one round trip; each room's answer apart (on a Redis
/// Cluster, a room whose slot moved is answered `MOVED`).
pub(super) async fn positions(
    conn: &mut impl ConnectionLike,
    addr: &Addr,
    keys: Keyspace,
    rooms: &[RoomName],
    limit: Duration,
) -> Result<Vec<redis::RedisResult<Cursor>>, Error> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for room in rooms {
        pipe.cmd("HMGET")
            .arg(keys.room_key(room.as_str()))
            .arg("o")
            .arg("e");
    }
    let replies: Vec<redis::RedisResult<(Option<u64>, Option<String>)>> =
        bounded(addr, "HMGET room positions", limit, pipe.query_async(conn)).await?;
    Ok(replies
        .into_iter()
        .map(|reply| {
            reply.map(|(offset, epoch)| Cursor::new(epoch.unwrap_or_default(), offset.unwrap_or(0)))
        })
        .collect())
}

/// Rooms tracked for acknowledged offsets at most; past it, the map is reset.
const MAX_ACKED: usize = 65_536;

/// The last offset this node had acknowledged per room (history mode), for
/// the epoch check after a reconnect. Std mutex: map updates only.
#[derive(Default)]
pub(super) struct Acked(Mutex<HashMap<RoomName, Cursor>>);

impl Acked {
    pub fn note(&self, room: &RoomName, epoch: &Arc<str>, offset: u64) {
        let mut acked = lock(&self.0);
        if acked.len() >= MAX_ACKED && !acked.contains_key(room) {
            acked.clear();
        }
        match acked.get_mut(room) {
            Some(cursor) => cursor.advance(epoch, offset),
            None => {
                acked.insert(room.clone(), Cursor::new(epoch.clone(), offset));
            }
        }
    }
}

/// What the epoch check after a reconnect found.
#[derive(Default)]
pub(super) struct Checked {
    /// Catch-up fills for what was published while this node was away.
    pub fills: Vec<FillJob>,
    /// Rooms the master redirected (`MOVED`, `ASK`: on a Redis Cluster,
    /// their slot is elsewhere), unchecked.
    pub moved: Vec<(RoomName, redis::RedisError)>,
}

/// After (re)connecting in history mode, before any publish reaches the
/// master: for every room this node saw offsets of (acknowledged or
/// delivered) and that `owns` says this master holds, make sure the master
/// still has them (else the room gets a new epoch: acknowledged messages
/// were lost), and set each delivered room's cursor. Returns the catch-up
/// fills for what was published while this node was away, to run once live
/// messages flow.
pub(super) async fn check_epochs(
    master: &mut Master,
    keys: Keyspace,
    tracker: &Tracker,
    acked: &Acked,
    metrics: &Metrics,
    limit: Duration,
    owns: impl Fn(&RoomName) -> bool,
) -> Result<Checked, Error> {
    let mut known: HashMap<RoomName, Cursor> = lock(&acked.0)
        .iter()
        .filter(|(room, _)| owns(room))
        .map(|(room, cursor)| (room.clone(), cursor.clone()))
        .collect();
    for (room, cursor) in tracker.cursors() {
        if !owns(&room) {
            continue;
        }
        match known.get_mut(&room) {
            Some(k) => k.advance(&cursor.epoch, cursor.offset),
            None => {
                known.insert(room, cursor);
            }
        }
    }
    let mut checked = Checked::default();
    if known.is_empty() {
        return Ok(checked);
    }
    let rooms: Vec<(RoomName, Cursor)> = known.into_iter().collect();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (room, seen) in &rooms {
        pipe.cmd("EVALSHA")
            .arg(scripts::EPOCH_CHECK.get_hash())
            .arg(2)
            .arg(keys.room_key(room.as_str()))
            .arg(keys.history_key(room.as_str()))
            .arg(&*seen.epoch)
            .arg(seen.offset)
            .arg(new_epoch());
    }
    let replies: Vec<redis::RedisResult<(u8, u64, String)>> = bounded(
        &master.addr,
        "epoch check",
        limit * 2,
        pipe.query_async(&mut master.conn),
    )
    .await?;
    for ((room, seen), reply) in rooms.into_iter().zip(replies) {
        let (reset, last, epoch) = match reply {
            Ok(reply) => reply,
            Err(e) if e.redirect_node().is_some() => {
                checked.moved.push((room, e));
                continue;
            }
            Err(source) => {
                return Err(Error::Command {
                    command: "epoch check",
                    addr: master.addr.clone(),
                    source,
                });
            }
        };
        let check = Check {
            reset: reset == 1,
            last,
            epoch: epoch.into(),
        };
        if check.reset {
            metrics.epoch_resets.inc();
            tracing::warn!(
                %room, had = seen.offset, master_has = last, old_epoch = %seen.epoch, new_epoch = %check.epoch,
                "the master lacks acknowledged messages of the room (lost in a failover): new epoch"
            );
            lock(&acked.0).remove(&room);
        }
        match continuity::resume(tracker.cursor(&room).as_ref(), &check) {
            Resume::Untracked => {}
            Resume::Reset(cursor) => {
                tracker.resume(&room, cursor, 0);
            }
            Resume::From { from, upto } => checked.fills.extend(tracker.resume(&room, from, upto)),
        }
    }
    Ok(checked)
}
