//! A Redis Cluster on loopback: `redis-server --cluster-enabled yes`
//! processes on free ports, joined by `redis-cli --cluster create …
//! --cluster-replicas N --cluster-yes`, ready when every node agrees that
//! every slot is served and every replica is in sync. Helpers steer it as a
//! test needs: move one slot to another master (in steps, so a test can act
//! while the slot's keys are in flight), kill a shard's master and wait for
//! its replica to take over, count a shard channel's subscribers per master.
//! [`RedisCluster::launch_unjoined`] starts nodes that know only
//! themselves, for code that builds the cluster itself (the operator).

use std::process::Stdio;
use std::time::Duration;

use redis::Value;

use crate::daemon::START_LIMIT;
use crate::redis::{RedisOptions, RedisServer, query};
use crate::{Error, Result, free_port, wait};

/// The shape of a [`RedisCluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Masters, each serving an equal share of the slots.
    pub shards: usize,
    pub replicas_per_shard: usize,
    /// `cluster-node-timeout`: how soon a silent master counts as failed
    /// (its replica takes over about a second after).
    pub node_timeout: Duration,
    /// `requirepass` and `masterauth` of every node.
    pub password: Option<String>,
}

impl Default for ClusterOptions {
    /// Three shards of a master and a replica, a two-second node timeout.
    fn default() -> Self {
        Self {
            shards: 3,
            replicas_per_shard: 1,
            node_timeout: Duration::from_secs(2),
            password: None,
        }
    }
}

/// How long a failover may take: the node timeout, the election, and a
/// slow machine.
const FAILOVER_LIMIT: Duration = Duration::from_secs(60);

/// The nodes of a Redis Cluster (masters and replicas in no fixed order: a
/// failover swaps roles).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    password: Option<String>,
}

impl RedisCluster {
    /// [`RedisCluster::launch`] with [`ClusterOptions::default`], panicking
    /// with the error (for tests).
    pub async fn start() -> Self {
        Self::launch(ClusterOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `shards × (1 + replicas_per_shard)` nodes, creates the
    /// cluster and waits until it is whole.
    pub async fn launch(options: ClusterOptions) -> Result<Self> {
        let count = options.shards * (1 + options.replicas_per_shard);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            nodes.push(launch_node(&options).await?);
        }
        let cluster = Self {
            nodes,
            password: options.password.clone(),
        };
        let mut args: Vec<String> = Vec::new();
        if let Some(password) = &options.password {
            args.extend(["-a".into(), password.clone(), "--no-auth-warning".into()]);
        }
        args.extend(["--cluster".into(), "create".into()]);
        args.extend(cluster.nodes.iter().map(|n| n.addr()));
        args.extend([
            "--cluster-replicas".into(),
            options.replicas_per_shard.to_string(),
            "--cluster-yes".into(),
        ]);
        redis_cli(&args).await?;
        cluster.wait_whole(START_LIMIT).await?;
        Ok(cluster)
    }

    /// `count` cluster-enabled nodes that know only themselves and serve no
    /// slot: for code that meets them and assigns slots itself.
    pub async fn launch_unjoined(count: usize, options: ClusterOptions) -> Result<Self> {
        let mut cluster = Self {
            nodes: Vec::with_capacity(count),
            password: options.password.clone(),
        };
        for _ in 0..count {
            cluster.add_unjoined(&options).await?;
        }
        Ok(cluster)
    }

    /// Starts one more node that knows only itself (a pod added by a
    /// scale-up); returns its port.
    pub async fn add_unjoined(&mut self, options: &ClusterOptions) -> Result<u16> {
        let node = launch_node(options).await?;
        let port = node.port;
        self.nodes.push(node);
        Ok(port)
    }

    /// `redis+cluster://` with every node, for the chorus nodes.
    pub fn broker_url(&self) -> String {
        let addrs: Vec<String> = self.nodes.iter().map(|n| n.addr()).collect();
        format!("redis+cluster://{}", addrs.join(","))
    }

    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// The slots' masters as a live node sees them: `(first, last, port)`.
    pub async fn slots(&self) -> Vec<(u16, u16, u16)> {
        for node in &self.nodes {
            if let Some(slots) = slots_of(node).await {
                return slots;
            }
        }
        panic!("no cluster node answers CLUSTER SLOTS")
    }

    /// The port of the master serving `slot`.
    pub async fn master_of(&self, slot: u16) -> u16 {
        self.slots()
            .await
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, port)| *port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// Ports of the masters serving slots.
    pub async fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.slots().await.iter().map(|(_, _, p)| *p).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// `CLUSTER KEYSLOT key`.
    pub async fn slot_of(&self, key: &str) -> u16 {
        let port = self.masters().await[0];
        self.node(port)
            .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
    }

    /// Subscribers of a shard channel on each master: `(port, count)` from
    /// `PUBSUB SHARDNUMSUB`.
    pub async fn shard_numsub(&self, channel: &str) -> Vec<(u16, i64)> {
        let mut out = Vec::new();
        for port in self.masters().await {
            let (_, n): (String, i64) = self
                .node(port)
                .query(redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(channel))
                .await;
            out.push((port, n));
        }
        out
    }

    /// Starts moving `slot` to the master on port `to`: the slot is
    /// importing there and migrating on its master, and its keys are moved
    /// (`MIGRATE`); until [`Migration::finish`] its old master answers
    /// `ASK` for them.
    pub async fn begin_migration(&self, slot: u16, to: u16) -> Migration {
        let from = self.master_of(slot).await;
        assert_ne!(from, to, "slot {slot} is on {to} already");
        let (from_id, to_id) = (self.node_id(from).await, self.node_id(to).await);
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        let _: () = self.node(to).query(&setslot("IMPORTING", &from_id)).await;
        let _: () = self.node(from).query(&setslot("MIGRATING", &to_id)).await;
        loop {
            let keys: Vec<Vec<u8>> = self
                .node(from)
                .query(
                    redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(slot)
                        .arg(100),
                )
                .await;
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate.arg("127.0.0.1").arg(to).arg("").arg(0).arg(5000);
            if let Some(password) = &self.password {
                migrate.arg("AUTH").arg(password);
            }
            let _: Value = self.node(from).query(migrate.arg("KEYS").arg(&keys)).await;
        }
        Migration {
            slot,
            from,
            to,
            to_id,
        }
    }

    /// Moves `slot` to the master on port `to`, keys and all.
    pub async fn migrate_slot(&self, slot: u16, to: u16) {
        self.begin_migration(slot, to).await.finish(self).await;
    }

    /// Kills the master serving `slot` and waits until one of its replicas
    /// serves the slot (every live node agreeing); returns the new master's
    /// port. The old master stays down (`node_mut(port).restart()` brings it
    /// back, as a replica).
    pub async fn kill_master_of(&mut self, slot: u16) -> u16 {
        let old = self.master_of(slot).await;
        self.node_mut(old).kill();
        let what = format!("a replica to take slot {slot} over from {old}");
        let promoted = wait::until_every(
            &what,
            FAILOVER_LIMIT,
            Duration::from_millis(200),
            async || {
                let port = self.live_view_of(slot).await?;
                (port != old).then_some(port)
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        self.wait_whole(FAILOVER_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        promoted
    }

    /// The master of `slot` if every live node names the same one.
    async fn live_view_of(&self, slot: u16) -> Option<u16> {
        let mut named = None;
        for node in &self.nodes {
            let Some(slots) = slots_of(node).await else {
                continue;
            };
            let port = slots
                .iter()
                .find(|(first, last, _)| (*first..=*last).contains(&slot))
                .map(|(_, _, port)| *port)?;
            match named {
                None => named = Some(port),
                Some(p) if p != port => return None,
                Some(_) => {}
            }
        }
        named
    }

    async fn node_id(&self, port: u16) -> String {
        self.node(port)
            .query(redis::cmd("CLUSTER").arg("MYID"))
            .await
    }

    /// Waits until every live node says `cluster_state:ok` and places
    /// every slot where the others do, and every live replica is in sync.
    pub async fn wait_whole(&self, limit: Duration) -> Result<()> {
        wait::until_every(
            "the cluster to be whole",
            limit,
            Duration::from_millis(100),
            async || {
                let mut views = Vec::new();
                for node in &self.nodes {
                    if !crate::redis::answers_ping(&node.url()).await {
                        continue;
                    }
                    if !node_ready(node).await {
                        return None;
                    }
                    views.push(slots_of(node).await?);
                }
                (!views.is_empty() && views.windows(2).all(|w| w[0] == w[1])).then_some(())
            },
        )
        .await
    }

    /// The end of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&format!("==> redis :{} <==\n{}", n.port, n.log_tail(20)));
        }
        out
    }
}

/// A slot being moved (see [`RedisCluster::begin_migration`]).
pub struct Migration {
    pub slot: u16,
    pub from: u16,
    pub to: u16,
    to_id: String,
}

impl Migration {
    /// Assigns the slot to its new master on every node (the new master
    /// first, then the old one, which then pushes `SUNSUBSCRIBE` for the
    /// slot's shard channels to its subscribers), and waits until every
    /// node agrees.
    pub async fn finish(self, cluster: &RedisCluster) {
        let mut setslot = redis::cmd("CLUSTER");
        setslot
            .arg("SETSLOT")
            .arg(self.slot)
            .arg("NODE")
            .arg(&self.to_id);
        let _: () = cluster.node(self.to).query(&setslot).await;
        let _: () = cluster.node(self.from).query(&setslot).await;
        for node in &cluster.nodes {
            // Replicas refuse SETSLOT; gossip tells them.
            let _: redis::RedisResult<()> = query(&node.url_with_auth(), &setslot).await;
        }
        let what = format!("every node to place slot {} on {}", self.slot, self.to);
        wait::until(&what, START_LIMIT, async || {
            (cluster.live_view_of(self.slot).await == Some(self.to)).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Starts one node; a node that exits at once (a port of the two it was
/// given was taken by another process meanwhile) is started again on
/// other ports, twice at most.
async fn launch_node(options: &ClusterOptions) -> Result<RedisServer> {
    let mut tries = 0;
    loop {
        match RedisServer::launch(node_options(options)).await {
            Err(Error::Exited { .. }) if tries < 2 => tries += 1,
            other => return other,
        }
    }
}

/// A node's options. Its cluster bus gets a free port of its own: the
/// default, its port + 10 000, may be taken (or past 65 535).
fn node_options(options: &ClusterOptions) -> RedisOptions {
    RedisOptions {
        password: options.password.clone(),
        extra: [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-port",
            &free_port().to_string(),
            "--cluster-node-timeout",
            &options.node_timeout.as_millis().to_string(),
        ]
        .map(String::from)
        .into(),
        ..RedisOptions::default()
    }
}

/// A live node says `cluster_state:ok` and, as a replica, is in sync.
async fn node_ready(node: &RedisServer) -> bool {
    let Ok(text) = query::<String>(&node.url_with_auth(), redis::cmd("CLUSTER").arg("INFO")).await
    else {
        return false;
    };
    if crate::redis::Info::parse(&text)
        .get("cluster_state")
        .map(str::trim)
        != Some("ok")
    {
        return false;
    }
    let Some(replication) = node.info("replication").await else {
        return false;
    };
    replication.get("role") == Some("master")
        || (replication.get("master_link_status") == Some("up")
            && replication.get("master_sync_in_progress") != Some("1"))
}

/// A live node's `CLUSTER SLOTS`, parsed.
async fn slots_of(node: &RedisServer) -> Option<Vec<(u16, u16, u16)>> {
    let reply: Value = query(&node.url_with_auth(), redis::cmd("CLUSTER").arg("SLOTS"))
        .await
        .ok()?;
    parse_slots(&reply)
}

/// `CLUSTER SLOTS` as `(first, last, master port)`.
fn parse_slots(reply: &Value) -> Option<Vec<(u16, u16, u16)>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else {
            return None;
        };
        let (Value::Int(first), Value::Int(last), Value::Array(master)) =
            (items.first()?, items.get(1)?, items.get(2)?)
        else {
            return None;
        };
        let Value::Int(port) = master.get(1)? else {
            return None;
        };
        out.push((*first as u16, *last as u16, *port as u16));
    }
    out.sort_unstable();
    Some(out)
}

/// Runs `redis-cli` with `args` to its end (at most [`START_LIMIT`]).
async fn redis_cli(args: &[String]) -> Result<()> {
    let child = tokio::process::Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Spawn {
            program: "redis-cli".into(),
            source,
        })?;
    let what = format!("redis-cli {}", args.join(" "));
    let output = tokio::time::timeout(START_LIMIT, child.wait_with_output())
        .await
        .map_err(|_| Error::Timeout {
            what: what.clone(),
            waited: START_LIMIT,
            log: String::new(),
        })?
        .map_err(Error::io(what.clone()))?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Exited {
        name: "redis-cli".into(),
        what,
        status: output.status,
        log: format!(
            "\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}
