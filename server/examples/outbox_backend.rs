//! A backend that changes an order and tells the order's room in one
//! PostgreSQL transaction: the message is published (by any
//! `chorus-server --outbox` relay) only if the change commits, and after
//! every change of the room committed before it.
//!
//! ```sh
//! chorus-server --outbox postgres://app@127.0.0.1:5432/app --outbox-init &
//! cargo run -p chorus-server --example outbox_backend -- \
//!     --db postgres://app@127.0.0.1:5432/app --order 42 --status paid
//! # a WebSocket client subscribed to `orders:42` gets {"order": 42, "status": "paid"}
//! cargo run -p chorus-server --example outbox_backend -- \
//!     --db postgres://app@127.0.0.1:5432/app --order 42 --status refunded --roll-back
//! # nothing is published: the change rolled back, and its message with it
//! ```

use clap::Parser;
use tokio_postgres::NoTls;

#[derive(Parser)]
struct Args {
    /// The backend's database (the one chorus-server --outbox relays from).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    db: String,
    /// The order to change.
    #[arg(long)]
    order: i64,
    /// Its new status.
    #[arg(long)]
    status: String,
    /// Roll the transaction back instead of committing it.
    #[arg(long)]
    roll_back: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (mut db, connection) = tokio_postgres::connect(&args.db, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("database connection: {e}");
        }
    });
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS orders (id bigint PRIMARY KEY, status text NOT NULL)",
    )
    .await?;

    let tx = db.transaction().await?;
    // The business change…
    tx.execute(
        "INSERT INTO orders (id, status) VALUES ($1, $2) \
         ON CONFLICT (id) DO UPDATE SET status = excluded.status",
        &[&args.order, &args.status],
    )
    .await?;
    // …and its message, in the same transaction. The key makes a retry of
    // this whole transaction (after a lost answer, say) show once.
    tx.execute(
        "INSERT INTO chorus_outbox (room, data, key) \
         VALUES ($1, jsonb_build_object('order', $2::int8, 'status', $3::text), $4)",
        &[
            &format!("orders:{}", args.order),
            &args.order,
            &args.status,
            &format!("order-{}-{}", args.order, args.status),
        ],
    )
    .await?;
    if args.roll_back {
        tx.rollback().await?;
        println!(
            "rolled back: order {} unchanged, nothing published",
            args.order
        );
    } else {
        tx.commit().await?;
        println!(
            "committed: order {} is {}; the relay publishes it to orders:{}",
            args.order, args.status, args.order
        );
    }
    Ok(())
}
