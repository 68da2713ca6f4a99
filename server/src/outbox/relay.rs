//! The relay loop of one node.
//!
//! A session is one PostgreSQL connection: connect, create the table if
//! asked (`--outbox-init`), find the table and its commit trigger, `LISTEN`
//! on the trigger's channel, then rounds until the connection fails or the
//! node goes (drained or dropped). A failed session is retried with
//! jittered backoff (100 ms doubling to 5 s); `chorus_outbox_up` says
//! whether one is connected.
//!
//! A round: one query counts every partition's waiting rows (the pending
//! and lag metrics), then each partition with rows, in an order that
//! differs between relays, is taken in a transaction of its own: the
//! partition's advisory lock (held by another relay: skipped), its next
//! `--outbox-batch` rows in commit order, published, deleted, committed.
//! The next round starts at once when rows were relayed (until a round
//! finds none), else on a notification or after `--outbox-poll-interval`,
//! whichever comes first.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls, Socket, Statement};

use super::OutboxOptions;
use super::publish::{OutboxRow, publish_batch};
use super::schema::{self, Names};
use crate::metrics::Metrics;
use crate::node::Node;

/// Bound on one round's work (queries, publishes, commit): a round that
/// takes longer is given up and the connection made again.
const ROUND_LIMIT: Duration = Duration::from_secs(30);
/// Bound on preparing a session (migration included).
const SETUP_LIMIT: Duration = Duration::from_secs(30);
/// Backoff between failed sessions.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{what} took longer than {limit:?}")]
    Timeout { what: &'static str, limit: Duration },
    #[error(
        "table {0} does not exist: start with --outbox-init, or create it with server/sql/outbox.sql"
    )]
    NoTable(String),
    #[error(
        "table {table} has no commit trigger {trigger}: without it nothing is relayed in commit order; \
         start with --outbox-init, or create it with server/sql/outbox.sql"
    )]
    NoTrigger { table: String, trigger: String },
    #[error("the connection to PostgreSQL closed")]
    Closed,
}

/// Starts the relay of `node`. It holds the node weakly and stops when
/// the node is dropped or starts draining.
pub fn spawn(node: &Arc<Node>, options: OutboxOptions) -> JoinHandle<()> {
    let relay = Relay {
        node: Arc::downgrade(node),
        metrics: node.metrics.clone(),
        names: Names::new(&options.table),
        options,
    };
    tokio::spawn(relay.run())
}

struct Relay {
    node: Weak<Node>,
    metrics: Arc<Metrics>,
    names: Names,
    options: OutboxOptions,
}

/// A session's prepared statements and what it found out about the table.
struct Session {
    client: Client,
    wake: mpsc::Receiver<()>,
    pending: Statement,
    lock: Statement,
    batch: Statement,
    delete: Statement,
    /// Rows without a key are published with `outbox:<table oid>:<id>`:
    /// ids start again in a new table, and its oid differs.
    key_prefix: String,
    oid: u32,
    /// Stops driving the connection when the session ends.
    _driver: AbortOnDrop,
}

/// How a round went.
enum Round {
    /// Nothing waited (as far as this relay could see).
    Idle,
    /// Rows were relayed: look again at once.
    Busy,
    /// A publish failed: wait before going again.
    Failed,
}

impl Relay {
    async fn run(self) {
        let mut delay = BACKOFF_MIN;
        let mut migrated = false;
        loop {
            let started = Instant::now();
            let result = self.session(&mut migrated).await;
            self.metrics.outbox_up.set(0);
            match result {
                Ok(()) => {
                    tracing::info!("outbox relay stopped");
                    return;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    dsn = %self.options.redacted_dsn(),
                    table = %self.names.table,
                    "outbox relay: PostgreSQL failed, connecting again"
                ),
            }
            if started.elapsed() > BACKOFF_MAX {
                delay = BACKOFF_MIN;
            }
            tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..1.0))).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life; `Ok` when the node is gone or draining.
    async fn session(&self, migrated: &mut bool) -> Result<(), RelayError> {
        let mut session = within(SETUP_LIMIT, "connecting", self.connect(migrated)).await?;
        self.metrics.outbox_up.set(1);
        tracing::info!(
            dsn = %self.options.redacted_dsn(),
            table = %self.names.table,
            "outbox relay connected"
        );
        let mut failures = Duration::ZERO;
        loop {
            let round = {
                let Some(node) = self.node.upgrade() else {
                    return Ok(());
                };
                if node.is_draining() {
                    return Ok(());
                }
                within(
                    ROUND_LIMIT,
                    "a relay round",
                    self.round(&mut session, &node),
                )
                .await?
            };
            let wait = match round {
                Round::Busy => {
                    failures = Duration::ZERO;
                    continue;
                }
                Round::Idle => {
                    failures = Duration::ZERO;
                    self.options.poll_interval
                }
                Round::Failed => {
                    failures = (failures * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                    tokio::time::sleep(failures).await;
                    continue;
                }
            };
            tokio::select! {
                woken = session.wake.recv() => if woken.is_none() {
                    return Err(RelayError::Closed);
                },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn connect(&self, migrated: &mut bool) -> Result<Session, RelayError> {
        let pg = self.options.pg_config().map_err(|e| {
            // Checked when the node started; cannot change since.
            tracing::error!(error = %e, "outbox DSN");
            RelayError::Closed
        })?;
        let (mut client, connection) = pg.connect(NoTls).await?;
        let (wake_tx, wake) = mpsc::channel(1);
        let driver = AbortOnDrop(tokio::spawn(drive(connection, wake_tx)));
        // A relay that vanished (killed, cut off) has its queries cancelled
        // and its transaction rolled back soon (PostgreSQL 14+; ignored before).
        let _ = client
            .batch_execute("SET client_connection_check_interval = '5s'")
            .await;
        if self.options.init && !*migrated {
            let tx = client.transaction().await?;
            tx.batch_execute(schema::MIGRATION_LOCK).await?;
            tx.batch_execute(&schema::migration(&self.options.table))
                .await?;
            tx.commit().await?;
            *migrated = true;
            tracing::info!(table = %self.names.table, "outbox table ready (--outbox-init)");
        }
        let table = &self.names.table;
        let found = client
            .query_opt(schema::RESOLVE, &[table, &self.names.trigger])
            .await?
            .ok_or_else(|| RelayError::NoTable(table.clone()))?;
        let (oid, namespace, has_trigger): (i64, String, bool) =
            (found.try_get(0)?, found.try_get(1)?, found.try_get(2)?);
        if !has_trigger {
            return Err(RelayError::NoTrigger {
                table: table.clone(),
                trigger: self.names.trigger.clone(),
            });
        }
        let oid = u32::try_from(oid).unwrap_or_default();
        let channel = schema::channel(&namespace, &self.options.table.name);
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await?;
        Ok(Session {
            pending: client.prepare(&schema::pending(table)).await?,
            lock: client.prepare(schema::LOCK_PARTITION).await?,
            batch: client.prepare(&schema::batch(table)).await?,
            delete: client.prepare(&schema::delete(table)).await?,
            client,
            wake,
            key_prefix: format!("outbox:{oid}:"),
            oid,
            _driver: driver,
        })
    }

    async fn round(&self, s: &mut Session, node: &Arc<Node>) -> Result<Round, RelayError> {
        let mut parts = Vec::new();
        let (mut pending, mut unstamped, mut lag) = (0i64, 0i64, 0f64);
        for row in s.client.query(&s.pending, &[]).await? {
            let (part, ready, orphans, age): (i16, i64, i64, f64) = (
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            );
            pending += ready;
            unstamped += orphans;
            if ready > 0 {
                parts.push(part);
                lag = lag.max(age);
            }
        }
        self.metrics.outbox_pending.set(pending);
        self.metrics.outbox_lag.set(lag);
        let mut round = Round::Idle;
        if unstamped > 0 {
            let table = &self.names.table;
            let n = s.client.execute(&schema::adopt(table), &[]).await?;
            tracing::warn!(
                rows = n,
                table = %table,
                "outbox rows committed without the commit trigger (triggers off?): stamped now, relayed from here"
            );
            round = Round::Busy;
        }
        // Relays start at different partitions, so they rarely meet.
        if !parts.is_empty() {
            let start = rand::random_range(0..parts.len());
            parts.rotate_left(start);
        }
        for part in parts {
            match self.partition(s, node, part).await? {
                Round::Idle => {}
                Round::Busy => round = Round::Busy,
                Round::Failed => return Ok(Round::Failed),
            }
        }
        Ok(round)
    }

    /// One batch of one partition, if no other relay holds it.
    async fn partition(
        &self,
        s: &mut Session,
        node: &Arc<Node>,
        part: i16,
    ) -> Result<Round, RelayError> {
        let batch = i64::from(self.options.batch);
        let tx = s.client.transaction().await?;
        let locked: bool = tx
            .query_one(&s.lock, &[&schema::partition_lock(s.oid, part)])
            .await?
            .try_get(0)?;
        if !locked {
            return Ok(Round::Idle);
        }
        let rows = tx
            .query(&s.batch, &[&part, &batch])
            .await?
            .iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get(0)?,
                    room: r.try_get(1)?,
                    data: r.try_get(2)?,
                    key: r.try_get(3)?,
                    age: r.try_get::<_, Option<f64>>(4)?.unwrap_or(0.0),
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
        let full = rows.len() as i64 == batch;
        let outcome = publish_batch(node, rows, &s.key_prefix, self.options.max_data_bytes).await;
        let done = outcome.done();
        if !done.is_empty() {
            tx.execute(&s.delete, &[&done]).await?;
        }
        tx.commit().await?;
        self.metrics
            .outbox_relayed
            .inc_by(outcome.published.len() as u64);
        self.metrics
            .outbox_rejected
            .inc_by(outcome.rejected.len() as u64);
        for latency in &outcome.latencies {
            self.metrics.outbox_latency.observe(*latency);
        }
        Ok(match outcome.failed {
            Some(e) => {
                tracing::debug!(error = %e, part, "outbox publish failed; the room's rest waits");
                Round::Failed
            }
            // Another look at once: more rows (a full batch), or fresh
            // pending and lag metrics after this one.
            None if full || !done.is_empty() => Round::Busy,
            None => Round::Idle,
        })
    }
}

/// Drives the connection, turning every notification into a wake-up;
/// ends (dropping `wake`) when the connection does.
async fn drive(mut connection: Connection<Socket, NoTlsStream>, wake: mpsc::Sender<()>) {
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(_))) => {
                // Full: a wake-up is already waiting, which covers this one.
                let _ = wake.try_send(());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "outbox connection ended");
                return;
            }
            None => return,
        }
    }
}

async fn within<T>(
    limit: Duration,
    what: &'static str,
    work: impl Future<Output = Result<T, RelayError>>,
) -> Result<T, RelayError> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(RelayError::Timeout { what, limit }))
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
