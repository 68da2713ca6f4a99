//! The canary a link sends round through its own subscription every
//! `--canary-interval`: if one is not back within `--canary-timeout`, the
//! subscription is dead even though its connection looks open, and the link
//! restarts. The one-Redis link has one; a Redis Cluster link has one per
//! shard (`SPUBLISH` on a channel in a slot of that shard).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::connection::Master;
use super::error::{Error, bounded};
use crate::metrics::Metrics;

/// The canary of one link: the one in flight, if any.
#[derive(Default)]
pub(super) struct Canary {
    /// Its number and when it was sent.
    in_flight: Option<(u64, Instant)>,
    last: u64,
}

impl Canary {
    /// Canary `seq` came back: its round trip (and one more round trip
    /// counted) goes to the metrics.
    pub fn seen(&mut self, seq: u64, metrics: &Metrics) {
        if let Some((want, sent)) = self.in_flight
            && seq == want
        {
            metrics.canary_rtt.set(sent.elapsed().as_secs_f64());
            metrics.canary_round_trips.inc();
            self.in_flight = None;
        }
    }

    /// At each tick: the number of a canary to send now, if none is in
    /// flight; an error when the one in flight is later than `limit`.
    pub fn tick(&mut self, limit: Duration) -> Result<Option<u64>, Error> {
        match self.in_flight {
            Some((_, sent)) if sent.elapsed() > limit => Err(Error::CanaryLost(limit)),
            Some(_) => Ok(None),
            None => {
                self.last += 1;
                self.in_flight = Some((self.last, Instant::now()));
                Ok(Some(self.last))
            }
        }
    }

    /// The canary's channel changed: the one in flight will not come back.
    pub fn forget(&mut self) {
        self.in_flight = None;
    }
}

/// Publishes canary `seq` on `channel` with `command` (`PUBLISH`,
/// `SPUBLISH`) on its own task (the link keeps watching); a failure comes
/// back on `errors`.
pub(super) fn send(
    master: &Master,
    command: &'static str,
    channel: &str,
    seq: u64,
    limit: Duration,
    errors: mpsc::Sender<Error>,
) {
    let mut conn = master.conn.clone();
    let addr = master.addr.clone();
    let mut publish = redis::cmd(command);
    publish.arg(channel).arg(seq);
    let what = if command == "SPUBLISH" {
        "canary SPUBLISH"
    } else {
        "canary PUBLISH"
    };
    tokio::spawn(async move {
        let sent = publish.query_async::<i64>(&mut conn);
        if let Err(e) = bounded(&addr, what, limit, sent).await {
            let _ = errors.try_send(e);
        }
    });
}
