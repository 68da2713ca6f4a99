//! `rooms`: many small rooms, each served by subscribers on different nodes.

use std::time::Duration;

use anyhow::Result;

use crate::client::PubSpec;
use crate::fleet::Fleet;
use crate::report::{Report, num, report_delivery};
use crate::scenarios::{DeliveryPlan, account, run_delivery};

#[derive(Debug, Clone, clap::Args)]
pub struct RoomsArgs {
    /// Rooms.
    #[arg(long, default_value_t = 1000)]
    pub rooms: usize,
    /// Subscribers per room, each on the next node (room r's j-th on node (r+j) mod N).
    #[arg(long, default_value_t = 3)]
    pub per_room: usize,
    /// Messages per second over all rooms (one publisher per node).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Messages over all rooms.
    #[arg(long, default_value_t = 20000)]
    pub messages: u64,
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
}

pub async fn rooms(fleet: &mut Fleet, args: &RoomsArgs) -> Result<Report> {
    let n = fleet.nodes.len();
    let names: Vec<String> = (0..args.rooms).map(|r| format!("bench-room-{r}")).collect();
    let placement = (0..args.rooms)
        .flat_map(|r| (0..args.per_room).map(move |j| ((r + j) % n, r)))
        .collect();
    let pubs = n.min(args.rooms);
    let publishers = (0..pubs)
        .map(|p| PubSpec {
            url: fleet.nodes[p].ws_url.clone(),
            rooms: (p..args.rooms)
                .step_by(pubs)
                .map(|r| (r, names[r].clone()))
                .collect(),
            rate: Some(args.rate / pubs as f64),
            // Spread the remainder so exactly `messages` are published.
            count: Some(
                args.messages / pubs as u64 + u64::from((p as u64) < args.messages % pubs as u64),
            ),
            duration: None,
            window: 64,
            payload: args.payload,
            first: p as u64,
            step: pubs as u64,
            target: fleet.target,
        })
        .collect();
    let plan = DeliveryPlan {
        placement,
        rooms: names,
        publishers,
        drain: Duration::from_secs(10),
        timelines: false,
    };
    let out_before = fleet.redis_stat("total_net_output_bytes").await;
    let (d, ()) = run_delivery(fleet, plan, async |_| {}).await?;
    let out_after = fleet.redis_stat("total_net_output_bytes").await;
    let a = account(&d);
    let mut r = Report::new("rooms", &fleet.label);
    r.put(
        "params",
        "rooms × subscribers, rate, messages",
        serde_json::json!({"rooms": args.rooms, "per_room": args.per_room, "rate": args.rate, "messages": args.messages, "payload": args.payload}),
        format!(
            "{} × {} (on {} node(s) each), {} msg/s, {} messages, {} B",
            args.rooms,
            args.per_room,
            args.per_room.min(n),
            args.rate,
            args.messages,
            args.payload
        ),
    );
    report_delivery(&mut r, fleet, &d, &a);
    if let (Some(b), Some(e)) = (out_before, out_after)
        && a.acked > 0
    {
        let per_msg = (e - b) as f64 / a.acked as f64;
        r.put(
            "redis_out_bytes_per_message",
            "redis bytes sent per message",
            num(Some(per_msg)),
            format!("{per_msg:.0} (replies, pub/sub pushes, canaries)"),
        );
    }
    Ok(r)
}
