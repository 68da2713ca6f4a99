//! Tuning of the Redis broker (from the command line, see `node.rs`).

use std::time::Duration;

use super::scripts::Keyspace;
use super::url::{RedisUrl, Target};
use crate::protocol::Pattern;

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: RedisUrl,
    pub node_id: String,
    /// A room's state (epoch, offset) expires after this long without a publish.
    pub room_ttl: Duration,
    /// Bound on every Redis call (connect, publish, subscribe).
    pub op_timeout: Duration,
    /// How often the canary goes round through Redis.
    pub canary_interval: Duration,
    /// A canary not back within this long means the subscription is dead.
    pub canary_timeout: Duration,
    /// Keep a history per room (`--delivery streams`).
    pub history: Option<HistoryOptions>,
    /// How long a publish's idempotency key is remembered.
    pub idempotency_window: Duration,
    /// Rooms whose client publishes are also appended for backend consumers.
    pub upstream: Option<UpstreamOptions>,
}

#[derive(Debug, Clone)]
pub struct HistoryOptions {
    /// Approximate number of messages kept per room.
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    pub rooms: Vec<Pattern>,
    /// Approximate number of entries kept per upstream stream.
    pub maxlen: u64,
}

impl UpstreamOptions {
    pub(super) fn wants(&self, room: &str) -> bool {
        self.rooms.iter().any(|p| p.matches(room))
    }
}

impl RedisOptions {
    pub fn new(url: RedisUrl, node_id: String) -> Self {
        Self {
            url,
            node_id,
            room_ttl: Duration::from_secs(24 * 3600),
            op_timeout: Duration::from_secs(1),
            canary_interval: Duration::from_secs(1),
            canary_timeout: Duration::from_secs(3),
            history: None,
            idempotency_window: Duration::from_secs(300),
            upstream: None,
        }
    }

    pub(super) fn ttl_secs(&self) -> u64 {
        self.room_ttl.as_secs().max(1)
    }

    /// How room keys are named: hash-tagged on a Redis Cluster.
    pub(super) fn keys(&self) -> Keyspace {
        match self.url.target {
            Target::Cluster { .. } => Keyspace::Tagged,
            _ => Keyspace::Plain,
        }
    }

    /// The room's history stream, or an unused key without history.
    pub(super) fn history_key(&self, room: &str) -> String {
        if self.history.is_some() {
            self.keys().history_key(room)
        } else {
            self.keys().unused(room)
        }
    }
}
