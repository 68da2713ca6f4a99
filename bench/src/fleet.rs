//! The processes under test: `chorus-server` nodes, `redis-server`,
//! `redis-sentinel`, started on free ports of 127.0.0.1 in a temporary
//! directory and killed when the [`Fleet`] is dropped. A fleet can also be a
//! list of nodes someone else runs (`--url`), whose CPU is then unknown.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;

/// Sentinel master name, as in the operator and the tests.
pub const MASTER_NAME: &str = "chorus";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Memory,
    Redis,
    Sentinel,
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
}

impl FleetSpec {
    pub fn label(&self) -> String {
        match self.broker {
            BrokerKind::Memory => format!("{} node(s), memory broker", self.nodes),
            BrokerKind::Redis => format!("{} nodes + 1 redis", self.nodes),
            BrokerKind::Sentinel => format!(
                "{} nodes + sentinel group (2 redis, 3 sentinels)",
                self.nodes
            ),
        }
    }
}

/// A child process, SIGKILLed on drop.
pub struct Proc {
    pub name: String,
    pub port: u16,
    child: Option<Child>,
}

impl Proc {
    fn spawn(name: String, port: u16, program: &Path, args: &[String], log: &Path) -> Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Self {
            name,
            port,
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node as the load generator sees it.
pub struct NodeInfo {
    pub name: String,
    pub ws_url: String,
    pub http_base: String,
    pub proc: Option<Proc>,
}

impl NodeInfo {
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }
}

pub struct Fleet {
    pub label: String,
    pub nodes: Vec<NodeInfo>,
    /// redis-server processes (master first).
    pub redis: Vec<Proc>,
    pub sentinels: Vec<Proc>,
    dir: Option<PathBuf>,
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The `chorus-server` next to this executable (both live in target/<profile>/).
pub fn default_server_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("chorus-server")))
        .unwrap_or_else(|| PathBuf::from("chorus-server"))
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn redis_conn(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

async fn redis_ping(port: u16) -> bool {
    let Some(mut conn) = redis_conn(port).await else {
        return false;
    };
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            redis::cmd("PING").query_async::<String>(&mut conn)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Where a sentinel says the master is.
pub async fn sentinel_master_port(sentinel_port: u16) -> Option<u16> {
    let mut conn = redis_conn(sentinel_port).await?;
    let reply: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(MASTER_NAME)
        .query_async(&mut conn)
        .await
        .ok()?;
    reply.map(|(_, p)| p)
}

async fn sentinel_knows(port: u16) -> (usize, usize) {
    let Some(mut conn) = redis_conn(port).await else {
        return (0, 0);
    };
    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
        .arg("REPLICAS")
        .arg(MASTER_NAME)
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    let sentinels: Vec<redis::Value> = redis::cmd("SENTINEL")
        .arg("SENTINELS")
        .arg(MASTER_NAME)
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    (replicas.len(), sentinels.len())
}

async fn http_ok(client: &reqwest::Client, url: &str) -> bool {
    matches!(client.get(url).send().await, Ok(r) if r.status().is_success())
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
            nodes,
            redis: Vec::new(),
            sentinels: Vec::new(),
            dir: None,
        })
    }

    pub async fn start(spec: &FleetSpec) -> Result<Self> {
        if !spec.server_bin.exists() {
            bail!(
                "no chorus-server at {} (build it with `cargo build --release -p chorus-server`, or pass --server-bin)",
                spec.server_bin.display()
            );
        }
        let dir = std::env::temp_dir().join(format!(
            "chorus-bench-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        let mut fleet = Self {
            label: spec.label(),
            nodes: Vec::new(),
            redis: Vec::new(),
            sentinels: Vec::new(),
            dir: Some(dir.clone()),
        };
        let broker_url = match spec.broker {
            BrokerKind::Memory => "memory://".to_string(),
            BrokerKind::Redis => {
                let port = fleet.start_redis(&dir, None).await?;
                format!("redis://127.0.0.1:{port}")
            }
            BrokerKind::Sentinel => {
                let master = fleet.start_redis(&dir, None).await?;
                fleet.start_redis(&dir, Some(master)).await?;
                for _ in 0..3 {
                    fleet
                        .start_sentinel(&dir, master, spec.down_after_ms)
                        .await?;
                }
                for s in &fleet.sentinels {
                    let port = s.port;
                    wait_for(
                        "the sentinels to see the replica and each other",
                        Duration::from_secs(30),
                        || async move {
                            let (replicas, peers) = sentinel_knows(port).await;
                            replicas >= 1 && peers >= 2
                        },
                    )
                    .await?;
                }
                let addrs: Vec<String> = fleet
                    .sentinels
                    .iter()
                    .map(|s| format!("127.0.0.1:{}", s.port))
                    .collect();
                format!("redis+sentinel://{}/{MASTER_NAME}", addrs.join(","))
            }
        };
        let http = reqwest::Client::new();
        for i in 0..spec.nodes {
            let port = free_port()?;
            let name = format!("n{}", i + 1);
            let mut args: Vec<String> = vec![
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--broker".into(),
                broker_url.clone(),
                "--node-id".into(),
                name.clone(),
                "--drain-seconds".into(),
                "0".into(),
            ];
            args.extend(spec.server_args.iter().cloned());
            let log = dir.join(format!("{name}.log"));
            let proc = Proc::spawn(name.clone(), port, &spec.server_bin, &args, &log)?;
            fleet.nodes.push(NodeInfo {
                name,
                ws_url: format!("ws://127.0.0.1:{port}/ws"),
                http_base: format!("http://127.0.0.1:{port}"),
                proc: Some(proc),
            });
        }
        for node in &fleet.nodes {
            let url = format!("{}/readyz", node.http_base);
            let http = &http;
            wait_for(
                &format!("{} to be ready ({url})", node.name),
                Duration::from_secs(20),
                || {
                    let url = url.clone();
                    async move { http_ok(http, &url).await }
                },
            )
            .await?;
        }
        Ok(fleet)
    }

    async fn start_redis(&mut self, dir: &Path, replica_of: Option<u16>) -> Result<u16> {
        let port = free_port()?;
        let data = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&data)?;
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            data.display().to_string(),
        ];
        if let Some(master) = replica_of {
            args.extend(["--replicaof".into(), format!("127.0.0.1 {master}")]);
        }
        let log = dir.join(format!("redis-{port}.log"));
        let name = if replica_of.is_some() {
            "redis-replica"
        } else {
            "redis"
        };
        self.redis.push(Proc::spawn(
            name.into(),
            port,
            Path::new("redis-server"),
            &args,
            &log,
        )?);
        wait_for(
            "redis-server to answer PING",
            Duration::from_secs(10),
            || redis_ping(port),
        )
        .await?;
        Ok(port)
    }

    async fn start_sentinel(&mut self, dir: &Path, master: u16, down_after_ms: u64) -> Result<()> {
        let port = free_port()?;
        let sdir = dir.join(format!("sentinel-{port}"));
        std::fs::create_dir_all(&sdir)?;
        let conf = sdir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {d}\nsentinel resolve-hostnames no\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n\
                 sentinel failover-timeout {MASTER_NAME} {timeout}\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                d = sdir.display(),
                timeout = down_after_ms * 3,
            ),
        )?;
        let log = dir.join(format!("sentinel-{port}.log"));
        self.sentinels.push(Proc::spawn(
            "sentinel".into(),
            port,
            Path::new("redis-sentinel"),
            &[conf.display().to_string()],
            &log,
        )?);
        wait_for(
            "redis-sentinel to answer PING",
            Duration::from_secs(10),
            || redis_ping(port),
        )
        .await
    }

    /// Pids of the server processes (empty for external nodes).
    pub fn server_pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(NodeInfo::pid).collect()
    }

    /// Pids of the redis-server processes still running.
    pub fn redis_pids(&self) -> Vec<u32> {
        self.redis.iter().filter_map(Proc::pid).collect()
    }

    pub fn sentinel_pids(&self) -> Vec<u32> {
        self.sentinels.iter().filter_map(Proc::pid).collect()
    }

    /// Whether CPU and memory of the servers can be read.
    pub fn measurable(&self) -> bool {
        self.nodes.iter().all(|n| n.pid().is_some())
    }

    /// A numeric field of the master's `INFO` (e.g. `total_net_output_bytes`).
    pub async fn redis_stat(&self, field: &str) -> Option<u64> {
        let mut conn = redis_conn(self.redis.first()?.port).await?;
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut conn)
            .await
            .ok()?;
        info.lines().find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// A counter from a node's `/metrics` (summed over label sets).
    pub async fn metric(&self, name: &str) -> Option<f64> {
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

impl Drop for Fleet {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(p) = &mut node.proc {
                p.kill();
            }
        }
        for p in self.sentinels.iter_mut().chain(self.redis.iter_mut()) {
            p.kill();
        }
        if let Some(dir) = &self.dir
            && std::env::var_os("CHORUS_BENCH_KEEP").is_none()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
