//! Connecting to the master: a client for an address with the URL's
//! credentials, the command connection (role checked, scripts loaded, fence
//! taken) and the Pub/Sub connection. Where the master is comes from
//! `discovery`; what runs over the connections, from the
//! other modules.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

use super::error::{Error, bounded};
use super::options::RedisOptions;
use super::scripts;
use super::url::{Addr, RedisUrl};
use crate::broker::new_epoch;

/// The current master as publishes and reads see it: its address, the
/// command connection, and the fence its writes carry (pubsub mode; `""`
/// with history). One value, so that a publish never pairs one master's
/// connection with another's fence.
#[derive(Clone)]
pub(super) struct Master {
    pub addr: Addr,
    pub conn: MultiplexedConnection,
    pub fence: Arc<str>,
}

/// A client for `addr` with the URL's database and credentials.
pub(super) fn client(url: &RedisUrl, addr: &Addr) -> Result<redis::Client, Error> {
    client_with(addr, settings(url))
}

/// The URL's database and credentials.
fn settings(url: &RedisUrl) -> RedisConnectionInfo {
    let mut settings = RedisConnectionInfo::default().set_db(url.db);
    if let Some(user) = &url.username {
        settings = settings.set_username(user);
    }
    if let Some(pw) = &url.password {
        settings = settings.set_password(pw);
    }
    settings
}

/// A client for `addr` with these settings (database, credentials, protocol).
pub(super) fn client_with(
    addr: &Addr,
    settings: RedisConnectionInfo,
) -> Result<redis::Client, Error> {
    let connect_error = |source| Error::Connect {
        addr: addr.clone(),
        source,
    };
    let info = ConnectionAddr::Tcp(addr.host.clone(), addr.port)
        .into_connection_info()
        .map_err(connect_error)?
        .set_redis_settings(settings);
    redis::Client::open(info).map_err(connect_error)
}

/// Connecting and every answer bounded by `limit`.
pub(super) fn config(limit: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(limit))
        .set_response_timeout(Some(limit))
}

/// Connects to `addr`, checks that it is a master, loads the scripts and
/// (pubsub mode) takes its fence. Returns the client too, for the Pub/Sub
/// connection.
pub(super) async fn open_master(
    opts: &RedisOptions,
    addr: &Addr,
) -> Result<(Master, redis::Client), Error> {
    let limit = opts.op_timeout;
    let client = client(&opts.url, addr)?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config(limit))
        .await
        .map_err(|source| Error::Connect {
            addr: addr.clone(),
            source,
        })?;
    if !is_master(&mut conn, addr, limit).await? {
        return Err(Error::NotMaster(addr.clone()));
    }
    for script in [
        &*scripts::PUBLISH,
        &*scripts::POSITION,
        &*scripts::EPOCH_CHECK,
    ] {
        bounded(addr, "SCRIPT LOAD", limit, script.load_async(&mut conn)).await?;
    }
    let fence = if opts.history.is_some() {
        // History mode keeps epochs across failovers when nothing was lost
        // (each node checks the offsets it saw: `history::check_epochs`).
        Arc::from("")
    } else if opts.keys() == scripts::Keyspace::Tagged {
        process_fence(&mut conn, addr, limit).await?
    } else {
        fence(&mut conn, addr, limit).await?
    };
    let master = Master {
        addr: addr.clone(),
        conn,
        fence,
    };
    Ok((master, client))
}

/// The Pub/Sub connection, split: the sink to (un)subscribe, the stream the
/// reader reads.
pub(super) async fn open_pubsub(
    client: &redis::Client,
    addr: &Addr,
    limit: Duration,
) -> Result<(PubSubSink, PubSubStream), Error> {
    let pubsub = bounded(addr, "pub/sub connect", limit, client.get_async_pubsub()).await?;
    Ok(pubsub.split())
}

/// A RESP3 connection to `addr` whose pushes (sharded Pub/Sub messages,
/// subscription confirmations, a `SUNSUBSCRIBE` the server sends by itself)
/// go to `pushes`, with the URL's credentials; connecting and every answer
/// bounded by `limit`.
pub(super) async fn open_push(
    url: &RedisUrl,
    addr: &Addr,
    limit: Duration,
    pushes: impl redis::aio::AsyncPushSender,
) -> Result<MultiplexedConnection, Error> {
    let settings = settings(url).set_protocol(redis::ProtocolVersion::RESP3);
    let connected = client_with(addr, settings)?
        .get_multiplexed_async_connection_with_config(&config(limit).set_push_sender(pushes))
        .await;
    connected.map_err(|source| Error::Connect {
        addr: addr.clone(),
        source,
    })
}

/// Whether the connection reaches a master (`ROLE`).
pub(super) async fn is_master(
    conn: &mut MultiplexedConnection,
    addr: &Addr,
    limit: Duration,
) -> Result<bool, Error> {
    let role: redis::Value =
        bounded(addr, "ROLE", limit, redis::cmd("ROLE").query_async(conn)).await?;
    Ok(role_is_master(&role))
}

/// The publisher saw an error: does the connection still answer, and does
/// it still reach a master? (A `READONLY` reply means it was demoted.)
pub(super) async fn check_master(master: &mut Master, limit: Duration) -> Result<(), Error> {
    bounded(
        &master.addr,
        "PING",
        limit,
        redis::cmd("PING").query_async::<String>(&mut master.conn),
    )
    .await?;
    match is_master(&mut master.conn, &master.addr, limit).await {
        Ok(false) => Err(Error::NotMaster(master.addr.clone())),
        // It answered PING: a failed ROLE alone does not end the link.
        _ => Ok(()),
    }
}

fn role_is_master(role: &redis::Value) -> bool {
    match role {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(b)) => b == b"master",
            Some(redis::Value::SimpleString(s)) => s == "master",
            _ => false,
        },
        _ => false,
    }
}

/// The fence of the master this connection reaches (see `scripts::FENCE`).
async fn fence(
    conn: &mut MultiplexedConnection,
    addr: &Addr,
    limit: Duration,
) -> Result<Arc<str>, Error> {
    let info: String = bounded(
        addr,
        "INFO server",
        limit,
        redis::cmd("INFO").arg("server").query_async(&mut *conn),
    )
    .await?;
    let run_id = run_id(&info).ok_or_else(|| Error::NoRunId(addr.clone()))?;
    let token: String = bounded(
        addr,
        "fence script",
        limit,
        scripts::FENCE
            .key(scripts::FENCE_KEY)
            .arg(run_id)
            .arg(new_epoch())
            .invoke_async(&mut *conn),
    )
    .await?;
    Ok(token.into())
}

/// The fence of a Redis Cluster shard's master (pubsub mode): its `run_id`
/// and replication ID, read with `INFO`. A cluster has no key every node
/// would look up on the shard whatever its slots (a `chorus:fence` key lives
/// in one slot of one shard), so the fence is what the master process says
/// of itself: a restart changes its `run_id`, and a replica promoted by a
/// failover — or a demoted master promoted again — changes its replication
/// ID, so every case `scripts::FENCE` tells apart is told apart here too,
/// and all nodes read the same value from the same process.
async fn process_fence(
    conn: &mut MultiplexedConnection,
    addr: &Addr,
    limit: Duration,
) -> Result<Arc<str>, Error> {
    let mut fence = String::new();
    for (section, field) in [("server", "run_id:"), ("replication", "master_replid:")] {
        let info: String = bounded(
            addr,
            "INFO",
            limit,
            redis::cmd("INFO").arg(section).query_async(&mut *conn),
        )
        .await?;
        let value = info_field(&info, field).ok_or_else(|| Error::NoRunId(addr.clone()))?;
        if !fence.is_empty() {
            fence.push(':');
        }
        fence.push_str(value);
    }
    Ok(fence.into())
}

/// The `run_id` line of `INFO server`.
fn run_id(info: &str) -> Option<&str> {
    info_field(info, "run_id:")
}

/// A `field:value` line of an `INFO` reply (`field` with its colon).
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(str::trim)
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_is_told_by_its_role_and_run_id() {
        let role = |first: &str| {
            redis::Value::Array(vec![
                redis::Value::BulkString(first.as_bytes().to_vec()),
                redis::Value::Int(0),
            ])
        };
        assert!(role_is_master(&role("master")));
        assert!(!role_is_master(&role("slave")));
        assert!(!role_is_master(&redis::Value::Nil));
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:0f3e9c\r\ntcp_port:6379\r\n";
        assert_eq!(run_id(info), Some("0f3e9c"));
        assert_eq!(run_id("# Server\r\nrun_id:\r\n"), None);
    }
}
