//! `saturate`: publishers with a window of in-flight publishes for a fixed time.

use std::time::Duration;

use anyhow::Result;

use crate::client::PubSpec;
use crate::fleet::Fleet;
use crate::report::{Report, num, report_delivery};
use crate::scenarios::{DeliveryPlan, account, run_delivery};

#[derive(Debug, Clone, clap::Args)]
pub struct SaturateArgs {
    /// Publishers (one connection each, spread over the nodes).
    #[arg(long, default_value_t = 3)]
    pub publishers: usize,
    /// Publishes in flight per publisher (the server allows 64).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Subscribers of the one room, spread over the nodes.
    #[arg(long, default_value_t = 60)]
    pub subscribers: usize,
    /// How long to publish, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
}

pub async fn saturate(fleet: &mut Fleet, args: &SaturateArgs) -> Result<Report> {
    let n = fleet.nodes.len();
    let room = "bench-saturate".to_string();
    let plan = DeliveryPlan {
        placement: (0..args.subscribers).map(|i| (i % n, 0)).collect(),
        rooms: vec![room.clone()],
        publishers: (0..args.publishers)
            .map(|p| PubSpec {
                url: fleet.nodes[p % n].ws_url.clone(),
                rooms: vec![(0, room.clone())],
                rate: None,
                count: None,
                duration: Some(Duration::from_secs_f64(args.duration)),
                window: args.window,
                payload: args.payload,
                first: p as u64,
                step: args.publishers as u64,
                target: fleet.target,
            })
            .collect(),
        drain: Duration::from_secs(10),
        timelines: false,
    };
    let (d, ()) = run_delivery(fleet, plan, async |_| {}).await?;
    let a = account(&d);
    let mut r = Report::new("saturate", &fleet.label);
    r.put(
        "params",
        "publishers × window, subscribers, duration",
        serde_json::json!({"publishers": args.publishers, "window": args.window, "subscribers": args.subscribers, "duration": args.duration, "payload": args.payload}),
        format!(
            "{} × {} in flight, {} subscribers, {} s, {} B",
            args.publishers, args.window, args.subscribers, args.duration, args.payload
        ),
    );
    let msgs_per_sec = a.acked as f64 / args.duration;
    r.put(
        "messages_per_sec",
        "messages / s (acknowledged)",
        num(Some(msgs_per_sec)),
        format!("{msgs_per_sec:.0}"),
    );
    report_delivery(&mut r, fleet, &d, &a);
    Ok(r)
}
