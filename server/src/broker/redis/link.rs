//! The link: one connection set to the current master, and its lifecycle.
//! The supervisor connects to where `discovery` says the
//! master is (command connection, Pub/Sub connection, every wanted room
//! subscribed, and in history mode the epoch check), starts the
//! `reader`, then watches the link — the reader ending,
//! the canary not coming back, the publisher's errors, the master moving —
//! while it keeps the subscriptions up to date. On trouble it marks the
//! broker down, stops the reader and its fills, and reconnects with jittered
//! backoff.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;

use super::Shared;
use super::canary::{self, Canary};
use super::connection::{self, Master};
use super::discovery::Located;
use super::error::{Error, bounded};
use super::history;
use super::reader::Reader;
use super::subscriptions::Subscribed;
use crate::broker::Health;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One established link to the current master.
struct Link {
    master: Master,
    subscribed: Subscribed,
    /// The reader task (one), aborted with its fills if the link is dropped.
    reader: JoinSet<Option<Error>>,
    stop: Arc<Notify>,
    canary_seen: watch::Receiver<u64>,
}

pub(super) async fn supervise(shared: Arc<Shared>) {
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    let mut located = shared.discovery.subscribe();
    loop {
        let why = match connect(&shared, &mut located).await {
            Ok(link) => {
                backoff = BACKOFF_MIN;
                if !first {
                    shared.metrics.broker_reconnects.inc();
                }
                first = false;
                let master = link.master.addr.clone();
                tracing::info!(%master, rooms = link.subscribed.active.len(), "redis link up");
                let why = run(&shared, link, &mut located).await;
                tracing::warn!(%master, reason = %why, "redis link lost; reconnecting");
                why
            }
            Err(why) => {
                tracing::warn!(reason = %why, retry_in_ms = backoff.as_millis() as u64, "cannot connect to redis");
                why
            }
        };
        shared.conn.send_replace(None);
        shared.health.send_replace(Health::Down(why.to_string()));
        if let Some((tracker, _)) = &shared.history {
            // No fill runs now (the reader stopped them, or never started).
            tracker.stop_fills();
        }
        shared.subscriptions.fail_waiters(&why);
        // Whatever failed, the master may have moved.
        shared.discovery.recheck();
        // Jitter: sleep between half and the whole backoff.
        let sleep = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        // A failover that completes meanwhile cuts the wait short.
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            _ = located.changed() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Connects to the master, subscribes the canary and every wanted room,
/// (history mode) checks epochs, starts the reader and marks the broker up.
async fn connect(
    shared: &Arc<Shared>,
    located: &mut watch::Receiver<Located>,
) -> Result<Link, Error> {
    let addr = located.borrow_and_update().clone()?;
    let limit = shared.opts.op_timeout;
    let (mut master, client) = connection::open_master(&shared.opts, &addr).await?;
    let (mut sink, stream) = connection::open_pubsub(&client, &addr, limit).await?;
    bounded(
        &addr,
        "canary SUBSCRIBE",
        limit,
        sink.subscribe(&shared.canary_channel),
    )
    .await?;
    let mut subscribed = Subscribed {
        sink,
        active: HashSet::new(),
    };
    let tracker = shared.history.as_ref().map(|(t, _)| &**t);
    shared
        .subscriptions
        .reconcile(&mut subscribed, &master, tracker, limit)
        .await?;
    let fills = match &shared.history {
        Some((tracker, acked)) => {
            // Rooms left while the link was down are no longer tracked.
            tracker.retain(|room| subscribed.active.contains(room));
            let keys = shared.opts.keys();
            let metrics = &shared.metrics;
            history::check_epochs(&mut master, keys, tracker, acked, metrics, limit, |_| true)
                .await?
                .fills
        }
        None => Vec::new(),
    };
    let (canary, canary_seen) = watch::channel(0);
    let stop = Arc::new(Notify::new());
    let reader = Reader {
        stream,
        master: addr,
        deliver: shared.deliver.clone(),
        history: shared
            .history
            .as_ref()
            .map(|(tracker, _)| (tracker.clone(), history::pages(&master, limit))),
        canary_channel: shared.canary_channel.clone(),
        canary,
        stop: stop.clone(),
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(reader.run(fills));
    shared.conn.send_replace(Some(master.clone()));
    shared.health.send_replace(Health::Up);
    Ok(Link {
        master,
        subscribed,
        reader: tasks,
        stop,
        canary_seen,
    })
}

/// Runs an established link until it fails; returns why, once its reader
/// and fills have stopped.
async fn run(
    shared: &Arc<Shared>,
    mut link: Link,
    located: &mut watch::Receiver<Located>,
) -> Error {
    let why = watch_link(shared, &mut link, located).await;
    link.stop.notify_one();
    while link.reader.join_next().await.is_some() {}
    why
}

async fn watch_link(
    shared: &Arc<Shared>,
    link: &mut Link,
    located: &mut watch::Receiver<Located>,
) -> Error {
    let opts = &shared.opts;
    let mut canary_tick = tokio::time::interval(opts.canary_interval);
    canary_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut canary = Canary::default();
    let (canary_err_tx, mut canary_err_rx) = mpsc::channel::<Error>(1);
    let tracker = shared.history.as_ref().map(|(t, _)| &**t);
    loop {
        tokio::select! {
            done = link.reader.join_next() => {
                return match done {
                    Some(Ok(Some(why))) => why,
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "the pub/sub reader panicked");
                        Error::SubscriptionClosed(link.master.addr.clone())
                    }
                    _ => Error::SubscriptionClosed(link.master.addr.clone()),
                };
            }
            () = shared.subscriptions.changed() => {
                if let Err(e) = shared.subscriptions.reconcile(&mut link.subscribed, &link.master, tracker, opts.op_timeout).await {
                    return e;
                }
            }
            () = shared.trouble.notified() => {
                if let Err(e) = connection::check_master(&mut link.master, opts.op_timeout).await {
                    return e;
                }
            }
            Ok(()) = link.canary_seen.changed() => {
                canary.seen(*link.canary_seen.borrow_and_update(), &shared.metrics);
            }
            _ = canary_tick.tick() => match canary.tick(opts.canary_timeout) {
                Err(lost) => return lost,
                Ok(Some(seq)) => {
                    let errors = canary_err_tx.clone();
                    let channel = &shared.canary_channel;
                    canary::send(&link.master, "PUBLISH", channel, seq, opts.op_timeout, errors);
                }
                Ok(None) => {}
            },
            Some(err) = canary_err_rx.recv() => return err,
            Ok(()) = located.changed() => {
                if let Ok(now) = &*located.borrow_and_update()
                    && *now != link.master.addr
                {
                    return Error::MasterMoved { from: link.master.addr.clone(), to: now.clone() };
                }
            }
        }
    }
}
