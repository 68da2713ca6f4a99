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
/// session, 12 fence (`""`: none).
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
if KEYS[3] ~= '' then
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
  if KEYS[2] ~= '' then redis.call('DEL', KEYS[2]) end
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
local frame = ARGV[2] .. offset .. '"#,
            EPOCH_FIELD,
            r#"' .. epoch .. ARGV[3]
if KEYS[2] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '0-' .. offset, 'f', frame)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
if KEYS[3] ~= '' then
  redis.call('SET', KEYS[3], offset .. ' ' .. epoch, 'EX', ARGV[8])
end
if KEYS[4] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*',
    'offset', offset, 'epoch', epoch, 'data', ARGV[10], 'from', ARGV[11], 'ts', ARGV[4])
end
redis.call('PUBLISH', ARGV[1], ARGV[4] .. ' ' .. offset .. ' ' .. epoch .. ' ' .. frame)
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
  if KEYS[2] ~= '' then redis.call('DEL', KEYS[2]) end
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
  if KEYS[2] ~= '' then redis.call('DEL', KEYS[2]) end
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
    format!("chorus:room:{room}")
}

pub fn history_key(room: &str) -> String {
    format!("chorus:hist:{room}")
}

/// The idempotency entry of `key` in `room`: scoped by the room's length, so
/// no (room, key) pair can name another pair's entry.
pub fn idempotency_key(room: &str, key: &str) -> String {
    format!("chorus:idem:{}:{room}:{key}", room.len())
}

pub use crate::upstream::upstream_key;

pub const ROOM_CHANNEL_PREFIX: &str = "chorus:room:";

pub fn room_channel(room: &str) -> String {
    format!("{ROOM_CHANNEL_PREFIX}{room}")
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
    fn idempotency_keys_of_different_rooms_never_collide() {
        // Both rooms and keys may contain `:`.
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
