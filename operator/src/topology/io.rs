//! The thin network layer: ask every member what it knows, and carry out
//! actions. Every connect and every command is bounded by
//! `TopologyConfig::call_timeout`, and members are contacted concurrently, so
//! a dead pod costs one timeout per pass, not one per command.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo,
};

use super::error::TopologyError;
use super::model::{
    Action, NodeAddr, Observed, RedisNode, RedisRole, SentinelNode, SentinelView, TopologyConfig,
};
use super::parse;

/// One open connection to one member, remembering where it goes for errors.
pub(crate) struct Conn {
    addr: NodeAddr,
    con: MultiplexedConnection,
    timeout: Duration,
}

impl Conn {
    pub(crate) async fn open(
        addr: &NodeAddr,
        password: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, TopologyError> {
        let connect_error = |source| TopologyError::Connect {
            addr: addr.clone(),
            source,
        };
        let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(password) = password {
            settings = settings.set_password(password);
        }
        let info = ConnectionAddr::Tcp(addr.host.clone(), addr.port)
            .into_connection_info()
            .map_err(connect_error)?
            .set_redis_settings(settings);
        let client = Client::open(info).map_err(connect_error)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        // The outer timeout also bounds the AUTH/HELLO handshake.
        let con = bounded(addr, "connect", timeout, async {
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(connect_error)
        })
        .await?;
        Ok(Self {
            addr: addr.clone(),
            con,
            timeout,
        })
    }

    pub(crate) async fn query<T: redis::FromRedisValue>(
        &mut self,
        name: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, TopologyError> {
        let addr = &self.addr;
        let con = &mut self.con;
        bounded(addr, name, self.timeout, async {
            cmd.query_async::<T>(con)
                .await
                .map_err(|source| TopologyError::Command {
                    addr: addr.clone(),
                    command: name,
                    source,
                })
        })
        .await
    }

    pub(crate) fn reply_error(&self, command: &'static str, detail: String) -> TopologyError {
        TopologyError::Reply {
            addr: self.addr.clone(),
            command,
            detail,
        }
    }
}

/// Runs `work`, giving up after `timeout` (belt and braces on top of the
/// client's own timeouts).
async fn bounded<T>(
    addr: &NodeAddr,
    command: &'static str,
    timeout: Duration,
    work: impl Future<Output = Result<T, TopologyError>>,
) -> Result<T, TopologyError> {
    // A little slack so the client's own, more precise error wins.
    let limit = timeout + timeout / 2;
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => Err(TopologyError::Timeout {
            addr: addr.clone(),
            command,
            timeout_ms: timeout.as_millis(),
        }),
    }
}

/// Asks every Redis pod and every sentinel, all at once.
pub async fn observe(config: &TopologyConfig) -> Observed {
    let redis = join_all(config.redis.iter().map(|addr| async move {
        RedisNode {
            addr: addr.clone(),
            role: observe_redis(addr, config).await.map_err(|e| e.to_string()),
        }
    }));
    let sentinels = join_all(config.sentinels.iter().map(|addr| async move {
        SentinelNode {
            addr: addr.clone(),
            view: observe_sentinel(addr, config)
                .await
                .map_err(|e| e.to_string()),
        }
    }));
    let (redis, sentinels) = futures_util::future::join(redis, sentinels).await;
    Observed { redis, sentinels }
}

/// A member on its port, or else in its waiting room (port + 1).
async fn observe_redis(
    addr: &NodeAddr,
    config: &TopologyConfig,
) -> Result<RedisRole, TopologyError> {
    let serving = Conn::open(addr, config.password.as_deref(), config.call_timeout).await;
    let mut con = match serving {
        Ok(con) => con,
        Err(serving_error) => {
            let waiting = NodeAddr::new(addr.host.clone(), addr.port.saturating_add(1));
            return match observe_waiting(&waiting, config).await {
                Ok(role) => Ok(role),
                Err(_) => Err(serving_error),
            };
        }
    };
    let text: String = con
        .query("INFO replication", redis::cmd("INFO").arg("replication"))
        .await?;
    parse::replication_info(&text).map_err(|detail| con.reply_error("INFO replication", detail))
}

async fn observe_waiting(
    addr: &NodeAddr,
    config: &TopologyConfig,
) -> Result<RedisRole, TopologyError> {
    let mut con = Conn::open(addr, config.password.as_deref(), config.call_timeout).await?;
    let text: String = con
        .query("INFO replication", redis::cmd("INFO").arg("replication"))
        .await?;
    let offset = parse::replication_info(&text)
        .map_err(|detail| con.reply_error("INFO replication", detail))?
        .data()
        .0;
    let keys: u64 = con.query("DBSIZE", &redis::cmd("DBSIZE")).await?;
    Ok(RedisRole::Waiting { offset, keys })
}

fn sentinel_cmd(sub: &str, config: &TopologyConfig) -> redis::Cmd {
    let mut cmd = redis::cmd("SENTINEL");
    cmd.arg(sub).arg(&config.master_name);
    cmd
}

async fn observe_sentinel(
    addr: &NodeAddr,
    config: &TopologyConfig,
) -> Result<Option<SentinelView>, TopologyError> {
    let mut con = Conn::open(
        addr,
        config.sentinel_password.as_deref(),
        config.call_timeout,
    )
    .await?;
    let reply: Option<(String, String)> = con
        .query(
            "SENTINEL GET-MASTER-ADDR-BY-NAME",
            &sentinel_cmd("GET-MASTER-ADDR-BY-NAME", config),
        )
        .await?;
    let master = parse::master_addr(reply)
        .map_err(|detail| con.reply_error("SENTINEL GET-MASTER-ADDR-BY-NAME", detail))?;
    let Some(master) = master else {
        return Ok(None);
    };

    let fields: HashMap<String, String> = con
        .query("SENTINEL MASTER", &sentinel_cmd("MASTER", config))
        .await?;
    let number = |name: &str| {
        parse::number_field(&fields, name)
            .map_err(|detail| con.reply_error("SENTINEL MASTER", detail))
    };
    let config_epoch = number("config-epoch")?;
    let quorum = number("quorum")?;
    let quorum = u32::try_from(quorum)
        .map_err(|_| con.reply_error("SENTINEL MASTER", format!("quorum {quorum} too large")))?;
    let down_after_ms = number("down-after-milliseconds")?;
    let failover_timeout_ms = number("failover-timeout")?;
    let failover_in_progress = parse::has_flag(&fields, "failover_in_progress");

    let known_sentinels = addr_list(
        &mut con,
        "SENTINEL SENTINELS",
        sentinel_cmd("SENTINELS", config),
    )
    .await?;
    let known_replicas = addr_list(
        &mut con,
        "SENTINEL REPLICAS",
        sentinel_cmd("REPLICAS", config),
    )
    .await?;
    Ok(Some(SentinelView {
        master,
        config_epoch,
        failover_in_progress,
        quorum,
        down_after_ms,
        failover_timeout_ms,
        known_sentinels,
        known_replicas,
    }))
}

async fn addr_list(
    con: &mut Conn,
    name: &'static str,
    cmd: redis::Cmd,
) -> Result<Vec<NodeAddr>, TopologyError> {
    let entries: Vec<HashMap<String, String>> = con.query(name, &cmd).await?;
    entries
        .iter()
        .map(|entry| parse::entry_addr(entry).map_err(|detail| con.reply_error(name, detail)))
        .collect()
}

/// Carries out one action.
pub async fn apply(action: &Action, config: &TopologyConfig) -> Result<(), TopologyError> {
    match action {
        Action::Promote { node } => {
            let mut con = Conn::open(node, config.password.as_deref(), config.call_timeout).await?;
            let _: () = con
                .query(
                    "REPLICAOF NO ONE",
                    redis::cmd("REPLICAOF").arg("NO").arg("ONE"),
                )
                .await?;
        }
        Action::ReplicaOf { node, master } => {
            let mut con = Conn::open(node, config.password.as_deref(), config.call_timeout).await?;
            if let Some(password) = &config.password {
                let _: () = con
                    .query(
                        "CONFIG SET masterauth",
                        redis::cmd("CONFIG")
                            .arg("SET")
                            .arg("masterauth")
                            .arg(password),
                    )
                    .await?;
            }
            let _: () = con
                .query(
                    "REPLICAOF",
                    redis::cmd("REPLICAOF").arg(&master.host).arg(master.port),
                )
                .await?;
        }
        Action::Monitor { sentinel, master } => {
            let mut con = sentinel_conn(sentinel, config).await?;
            monitor(&mut con, master, config).await?;
        }
        Action::Remonitor {
            sentinel, master, ..
        } => {
            let mut con = sentinel_conn(sentinel, config).await?;
            let _: () = con
                .query("SENTINEL REMOVE", &sentinel_cmd("REMOVE", config))
                .await?;
            monitor(&mut con, master, config).await?;
        }
        Action::Configure { sentinel } => {
            let mut con = sentinel_conn(sentinel, config).await?;
            set_options(&mut con, config).await?;
        }
        Action::Reset { sentinel } => {
            let mut con = sentinel_conn(sentinel, config).await?;
            // Answers the number of masters reset.
            let _: i64 = con
                .query("SENTINEL RESET", &sentinel_cmd("RESET", config))
                .await?;
        }
    }
    Ok(())
}

async fn sentinel_conn(addr: &NodeAddr, config: &TopologyConfig) -> Result<Conn, TopologyError> {
    Conn::open(
        addr,
        config.sentinel_password.as_deref(),
        config.call_timeout,
    )
    .await
}

async fn monitor(
    con: &mut Conn,
    master: &NodeAddr,
    config: &TopologyConfig,
) -> Result<(), TopologyError> {
    let mut cmd = sentinel_cmd("MONITOR", config);
    cmd.arg(&master.host).arg(master.port).arg(config.quorum);
    let _: () = con.query("SENTINEL MONITOR", &cmd).await?;
    set_options(con, config).await
}

/// `SENTINEL SET` with every configured option in one command (quorum is
/// included so a drifted quorum is fixed too).
async fn set_options(con: &mut Conn, config: &TopologyConfig) -> Result<(), TopologyError> {
    let mut cmd = sentinel_cmd("SET", config);
    cmd.arg("quorum").arg(config.quorum);
    if let Some(d) = config.down_after {
        cmd.arg("down-after-milliseconds")
            .arg(d.as_millis().to_string());
    }
    if let Some(d) = config.failover_timeout {
        cmd.arg("failover-timeout").arg(d.as_millis().to_string());
    }
    if let Some(password) = &config.password {
        cmd.arg("auth-pass").arg(password);
    }
    let _: () = con.query("SENTINEL SET", &cmd).await?;
    Ok(())
}
