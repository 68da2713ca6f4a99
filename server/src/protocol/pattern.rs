//! Room patterns: `*`, `prefix:*` or a room name — what token claims
//! (`rooms`, `publish`) and `--upstream-rooms` list.

use super::room::is_room_name;

/// A room name, `prefix:*` or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `*`
    All,
    /// `prefix:*`, stored as `prefix:`.
    Prefix(String),
    /// A room name.
    Exact(String),
}

impl Pattern {
    /// `*`; `prefix:*` where `prefix:` is a room name (so `chat:*` matches
    /// `chat:lobby` and `chat:a:b`, not `chat` nor `chatter`); or a room
    /// name. Anything else (`chat*`, `a*b`, `:*`, empty, outside the room
    /// alphabet, too long) is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        if s == "*" {
            return Some(Self::All);
        }
        if let Some(prefix) = s.strip_suffix('*') {
            return (prefix.len() > 1 && prefix.ends_with(':') && is_room_name(prefix))
                .then(|| Self::Prefix(prefix.to_owned()));
        }
        is_room_name(s).then(|| Self::Exact(s.to_owned()))
    }

    /// Whether `room` (a valid room name) matches.
    pub fn matches(&self, room: &str) -> bool {
        match self {
            Self::All => true,
            Self::Prefix(prefix) => room.starts_with(prefix.as_str()),
            Self::Exact(name) => room == name,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pattern_parsing() {
        assert_eq!(Pattern::parse("*"), Some(Pattern::All));
        assert_eq!(
            Pattern::parse("chat:*"),
            Some(Pattern::Prefix("chat:".to_owned()))
        );
        assert_eq!(
            Pattern::parse("a.b@c-d_e:f"),
            Some(Pattern::Exact("a.b@c-d_e:f".to_owned()))
        );
        for bad in [
            "",
            "chat*",
            "a*b",
            ":*",
            "**",
            "chat:**",
            "room with space",
            "é",
        ] {
            assert_eq!(Pattern::parse(bad), None, "{bad:?}");
        }
        assert!(Pattern::parse(&"a".repeat(256)).is_some());
        assert!(Pattern::parse(&"a".repeat(257)).is_none());
        // The prefix counts against the room name's length, `*` does not.
        assert!(Pattern::parse(&format!("{}:*", "a".repeat(255))).is_some());
        assert!(Pattern::parse(&format!("{}:*", "a".repeat(256))).is_none());
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let p = Pattern::parse("chat:*").unwrap();
        assert!(p.matches("chat:lobby") && p.matches("chat:a:b"));
        assert!(!p.matches("chat") && !p.matches("chatter"));
        assert!(Pattern::All.matches("x"));
        assert!(!Pattern::parse("news").unwrap().matches("news:sport"));
    }
}
