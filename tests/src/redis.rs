//! Real `redis-server` and `redis-sentinel` processes on free ports, each in
//! its own temporary directory, killed and cleaned up on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{WAIT, free_port, wait_until};

/// Sentinel master name used by the tests (and by the operator).
pub const MASTER_NAME: &str = "chorus";

fn temp_dir(kind: &str, port: u16) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("chorus-test-{}-{kind}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn spawn(program: &str, args: &[String]) -> Child {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {program} (run scripts/test.sh to install it): {e}")
        })
}

/// A `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone master without persistence.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A server with extra `redis-server` arguments (e.g. `--replicaof`).
    pub async fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let dir = temp_dir("redis", port);
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
            dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Self {
            port,
            dir,
            args,
            child: None,
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        self.child = Some(spawn("redis-server", &self.args));
        let url = self.url();
        wait_until("redis-server to answer PING", || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same port (empty: no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// Runs a command and returns its reply.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        cmd.query_async(&mut conn).await.unwrap()
    }

    /// Subscribers of a channel, from `PUBSUB NUMSUB`.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let (_, n): (String, i64) = self
            .query(redis::cmd("PUBSUB").arg("NUMSUB").arg(channel))
            .await;
        n
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    // A server with a password answers NOAUTH: it is up all the same.
    match tokio::time::timeout(
        Duration::from_millis(500),
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await
    {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.code() == Some("NOAUTH"),
        Err(_) => false,
    }
}

/// A `redis-sentinel` process monitoring [`MASTER_NAME`].
pub struct Sentinel {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Sentinel {
    pub async fn start(master_port: u16, quorum: u32, down_after_ms: u64) -> Self {
        let port = free_port();
        let dir = temp_dir("sentinel", port);
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel resolve-hostnames no\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n\
                 sentinel failover-timeout {MASTER_NAME} {failover}\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir = dir.display(),
                failover = down_after_ms * 3,
            ),
        )
        .unwrap();
        let child = spawn("redis-sentinel", &[conf.display().to_string()]);
        let sentinel = Self {
            port,
            dir,
            child: Some(child),
        };
        let url = format!("redis://127.0.0.1:{port}");
        wait_until("redis-sentinel to answer PING", || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await;
        sentinel
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where this sentinel says the master is.
    pub async fn master_port(&self) -> Option<u16> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let reply: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER_NAME)
            .query_async(&mut conn)
            .await
            .ok()?;
        reply.map(|(_, p)| p)
    }

    /// (replicas known, other sentinels known)
    async fn knows(&self) -> (usize, usize) {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)) else {
            return (0, 0);
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
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
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One master, one replica and three sentinels (quorum 2).
pub struct SentinelGroup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelGroup {
    pub async fn start(down_after_ms: u64) -> Self {
        let master = RedisServer::start().await;
        let replicaof = format!("127.0.0.1 {}", master.port);
        // DEBUG lets a test freeze the replica (DEBUG SLEEP) to make it miss writes.
        let replica = RedisServer::start_with(&[
            "--replicaof",
            &replicaof,
            "--enable-debug-command",
            "local",
        ])
        .await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Sentinel::start(master.port, 2, down_after_ms).await);
        }
        let group = Self {
            master,
            replica,
            sentinels,
        };
        group.wait_replica_synced().await;
        // Failover needs every sentinel to know the replica and its peers.
        for s in &group.sentinels {
            let deadline = tokio::time::Instant::now() + WAIT * 3;
            loop {
                let (replicas, peers) = s.knows().await;
                if replicas >= 1 && peers >= 2 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "sentinel {} never saw the group",
                    s.port
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        group
    }

    /// Waits until the replica finished its sync with the master.
    pub async fn wait_replica_synced(&self) {
        let replica = self.replica.url();
        wait_until("the replica to sync", || {
            let replica = replica.clone();
            async move {
                let Ok(client) = redis::Client::open(replica) else {
                    return false;
                };
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                    return false;
                };
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                info.contains("master_link_status:up")
                    && !info.contains("master_sync_in_progress:1")
            }
        })
        .await;
    }

    /// Makes the replica miss what the master acknowledges from now on until
    /// the returned task ends (about 1.5 s): freezes it (`DEBUG SLEEP`) and
    /// cuts its replication link. Kill the master meanwhile to lose them.
    pub async fn freeze_replica(&self) -> tokio::task::JoinHandle<()> {
        let replica_url = self.replica.url();
        let sleeper = tokio::spawn(async move {
            let client = redis::Client::open(replica_url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let _: redis::RedisResult<String> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("1.5")
                .query_async(&mut conn)
                .await;
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _: i64 = self
            .master
            .query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"))
            .await;
        sleeper
    }

    /// `redis+sentinel://…/chorus` for the nodes.
    pub fn broker_url(&self) -> String {
        let addrs: Vec<String> = self.sentinels.iter().map(Sentinel::addr).collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", addrs.join(","))
    }

    /// Kills the master (unless already dead) and waits until a majority of
    /// sentinels names the replica.
    pub async fn fail_over(&mut self) {
        let old = self.master.port;
        let new = self.replica.port;
        self.master.kill();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut agree = 0;
            for s in &self.sentinels {
                if s.master_port().await == Some(new) {
                    agree += 1;
                }
            }
            if agree >= 2 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sentinels did not fail over from {old} to {new}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
