//! What the transactional outbox's commit order costs (BENCHMARKS.md,
//! "Transactional outbox"), on a PostgreSQL of the test kit with `fsync`
//! on (a commit waits for its WAL flush, as in production):
//!
//! 1. backends: `--writers` concurrent connections, each committing
//!    transactions of one business row and one message for
//!    `--seconds`, into (a) a plain table of the same columns without the
//!    commit trigger (what an id-ordered outbox costs), (b) the outbox,
//!    every writer in its own room, (c) the outbox, every writer in the
//!    same room (commits take turns there), (d, e) the same two with
//!    `chorus.outbox_notify = off` (no NOTIFY, whose lock makes every
//!    notifying commit of the database take turns): commits per second and
//!    the `COMMIT`'s latency;
//! 2. the relay: one `chorus-server --outbox` (memory broker) and a
//!    subscriber; `--samples` transactions one after another, each timed
//!    from its `COMMIT` returning to the subscriber receiving it, woken by
//!    NOTIFY, then without NOTIFY polling every 50 ms.
//!
//! ```sh
//! cargo build --release -p chorus-server -p chorus-bench
//! target/release/outbox_cost --writers 8 --seconds 5
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chorus_bench::client;
use chorus_bench::hist::Histogram;
use chorus_bench::peers::Target;
use chorus_testkit::postgres::connect;
use chorus_testkit::{ChorusServer, Postgres, PostgresOptions};
use clap::Parser;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

const MIGRATION: &str = include_str!("../../../server/sql/outbox.sql");

#[derive(Parser)]
struct Args {
    /// Concurrent backend connections.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Seconds each backend case runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Transactions timed through the relay.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// The chorus-server binary.
    #[arg(long, default_value_os_t = chorus_bench::fleet::default_server_bin())]
    server_bin: std::path::PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let pg = Postgres::launch(PostgresOptions {
        settings: [("fsync", "on"), ("full_page_writes", "on")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
    })
    .await?;
    let db = connect(&pg.dsn()).await?;
    db.batch_execute(MIGRATION).await?;
    db.batch_execute(
        "CREATE TABLE business (id bigserial PRIMARY KEY, n bigint NOT NULL);
         CREATE TABLE plain_outbox (id bigserial PRIMARY KEY, room text NOT NULL,
             data jsonb NOT NULL, key text, created_at timestamptz NOT NULL DEFAULT clock_timestamp());",
    )
    .await?;
    println!(
        "backends: {} writers, {} s per case, fsync on",
        args.writers, args.seconds
    );
    println!("case                                  commits/s   COMMIT p50       p99");
    for case in [
        Case::new("plain table, no trigger", "plain_outbox", false, true),
        Case::new("outbox, a room per writer", "chorus_outbox", false, true),
        Case::new("outbox, one room", "chorus_outbox", true, true),
        Case::new(
            "outbox, a room per writer, no NOTIFY",
            "chorus_outbox",
            false,
            false,
        ),
        Case::new("outbox, one room, no NOTIFY", "chorus_outbox", true, false),
    ] {
        let (rate, commit) = backends(&pg, &args, &case).await?;
        println!(
            "{:<37} {rate:>9.0}   {:>7.2} ms   {:>7.2} ms",
            case.name,
            ms(commit.quantile(0.5)),
            ms(commit.quantile(0.99)),
        );
        db.batch_execute(&format!("TRUNCATE {}", case.table))
            .await?;
    }
    println!(
        "relay: COMMIT returned -> subscriber received, {} transactions one after another",
        args.samples
    );
    for (name, notify, poll) in [
        ("woken by NOTIFY", true, "1s"),
        ("no NOTIFY, --outbox-poll-interval 50ms", false, "50ms"),
    ] {
        let relay = relay(&pg, &args, notify, poll).await?;
        println!(
            "{name:<40} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
            ms(relay.quantile(0.5)),
            ms(relay.quantile(0.99)),
            ms(relay.max()),
        );
    }
    Ok(())
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// One backend case.
struct Case {
    name: &'static str,
    table: &'static str,
    /// Every writer in the same room (else a room each).
    same_room: bool,
    /// The commit trigger's NOTIFY (`chorus.outbox_notify`).
    notify: bool,
}

impl Case {
    fn new(name: &'static str, table: &'static str, same_room: bool, notify: bool) -> Self {
        Self {
            name,
            table,
            same_room,
            notify,
        }
    }
}

/// A connection to `pg`, with the commit trigger's NOTIFY on or off.
async fn session(pg: &Postgres, notify: bool) -> Result<tokio_postgres::Client> {
    let db = connect(&pg.dsn()).await?;
    if !notify {
        db.batch_execute("SET chorus.outbox_notify = off").await?;
    }
    Ok(db)
}

/// Commits per second and the `COMMIT` latencies (µs) of `--writers`
/// connections writing a business row and a message per transaction.
async fn backends(pg: &Postgres, args: &Args, case: &Case) -> Result<(f64, Histogram)> {
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let mut db = session(pg, case.notify).await?;
        let room = if case.same_room {
            "room".to_owned()
        } else {
            format!("room-{w}")
        };
        let insert = format!(
            "INSERT INTO {} (room, data) VALUES ($1, '{{\"n\": 1}}')",
            case.table
        );
        tasks.push(tokio::spawn(async move {
            let mut commits = Histogram::default();
            while Instant::now() < until {
                let tx = db.transaction().await?;
                tx.execute("INSERT INTO business (n) VALUES (1)", &[])
                    .await?;
                tx.execute(&insert, &[&room]).await?;
                let start = Instant::now();
                tx.commit().await?;
                commits.record(start.elapsed().as_micros() as u64);
            }
            anyhow::Ok(commits)
        }));
    }
    let mut all = Histogram::default();
    for task in tasks {
        all.merge(&task.await??);
    }
    Ok((all.count() as f64 / args.seconds as f64, all))
}

/// Time from a transaction's `COMMIT` returning to its message reaching a
/// subscriber, through a `chorus-server --outbox` relay (µs).
async fn relay(pg: &Postgres, args: &Args, notify: bool, poll: &str) -> Result<Histogram> {
    let dsn = pg.dsn();
    let server = ChorusServer::launch(
        &args.server_bin,
        &["--outbox", &dsn, "--outbox-poll-interval", poll],
        &[],
        Duration::from_secs(20),
    )
    .await
    .with_context(|| format!("start {}", args.server_bin.display()))?;
    let mut ws = client::connect(&server.ws_url(), Target::Chorus).await?;
    client::subscribe(&mut ws, "timed", Target::Chorus).await?;
    let mut db = session(pg, notify).await?;
    let mut latency = Histogram::default();
    for n in 0..args.samples {
        let tx = db.transaction().await?;
        tx.execute(
            "INSERT INTO chorus_outbox (room, data) VALUES ('timed', jsonb_build_object('n', $1::int8))",
            &[&(n as i64)],
        )
        .await?;
        tx.commit().await?;
        let committed = Instant::now();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .context("no message within 10 s")?
                .context("connection closed")??;
            if let Message::Text(text) = frame {
                let frame: serde_json::Value = serde_json::from_str(&text)?;
                if frame["op"] == "message" {
                    if frame["data"]["n"] == n {
                        break;
                    }
                    bail!("unexpected message {text}");
                }
            }
        }
        latency.record(committed.elapsed().as_micros() as u64);
    }
    Ok(latency)
}
