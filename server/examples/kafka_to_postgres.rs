//! A backend replica archiving client messages from the Kafka feed
//! (`--upstream-rooms` with `--upstream-kafka`) into PostgreSQL, in batches.
//!
//! Run as many replicas as you like with the same `--group`: Kafka gives
//! each a share of the topic's partitions (a room's records all go to one
//! of them). Each batch is written in one transaction,
//! `INSERT … ON CONFLICT DO NOTHING` on the primary key
//! `(room, epoch, "offset")`, and the batch's Kafka offsets are committed
//! only after that transaction committed. A replica that dies between the
//! two leaves its batch uncommitted in Kafka: whoever reads the partition
//! next writes it again, and the key keeps every message in the table once.
//!
//! ```sh
//! chorus-server --upstream-rooms 'chat:*' --upstream-kafka kafka://127.0.0.1:9092/chorus.upstream &
//! cargo run -p chorus-server --example kafka_to_postgres -- \
//!     --kafka kafka://127.0.0.1:9092/chorus.upstream --group archive \
//!     --postgres 'postgres://archive@127.0.0.1/app'
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use chorus_server::broker::KafkaUrl;
use chorus_server::upstream::UpstreamRecord;
use clap::Parser;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_postgres::{Client, NoTls};

#[derive(Parser)]
struct Args {
    /// The feed: `kafka://host:port[,host:port…]/<topic>`.
    #[arg(long)]
    kafka: String,
    /// Consumer group (one per backend service).
    #[arg(long, default_value = "chorus-archive")]
    group: String,
    /// PostgreSQL connection string.
    #[arg(long)]
    postgres: String,
    /// Records written per transaction at most.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// How long a batch waits to fill up before it is written.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// Crash (abort) right after the n-th batch's transaction committed,
    /// before its Kafka offsets are: to see a restart store it again
    /// without a duplicate.
    #[arg(long)]
    crash_after: Option<u64>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS chorus_messages (
    room         text   NOT NULL,
    epoch        text   NOT NULL,
    "offset"     bigint NOT NULL,
    data         jsonb  NOT NULL,
    sender       text   NOT NULL,
    published_us bigint NOT NULL,
    PRIMARY KEY (room, epoch, "offset")
)"#;

const INSERT: &str = r#"
INSERT INTO chorus_messages (room, epoch, "offset", data, sender, published_us)
VALUES ($1, $2, $3, CAST($4::text AS jsonb), $5, $6)
ON CONFLICT DO NOTHING"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let url = KafkaUrl::parse(&args.kafka)?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", url.bootstrap())
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // A replica that died loses its partitions to the others after this.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        .create()?;
    consumer.subscribe(&[url.topic.as_str()])?;
    let mut db = connect(&args.postgres).await?;
    db.batch_execute(SCHEMA).await.context("create the table")?;
    for written in 1.. {
        let batch = next_batch(&consumer, args.batch, args.linger).await;
        // The batch is written before anything of it is committed in
        // Kafka; a failed write is tried again with the same records.
        loop {
            match write(&mut db, &batch).await {
                Ok(stored) => {
                    eprintln!("stored {stored} of {} records", batch.len());
                    break;
                }
                Err(e) => {
                    eprintln!("write failed ({e:#}); trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if db.is_closed() {
                        match connect(&args.postgres).await {
                            Ok(client) => db = client,
                            Err(e) => eprintln!("{e:#}"),
                        }
                    }
                }
            }
        }
        if args.crash_after == Some(written) {
            eprintln!("crashing before committing batch {written} in Kafka");
            std::process::abort();
        }
        commit(&consumer, &batch)?;
    }
    Ok(())
}

async fn connect(dsn: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .context("connect to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("PostgreSQL connection: {e}");
        }
    });
    Ok(client)
}

/// The first record to come, then what else comes within `linger`, up to `max`.
async fn next_batch(consumer: &StreamConsumer, max: usize, linger: Duration) -> Vec<OwnedMessage> {
    let mut batch = Vec::new();
    loop {
        match consumer.recv().await {
            Ok(m) => {
                batch.push(m.detach());
                break;
            }
            Err(e) => eprintln!("kafka: {e}"),
        }
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) => eprintln!("kafka: {e}"),
            Err(_) => break,
        }
    }
    batch
}

/// Writes the batch in one transaction; the number of new rows.
async fn write(db: &mut Client, batch: &[OwnedMessage]) -> anyhow::Result<u64> {
    let tx = db.transaction().await?;
    let insert = tx.prepare(INSERT).await?;
    let mut stored = 0;
    for m in batch {
        let record: UpstreamRecord = match m.payload().map(serde_json::from_slice) {
            Some(Ok(record)) => record,
            _ => {
                eprintln!(
                    "skipped a malformed record at {}/{}/{}",
                    m.topic(),
                    m.partition(),
                    m.offset()
                );
                continue;
            }
        };
        stored += tx
            .execute(
                &insert,
                &[
                    &record.room,
                    &record.epoch,
                    &(record.offset as i64),
                    &record.data.get(),
                    &record.from,
                    &(record.ts as i64),
                ],
            )
            .await?;
    }
    tx.commit().await?;
    Ok(stored)
}

/// Commits, per partition, the offset after the batch's last record.
fn commit(consumer: &StreamConsumer, batch: &[OwnedMessage]) -> anyhow::Result<()> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in batch {
        let at = next.entry((m.topic(), m.partition())).or_default();
        *at = (*at).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
        // The partition went to another replica meanwhile: it writes the
        // batch again, which changes nothing in the table.
        eprintln!("commit: {e}");
    }
    Ok(())
}
