//! The transactional outbox relay (`--outbox`): backends insert messages
//! into a PostgreSQL table inside the transaction that makes their business
//! change; the relay publishes each one to its room once that transaction
//! has committed, never one that rolled back, and within a room in the
//! order the transactions committed.
//!
//! - [`schema`]: the table, its commit trigger (`server/sql/outbox.sql`)
//!   and the relay's statements
//! - [`relay`]: the loop: connect, LISTEN, rounds over the partitions of
//!   rooms, reconnect with backoff
//! - [`publish`]: one batch through [`Node::publish`] (the HTTP API's
//!   path), in order within each room
//!
//! **Commit order.** Ids (and `xid`s) are handed out when rows are
//! inserted, not when their transactions commit, so neither orders
//! messages by commit. The commit trigger, which runs at commit, stamps a
//! transaction's rows with the next `commit_seq` while holding a
//! transaction-level advisory lock on each of its rooms; the lock is
//! released only once the commit is visible. So within a room a higher
//! `commit_seq` is never visible while a lower one is still committing:
//! the relay publishes a room's visible rows in `commit_seq` order and
//! never skips a transaction that commits late. The cost falls on
//! backends: commits touching the same room take turns (the lock is held
//! from the stamp to the end of the commit's WAL flush); other rooms
//! commit in parallel, unless the trigger's wake-up `NOTIFY` is on (the
//! default): PostgreSQL serialises the commits of all notifying
//! transactions of a database, so `chorus.outbox_notify = off` trades that
//! for polling. The README's "Transactional outbox" section weighs this
//! against an xmin-horizon relay and logical decoding, with figures.
//!
//! **Several relays** (one per node) share 64 partitions of rooms: a relay
//! works on a partition inside a transaction that holds the partition's
//! advisory lock (others skip it), publishes a batch, deletes it and
//! commits. A relay that dies mid-way leaves its transaction to roll back:
//! the rows stay, the next relay publishes them again with the same
//! idempotency key (the row's `key`, else one made of the table's oid and
//! the row's id), and the broker delivers each key once per
//! `--idempotency-window`.
//!
//! [`Node::publish`]: crate::Node::publish

pub mod publish;
pub mod relay;
pub mod schema;

use std::time::Duration;

use crate::config::{Config, OutboxTable, read_secret};

pub use relay::spawn;

/// What the relay needs from the configuration.
#[derive(Clone)]
pub struct OutboxOptions {
    /// The DSN, password included (never logged: see [`OutboxOptions::redacted_dsn`]).
    dsn: String,
    pub table: OutboxTable,
    pub init: bool,
    pub batch: u32,
    pub poll_interval: Duration,
    /// Largest `data` published, in bytes of JSON (`--max-frame-bytes`,
    /// as for the HTTP API); a larger row is rejected.
    pub max_data_bytes: usize,
}

impl std::fmt::Debug for OutboxOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxOptions")
            .field("dsn", &self.redacted_dsn())
            .field("table", &self.table)
            .field("init", &self.init)
            .field("batch", &self.batch)
            .field("poll_interval", &self.poll_interval)
            .field("max_data_bytes", &self.max_data_bytes)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("cannot read the outbox DSN from {path}: {source}")]
    DsnFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--outbox `{dsn}` is not a PostgreSQL connection string: {why}")]
    Dsn { dsn: String, why: String },
    #[error(
        "--outbox `{0}` asks for TLS (sslmode=require), which this build does not support yet: \
         reach PostgreSQL over a trusted network or a TLS sidecar"
    )]
    Tls(String),
}

impl OutboxOptions {
    /// The options from `--outbox` / `--outbox-dsn-file` and their
    /// companions; `None` when the outbox is off.
    pub fn from_config(config: &Config) -> Result<Option<Self>, OptionsError> {
        let dsn = match (&config.outbox, &config.outbox_dsn_file) {
            (Some(dsn), _) => dsn.expose().to_owned(),
            (None, Some(path)) => read_secret(path).map_err(|source| OptionsError::DsnFile {
                path: path.display().to_string(),
                source,
            })?,
            (None, None) => return Ok(None),
        };
        let options = Self {
            dsn,
            table: config.outbox_table.clone(),
            init: config.outbox_init,
            batch: config.outbox_batch,
            poll_interval: config.outbox_poll_interval,
            max_data_bytes: config.max_frame_bytes as usize,
        };
        let pg = options.pg_config()?;
        if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(OptionsError::Tls(options.redacted_dsn()));
        }
        Ok(Some(options))
    }

    /// The DSN without its password, for logs and errors.
    pub fn redacted_dsn(&self) -> String {
        crate::secret::redact_dsn(&self.dsn)
    }

    /// The client configuration: the DSN, with a connect timeout, TCP
    /// keepalives and an application name unless it sets them.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, OptionsError> {
        let mut pg: tokio_postgres::Config =
            self.dsn
                .parse()
                .map_err(|e: tokio_postgres::Error| OptionsError::Dsn {
                    dsn: self.redacted_dsn(),
                    why: e.to_string(),
                })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(CONNECT_TIMEOUT);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("chorus-server outbox relay");
        }
        if pg.get_keepalives_idle() == LIBPQ_KEEPALIVE_IDLE {
            pg.keepalives(true).keepalives_idle(KEEPALIVE_IDLE);
        }
        Ok(pg)
    }
}

/// Bound on connecting, unless the DSN sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalives on the relay's connection: a dead peer is found in
/// about a minute rather than hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// The client's default `keepalives_idle` (two hours): a DSN that leaves it.
const LIBPQ_KEEPALIVE_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    fn options(args: &[&str]) -> Result<Option<OutboxOptions>, OptionsError> {
        let mut all = vec!["chorus-server"];
        all.extend_from_slice(args);
        OutboxOptions::from_config(&Config::try_parse_from(all).unwrap())
    }

    #[test]
    fn the_outbox_is_off_without_a_dsn() {
        assert!(options(&[]).unwrap().is_none());
    }

    #[test]
    fn the_dsn_comes_from_the_flag_or_a_file() {
        let o = options(&["--outbox", "postgres://relay:pw@db/app", "--outbox-init"])
            .unwrap()
            .unwrap();
        assert!(o.init);
        assert_eq!(o.table.to_string(), "chorus_outbox");
        assert_eq!((o.batch, o.poll_interval), (100, Duration::from_secs(1)));
        assert_eq!(o.pg_config().unwrap().get_dbname(), Some("app"));
        let debug = format!("{o:?}");
        assert!(!debug.contains("pw@"), "{debug}");

        let dir = tempfile_dir();
        let file = dir.join("dsn");
        std::fs::write(&file, "host=db user=relay password=pw2 dbname=app\n").unwrap();
        let o = options(&["--outbox-dsn-file", file.to_str().unwrap()])
            .unwrap()
            .unwrap();
        assert_eq!(o.pg_config().unwrap().get_password(), Some(&b"pw2"[..]));
        assert!(!format!("{o:?}").contains("pw2"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_dsns_and_tables_are_refused_without_showing_the_password() {
        let err = options(&["--outbox", "host=db password=pw3 port=notaport"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("port") && !err.contains("pw3"), "{err}");
        let err = options(&["--outbox", "postgres://u:pw4@db/app?sslmode=require"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TLS") && !err.contains("pw4"), "{err}");
        for bad in ["", "Outbox", "1table", "a.b.c", "x;drop", "app."] {
            assert!(
                Config::try_parse_from(["chorus-server", "--outbox-table", bad]).is_err(),
                "{bad} accepted"
            );
        }
        let t = OutboxTable::parse("app.events_out").unwrap();
        assert_eq!(
            (t.schema.as_deref(), t.name.as_str()),
            (Some("app"), "events_out")
        );
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("chorus-outbox-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
