//! A backend replica reading client publishes from upstream streams.
//!
//! Run one per replica, all with the same `--group`; each message is handled
//! by exactly one of them. This one prints every message as a JSON line and
//! acknowledges it; replace `handle` with your service's logic.
//!
//! ```sh
//! chorus-server --broker redis://127.0.0.1:6379 --upstream-rooms 'orders:*' &
//! cargo run -p chorus-server --example upstream_consumer -- \
//!     --redis redis://127.0.0.1:6379 --group billing --consumer billing-0 --room orders:eu
//! ```

use std::time::Duration;

use chorus_server::upstream::{Consumer, ConsumerConfig, UpstreamMessage};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Redis master URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Consumer group (one per backend service).
    #[arg(long)]
    group: String,
    /// This replica's name in the group.
    #[arg(long)]
    consumer: String,
    /// Room to consume (repeat for several).
    #[arg(long = "room", required = true)]
    rooms: Vec<String>,
    /// Take over entries another replica left unacknowledged this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    claim_idle: Duration,
    /// Move an entry to the dead-letter stream after this many failed attempts.
    #[arg(long, default_value_t = 5)]
    max_attempts: u64,
}

async fn handle(msg: &UpstreamMessage) -> Result<(), String> {
    let line = serde_json::json!({
        "room": msg.room, "offset": msg.offset, "epoch": msg.epoch,
        "from": msg.from, "attempt": msg.attempt, "data": msg.data,
    });
    println!("{line}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let args = Args::parse();
    let mut cfg = ConsumerConfig::new(&args.redis, &args.group, &args.consumer, args.rooms);
    cfg.claim_idle = args.claim_idle;
    cfg.max_attempts = args.max_attempts;
    let mut consumer = Consumer::connect(cfg).await?;
    loop {
        for msg in consumer.next_batch().await? {
            match handle(&msg).await {
                Ok(()) => consumer.ack(&msg).await?,
                // Left pending: retried after --claim-idle, dead-lettered after --max-attempts.
                Err(e) => {
                    tracing::warn!(room = %msg.room, offset = msg.offset, error = %e, "handling failed")
                }
            }
        }
    }
}
