//! What goes wrong inside the Redis broker, one variant per step that
//! failed. The link's errors become `/readyz`'s reason and the logs' text;
//! at the [`Broker`](crate::broker::Broker) boundary they become a
//! [`BrokerError`], whose client-facing text hides these details.

use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use tokio::time::timeout;

use super::url::Addr;
use crate::broker::BrokerError;
use crate::protocol::RoomName;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Opening a connection (TCP, handshake, AUTH) failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: Addr,
        #[source]
        source: redis::RedisError,
    },
    /// A command was refused, or its connection broke.
    #[error("{command} on {addr}: {source}")]
    Command {
        command: &'static str,
        addr: Addr,
        #[source]
        source: redis::RedisError,
    },
    /// A command (or a connection attempt) got no answer in time.
    #[error("{command} on {addr}: no answer within {limit:?}")]
    Timeout {
        command: &'static str,
        addr: Addr,
        limit: Duration,
    },
    #[error("{0} is not a master")]
    NotMaster(Addr),
    #[error("{0} did not tell its run_id")]
    NoRunId(Addr),
    #[error("sentinel {sentinel} does not know master `{master}`")]
    UnknownMaster { sentinel: Addr, master: String },
    /// No sentinel answered yet.
    #[error("asking the sentinels where master `{0}` is")]
    Locating(String),
    #[error("the connection to sentinel {0} closed")]
    SentinelClosed(Addr),
    /// A whole round of sentinels named no master.
    #[error("no sentinel named a master for `{master}` ({})", list(tried))]
    NoMaster {
        master: String,
        tried: Vec<(Addr, Error)>,
    },
    #[error("pub/sub connection to {0} closed")]
    SubscriptionClosed(Addr),
    #[error("canary not delivered within {0:?}: subscription is dead")]
    CanaryLost(Duration),
    #[error("sentinels moved the master from {from} to {to}")]
    MasterMoved { from: Addr, to: Addr },
    #[error("catching up `{room}` from history: {source}")]
    CatchUp {
        room: RoomName,
        #[source]
        source: Box<Error>,
    },
    #[error("not connected")]
    NotConnected,
    /// Redis Cluster: no master is known for the slot.
    #[error("no master serves slot {0}")]
    SlotUnserved(u16),
    /// Redis Cluster: the link to the master serving a room is down.
    #[error("shard {shard}: {why}")]
    ShardDown { shard: Addr, why: String },
    /// Redis Cluster: redirected again and again.
    #[error("the slot of `{0}` keeps moving")]
    KeepsMoving(RoomName),
    /// Redis Cluster: a `CLUSTER SLOTS` answer that makes no sense.
    #[error("cluster topology: {0}")]
    Topology(String),
    /// Redis Cluster: the master serves no slot (any more).
    #[error("{0} serves no slots")]
    NoSlots(Addr),
    /// Messages came faster than the reader took them: some were dropped.
    #[error("the pub/sub reader of {0} fell behind")]
    Overflow(Addr),
    /// A subscription command was answered with another's confirmation (a
    /// `SUNSUBSCRIBE` Redis pushed crossed it): the link's subscriptions
    /// are no longer certain.
    #[error("{addr} answered {command} `{channel}` with {answer}")]
    Unconfirmed {
        addr: Addr,
        command: &'static str,
        channel: String,
        answer: String,
    },
    /// One of the broker's tasks is gone (the broker is shutting down) or
    /// dropped the request (its link restarted).
    #[error("{0}")]
    Dropped(&'static str),
}

fn list(tried: &[(Addr, Error)]) -> String {
    let mut out = String::new();
    for (i, (addr, e)) in tried.iter().enumerate() {
        let sep = if i == 0 { "" } else { "; " };
        let _ = write!(out, "{sep}{addr}: {e}");
    }
    out
}

impl From<Error> for BrokerError {
    fn from(e: Error) -> Self {
        match e {
            Error::Timeout { limit, .. } => BrokerError::Timeout(limit),
            other => BrokerError::Unavailable(other.to_string()),
        }
    }
}

/// A Redis call on `addr`, bounded by `limit`.
pub(super) async fn bounded<T>(
    addr: &Addr,
    command: &'static str,
    limit: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, Error> {
    match timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(Error::Command {
            command,
            addr: addr.clone(),
            source,
        }),
        Err(_) => Err(Error::Timeout {
            command,
            addr: addr.clone(),
            limit,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_which_step_failed_and_where() {
        let addr = |port| Addr {
            host: "10.0.0.1".into(),
            port,
        };
        let e = Error::NoMaster {
            master: "chorus".into(),
            tried: vec![
                (
                    addr(26379),
                    Error::Timeout {
                        command: "SENTINEL GET-MASTER-ADDR-BY-NAME",
                        addr: addr(26379),
                        limit: Duration::from_secs(1),
                    },
                ),
                (
                    addr(26380),
                    Error::UnknownMaster {
                        sentinel: addr(26380),
                        master: "chorus".into(),
                    },
                ),
            ],
        };
        assert_eq!(
            e.to_string(),
            "no sentinel named a master for `chorus` (10.0.0.1:26379: SENTINEL \
             GET-MASTER-ADDR-BY-NAME on 10.0.0.1:26379: no answer within 1s; \
             10.0.0.1:26380: sentinel 10.0.0.1:26380 does not know master `chorus`)"
        );
        let timeout = Error::Timeout {
            command: "EVALSHA",
            addr: addr(6379),
            limit: Duration::from_millis(500),
        };
        assert_eq!(
            BrokerError::from(timeout),
            BrokerError::Timeout(Duration::from_millis(500))
        );
        assert_eq!(
            BrokerError::from(Error::NotMaster(addr(6379))),
            BrokerError::Unavailable("10.0.0.1:6379 is not a master".into())
        );
    }
}
