//! Lua scripts: each runs atomically in Redis, so the offset, the epoch, the
//! history entry and the PUBLISH that carries the message are one step —
//! every node sees the same order, and history never disagrees with what was
//! delivered.
//!
//! Keys of a room:
//! - `chorus:room:<room>`: hash with `e` (epoch), `o` (last offset) and, in
//!   pubsub mode, `r` (the fence the epoch was started under), expiring after
//!   the idle TTL. When it is gone (idle expiry, Redis restarted without
//!   persistence, a failover to a replica that never got it) the next
//!   publish starts a new epoch at offset 1 and drops the old history.
//! - `chorus:fence`: `"<run_id> <token>"`, the fence of the Redis process
//!   that is master now (see [`FENCE`]).
//! - `chorus:hist:<room>` (streams delivery): a stream of the room's
//!   messages, entry id `0-<offset>`, field `f` = the exact `message` frame;
//!   capped with `MAXLEN ~` and expiring with the hash.
//! - `chorus:idem:<room length>:<room>:<key>`: `"<offset> <epoch>"` of a
//!   publish with an idempotency key, for the idempotency window. The room's
//!   byte length comes first because both the room and the key may contain
//!   `:` — without it, room `a` with key `b:c` and room `a:b` with key `c`
//!   would share one entry.
//! - `chorus:upstream:<room>`: client publishes for backend consumer groups.
//!
//! Every other key is a fixed prefix followed by the whole room name, which
//! is unambiguous as it is.
//!
//! On a Redis Cluster ([`Keyspace::Tagged`]) the room name in every key and
//! in the channel is written `{<room>}`, a hash tag: a room's hash, history,
//! idempotency entries, upstream stream and channel then share one slot, so
//! the script that touches them runs on one shard and `SPUBLISH`es there
//! (room names cannot contain braces, so the tag is always the room). A key
//! a call does not use is passed as `""` (one Redis) or as the room hash's
//! own name (a cluster refuses keys of other slots in one call); the scripts
//! treat both as unused.
//!
//! The live notification on channel `chorus:room:<room>` is
//! `"<published_at_us> <offset> <epoch> <message frame>"`: the frame is
//! assembled here from a head and a tail the publishing node encoded
//! ([`crate::protocol::message`] defines how), so receiving nodes forward the
//! bytes without decoding or re-encoding them.

use std::sync::LazyLock;

use redis::Script;

use crate::protocol::message::EPOCH_FIELD;

/// KEYS: room hash, history stream, idempotency key, upstream stream (the
/// last three may be `""` when unused).
/// ARGV: 1 channel, 2 frame head, 3 frame tail (both from
/// [`crate::protocol::message_parts`]), 4 published_at_us, 5 epoch for a
/// new room, 6 idle TTL (s), 7 history MAXLEN (0: no history),
/// 8 idempotency window (s), 9 upstream MAXLEN, 10 data, 11 publisher
/// session, 12 fence (`""`: none), 13 the publish command (`PUBLISH`, the
/// default, or `SPUBLISH` on a Redis Cluster).
/// A room whose epoch was started under another fence gets a new epoch (see
/// [`FENCE`]). Returns `{offset, epoch, duplicate}`.
///
/// The frame is joined as [`crate::protocol::message::splice`] joins it,
/// with [`EPOCH_FIELD`] from there: the protocol module owns the frame's
/// format, and the `wire_format` test in `chorus-tests` holds the two to it.
pub static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            r#"
local function used(i) return KEYS[i] ~= '' and KEYS[i] ~= KEYS[1] end
if used(3) then
  local prev = redis.call('GET', KEYS[3])
  if prev then
    local sp = string.find(prev, ' ', 1, true)
    return {tonumber(string.sub(prev, 1, sp - 1)), string.sub(prev, sp + 1), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch or (ARGV[12] ~= '' and redis.call('HGET', KEYS[1], 'r') ~= ARGV[12]) then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'r', ARGV[12])
  if used(2) then redis.call('DEL', KEYS[2]) end
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
local frame = ARGV[2] .. offset .. '"#,
            EPOCH_FIELD,
            r#"' .. epoch .. ARGV[3]
if used(2) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '0-' .. offset, 'f', frame)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
if used(3) then
  redis.call('SET', KEYS[3], offset .. ' ' .. epoch, 'EX', ARGV[8])
end
if used(4) then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*',
    'offset', offset, 'epoch', epoch, 'data', ARGV[10], 'from', ARGV[11], 'ts', ARGV[4])
end
redis.call(ARGV[13] or 'PUBLISH', ARGV[1], ARGV[4] .. ' ' .. offset .. ' ' .. epoch .. ' ' .. frame)
return {offset, epoch, 0}
"#,
        ]
        .concat(),
    )
});

/// KEYS: room hash, history stream (or `""`). ARGV: epoch for a new room,
/// idle TTL, fence (`""`: none).
/// Returns `{last offset, epoch}`, creating the epoch (or, under another
/// fence, a new one, as [`PUBLISH`] would) so that the first message of a
/// new room carries the epoch its first subscriber was told.
pub static POSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local e = redis.call('HGET', KEYS[1], 'e')
if not e or (ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'r') ~= ARGV[3]) then
  redis.call('HSET', KEYS[1], 'e', ARGV[1], 'o', 0, 'r', ARGV[3])
  if KEYS[2] ~= '' and KEYS[2] ~= KEYS[1] then redis.call('DEL', KEYS[2]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'o', 'e')
return {tonumber(v[1]) or 0, v[2]}
"#,
    )
});

/// The fence of the master (pubsub mode): a token that changes whenever
/// another Redis process becomes master — a restart (from whatever snapshot
/// or AOF it loads), a failover, a demoted master promoted again. A room's
/// counter read under another fence may have lost acknowledged writes (Redis
/// replication and persistence are asynchronous), and in pubsub mode no node
/// keeps what it saw, so [`PUBLISH`] and [`POSITION`] start a new epoch for
/// it: clients are told by the epoch change instead of getting reused
/// offsets.
///
/// KEYS: `chorus:fence`. ARGV: the master's `run_id` (from `INFO server` on
/// the same connection), a fresh token. Returns the token in force: the
/// stored one when this process set it, else the fresh one, stored.
pub static FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('GET', KEYS[1])
if v then
  local sp = string.find(v, ' ', 1, true)
  if sp and string.sub(v, 1, sp - 1) == ARGV[1] then return string.sub(v, sp + 1) end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2])
return ARGV[2]
"#,
    )
});

pub const FENCE_KEY: &str = "chorus:fence";

/// Epoch honesty after a failover. KEYS: room hash, history stream.
/// ARGV: the epoch this node knows, the highest offset it saw acknowledged or
/// delivered in it, a fresh epoch.
/// When the master still has that epoch but a lower offset, acknowledged
/// messages were lost with the old master: the room gets the fresh epoch (and
/// its history is dropped), so clients are told `history_gone` instead of
/// finding a silent hole. Returns `{changed, last offset, epoch}`; a room the
/// master does not know at all answers `{0, 0, ""}`.
pub static EPOCH_CHECK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('HMGET', KEYS[1], 'o', 'e')
if not v[2] then return {0, 0, ''} end
local last = tonumber(v[1]) or 0
if v[2] == ARGV[1] and last < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'e', ARGV[3])
  if KEYS[2] ~= '' and KEYS[2] ~= KEYS[1] then redis.call('DEL', KEYS[2]) end
  return {1, last, ARGV[3]}
end
return {0, last, v[2]}
"#,
    )
});

/// One page of a room's history. KEYS: room hash, history stream.
/// ARGV: 1 the offset to read after, 2 most entries, 3 most bytes of frames
/// (the first entry is returned whatever its size).
/// Returns `{last offset, epoch, {{entry id, frame}, …}}`, read in small
/// chunks so that neither Redis nor the node holds more than about a page.
pub static HISTORY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('HMGET', KEYS[1], 'o', 'e')
local left = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local from = tonumber(ARGV[1]) + 1
local out, bytes = {}, 0
while left > 0 do
  local chunk = redis.call('XRANGE', KEYS[2], string.format('0-%d', from), '+',
    'COUNT', math.min(left, 32))
  if #chunk == 0 then break end
  for _, e in ipairs(chunk) do
    local frame = e[2][2]
    if #out > 0 and bytes + #frame > cap then
      return {v[1], v[2], out}
    end
    bytes = bytes + #frame
    out[#out + 1] = {e[1], frame}
    left = left - 1
    if left == 0 then break end
  end
  from = tonumber(string.sub(chunk[#chunk][1], 3)) + 1
end
return {v[1], v[2], out}
"#,
    )
});

pub fn room_key(room: &str) -> String {
    Keyspace::Plain.room_key(room)
}

pub const ROOM_CHANNEL_PREFIX: &str = "chorus:room:";

pub fn room_channel(room: &str) -> String {
    Keyspace::Plain.room_channel(room)
}

/// How a room's keys and channel are named: as they always were (one
/// Redis, with or without Sentinel), or with the room as hash tag (Redis
/// Cluster), so that all of them live in the room's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyspace {
    Plain,
    Tagged,
}

impl Keyspace {
    /// The room as it appears in key and channel names.
    fn room(self, room: &str) -> std::borrow::Cow<'_, str> {
        match self {
            Keyspace::Plain => room.into(),
            Keyspace::Tagged => format!("{{{room}}}").into(),
        }
    }

    pub fn room_key(self, room: &str) -> String {
        format!("chorus:room:{}", self.room(room))
    }

    pub fn history_key(self, room: &str) -> String {
        format!("chorus:hist:{}", self.room(room))
    }

    /// The idempotency entry of `key` in `room`: scoped by the room's
    /// length, so no (room, key) pair can name another pair's entry.
    pub fn idempotency_key(self, room: &str, key: &str) -> String {
        format!("chorus:idem:{}:{}:{key}", room.len(), self.room(room))
    }

    pub fn upstream_key(self, room: &str) -> String {
        crate::upstream::upstream_key(&self.room(room))
    }

    pub fn room_channel(self, room: &str) -> String {
        format!("{ROOM_CHANNEL_PREFIX}{}", self.room(room))
    }

    /// The room a channel named by [`Keyspace::room_channel`] belongs to.
    pub fn channel_room(self, channel: &str) -> Option<&str> {
        let rest = channel.strip_prefix(ROOM_CHANNEL_PREFIX)?;
        match self {
            Keyspace::Plain => Some(rest),
            Keyspace::Tagged => rest.strip_prefix('{')?.strip_suffix('}'),
        }
    }

    /// A key the script call does not use (see the module doc).
    pub fn unused(self, room: &str) -> String {
        match self {
            Keyspace::Plain => String::new(),
            Keyspace::Tagged => self.room_key(room),
        }
    }

    /// The publish command the script runs.
    pub fn publish_command(self) -> &'static str {
        match self {
            Keyspace::Plain => "PUBLISH",
            Keyspace::Tagged => "SPUBLISH",
        }
    }
}

/// A live notification, split.
#[derive(Debug, PartialEq, Eq)]
pub struct Notification<'a> {
    pub published_at_us: u64,
    pub offset: u64,
    pub epoch: &'a str,
    pub frame: &'a [u8],
}

/// Splits `"<published_at_us> <offset> <epoch> <frame>"`.
pub fn split_notification(payload: &[u8]) -> Option<Notification<'_>> {
    let mut parts = payload.splitn(4, |b| *b == b' ');
    let published_at_us = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let offset = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    Some(Notification {
        published_at_us,
        offset,
        epoch,
        frame: parts.next()?,
    })
}

/// The offset of a history entry id `0-<offset>`.
pub fn entry_offset(id: &str) -> Option<u64> {
    id.strip_prefix("0-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_split_into_their_parts() {
        assert_eq!(
            split_notification(b"17 5 e1 {\"op\":\"message\"}"),
            Some(Notification {
                published_at_us: 17,
                offset: 5,
                epoch: "e1",
                frame: b"{\"op\":\"message\"}"
            })
        );
        assert_eq!(split_notification(b"17 x e {}"), None);
        assert_eq!(split_notification(b"17 1 e"), None);
        assert_eq!(entry_offset("0-42"), Some(42));
        assert_eq!(entry_offset("1700000000-0"), None);
    }

    #[test]
    fn a_cluster_room_keeps_its_keys_and_channel_in_one_slot() {
        let k = Keyspace::Tagged;
        let names = [
            k.room_key("chat:lobby"),
            k.history_key("chat:lobby"),
            k.idempotency_key("chat:lobby", "m-{1}"),
            k.upstream_key("chat:lobby"),
            k.room_channel("chat:lobby"),
            k.unused("chat:lobby"),
        ];
        for name in &names {
            assert_eq!(
                super::super::cluster::slot(name),
                super::super::cluster::slot(&names[0]),
                "{name}"
            );
        }
        assert_eq!(names[0], "chorus:room:{chat:lobby}");
        assert_eq!(names[3], "chorus:upstream:{chat:lobby}");
        assert_eq!(k.channel_room(&names[4]), Some("chat:lobby"));
        assert_eq!(Keyspace::Plain.channel_room("chorus:room:a"), Some("a"));
        assert_eq!(k.channel_room("chorus:room:a"), None);
    }

    #[test]
    fn idempotency_keys_of_different_rooms_never_collide() {
        // Both rooms and keys may contain `:`.
        let idempotency_key = |room, key| Keyspace::Plain.idempotency_key(room, key);
        assert_ne!(idempotency_key("a", "b:c"), idempotency_key("a:b", "c"));
        assert_ne!(idempotency_key("a:", "b"), idempotency_key("a", ":b"));
        assert_eq!(
            idempotency_key("chat:lobby", "m-1"),
            "chorus:idem:10:chat:lobby:m-1"
        );
    }
}

#[cfg(test)]
#[path = "scripts_rules_tests.rs"]
mod rules_tests;
