//! Where the master is. A direct URL names it; with Sentinel, one task keeps
//! one long-lived connection to one sentinel at a time (RESP3, so the same
//! connection carries the `+switch-master` subscription and the questions):
//! it asks for the master, follows the failover announcements, asks again
//! when the link reports trouble ([`Discovery::recheck`]) and every
//! [`CHECK_INTERVAL`] (which also proves the sentinel still answers). A
//! sentinel that fails or stops answering (within `--redis-timeout`) is left
//! for the next one.
//!
//! The answer is a watch value: the link connects to it and ends when it
//! moves. Nothing here runs on the link's or the reader's path, so a stalled
//! sentinel delays nobody's delivery.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ProtocolVersion, PushInfo, RedisConnectionInfo};
use tokio::sync::{Notify, mpsc, watch};

use super::Shared;
use super::connection::{client_with, config};
use super::error::{Error, bounded};
use super::url::{Addr, Target};

/// How often the sentinel is asked again without being told to.
pub(super) const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The pause after a whole round of sentinels failed.
const ROUND_PAUSE: Duration = Duration::from_secs(1);
const SWITCH_CHANNEL: &str = "+switch-master";

/// Where the master is as far as this node knows, or why it does not know.
pub(super) type Located = Result<Addr, Error>;

pub(super) struct Discovery {
    master: watch::Sender<Located>,
    recheck: Notify,
}

impl Discovery {
    /// For `target`; a Sentinel target needs [`follow`] running.
    pub fn new(target: &Target) -> Self {
        let located = match target {
            Target::Direct(addr) => Ok(addr.clone()),
            Target::Sentinel { master, .. } => Err(Error::Locating(master.clone())),
            // Not for this broker: `redis+cluster://` starts the cluster one.
            Target::Cluster { .. } => Err(Error::Locating("a Redis Cluster".into())),
        };
        Self {
            master: watch::Sender::new(located),
            recheck: Notify::new(),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Located> {
        self.master.subscribe()
    }

    /// The master may have moved (a `READONLY` reply, a failed connection):
    /// ask again now.
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }

    fn found(&self, addr: Addr) {
        self.master.send_if_modified(|now| {
            if now.as_ref().ok() == Some(&addr) {
                return false;
            }
            tracing::info!(master = %addr, "sentinel names the master");
            *now = Ok(addr);
            true
        });
    }
}

/// Follows the master through the sentinels, one at a time, for ever.
pub(super) async fn follow(shared: Arc<Shared>, sentinels: Vec<Addr>, name: String) {
    let discovery = &shared.discovery;
    let password = shared.opts.url.password.as_deref();
    let limit = shared.opts.op_timeout;
    let mut tried: Vec<(Addr, Error)> = Vec::new();
    for sentinel in sentinels.iter().cycle() {
        let session = Session {
            discovery,
            sentinel,
            name: &name,
            limit,
        };
        let (answered, error) = session.run(password).await;
        tracing::warn!(%sentinel, %error, "sentinel lost; asking the next one");
        if answered {
            tried.clear();
        }
        tried.push((sentinel.clone(), error));
        if tried.len() >= sentinels.len() {
            // A whole round without an answer.
            let tried = std::mem::take(&mut tried);
            discovery.master.send_if_modified(|now| {
                let unknown = now.is_err();
                if unknown {
                    *now = Err(Error::NoMaster {
                        master: name.clone(),
                        tried,
                    });
                }
                unknown
            });
            tokio::time::sleep(ROUND_PAUSE).await;
        }
    }
}

/// One long-lived connection to one sentinel.
struct Session<'a> {
    discovery: &'a Discovery,
    sentinel: &'a Addr,
    name: &'a str,
    limit: Duration,
}

impl Session<'_> {
    /// Runs until the sentinel fails; whether it named the master at least
    /// once, and why it ended.
    async fn run(&self, password: Option<&str>) -> (bool, Error) {
        let (push_tx, mut pushes) = mpsc::channel::<PushInfo>(16);
        let mut conn = match self.connect(password, push_tx).await {
            Ok(conn) => conn,
            Err(e) => return (false, e),
        };
        let limit = self.limit;
        if let Err(e) = bounded(
            self.sentinel,
            "SUBSCRIBE +switch-master",
            limit,
            conn.subscribe(SWITCH_CHANNEL),
        )
        .await
        {
            return (false, e);
        }
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answered = false;
        loop {
            match self.ask(&mut conn).await {
                Ok(addr) => {
                    answered = true;
                    self.discovery.found(addr);
                }
                Err(e) => return (answered, e),
            }
            tokio::select! {
                push = pushes.recv() => match push {
                    Some(push) if push.kind != redis::PushKind::Disconnection => {
                        if let Some(addr) = switched_to(push, self.name) {
                            tracing::info!(sentinel = %self.sentinel, master = %addr, "sentinel announced a failover");
                            self.discovery.found(addr);
                        }
                    }
                    _ => return (answered, Error::SentinelClosed(self.sentinel.clone())),
                },
                () = self.discovery.recheck.notified() => {}
                _ = tick.tick() => {}
            }
        }
    }

    /// A RESP3 connection (subscription and questions on one connection).
    /// Sentinels usually have no password of their own; try without first,
    /// then with the Redis password.
    async fn connect(
        &self,
        password: Option<&str>,
        pushes: mpsc::Sender<PushInfo>,
    ) -> Result<MultiplexedConnection, Error> {
        let addr = self.sentinel;
        let plain = RedisConnectionInfo::default().set_protocol(ProtocolVersion::RESP3);
        let mut attempts = vec![plain.clone()];
        if let Some(pw) = password {
            attempts.push(plain.set_password(pw));
        }
        let mut last = None;
        for settings in attempts {
            let tx = pushes.clone();
            // The push sender must not block the connection: a full queue
            // drops the announcement, and the next question finds the master.
            let config = config(self.limit).set_push_sender(move |p: PushInfo| tx.try_send(p));
            let connected = client_with(addr, settings)?
                .get_multiplexed_async_connection_with_config(&config)
                .await;
            match connected {
                Ok(conn) => return Ok(conn),
                Err(source) => last = Some(source),
            }
        }
        Err(match last {
            Some(source) => Error::Connect {
                addr: addr.clone(),
                source,
            },
            None => Error::SentinelClosed(addr.clone()),
        })
    }

    async fn ask(&self, conn: &mut MultiplexedConnection) -> Result<Addr, Error> {
        let reply: Option<(String, u16)> = bounded(
            self.sentinel,
            "SENTINEL GET-MASTER-ADDR-BY-NAME",
            self.limit,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(self.name)
                .query_async(conn),
        )
        .await?;
        let (host, port) = reply.ok_or_else(|| Error::UnknownMaster {
            sentinel: self.sentinel.clone(),
            master: self.name.to_string(),
        })?;
        Ok(Addr { host, port })
    }
}

/// The new master of a `+switch-master` announcement for `name`
/// (`"<name> <old-ip> <old-port> <new-ip> <new-port>"`).
fn switched_to(push: PushInfo, name: &str) -> Option<Addr> {
    let msg = redis::Msg::from_push_info(push)?;
    if msg.get_channel_name() != SWITCH_CHANNEL {
        return None;
    }
    parse_switch(std::str::from_utf8(msg.get_payload_bytes()).ok()?, name)
}

fn parse_switch(payload: &str, name: &str) -> Option<Addr> {
    let parts: Vec<&str> = payload.split_whitespace().collect();
    match parts[..] {
        [master, _, _, host, port] if master == name => Some(Addr {
            host: host.to_string(),
            port: port.parse().ok()?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_announcements_name_the_new_master_of_our_group_only() {
        assert_eq!(
            parse_switch("chorus 10.0.0.1 6379 10.0.0.2 6380", "chorus"),
            Some(Addr {
                host: "10.0.0.2".into(),
                port: 6380
            })
        );
        assert_eq!(
            parse_switch("other 10.0.0.1 6379 10.0.0.2 6380", "chorus"),
            None
        );
        assert_eq!(parse_switch("chorus 10.0.0.1 6379", "chorus"), None);
        assert_eq!(
            parse_switch("chorus 10.0.0.1 6379 10.0.0.2 x", "chorus"),
            None
        );
    }
}
