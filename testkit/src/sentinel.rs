//! `redis-sentinel` on a free port, and a Sentinel group: a master, its
//! replicas and sentinels that monitor it with small timeouts, ready for a
//! failover when [`SentinelGroup::launch`] returns.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::daemon::{Daemon, START_LIMIT, deref_daemon};
use crate::process::{free_port, workdir};
use crate::redis::{RedisOptions, RedisServer, launch_program, query, url};
use crate::{Error, Result, wait};

/// The Sentinel master name, as the operator and the nodes use it.
pub const MASTER_NAME: &str = "chorus";

/// What a sentinel monitors ([`MASTER_NAME`] at `127.0.0.1:<master_port>`).
#[derive(Clone, Debug)]
pub struct Monitor {
    pub master_port: u16,
    pub quorum: u32,
    /// `down-after-milliseconds`: how soon a silent master counts as down.
    pub down_after: Duration,
    /// `failover-timeout`.
    pub failover_timeout: Duration,
    /// `auth-pass`, for a master with a password.
    pub password: Option<String>,
}

/// A `redis-sentinel` process. Kill, restart, freeze (a stalled Sentinel)
/// and thaw come from its [`Daemon`]; a restarted sentinel reads the
/// configuration it rewrote while it ran, so what it learnt survives, as
/// on a pod restart with its volume.
pub struct Sentinel {
    daemon: Daemon,
}

deref_daemon!(Sentinel);

impl Sentinel {
    /// [`Sentinel::launch`], panicking with the error (for tests).
    pub async fn start(monitor: Option<&Monitor>) -> Self {
        Self::launch(monitor)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a sentinel, monitoring nothing when `monitor` is `None` (the
    /// operator's topology module sets that up), and waits until it
    /// answers PING.
    pub async fn launch(monitor: Option<&Monitor>) -> Result<Self> {
        let port = free_port();
        let dir = workdir("sentinel")?;
        let conf = dir.path().join("sentinel.conf");
        let mut text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n\
             dir {dir}\nsentinel resolve-hostnames no\n",
            dir = dir.path().display(),
        );
        if let Some(m) = monitor {
            text.push_str(&format!(
                "sentinel monitor {MASTER_NAME} 127.0.0.1 {port} {quorum}\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {down}\n\
                 sentinel failover-timeout {MASTER_NAME} {failover}\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                port = m.master_port,
                quorum = m.quorum,
                down = m.down_after.as_millis(),
                failover = m.failover_timeout.as_millis(),
            ));
            if let Some(password) = &m.password {
                text.push_str(&format!("sentinel auth-pass {MASTER_NAME} {password}\n"));
            }
        }
        std::fs::write(&conf, text).map_err(Error::io(format!("write {}", conf.display())))?;
        let args = vec![conf.display().to_string()];
        let daemon = launch_program("redis-sentinel", port, dir, args).await?;
        Ok(Self { daemon })
    }

    pub fn url(&self) -> String {
        url("127.0.0.1", self.port, None)
    }

    /// The master's port by this sentinel (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    pub async fn master_port(&self) -> Option<u16> {
        let reply: Option<(String, u16)> = query(
            &self.url(),
            ::redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME),
        )
        .await
        .ok()?;
        reply.map(|(_, port)| port)
    }

    /// (replicas known, other sentinels known) of [`MASTER_NAME`].
    pub async fn knows(&self) -> (usize, usize) {
        let count = async |what: &str| {
            query::<Vec<::redis::Value>>(
                &self.url(),
                ::redis::cmd("SENTINEL").arg(what).arg(MASTER_NAME),
            )
            .await
            .map_or(0, |v| v.len())
        };
        (count("REPLICAS").await, count("SENTINELS").await)
    }
}

/// The shape of a [`SentinelGroup`].
#[derive(Clone, Debug)]
pub struct GroupOptions {
    pub replicas: usize,
    pub sentinels: usize,
    pub quorum: u32,
    pub down_after: Duration,
    pub failover_timeout: Duration,
    /// Password of every Redis member.
    pub password: Option<String>,
}

impl GroupOptions {
    /// One replica, three sentinels (quorum 2), failover timeout three
    /// times `down_after`.
    pub fn new(down_after: Duration) -> Self {
        Self {
            replicas: 1,
            sentinels: 3,
            quorum: 2,
            down_after,
            failover_timeout: down_after * 3,
            password: None,
        }
    }
}

/// How long sentinels may take to discover each other and the replicas.
const MESH_LIMIT: Duration = Duration::from_secs(30);

/// A master, its replicas and the sentinels monitoring it.
pub struct SentinelGroup {
    pub master: RedisServer,
    pub replicas: Vec<RedisServer>,
    pub sentinels: Vec<Sentinel>,
    quorum: usize,
}

impl SentinelGroup {
    /// [`GroupOptions::new`] with `down_after_ms`, panicking on failure (for tests).
    pub async fn start(down_after_ms: u64) -> Self {
        Self::launch(GroupOptions::new(Duration::from_millis(down_after_ms)))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the group and waits until every replica is in sync and every
    /// sentinel knows every replica and every other sentinel: only then
    /// can they agree on a failover.
    pub async fn launch(options: GroupOptions) -> Result<Self> {
        let master = RedisServer::launch(RedisOptions {
            password: options.password.clone(),
            ..RedisOptions::default()
        })
        .await?;
        let mut replicas = Vec::new();
        for _ in 0..options.replicas {
            replicas.push(
                RedisServer::launch(RedisOptions {
                    password: options.password.clone(),
                    replica_of: Some(master.port),
                    debug_command: true,
                    ..RedisOptions::default()
                })
                .await?,
            );
        }
        let monitor = Monitor {
            master_port: master.port,
            quorum: options.quorum,
            down_after: options.down_after,
            failover_timeout: options.failover_timeout,
            password: options.password.clone(),
        };
        let mut sentinels = Vec::new();
        for _ in 0..options.sentinels {
            sentinels.push(Sentinel::launch(Some(&monitor)).await?);
        }
        let group = Self {
            master,
            replicas,
            sentinels,
            quorum: options.quorum as usize,
        };
        group.try_wait_replicas_synced().await?;
        // Sentinel learns replicas from the master's INFO and its peers
        // from hello messages every 2 s.
        let (replicas, peers) = (group.replicas.len(), group.sentinels.len() - 1);
        for s in &group.sentinels {
            wait::until(
                &format!("sentinel {} to see the replicas and its peers", s.port),
                MESH_LIMIT,
                async || {
                    let (r, p) = s.knows().await;
                    (r >= replicas && p >= peers).then_some(())
                },
            )
            .await?;
        }
        Ok(group)
    }

    /// Waits until every replica finished its sync with the master; panics
    /// if one does not.
    pub async fn wait_replicas_synced(&self) {
        self.try_wait_replicas_synced()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn try_wait_replicas_synced(&self) -> Result<()> {
        for replica in &self.replicas {
            wait::until("the replica to sync", START_LIMIT, async || {
                let info = replica.info("replication").await?;
                (info.get("master_link_status") == Some("up")
                    && info.get("master_sync_in_progress") != Some("1"))
                .then_some(())
            })
            .await?;
        }
        Ok(())
    }

    /// Makes the first replica miss what the master acknowledges from now
    /// on until the returned task ends (about 1.5 s): blocks it from inside
    /// (`DEBUG SLEEP`, so it wakes by itself) and cuts its replication
    /// link. Kill the master meanwhile to lose those writes.
    pub async fn stall_replica(&self) -> JoinHandle<()> {
        let url = self.replicas[0].url_with_auth();
        let sleeper = tokio::spawn(async move {
            let client = ::redis::Client::open(url).unwrap_or_else(|e| panic!("{e}"));
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _: ::redis::RedisResult<String> = ::redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("1.5")
                .query_async(&mut conn)
                .await;
        });
        // The sleeper's DEBUG SLEEP must be running before the link is cut:
        // the replica no longer answers a PING.
        let replica = self.replicas[0].url_with_auth();
        wait::until("the replica to stop answering", START_LIMIT, async || {
            let ping = ::redis::cmd("PING");
            let quick =
                tokio::time::timeout(Duration::from_millis(100), query::<String>(&replica, &ping));
            quick.await.is_err().then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let _: i64 = self
            .master
            .query(
                ::redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("replica"),
            )
            .await;
        sleeper
    }

    /// `redis+sentinel://…/chorus` for the nodes.
    pub fn broker_url(&self) -> String {
        let addrs: Vec<String> = self.sentinels.iter().map(|s| s.addr()).collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", addrs.join(","))
    }

    /// The master port that at least a quorum of sentinels names.
    pub async fn agreed_master(&self) -> Option<u16> {
        let mut named = Vec::new();
        for s in &self.sentinels {
            named.extend(s.master_port().await);
        }
        named
            .iter()
            .copied()
            .find(|p| named.iter().filter(|q| *q == p).count() >= self.quorum)
    }

    /// Kills the master (unless already dead) and waits until a quorum of
    /// sentinels names a replica; returns its port. Panics after 60 s.
    pub async fn fail_over(&mut self) -> u16 {
        let old = self.master.port;
        self.master.kill();
        let replicas: Vec<u16> = self.replicas.iter().map(|r| r.port).collect();
        let what = format!("the sentinels to fail over from {old} to one of {replicas:?}");
        wait::until(&what, Duration::from_secs(60), async || {
            self.agreed_master().await.filter(|p| replicas.contains(p))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// The end of every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let redis = std::iter::once(&self.master).chain(&self.replicas);
        for r in redis {
            out.push_str(&format!("==> redis :{} <==\n{}", r.port, r.log_tail(25)));
        }
        for s in &self.sentinels {
            out.push_str(&format!("==> sentinel :{} <==\n{}", s.port, s.log_tail(25)));
        }
        out
    }
}
