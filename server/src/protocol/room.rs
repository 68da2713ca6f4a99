//! Room names: 1..=256 bytes of `[A-Za-z0-9_:.@-]`.

use std::fmt;
use std::sync::Arc;

/// Longest room name, in bytes.
pub const MAX_ROOM_BYTES: usize = 256;

/// A validated room name. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("room name is empty")]
    Empty,
    #[error("room name is longer than {MAX_ROOM_BYTES} bytes")]
    TooLong,
    #[error("room name has a character outside [A-Za-z0-9_:.@-] at byte {0}")]
    BadChar(usize),
}

impl RoomName {
    pub fn parse(name: &str) -> Result<Self, RoomError> {
        if name.is_empty() {
            return Err(RoomError::Empty);
        }
        if name.len() > MAX_ROOM_BYTES {
            return Err(RoomError::TooLong);
        }
        if let Some(pos) = name.bytes().position(|b| !is_room_byte(b)) {
            return Err(RoomError::BadChar(pos));
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `name` is a room name (what [`RoomName::parse`] accepts).
pub(crate) fn is_room_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_ROOM_BYTES && name.bytes().all(is_room_byte)
}

fn is_room_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'@' | b'-')
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl AsRef<str> for RoomName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in [
            "a",
            "chat:lobby",
            "user:alice@example.com",
            "x_y-z.1",
            &"a".repeat(256),
        ] {
            assert_eq!(
                RoomName::parse(ok).map(|r| r.to_string()),
                Ok(ok.to_string())
            );
        }
    }

    #[test]
    fn refuses_empty_long_and_odd_characters() {
        assert_eq!(RoomName::parse(""), Err(RoomError::Empty));
        assert_eq!(RoomName::parse(&"a".repeat(257)), Err(RoomError::TooLong));
        assert_eq!(RoomName::parse("a b"), Err(RoomError::BadChar(1)));
        assert_eq!(RoomName::parse("room/1"), Err(RoomError::BadChar(4)));
        assert_eq!(RoomName::parse("é"), Err(RoomError::BadChar(0)));
        assert_eq!(RoomName::parse("*"), Err(RoomError::BadChar(0)));
    }
}
