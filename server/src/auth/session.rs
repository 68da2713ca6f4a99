//! The grants of a connection: what its token lets it do, until when.
//!
//! - **`rooms`** (optional list of patterns): rooms the client may subscribe to.
//!   **Absent (or `null`) → any room.** Present → only matching rooms; `[]`
//!   means only the personal room.
//! - **`publish`** (optional list of patterns): rooms the client may publish
//!   to. **Absent (or `null`) → the same rooms it may subscribe to** (so a
//!   token with neither claim may do everything). Present → only matching
//!   rooms, independent of `rooms`.
//! - **Personal room.** `user:<sub>` is always allowed, for both subscribing
//!   and publishing, whatever the claims say.
//! - **Patterns** are [`Pattern`]s (`*`, `prefix:*`, a room name). A pattern
//!   that is none of these makes the whole token invalid: fail closed, with
//!   the reason in the error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{AuthError, Claims};
use crate::protocol::Pattern;

/// Prefix of a user's personal room: `user:<sub>`.
pub const PERSONAL_ROOM_PREFIX: &str = "user:";

/// What an authenticated client may do, for the life of its connection (or
/// until a `refresh` replaces them).
#[derive(Clone, Debug)]
pub struct Grants {
    /// `sub`; `None` when anonymous.
    user: Option<String>,
    /// `user:<sub>`, always allowed.
    personal_room: Option<String>,
    subscribe: Grant,
    publish: Grant,
    expires_at: Option<SystemTime>,
}

impl Grants {
    /// The grants of every client when auth is off: everything allowed, no
    /// user, no expiry.
    pub fn anonymous() -> Self {
        Self {
            user: None,
            personal_room: None,
            subscribe: Grant::Any,
            publish: Grant::Any,
            expires_at: None,
        }
    }

    /// The grants of already verified claims (signature and `exp` are the
    /// caller's business). Checks `sub` and the patterns.
    pub fn from_claims(claims: Claims) -> Result<Self, AuthError> {
        if claims.sub.is_empty() {
            return Err(AuthError::InvalidToken("claim `sub` is empty".to_owned()));
        }
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .ok_or_else(|| AuthError::InvalidToken("claim `exp` is out of range".to_owned()))?;
        let subscribe = Grant::from_claim("rooms", claims.rooms)?;
        let publish = match claims.publish {
            None => subscribe.clone(),
            Some(list) => Grant::from_claim("publish", Some(list))?,
        };
        Ok(Self {
            personal_room: Some(format!("{PERSONAL_ROOM_PREFIX}{}", claims.sub)),
            user: Some(claims.sub),
            subscribe,
            publish,
            expires_at: Some(expires_at),
        })
    }

    /// The user id (`sub`); `None` when anonymous.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The personal room `user:<sub>`; `None` when anonymous.
    pub fn personal_room(&self) -> Option<&str> {
        self.personal_room.as_deref()
    }

    /// May this client subscribe to `room`? (`forbidden` when not.)
    pub fn may_subscribe(&self, room: &str) -> bool {
        self.is_personal(room) || self.subscribe.allows(room)
    }

    /// May this client publish to `room`? (`forbidden` when not.)
    pub fn may_publish(&self, room: &str) -> bool {
        self.is_personal(room) || self.publish.allows(room)
    }

    /// When the token expires (its `exp`, without leeway); `None` when
    /// anonymous.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    fn is_personal(&self, room: &str) -> bool {
        self.personal_room.as_deref() == Some(room)
    }
}

/// The rooms one claim grants.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Grant {
    /// Claim absent.
    Any,
    /// Claim present: rooms matching one of these (none if empty).
    Only(Vec<Pattern>),
}

impl Grant {
    fn from_claim(claim: &str, list: Option<Vec<String>>) -> Result<Self, AuthError> {
        let Some(list) = list else {
            return Ok(Self::Any);
        };
        list.iter()
            .map(|p| {
                Pattern::parse(p).ok_or_else(|| {
                    AuthError::InvalidToken(format!(
                        "claim `{claim}`: {p:?} is not a room name, `prefix:*` or `*`"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::Only)
    }

    fn allows(&self, room: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(patterns) => patterns.iter().any(|p| p.matches(room)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use jsonwebtoken::Algorithm;

    #[test]
    fn valid_hs256_token_gives_its_permissions() {
        let mut c = claims("alice");
        c.rooms = list(&["chat:*", "news"]);
        c.publish = list(&["chat:lobby"]);
        let auth = secret_auth();
        assert!(auth.clients_need_token());
        assert_eq!(auth.jwt_algorithm(), Some(Algorithm::HS256));
        let s = auth.authenticate(Some(&hs256(&c, SECRET))).unwrap();

        assert_eq!(s.user(), Some("alice"));
        assert_eq!(s.personal_room(), Some("user:alice"));
        assert_eq!(
            s.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(c.exp))
        );
        assert!(s.may_subscribe("chat:lobby"));
        assert!(s.may_subscribe("chat:a:b"));
        assert!(s.may_subscribe("news"));
        assert!(!s.may_subscribe("news:sport"));
        assert!(!s.may_subscribe("chat"));
        assert!(!s.may_subscribe("chatter"));
        assert!(!s.may_subscribe("other"));
        assert!(s.may_publish("chat:lobby"));
        assert!(!s.may_publish("chat:other"));
        assert!(!s.may_publish("news"));
        // Personal room, both ways, whatever the claims.
        assert!(s.may_subscribe("user:alice"));
        assert!(s.may_publish("user:alice"));
        assert!(!s.may_subscribe("user:bob"));
        assert!(!s.may_publish("user:bob"));
    }

    #[test]
    fn absent_claims_allow_everything_and_publish_follows_rooms() {
        let s = grants(&claims("alice"));
        assert!(s.may_subscribe("anything"));
        assert!(s.may_publish("anything"));
        assert!(s.may_publish("user:bob"));

        let mut c = claims("alice");
        c.rooms = list(&["chat:*"]);
        let s = grants(&c);
        assert!(s.may_publish("chat:x"));
        assert!(!s.may_publish("news"));
        assert!(!s.may_subscribe("news"));

        // `publish` present, `rooms` absent: subscribe anywhere, publish only there.
        let mut c = claims("alice");
        c.publish = list(&["chat:*"]);
        let s = grants(&c);
        assert!(s.may_subscribe("news"));
        assert!(s.may_publish("chat:x"));
        assert!(!s.may_publish("news"));
    }

    #[test]
    fn empty_lists_leave_only_the_personal_room() {
        let mut c = claims("alice");
        c.rooms = list(&[]);
        c.publish = list(&[]);
        let s = grants(&c);
        assert!(!s.may_subscribe("chat:x"));
        assert!(!s.may_publish("chat:x"));
        assert!(s.may_subscribe("user:alice"));
        assert!(s.may_publish("user:alice"));
    }

    #[test]
    fn star_matches_everything() {
        let mut c = claims("alice");
        c.rooms = list(&["*"]);
        c.publish = list(&["news"]);
        let s = grants(&c);
        assert!(s.may_subscribe("a"));
        assert!(s.may_subscribe("x:y:z"));
        assert!(s.may_publish("news"));
        assert!(!s.may_publish("a"));
    }

    #[test]
    fn bad_pattern_invalidates_the_token() {
        let mut c = claims("alice");
        c.publish = list(&["chat*"]);
        let err = secret_auth()
            .authenticate(Some(&hs256(&c, SECRET)))
            .unwrap_err();
        assert!(
            matches!(&err, AuthError::InvalidToken(why) if why.contains("publish")),
            "{err}"
        );
    }
}
