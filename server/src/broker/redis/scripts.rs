//! Lua scripts: each runs atomically in Redis, so the offset, the epoch and
//! the PUBLISH that carries the message are one step — every node sees the
//! same order.
//!
//! Room state lives in one hash per room, `chorus:room:<room>`, with fields
//! `e` (epoch) and `o` (last offset). The hash expires when the room is idle
//! for the configured time; a room whose hash is gone (idle expiry, Redis
//! restarted without persistence, failover to a replica that lacked it)
//! starts a new epoch with offsets from 1, which clients see.
//!
//! The live notification is `"<published_at_us> <offset> <message frame>"` on
//! channel `chorus:room:<room>`: the frame is assembled here from a head and a
//! tail the publishing node encoded, so receiving nodes forward the bytes to
//! their subscribers without decoding or re-encoding them.

use std::sync::LazyLock;

use redis::Script;

/// KEYS[1] room hash; ARGV: channel, frame head, frame tail, published_at_us,
/// epoch to use if the room is new, idle TTL in seconds.
/// Returns `{offset, epoch}`.
pub static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
local frame = ARGV[2] .. offset .. ',"epoch":"' .. epoch .. '"' .. ARGV[3]
redis.call('PUBLISH', ARGV[1], ARGV[4] .. ' ' .. offset .. ' ' .. frame)
return {offset, epoch}
"#,
    )
});

/// KEYS[1] room hash; ARGV: epoch to use if the room is new, idle TTL.
/// Returns `{last offset, epoch}` (creating the epoch so that the first
/// message of a new room carries the epoch its first subscriber was told).
pub static POSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local created = redis.call('HSETNX', KEYS[1], 'e', ARGV[1])
if created == 1 then
  redis.call('HSET', KEYS[1], 'o', 0)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'o', 'e')
return {tonumber(v[1]) or 0, v[2]}
"#,
    )
});

pub fn room_key(room: &str) -> String {
    format!("chorus:room:{room}")
}

pub const ROOM_CHANNEL_PREFIX: &str = "chorus:room:";

pub fn room_channel(room: &str) -> String {
    format!("{ROOM_CHANNEL_PREFIX}{room}")
}

/// Splits a live notification into `(published_at_us, offset, frame)`.
pub fn split_notification(payload: &[u8]) -> Option<(u64, u64, &[u8])> {
    let mut parts = payload.splitn(3, |b| *b == b' ');
    let ts = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let offset = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    Some((ts, offset, parts.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_split_into_their_parts() {
        assert_eq!(
            split_notification(b"17 5 {\"op\":\"message\"}"),
            Some((17, 5, &b"{\"op\":\"message\"}"[..]))
        );
        assert_eq!(split_notification(b"17 x {}"), None);
        assert_eq!(split_notification(b"17"), None);
    }
}
