//! A shard's publisher: the one-Redis publisher's pipeline (publishes in
//! call order, one `EVALSHA` each, on the master's connection with its
//! fence), plus what a cluster answers while slots move:
//!
//! - `MOVED`: the script did not run; the slot is served elsewhere. The view
//!   is patched and the publish goes on to that master's publisher (at most
//!   a few times: past that, `unavailable`).
//! - `ASK` / `TRYAGAIN`: the script did not run; the room's keys are being
//!   migrated. The publish runs through the redis crate's cluster client,
//!   which sends `ASKING` to the importing master (or waits and retries),
//!   without a fence: the keys only just moved there, nothing was lost.
//!   Such publishes wait in a lane of their own (the shard's other rooms go
//!   on meanwhile) and run one at a time, so the room's later publishes,
//!   redirected the same way, keep their order. (A publish sent after the
//!   slot changed hands goes to the new master directly and may overtake
//!   one still in the lane.)
//! - `CLUSTERDOWN`: the script did not run: `unavailable`.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::timeout;

use super::Shared;
use super::topology::moved_to;
use crate::broker::BrokerError;
use crate::broker::now_us;
use crate::broker::redis::connection::Master;
use crate::broker::redis::error::Error;
use crate::broker::redis::publisher::{
    MAX_PIPELINE, PublishCmd, Reply, answer, script_call, send_pipeline, unanswered,
};
use crate::broker::redis::scripts;
use crate::broker::redis::url::Addr;

/// Redirected publishes waiting for their lane; more get `Overloaded`.
pub(super) const LANE: usize = 1024;

/// A publish a master answered `ASK` or `TRYAGAIN`, and that master.
pub(super) type Redirected = (PublishCmd, Master);

pub(super) async fn run(
    shared: Arc<Shared>,
    addr: Addr,
    mut rx: mpsc::Receiver<PublishCmd>,
    master: watch::Receiver<Option<Master>>,
    trouble: Arc<Notify>,
    lane: mpsc::Sender<Redirected>,
) {
    let limit = shared.opts.op_timeout;
    let acked = shared.history.as_ref().map(|(_, acked)| acked);
    let mut batch: Vec<PublishCmd> = Vec::with_capacity(MAX_PIPELINE);
    while rx.recv_many(&mut batch, MAX_PIPELINE).await > 0 {
        let Some(mut master) = master.borrow().clone() else {
            let why = Error::ShardDown {
                shard: addr.clone(),
                why: "not connected".into(),
            };
            for cmd in batch.drain(..) {
                let _ = cmd.reply.send(Err(why.clone().into()));
            }
            continue;
        };
        let results = match send_pipeline(&shared.opts, &mut master, &batch).await {
            Ok(results) => results,
            Err(unknown) => {
                trouble.notify_one();
                for cmd in batch.drain(..) {
                    let _ = cmd.reply.send(Err(unknown.clone()));
                }
                continue;
            }
        };
        for (cmd, res) in batch.drain(..).zip(results) {
            match res {
                None => {
                    let _ = cmd.reply.send(Err(unanswered(limit)));
                }
                Some(Err(e)) if moved_to(&e).is_some() => {
                    shared.view.moved(&e);
                    shared.route(cmd);
                }
                Some(Err(e)) if matches!(e.code(), Some("ASK" | "TRYAGAIN")) => {
                    if let Err(full) = lane.try_send((cmd, master.clone())) {
                        let (cmd, _) = full.into_inner();
                        let _ = cmd.reply.send(Err(BrokerError::Overloaded));
                    }
                }
                Some(Err(e)) if e.code() == Some("CLUSTERDOWN") => {
                    shared.view.refresh();
                    let _ = cmd.reply.send(Err(BrokerError::Unavailable(e.to_string())));
                }
                Some(res) => {
                    let reply = answer(acked, &master, &cmd, res, || trouble.notify_one());
                    let _ = cmd.reply.send(reply);
                }
            }
        }
    }
}

/// The shard's lane of redirected publishes: one at a time, in order.
pub(super) async fn lane(shared: Arc<Shared>, mut rx: mpsc::Receiver<Redirected>) {
    while let Some((cmd, master)) = rx.recv().await {
        redirected(&shared, master, cmd).await;
    }
}

/// A publish a master answered `ASK` or `TRYAGAIN`, through the cluster
/// client (which follows the redirect); its outcome is unknown past the
/// Redis timeout.
async fn redirected(shared: &Shared, master: Master, cmd: PublishCmd) {
    let limit = shared.opts.op_timeout;
    let Ok(mut cluster) = shared.cluster() else {
        let _ = cmd.reply.send(Err(Error::NotConnected.into()));
        return;
    };
    let (keys, args) = script_call(&shared.opts, &cmd.req, &now_us().to_string(), "");
    let mut inv = scripts::PUBLISH.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    for a in args {
        inv.arg(a);
    }
    let reply: Reply = match timeout(limit, inv.invoke_async(&mut cluster)).await {
        Ok(reply) => reply,
        Err(_) => {
            let _ = cmd.reply.send(Err(unanswered(limit)));
            return;
        }
    };
    let acked = shared.history.as_ref().map(|(_, acked)| acked);
    let reply = match reply {
        Err(e) if moved_to(&e).is_some() => {
            shared.view.moved(&e);
            shared.route(cmd);
            return;
        }
        other => answer(acked, &master, &cmd, other, || shared.view.refresh()),
    };
    let _ = cmd.reply.send(reply);
}
