//! Frame codec: JSON text frames to [`ClientFrame`] and [`ServerFrame`] to text
//! (the `message` frame has its own module, [`super::message`]).

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use super::{Frame, RoomName, check_key};

/// A request from a client, validated.
#[derive(Debug, Clone)]
pub enum ClientFrame {
    Subscribe {
        id: u64,
        room: RoomName,
        since: Option<Since>,
    },
    Unsubscribe {
        id: u64,
        room: RoomName,
    },
    Publish {
        id: u64,
        room: RoomName,
        data: Box<RawValue>,
        key: Option<String>,
    },
    Ping {
        id: u64,
    },
    /// A fresh token for the connection, before its current one expires.
    Refresh {
        id: u64,
        token: Token,
    },
}

/// A client's token as it came in a frame; its `Debug` form hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl PartialEq for ClientFrame {
    fn eq(&self, other: &Self) -> bool {
        use ClientFrame::*;
        match (self, other) {
            (
                Subscribe {
                    id: a,
                    room: r,
                    since: s,
                },
                Subscribe {
                    id: b,
                    room: q,
                    since: t,
                },
            ) => (a, r, s) == (b, q, t),
            (Unsubscribe { id: a, room: r }, Unsubscribe { id: b, room: q }) => (a, r) == (b, q),
            (
                Publish {
                    id: a,
                    room: r,
                    data: d,
                    key: k,
                },
                Publish {
                    id: b,
                    room: q,
                    data: e,
                    key: l,
                },
            ) => (a, r, d.get(), k) == (b, q, e.get(), l),
            (Ping { id: a }, Ping { id: b }) => a == b,
            (Refresh { id: a, token: t }, Refresh { id: b, token: u }) => (a, t) == (b, u),
            _ => false,
        }
    }
}

impl ClientFrame {
    pub fn id(&self) -> u64 {
        match self {
            Self::Subscribe { id, .. }
            | Self::Unsubscribe { id, .. }
            | Self::Publish { id, .. }
            | Self::Ping { id }
            | Self::Refresh { id, .. } => *id,
        }
    }
}

/// Where a recovering subscriber left off.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Since {
    pub epoch: String,
    pub offset: u64,
}

/// Error codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    BadRoom,
    TooLarge,
    RateLimited,
    Unauthorized,
    Forbidden,
    NotSubscribed,
    Unavailable,
    /// A publish whose answer never came: it may or may not have been
    /// delivered (retry with the same `key` to be safe).
    OutcomeUnknown,
    HistoryGone,
    TooManyRooms,
    /// The history API on a node that keeps no history (`--delivery pubsub`).
    NoHistory,
}

impl ErrorCode {
    /// Every code (the metrics export a series for each from the start).
    pub const ALL: [ErrorCode; 12] = [
        Self::BadFrame,
        Self::BadRoom,
        Self::TooLarge,
        Self::RateLimited,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotSubscribed,
        Self::Unavailable,
        Self::OutcomeUnknown,
        Self::HistoryGone,
        Self::TooManyRooms,
        Self::NoHistory,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::BadRoom => "bad_room",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotSubscribed => "not_subscribed",
            Self::Unavailable => "unavailable",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::HistoryGone => "history_gone",
            Self::TooManyRooms => "too_many_rooms",
            Self::NoHistory => "no_history",
        }
    }
}

/// Why a client frame was refused; `id` is echoed when the frame had one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct FrameError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    fn new(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id,
            code,
            message: message.into(),
        }
    }
}

/// Everything any op may carry; decoded in one pass, borrowing from the frame.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Data<'a>,
    #[serde(borrow, default)]
    key: Option<Cow<'a, str>>,
    #[serde(default)]
    since: Option<Since>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
}

/// `data` as raw JSON; unlike `Option<&RawValue>` this keeps an explicit `null`.
#[derive(Default)]
struct Data<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Data<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&RawValue>::deserialize(d).map(|raw| Data(Some(raw)))
    }
}

/// Whether `text` is a JSON object (its first non-whitespace character is
/// `{`). serde reads a struct from an array too, by position (`["ping",1]`
/// would be a ping): frames and HTTP bodies must be one JSON object, so
/// anything else is refused before it is decoded.
pub fn is_json_object(text: &[u8]) -> bool {
    text.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|b| *b == b'{')
}

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<ClientFrame, FrameError> {
    if !is_json_object(text.as_bytes()) {
        return Err(FrameError::new(
            None,
            ErrorCode::BadFrame,
            "a frame must be one JSON object",
        ));
    }
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
        FrameError::new(
            best_effort_id(text),
            ErrorCode::BadFrame,
            format!("invalid frame: {e}"),
        )
    })?;
    let id = env.id;
    let op = env
        .op
        .ok_or_else(|| FrameError::new(id, ErrorCode::BadFrame, "missing field `op`"))?;
    let need_id = || {
        id.ok_or_else(|| {
            FrameError::new(
                None,
                ErrorCode::BadFrame,
                format!("`{op}` needs an integer `id`"),
            )
        })
    };
    let room = |room: Option<Cow<'_, str>>| -> Result<RoomName, FrameError> {
        let room = room.ok_or_else(|| {
            FrameError::new(id, ErrorCode::BadFrame, format!("`{op}` needs a `room`"))
        })?;
        RoomName::parse(&room).map_err(|e| FrameError::new(id, ErrorCode::BadRoom, e.to_string()))
    };
    match &*op {
        "subscribe" => Ok(ClientFrame::Subscribe {
            id: need_id()?,
            room: room(env.room)?,
            since: env.since,
        }),
        "unsubscribe" => Ok(ClientFrame::Unsubscribe {
            id: need_id()?,
            room: room(env.room)?,
        }),
        "publish" => {
            let id = need_id()?;
            let room = room(env.room)?;
            let data = env.data.0.ok_or_else(|| {
                FrameError::new(Some(id), ErrorCode::BadFrame, "`publish` needs `data`")
            })?;
            if let Some(k) = &env.key {
                check_key(k).map_err(|why| FrameError::new(Some(id), ErrorCode::BadFrame, why))?;
            }
            let key = env.key.map(Cow::into_owned);
            Ok(ClientFrame::Publish {
                id,
                room,
                data: data.to_owned(),
                key,
            })
        }
        "ping" => Ok(ClientFrame::Ping { id: need_id()? }),
        "refresh" => {
            let id = need_id()?;
            let token = env.token.filter(|t| !t.is_empty()).ok_or_else(|| {
                FrameError::new(Some(id), ErrorCode::BadFrame, "`refresh` needs a `token`")
            })?;
            Ok(ClientFrame::Refresh {
                id,
                token: Token(token.into_owned()),
            })
        }
        other => Err(FrameError::new(
            id,
            ErrorCode::BadFrame,
            format!("unknown op `{other}`"),
        )),
    }
}

/// Pulls `id` out of a frame that did not decode as a whole (e.g. `data` was
/// cut short), so the error can still be matched to the request.
fn best_effort_id(text: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct OnlyId {
        id: u64,
    }
    serde_json::from_str::<OnlyId>(text).ok().map(|f| f.id)
}

/// Frames the server sends, other than `message`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        node: &'a str,
        version: &'a str,
    },
    Ok {
        id: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        missed: Option<u64>,
        /// Why a recovery failed (`history_gone`); the subscription holds.
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<ErrorCode>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: ErrorCode,
        message: &'a str,
    },
    Pong {
        id: u64,
    },
    Reconnect {
        reason: &'a str,
        after_ms: u64,
    },
    /// Durable delivery: the room's messages after the last one the client
    /// got, up to `offset`, fell out of the history before this node could
    /// deliver them (`code` is `history_gone`); the next message follows
    /// `offset`.
    Gap {
        room: &'a str,
        epoch: &'a str,
        offset: u64,
        code: ErrorCode,
    },
}

impl ServerFrame<'_> {
    pub fn ok(id: u64) -> Self {
        ServerFrame::Ok {
            id,
            offset: None,
            epoch: None,
            recovered: None,
            missed: None,
            code: None,
        }
    }
}

pub fn encode(frame: &ServerFrame<'_>) -> Frame {
    // Serialising these plain structs cannot fail (string keys, no maps of
    // non-string keys, no failing Serialize impls).
    Frame::json(frame)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn error_code_all_lists_every_code_once() {
        use ErrorCode::*;
        // Exhaustive: a new code fails to compile here until it has a
        // place, and then this test until ALL has it there too.
        let place = |code: ErrorCode| match code {
            BadFrame => 0,
            BadRoom => 1,
            TooLarge => 2,
            RateLimited => 3,
            Unauthorized => 4,
            Forbidden => 5,
            NotSubscribed => 6,
            Unavailable => 7,
            OutcomeUnknown => 8,
            HistoryGone => 9,
            TooManyRooms => 10,
            NoHistory => 11,
        };
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(place(code), i, "{code:?}");
        }
    }

    fn err(text: &str) -> FrameError {
        decode(text).unwrap_err()
    }

    #[test]
    fn decodes_every_op() {
        assert_eq!(
            decode(r#"{"op":"subscribe","id":1,"room":"lobby"}"#).unwrap(),
            ClientFrame::Subscribe {
                id: 1,
                room: RoomName::parse("lobby").unwrap(),
                since: None
            }
        );
        assert_eq!(
            decode(r#"{"id":2,"since":{"epoch":"e1","offset":7},"room":"a","op":"subscribe"}"#)
                .unwrap(),
            ClientFrame::Subscribe {
                id: 2,
                room: RoomName::parse("a").unwrap(),
                since: Some(Since {
                    epoch: "e1".into(),
                    offset: 7
                })
            }
        );
        assert_eq!(
            decode(r#"{"op":"unsubscribe","id":3,"room":"a"}"#).unwrap(),
            ClientFrame::Unsubscribe {
                id: 3,
                room: RoomName::parse("a").unwrap()
            }
        );
        assert_eq!(
            decode(r#"{"op":"ping","id":4}"#).unwrap(),
            ClientFrame::Ping { id: 4 }
        );
        let refresh = decode(r#"{"op":"refresh","id":6,"token":"a.b.c"}"#).unwrap();
        assert_eq!(
            refresh,
            ClientFrame::Refresh {
                id: 6,
                token: Token("a.b.c".into())
            }
        );
        assert!(
            !format!("{refresh:?}").contains("a.b.c"),
            "tokens stay out of logs"
        );
        let e = err(r#"{"op":"refresh","id":7}"#);
        assert_eq!((e.id, e.code), (Some(7), ErrorCode::BadFrame));
        match decode(
            r#"{"op":"publish","id":5,"room":"a","data":{"text":"hi","n":[1,2]},"key":"k1"}"#,
        )
        .unwrap()
        {
            ClientFrame::Publish {
                id,
                room,
                data,
                key,
            } => {
                assert_eq!((id, room.as_str(), key.as_deref()), (5, "a", Some("k1")));
                assert_eq!(data.get(), r#"{"text":"hi","n":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publish_keeps_null_and_escaped_strings() {
        match decode(r#"{"op":"publish","id":1,"room":"r\u003a1","data":null}"#).unwrap() {
            ClientFrame::Publish { room, data, .. } => {
                assert_eq!(room.as_str(), "r:1");
                assert_eq!(data.get(), "null");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_bad_frames_with_the_right_code_and_id() {
        let e = err("not json");
        assert_eq!((e.id, e.code), (None, ErrorCode::BadFrame));
        let e = err(r#"{"op":"dance","id":9}"#);
        assert_eq!((e.id, e.code), (Some(9), ErrorCode::BadFrame));
        assert!(e.message.contains("dance"));
        let e = err(r#"{"op":"publish","id":3,"room":"a"}"#);
        assert_eq!((e.id, e.code), (Some(3), ErrorCode::BadFrame));
        let e = err(r#"{"op":"subscribe","id":4,"room":"no spaces"}"#);
        assert_eq!((e.id, e.code), (Some(4), ErrorCode::BadRoom));
        let e = err(r#"{"op":"subscribe","id":4}"#);
        assert_eq!((e.id, e.code), (Some(4), ErrorCode::BadFrame));
        let e = err(r#"{"op":"ping"}"#);
        assert_eq!((e.id, e.code), (None, ErrorCode::BadFrame));
        let e = err(r#"{"op":"ping","id":-1}"#);
        assert_eq!(e.code, ErrorCode::BadFrame);
        let e = err(r#"[1,2]"#);
        assert_eq!(e.code, ErrorCode::BadFrame);
        // serde would read these structs by position: refused all the same.
        for array in [
            r#"["ping",1]"#,
            r#" ["subscribe",2,"lobby"]"#,
            "\n[]",
            "1",
            r#""ping""#,
        ] {
            let e = err(array);
            assert_eq!((e.id, e.code), (None, ErrorCode::BadFrame), "{array}");
        }
        assert!(decode(" \t\r\n{\"op\":\"ping\",\"id\":1}").is_ok());
        let long_key = "k".repeat(129);
        let e = err(&format!(
            r#"{{"op":"publish","id":6,"room":"a","data":1,"key":"{long_key}"}}"#
        ));
        assert_eq!((e.id, e.code), (Some(6), ErrorCode::BadFrame));
    }

    #[test]
    fn encodes_server_frames_as_the_protocol_says() {
        let v: Value = serde_json::from_str(&encode(&ServerFrame::ok(1))).unwrap();
        assert_eq!(v, json!({"op":"ok","id":1}));
        let v: Value = serde_json::from_str(&encode(&ServerFrame::Ok {
            id: 2,
            offset: Some(10),
            epoch: Some("ep"),
            recovered: Some(false),
            missed: Some(0),
            code: None,
        }))
        .unwrap();
        assert_eq!(
            v,
            json!({"op":"ok","id":2,"offset":10,"epoch":"ep","recovered":false,"missed":0})
        );
        let v: Value = serde_json::from_str(&encode(&ServerFrame::Error {
            id: None,
            code: ErrorCode::TooLarge,
            message: "big",
        }))
        .unwrap();
        assert_eq!(v, json!({"op":"error","code":"too_large","message":"big"}));
        let v: Value = serde_json::from_str(&encode(&ServerFrame::Reconnect {
            reason: "draining",
            after_ms: 250,
        }))
        .unwrap();
        assert_eq!(
            v,
            json!({"op":"reconnect","reason":"draining","after_ms":250})
        );
        let v: Value = serde_json::from_str(&encode(&ServerFrame::Welcome {
            session: "s",
            node: "n",
            version: "1",
        }))
        .unwrap();
        assert_eq!(
            v,
            json!({"op":"welcome","session":"s","node":"n","version":"1"})
        );
        let v: Value = serde_json::from_str(&encode(&ServerFrame::Pong { id: 7 })).unwrap();
        assert_eq!(v, json!({"op":"pong","id":7}));
    }

    #[test]
    fn error_codes_print_as_the_protocol_says() {
        assert_eq!(ErrorCode::HistoryGone.as_str(), "history_gone");
        assert_eq!(ErrorCode::NoHistory.as_str(), "no_history");
    }
}
