//! Encoded frames, and the one definition of the `message` frame's bytes.
//!
//! A [`Frame`] is a server frame as it goes out: UTF-8 text in a shared,
//! reference-counted buffer. The `message` frame of a publish is encoded
//! once per cluster (by the broker that assigns its offset) or once per
//! node, and every local subscriber is handed a clone of the same bytes.
//!
//! The `message` frame is built from three parts, so that a broker that
//! assigns the offset and epoch itself (the Redis Lua script) can finish it
//! without decoding or re-encoding anything:
//!
//! ```text
//! head                                           offset  EPOCH_FIELD   epoch  tail
//! {"op":"message","room":"lobby","data":{…},"offset":42  ,"epoch":"   5f1c   ","from":"s1"}
//! ```
//!
//! [`message_parts`] builds the head and the tail, [`splice`] joins them
//! around an offset and an epoch exactly as the Lua script does, and
//! [`encode_message`] is those two in one; a test in the `chorus-tests`
//! crate (`wire_format`) checks the script's output against it byte for byte.

use std::fmt::{self, Write as _};

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;

/// An encoded server frame: the text of one WebSocket text frame. Cheap to
/// clone (a reference count); always valid UTF-8.
///
/// It keeps its bytes in the WebSocket library's text buffer type, so that
/// handing a frame to a socket costs neither a copy nor a UTF-8 check —
/// once per subscriber, on every delivery.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Frame(Utf8Bytes);

impl Frame {
    /// A frame from bytes that came from elsewhere (a broker), if they are UTF-8.
    pub fn from_utf8(bytes: impl Into<bytes::Bytes>) -> Option<Self> {
        Utf8Bytes::try_from(bytes.into()).ok().map(Self)
    }

    pub const fn from_static(text: &'static str) -> Self {
        Self(Utf8Bytes::from_static(text))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Self {
        Self(text.into())
    }
}

impl From<Frame> for Utf8Bytes {
    fn from(frame: Frame) -> Self {
        frame.0
    }
}

impl std::ops::Deref for Frame {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields of a `message` frame.
#[derive(Debug)]
pub struct MessageFrame<'a> {
    pub room: &'a str,
    pub data: &'a RawValue,
    pub offset: u64,
    pub epoch: &'a str,
    /// The publisher's session (WebSocket publishes only).
    pub from: Option<&'a str>,
}

/// What stands between a `message` frame's offset and its epoch; the
/// epoch's closing quote begins the tail. The Lua script that finishes
/// frames in Redis takes it from here (it holds no `'` or `\`, so it sits in
/// a Lua string literal as it is).
pub const EPOCH_FIELD: &str = r#","epoch":""#;

/// A `message` frame cut around its offset and epoch, for a broker that
/// assigns those itself: the frame is
/// `head + offset + EPOCH_FIELD + epoch + tail` (see [`splice`]).
pub fn message_parts(room: &str, data: &RawValue, from: Option<&str>) -> (String, String) {
    let mut head = String::with_capacity(48 + room.len() + data.get().len());
    head.push_str(r#"{"op":"message","room":"#);
    push_json_str(&mut head, room);
    head.push_str(r#","data":"#);
    head.push_str(data.get());
    head.push_str(r#","offset":"#);
    let mut tail = String::from("\"");
    if let Some(from) = from {
        tail.push_str(r#","from":"#);
        push_json_str(&mut tail, from);
    }
    tail.push('}');
    (head, tail)
}

/// Joins the parts of a `message` frame around its offset and epoch, as
/// the Lua script does. Epochs are the brokers' hex ids, which JSON takes
/// as they are; any other epoch is escaped here (the script never sees one).
pub fn splice(head: &str, offset: u64, epoch: &str, tail: &str) -> Frame {
    let mut frame =
        String::with_capacity(head.len() + 20 + EPOCH_FIELD.len() + epoch.len() + tail.len());
    frame.push_str(head);
    // Writing to a String cannot fail.
    let _ = write!(frame, "{offset}");
    frame.push_str(EPOCH_FIELD);
    if epoch.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        let quoted = serde_json::to_string(epoch).unwrap_or_default();
        frame.push_str(&quoted[1..quoted.len() - 1]);
    } else {
        frame.push_str(epoch);
    }
    frame.push_str(tail);
    Frame::from(frame)
}

/// Encodes a `message` frame (for a broker that assigns offsets in the node).
pub fn encode_message(m: &MessageFrame<'_>) -> Frame {
    let (head, tail) = message_parts(m.room, m.data, m.from);
    splice(&head, m.offset, m.epoch, &tail)
}

/// Encodes a `message` frame that also says `prev`: no message of the room
/// lies between `prev` and this one's offset (a broker whose offsets are
/// positions in a log shared by several rooms, such as Kafka's).
pub fn encode_message_after(m: &MessageFrame<'_>, prev: u64) -> Frame {
    let (head, tail) = message_parts(m.room, m.data, m.from);
    // The tail opens with the epoch's closing quote.
    let tail = format!("\",\"prev\":{prev}{}", &tail[1..]);
    splice(&head, m.offset, m.epoch, &tail)
}

fn push_json_str(out: &mut String, s: &str) {
    // Serialising a string cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn encodes_message_frames_with_raw_data() {
        let data = RawValue::from_string(r#"{"text":"hé \"q\""}"#.into()).unwrap();
        let text = encode_message(&MessageFrame {
            room: "lobby",
            data: &data,
            offset: 3,
            epoch: "e",
            from: Some("s1"),
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"op":"message","room":"lobby","data":{"text":"hé \"q\""},"offset":3,"epoch":"e","from":"s1"})
        );
        let text = encode_message(&MessageFrame {
            room: "r",
            data: &data,
            offset: 1,
            epoch: "e",
            from: None,
        });
        assert_eq!(
            text.as_str(),
            r#"{"op":"message","room":"r","data":{"text":"hé \"q\""},"offset":1,"epoch":"e"}"#
        );
    }

    #[test]
    fn prev_follows_the_epoch() {
        let data = RawValue::from_string("1".into()).unwrap();
        let m = MessageFrame {
            room: "r",
            data: &data,
            offset: 9,
            epoch: "t/0",
            from: Some("s"),
        };
        assert_eq!(
            encode_message_after(&m, 4).as_str(),
            r#"{"op":"message","room":"r","data":1,"offset":9,"epoch":"t/0","prev":4,"from":"s"}"#
        );
    }

    #[test]
    fn the_parts_spliced_are_the_serde_encoding_of_the_frame() {
        #[derive(serde::Serialize)]
        struct Expected<'a> {
            op: &'static str,
            room: &'a str,
            data: &'a RawValue,
            offset: u64,
            epoch: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            from: Option<&'a str>,
        }
        let data = RawValue::from_string(r#"[1, {"a": "b\n"}]"#.into()).unwrap();
        for from in [Some("s\"1"), None] {
            for epoch in ["5f1c0a", "odd\"epoch\\"] {
                let (head, tail) = message_parts("r:1", &data, from);
                let spliced = splice(&head, 42, epoch, &tail);
                let serde = serde_json::to_string(&Expected {
                    op: "message",
                    room: "r:1",
                    data: &data,
                    offset: 42,
                    epoch,
                    from,
                })
                .unwrap();
                assert_eq!(spliced.as_str(), serde);
            }
        }
    }

    #[test]
    fn the_epoch_field_fits_in_a_lua_string_literal() {
        assert!(!EPOCH_FIELD.contains(['\'', '\\', '\n']));
    }
}
