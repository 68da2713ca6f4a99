//! The publisher: takes publishes in call order from a bounded queue, sends
//! whatever is waiting as one pipeline of `EVALSHA` (one round trip, order
//! kept) on the master's command connection, and answers each caller.
//! Errors that say the link may be broken (`READONLY`, I/O) wake the link
//! to check it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

use super::Shared;
use super::connection::Master;
use super::error::Error;
use super::scripts;
use crate::broker::{BrokerError, PublishRequest, Published, new_epoch, now_us};
use crate::protocol::message_parts;

/// Publishes waiting for the publisher task; more are refused (`Overloaded`).
pub(super) const QUEUE: usize = 16 * 1024;
/// Publishes sent in one pipeline at most.
const MAX_PIPELINE: usize = 512;

pub(super) struct PublishCmd {
    pub req: PublishRequest,
    pub reply: oneshot::Sender<Result<Published, BrokerError>>,
}

pub(super) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<PublishCmd>) {
    let conn_rx = shared.conn.subscribe();
    let mut batch: Vec<PublishCmd> = Vec::with_capacity(MAX_PIPELINE);
    while rx.recv_many(&mut batch, MAX_PIPELINE).await > 0 {
        let master = conn_rx.borrow().clone();
        let Some(master) = master else {
            for cmd in batch.drain(..) {
                let _ = cmd.reply.send(Err(Error::NotConnected.into()));
            }
            continue;
        };
        send_batch(&shared, master, &mut batch).await;
    }
}

/// Sends one pipeline and answers its callers.
async fn send_batch(
    shared: &Shared,
    Master {
        addr,
        mut conn,
        fence,
    }: Master,
    batch: &mut Vec<PublishCmd>,
) {
    let opts = &shared.opts;
    let limit = opts.op_timeout;
    let ts = now_us().to_string();
    // Arguments of each script call, kept for a retry with EVAL.
    let calls: Vec<(Vec<String>, Vec<String>)> = batch
        .iter()
        .map(|cmd| script_call(shared, &cmd.req, &ts, &fence))
        .collect();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (keys, args) in &calls {
        pipe.cmd("EVALSHA")
            .arg(scripts::PUBLISH.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
    }
    let outcome = timeout(
        limit,
        pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn),
    )
    .await;
    let results = match outcome {
        Ok(Ok(results)) => results,
        // The pipeline was (maybe partly) sent: Redis may have run any of
        // its scripts.
        Ok(Err(e)) => {
            shared.trouble.notify_one();
            for cmd in batch.drain(..) {
                let _ = cmd.reply.send(Err(BrokerError::OutcomeUnknown(format!(
                    "the link to {addr} failed with the publish in flight: {e}"
                ))));
            }
            return;
        }
        Err(_) => {
            shared.trouble.notify_one();
            for cmd in batch.drain(..) {
                let _ = cmd.reply.send(Err(unanswered(limit)));
            }
            return;
        }
    };
    for ((cmd, res), (keys, args)) in batch.drain(..).zip(results).zip(calls) {
        let res = match res {
            // The script cache was flushed under us: EVAL loads it again
            // (one call at a time, so the order is kept).
            Err(e) if e.code() == Some("NOSCRIPT") => {
                let mut inv = scripts::PUBLISH.prepare_invoke();
                for k in keys {
                    inv.key(k);
                }
                for a in args {
                    inv.arg(a);
                }
                match timeout(limit, inv.invoke_async::<redis::Value>(&mut conn)).await {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = cmd.reply.send(Err(unanswered(limit)));
                        continue;
                    }
                }
            }
            other => other,
        };
        let reply = match res
            .and_then(|v| redis::from_redis_value::<(u64, String, u8)>(v).map_err(Into::into))
        {
            Ok((offset, epoch, duplicate)) => {
                let epoch: Arc<str> = epoch.into();
                if let Some((_, acked)) = &shared.history {
                    acked.note(&cmd.req.room, &epoch, offset);
                }
                Ok(Published {
                    offset,
                    epoch,
                    duplicate: duplicate == 1,
                })
            }
            Err(source) => {
                if source.code() == Some("READONLY")
                    || source.is_io_error()
                    || source.is_connection_dropped()
                {
                    shared.trouble.notify_one();
                }
                Err(Error::Command {
                    command: "publish script",
                    addr: addr.clone(),
                    source,
                }
                .into())
            }
        };
        let _ = cmd.reply.send(reply);
    }
}

/// The keys and arguments of one publish script call (see `scripts::PUBLISH`).
fn script_call(
    shared: &Shared,
    req: &PublishRequest,
    ts: &str,
    fence: &str,
) -> (Vec<String>, Vec<String>) {
    let opts = &shared.opts;
    let room = req.room.as_str();
    let (head, tail) = message_parts(room, &req.data, req.from.as_deref());
    let upstream = req.from.is_some() && opts.upstream.as_ref().is_some_and(|u| u.wants(room));
    let keys = vec![
        scripts::room_key(room),
        opts.history_key(room),
        req.key
            .as_deref()
            .map(|k| scripts::idempotency_key(room, k))
            .unwrap_or_default(),
        if upstream {
            scripts::upstream_key(room)
        } else {
            String::new()
        },
    ];
    let args = vec![
        scripts::room_channel(room),
        head,
        tail,
        ts.to_string(),
        new_epoch(),
        opts.ttl_secs().to_string(),
        opts.history
            .as_ref()
            .map_or(0, |h| h.size.max(1))
            .to_string(),
        opts.idempotency_window.as_secs().max(1).to_string(),
        opts.upstream
            .as_ref()
            .map_or(0, |u| u.maxlen.max(1))
            .to_string(),
        if upstream {
            req.data.get().to_string()
        } else {
            String::new()
        },
        req.from.as_deref().unwrap_or("").to_string(),
        fence.to_string(),
    ];
    (keys, args)
}

/// A publish sent to Redis whose answer did not come within `limit`.
pub(super) fn unanswered(limit: Duration) -> BrokerError {
    BrokerError::OutcomeUnknown(format!("no answer from Redis within {limit:?}"))
}
