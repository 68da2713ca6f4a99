//! `redis-server` on a free port, and one-shot commands against any Redis
//! or Sentinel with every step bounded in time.

use std::sync::Arc;
use std::time::Duration;

use redis::{AsyncConnectionConfig, Cmd, FromRedisValue, RedisResult};
use tempfile::TempDir;

use crate::Result;
use crate::daemon::{Daemon, DaemonSpec, Probe, deref_daemon};
use crate::process::{ProcSpec, free_port, workdir};

/// How `redis-server` is started besides its port and directory.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `--requirepass` and `--masterauth`: clients and replicas authenticate.
    pub password: Option<String>,
    /// `--replicaof 127.0.0.1 <port>`.
    pub replica_of: Option<u16>,
    /// `--enable-debug-command local`: a test may freeze the server from
    /// inside with `DEBUG SLEEP` (see [`crate::SentinelGroup::stall_replica`]).
    pub debug_command: bool,
    /// Further `redis-server` arguments.
    pub extra: Vec<String>,
}

/// A `redis-server` without persistence (`--save ""`, no AOF): a restart
/// comes back empty, as a crashed in-memory pod would. Kill, restart,
/// freeze and thaw come from its [`Daemon`].
pub struct RedisServer {
    daemon: Daemon,
    password: Option<String>,
}

deref_daemon!(RedisServer);

impl RedisServer {
    /// A standalone master without persistence; panics if it cannot start.
    pub async fn start() -> Self {
        Self::start_with(RedisOptions::default()).await
    }

    /// [`RedisServer::launch`], panicking with the error (for tests).
    pub async fn start_with(options: RedisOptions) -> Self {
        Self::launch(options)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server and waits until it answers PING.
    pub async fn launch(options: RedisOptions) -> Result<Self> {
        let port = free_port();
        let dir = workdir("redis")?;
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.path().display().to_string(),
            // Full syncs start at once instead of after the default 5 s.
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ]
        .map(String::from)
        .into();
        if let Some(password) = &options.password {
            args.extend(["--requirepass", password, "--masterauth", password].map(String::from));
        }
        if let Some(master) = options.replica_of {
            args.extend(["--replicaof".to_owned(), format!("127.0.0.1 {master}")]);
        }
        if options.debug_command {
            args.extend(["--enable-debug-command", "local"].map(String::from));
        }
        args.extend(options.extra);
        let daemon = launch_program("redis-server", port, dir, args).await?;
        Ok(Self {
            daemon,
            password: options.password,
        })
    }

    /// `redis://127.0.0.1:<port>`, without the password (a node under test
    /// gets that apart, as `--redis-password-file`).
    pub fn url(&self) -> String {
        url("127.0.0.1", self.port, None)
    }

    /// [`RedisServer::url`] with the password, if any, for the test's own
    /// commands.
    pub fn url_with_auth(&self) -> String {
        url("127.0.0.1", self.port, self.password.as_deref())
    }

    /// Runs a command and returns its reply; panics on an error.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> T {
        query(&self.url_with_auth(), cmd)
            .await
            .unwrap_or_else(|e| panic!("{cmd:?} on {}: {e}", self.addr()))
    }

    /// Subscribers of a channel, from `PUBSUB NUMSUB`.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let (_, n): (String, i64) = self
            .query(redis::cmd("PUBSUB").arg("NUMSUB").arg(channel))
            .await;
        n
    }

    /// `INFO <section>`; `None` while the server does not answer.
    pub async fn info(&self, section: &str) -> Option<Info> {
        info(&self.url_with_auth(), section).await.ok()
    }
}

/// `program` (`redis-server`, `redis-sentinel`) on `port`, its log in
/// `dir`, once it answers PING.
pub(crate) async fn launch_program(
    program: &str,
    port: u16,
    dir: TempDir,
    args: Vec<String>,
) -> Result<Daemon> {
    Daemon::launch(DaemonSpec {
        port,
        proc: ProcSpec {
            name: format!("{program} :{port}"),
            program: program.into(),
            args,
            env: Vec::new(),
            log: dir.path().join(format!("{program}.log")),
            group: false,
        },
        dir,
        ready_when: format!("{program} to answer PING"),
        probe: ping_probe(url("127.0.0.1", port, None)),
    })
    .await
}

/// A probe that a Redis or Sentinel at `url` answers PING.
pub fn ping_probe(url: String) -> Probe {
    Arc::new(move || {
        let url = url.clone();
        Box::pin(async move { answers_ping(&url).await })
    })
}

/// `redis://[:password@]host:port`.
pub fn url(host: &str, port: u16, password: Option<&str>) -> String {
    match password {
        Some(password) => format!("redis://:{password}@{host}:{port}"),
        None => format!("redis://{host}:{port}"),
    }
}

/// Bound on connecting and on each reply in [`query`].
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// One command on a fresh connection, connecting and the reply each
/// bounded by [`CALL_TIMEOUT`].
pub async fn query<T: FromRedisValue>(url: &str, cmd: &Cmd) -> RedisResult<T> {
    query_within(url, cmd, CALL_TIMEOUT).await
}

async fn query_within<T: FromRedisValue>(url: &str, cmd: &Cmd, limit: Duration) -> RedisResult<T> {
    let client = redis::Client::open(url)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(limit))
        .set_response_timeout(Some(limit));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    cmd.query_async(&mut conn).await
}

/// Whether a Redis or Sentinel answers PING (a server that wants a
/// password answers NOAUTH: it is up all the same).
pub async fn answers_ping(url: &str) -> bool {
    let limit = Duration::from_millis(500);
    match query_within::<String>(url, &redis::cmd("PING"), limit).await {
        Ok(_) => true,
        Err(e) => e.code() == Some("NOAUTH"),
    }
}

/// `INFO <section>` of the server at `url`.
pub async fn info(url: &str, section: &str) -> RedisResult<Info> {
    let text: String = query(url, redis::cmd("INFO").arg(section)).await?;
    Ok(Info::parse(&text))
}

/// The `field:value` lines of an `INFO` reply.
#[derive(Clone, Debug, Default)]
pub struct Info(Vec<(String, String)>);

impl Info {
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|l| l.trim_end().split_once(':'))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    pub fn get(&self, field: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == field)
            .map(|(_, v)| v.as_str())
    }

    /// A numeric field (`total_net_output_bytes`, `connected_slaves`).
    pub fn number(&self, field: &str) -> Option<u64> {
        self.get(field)?.trim().parse().ok()
    }
}
