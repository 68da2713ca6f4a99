//! Wire protocol v1 (README, "Protocol"): client frames in, server frames out;
//! room names and room patterns.
//!
//! No I/O here. Decoding is lenient about field order and strict about
//! content: anything that is not a known op with its required fields is a
//! [`FrameError`] that the transport answers with `bad_frame` (or
//! `bad_room` / `too_large`) without closing the connection.

mod frames;
pub mod message;
mod pattern;
mod room;

pub use frames::{
    ClientFrame, ErrorCode, FrameError, ServerFrame, Since, Token, decode, encode, is_json_object,
};
pub use message::{Frame, MessageFrame, encode_message, encode_message_after, message_parts};
pub use pattern::Pattern;
pub use room::{MAX_ROOM_BYTES, RoomError, RoomName};

/// Sub-protocol name negotiated on the WebSocket upgrade.
pub const SUBPROTOCOL: &str = "chorus.v1";

/// Longest accepted idempotency key (characters).
pub const MAX_KEY_CHARS: usize = 128;

/// Checks an idempotency key (WebSocket `publish` and the HTTP API alike);
/// the error says what a key must be.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.chars().count() > MAX_KEY_CHARS {
        return Err(format!("`key` must be 1 to {MAX_KEY_CHARS} characters"));
    }
    Ok(())
}
