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
use super::history::Acked;
use super::options::RedisOptions;
use super::scripts;
use crate::broker::{BrokerError, PublishRequest, Published, new_epoch, now_us};
use crate::protocol::message_parts;

/// Publishes waiting for the publisher task; more are refused (`Overloaded`).
pub(super) const QUEUE: usize = 16 * 1024;
/// Publishes sent in one pipeline at most.
pub(super) const MAX_PIPELINE: usize = 512;

pub(super) struct PublishCmd {
    pub req: PublishRequest,
    pub reply: oneshot::Sender<Result<Published, BrokerError>>,
    /// Publishers it was handed to so far (a Redis Cluster sends a publish
    /// on when its slot moved).
    pub hops: u8,
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
async fn send_batch(shared: &Shared, mut master: Master, batch: &mut Vec<PublishCmd>) {
    let limit = shared.opts.op_timeout;
    let results = match send_pipeline(&shared.opts, &mut master, batch).await {
        Ok(results) => results,
        Err(unknown) => {
            shared.trouble.notify_one();
            for cmd in batch.drain(..) {
                let _ = cmd.reply.send(Err(unknown.clone()));
            }
            return;
        }
    };
    for (cmd, res) in batch.drain(..).zip(results) {
        let reply = match res {
            Some(res) => answer(
                shared.history.as_ref().map(|(_, a)| a),
                &master,
                &cmd,
                res,
                || shared.trouble.notify_one(),
            ),
            None => Err(unanswered(limit)),
        };
        let _ = cmd.reply.send(reply);
    }
}

/// One publish script's reply: what was assigned.
pub(super) type Reply = redis::RedisResult<(u64, String, u8)>;

/// Sends `batch` as one pipeline of `EVALSHA` on the master's connection
/// (a call whose script the master lost is run again with `EVAL`, one at a
/// time, so the order is kept) and returns each call's reply — `None` for
/// one that got no answer in time. `Err`: the pipeline as a whole got no
/// answer (or its link broke), so Redis may have run any of its scripts.
pub(super) async fn send_pipeline(
    opts: &RedisOptions,
    master: &mut Master,
    batch: &[PublishCmd],
) -> Result<Vec<Option<Reply>>, BrokerError> {
    let limit = opts.op_timeout;
    let ts = now_us().to_string();
    // Arguments of each script call, kept for a retry with EVAL.
    let calls: Vec<(Vec<String>, Vec<String>)> = batch
        .iter()
        .map(|cmd| script_call(opts, &cmd.req, &ts, &master.fence))
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
        pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut master.conn),
    )
    .await;
    let results = match outcome {
        Ok(Ok(results)) => results,
        // The pipeline was (maybe partly) sent: Redis may have run any of
        // its scripts.
        Ok(Err(e)) => {
            return Err(BrokerError::OutcomeUnknown(format!(
                "the link to {} failed with the publish in flight: {e}",
                master.addr
            )));
        }
        Err(_) => return Err(unanswered(limit)),
    };
    let mut replies = Vec::with_capacity(results.len());
    for (res, (keys, args)) in results.into_iter().zip(calls) {
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
                match timeout(limit, inv.invoke_async::<redis::Value>(&mut master.conn)).await {
                    Ok(r) => r,
                    Err(_) => {
                        replies.push(None);
                        continue;
                    }
                }
            }
            other => other,
        };
        replies.push(Some(res.and_then(|v| {
            redis::from_redis_value::<(u64, String, u8)>(v).map_err(Into::into)
        })));
    }
    Ok(replies)
}

/// The caller's answer for one script reply: what was assigned (noted as
/// acknowledged in history mode), or the error; `trouble` is called for an
/// error that says the link may be broken (`READONLY`, I/O).
pub(super) fn answer(
    acked: Option<&Acked>,
    master: &Master,
    cmd: &PublishCmd,
    reply: Reply,
    trouble: impl FnOnce(),
) -> Result<Published, BrokerError> {
    match reply {
        Ok((offset, epoch, duplicate)) => {
            let epoch: Arc<str> = epoch.into();
            if let Some(acked) = acked {
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
                trouble();
            }
            Err(Error::Command {
                command: "publish script",
                addr: master.addr.clone(),
                source,
            }
            .into())
        }
    }
}

/// The keys and arguments of one publish script call (see `scripts::PUBLISH`).
pub(super) fn script_call(
    opts: &RedisOptions,
    req: &PublishRequest,
    ts: &str,
    fence: &str,
) -> (Vec<String>, Vec<String>) {
    let keys_of = opts.keys();
    let room = req.room.as_str();
    let (head, tail) = message_parts(room, &req.data, req.from.as_deref());
    let upstream = req.from.is_some() && opts.upstream.as_ref().is_some_and(|u| u.wants(room));
    let keys = vec![
        keys_of.room_key(room),
        opts.history_key(room),
        req.key
            .as_deref()
            .map(|k| keys_of.idempotency_key(room, k))
            .unwrap_or_else(|| keys_of.unused(room)),
        if upstream {
            keys_of.upstream_key(room)
        } else {
            keys_of.unused(room)
        },
    ];
    let args = vec![
        keys_of.room_channel(room),
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
        keys_of.publish_command().to_string(),
    ];
    (keys, args)
}

/// A publish sent to Redis whose answer did not come within `limit`.
pub(super) fn unanswered(limit: Duration) -> BrokerError {
    BrokerError::OutcomeUnknown(format!("no answer from Redis within {limit:?}"))
}
