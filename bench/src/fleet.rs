//! The processes under test: `chorus-server` nodes and their broker (one
//! `redis-server`, a Sentinel group of 2 Redis and 3 sentinels, a Redis
//! Cluster of masters without replicas, or one Apache Kafka broker with a
//! topic of [`KAFKA_PARTITIONS`]), started
//! by chorus-testkit on free ports of 127.0.0.1, each in a temporary
//! directory with its log (kept with `CHORUS_KEEP_TEST_DIRS=1`), and killed
//! when the [`Fleet`] is dropped. A fleet can also be a list of nodes
//! someone else runs (`--url`), whose CPU is then unknown.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use chorus_testkit::{
    ChorusServer, ClusterOptions, Daemon, GroupOptions, KafkaBroker, RedisCluster, RedisServer,
    SentinelGroup,
};

use crate::peers::{self, Target};
use crate::procfs;

/// Partitions of the bench's Kafka topic.
pub const KAFKA_PARTITIONS: i32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Memory,
    Redis,
    Sentinel,
    /// A Redis Cluster of this many masters (no replicas: each shard's CPU
    /// is its own rooms' work).
    Cluster(usize),
    Kafka,
}

#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub nodes: usize,
    pub broker: BrokerKind,
    pub server_bin: PathBuf,
    /// Extra `chorus-server` flags for every node.
    pub server_args: Vec<String>,
    /// Sentinel `down-after-milliseconds`.
    pub down_after_ms: u64,
    /// Chorus, or a peer run the same way (its nodes on one Redis).
    pub target: Target,
}

impl FleetSpec {
    pub fn label(&self) -> String {
        if self.target != Target::Chorus {
            return format!("{} × {} + 1 redis", self.nodes, self.target.name());
        }
        match self.broker {
            BrokerKind::Memory => format!("{} node(s), memory broker", self.nodes),
            BrokerKind::Redis => format!("{} nodes + 1 redis", self.nodes),
            BrokerKind::Sentinel => format!(
                "{} nodes + sentinel group (2 redis, 3 sentinels)",
                self.nodes
            ),
            BrokerKind::Cluster(shards) => {
                format!("{} nodes + redis cluster ({shards} shards)", self.nodes)
            }
            BrokerKind::Kafka => format!(
                "{} nodes + 1 kafka ({KAFKA_PARTITIONS} partitions)",
                self.nodes
            ),
        }
    }
}

/// One Redis master's load at an instant, or between two.
#[derive(Debug, Clone, Copy)]
pub struct RedisLoad {
    pub port: u16,
    pub cpu_s: f64,
    /// Publish scripts run: messages of the rooms this master serves.
    pub scripts: u64,
}

impl RedisLoad {
    /// `self - before`, per port.
    pub fn deltas(after: &[RedisLoad], before: &[RedisLoad]) -> Vec<RedisLoad> {
        after
            .iter()
            .filter_map(|a| {
                let b = before.iter().find(|b| b.port == a.port)?;
                Some(RedisLoad {
                    port: a.port,
                    cpu_s: a.cpu_s - b.cpu_s,
                    scripts: a.scripts.saturating_sub(b.scripts),
                })
            })
            .collect()
    }
}

/// How long a started node may take to be ready.
const NODE_READY: Duration = Duration::from_secs(20);

/// A node as the load generator sees it.
pub struct NodeInfo {
    pub name: String,
    pub ws_url: String,
    pub http_base: String,
    /// `None` for a node someone else runs.
    pub proc: Option<NodeProc>,
}

/// The process of a node the bench started.
pub enum NodeProc {
    Chorus(ChorusServer),
    Peer(Daemon),
}

impl std::ops::Deref for NodeProc {
    type Target = Daemon;

    fn deref(&self) -> &Daemon {
        match self {
            NodeProc::Chorus(server) => server,
            NodeProc::Peer(daemon) => daemon,
        }
    }
}

impl std::ops::DerefMut for NodeProc {
    fn deref_mut(&mut self) -> &mut Daemon {
        match self {
            NodeProc::Chorus(server) => server,
            NodeProc::Peer(daemon) => daemon,
        }
    }
}

impl NodeInfo {
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(|p| p.pid())
    }
}

/// The broker processes the bench started.
pub enum Broker {
    /// Memory broker, or nodes run by someone else.
    None,
    Redis(RedisServer),
    Sentinel(SentinelGroup),
    Cluster(RedisCluster),
    Kafka(KafkaBroker),
}

pub struct Fleet {
    pub label: String,
    /// What its nodes run (and so which protocol the clients speak).
    pub target: Target,
    // Nodes first: they are killed before their broker.
    pub nodes: Vec<NodeInfo>,
    pub broker: Broker,
}

/// The `chorus-server` next to this executable (both live in target/<profile>/).
pub fn default_server_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("chorus-server")))
        .unwrap_or_else(|| PathBuf::from("chorus-server"))
}

impl Fleet {
    /// Nodes run by someone else.
    pub fn external(urls: &[String]) -> Result<Self> {
        let mut nodes = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let rest = url
                .strip_prefix("ws://")
                .context("--url must be ws://host:port/ws")?;
            let host = rest.split('/').next().unwrap_or(rest);
            nodes.push(NodeInfo {
                name: format!("url{}", i + 1),
                ws_url: url.clone(),
                http_base: format!("http://{host}"),
                proc: None,
            });
        }
        Ok(Self {
            label: format!("{} external node(s)", nodes.len()),
            target: Target::Chorus,
            nodes,
            broker: Broker::None,
        })
    }

    pub async fn start(spec: &FleetSpec) -> Result<Self> {
        if spec.target != Target::Chorus {
            return Self::start_peers(spec).await;
        }
        if !spec.server_bin.exists() {
            bail!(
                "no chorus-server at {} (build it with `cargo build --release -p chorus-server`, or pass --server-bin)",
                spec.server_bin.display()
            );
        }
        let (broker, broker_url) = match spec.broker {
            BrokerKind::Memory => (Broker::None, "memory://".to_string()),
            BrokerKind::Redis => {
                let redis = RedisServer::launch(Default::default()).await?;
                let url = redis.url();
                (Broker::Redis(redis), url)
            }
            BrokerKind::Sentinel => {
                let down_after = Duration::from_millis(spec.down_after_ms);
                let group = SentinelGroup::launch(GroupOptions::new(down_after)).await?;
                let url = group.broker_url();
                (Broker::Sentinel(group), url)
            }
            BrokerKind::Cluster(shards) => {
                let cluster = RedisCluster::launch(ClusterOptions {
                    shards,
                    replicas_per_shard: 0,
                    ..ClusterOptions::default()
                })
                .await?;
                let url = cluster.broker_url();
                (Broker::Cluster(cluster), url)
            }
            BrokerKind::Kafka => {
                let kafka = KafkaBroker::launch().await?;
                kafka.create_topic("bench", KAFKA_PARTITIONS).await;
                let url = kafka.url("bench");
                (Broker::Kafka(kafka), url)
            }
        };
        let mut fleet = Self {
            label: spec.label(),
            target: Target::Chorus,
            nodes: Vec::new(),
            broker,
        };
        for i in 0..spec.nodes {
            let name = format!("n{}", i + 1);
            let mut args = vec![
                "--broker",
                &broker_url,
                "--node-id",
                &name,
                "--drain-seconds",
                "0",
            ];
            args.extend(spec.server_args.iter().map(String::as_str));
            let node = ChorusServer::spawn(&spec.server_bin, &args, &[])?;
            fleet.nodes.push(NodeInfo {
                name,
                ws_url: node.ws_url(),
                http_base: node.http_base(),
                proc: Some(NodeProc::Chorus(node)),
            });
        }
        for node in fleet.nodes.iter_mut().filter_map(|n| n.proc.as_mut()) {
            node.ready(NODE_READY).await?;
        }
        Ok(fleet)
    }

    /// Nodes of a peer on one Redis.
    async fn start_peers(spec: &FleetSpec) -> Result<Self> {
        let redis = RedisServer::launch(Default::default()).await?;
        let addr = redis.addr();
        let mut fleet = Self {
            label: spec.label(),
            target: spec.target,
            nodes: Vec::new(),
            broker: Broker::Redis(redis),
        };
        for i in 0..spec.nodes {
            let node = peers::spawn(spec.target, &addr)?;
            fleet.nodes.push(NodeInfo {
                name: format!("n{}", i + 1),
                ws_url: node.ws_url,
                http_base: node.http_base,
                proc: Some(NodeProc::Peer(node.daemon)),
            });
        }
        for node in fleet.nodes.iter_mut().filter_map(|n| n.proc.as_mut()) {
            node.ready(NODE_READY).await?;
        }
        Ok(fleet)
    }

    /// The Redis servers (master first; a cluster's in no fixed order).
    fn redis(&self) -> Vec<&RedisServer> {
        match &self.broker {
            Broker::None | Broker::Kafka(_) => Vec::new(),
            Broker::Redis(redis) => vec![redis],
            Broker::Cluster(cluster) => cluster.nodes.iter().collect(),
            Broker::Sentinel(group) => std::iter::once(&group.master)
                .chain(&group.replicas)
                .collect(),
        }
    }

    /// The Sentinel group, when the fleet runs one.
    pub fn sentinel_group(&mut self) -> Option<&mut SentinelGroup> {
        match &mut self.broker {
            Broker::Sentinel(group) => Some(group),
            _ => None,
        }
    }

    /// Pids of the server processes (empty for external nodes).
    pub fn server_pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(NodeInfo::pid).collect()
    }

    /// Pids of the broker's processes still running: the redis-servers,
    /// or Kafka's JVM (reported in the broker's CPU column).
    pub fn redis_pids(&self) -> Vec<u32> {
        match &self.broker {
            Broker::Kafka(kafka) => kafka.pid().into_iter().collect(),
            _ => self.redis().iter().filter_map(|r| r.pid()).collect(),
        }
    }

    pub fn sentinel_pids(&self) -> Vec<u32> {
        match &self.broker {
            Broker::Sentinel(group) => group.sentinels.iter().filter_map(|s| s.pid()).collect(),
            _ => Vec::new(),
        }
    }

    /// Whether CPU and memory of the servers can be read.
    pub fn measurable(&self) -> bool {
        self.nodes.iter().all(|n| n.pid().is_some())
    }

    /// A numeric field of the master's `INFO` (e.g. `total_net_output_bytes`),
    /// summed over a cluster's masters.
    pub async fn redis_stat(&self, field: &str) -> Option<u64> {
        let masters = match &self.broker {
            Broker::Cluster(cluster) => cluster.nodes.iter().collect(),
            _ => vec![*self.redis().first()?],
        };
        let mut total = 0;
        for master in masters {
            total += master.info("stats").await?.number(field)?;
        }
        Some(total)
    }

    /// Each Redis master's load so far: its port, CPU seconds and publish
    /// scripts run (`EVALSHA` and `EVAL` calls in `INFO commandstats`).
    pub async fn redis_loads(&self) -> Vec<RedisLoad> {
        let masters = match &self.broker {
            Broker::Cluster(cluster) => cluster.nodes.iter().collect(),
            _ => self.redis().into_iter().take(1).collect::<Vec<_>>(),
        };
        let mut out = Vec::new();
        for master in masters {
            let stats = master.info("commandstats").await;
            let calls = |command: &str| {
                stats
                    .as_ref()
                    .and_then(|s| s.get(&format!("cmdstat_{command}")))
                    .and_then(|v| v.strip_prefix("calls="))
                    .and_then(|v| v.split(',').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            out.push(RedisLoad {
                port: master.port,
                cpu_s: master.pid().and_then(procfs::cpu_seconds).unwrap_or(0.0),
                scripts: calls("evalsha") + calls("eval"),
            });
        }
        out
    }

    /// A counter from a node's `/metrics` (summed over label sets); `None`
    /// for peers (their metrics are named otherwise).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        if self.target != Target::Chorus {
            return None;
        }
        let http = reqwest::Client::new();
        let mut total = 0.0;
        for node in &self.nodes {
            let text = http
                .get(format!("{}/metrics", node.http_base))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            for line in text.lines() {
                let Some(rest) = line.strip_prefix(name) else {
                    continue;
                };
                if !(rest.starts_with(' ') || rest.starts_with('{')) {
                    continue;
                }
                if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                    total += v;
                }
            }
        }
        Some(total)
    }
}
