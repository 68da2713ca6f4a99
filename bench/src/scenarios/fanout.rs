//! `fanout`: S subscribers in one room, one publisher at a fixed rate, M messages.

use std::time::Duration;

use anyhow::Result;

use crate::client::PubSpec;
use crate::fleet::Fleet;
use crate::report::{Report, report_delivery};
use crate::scenarios::{DeliveryPlan, account, run_delivery};

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Subscribers, spread round-robin over the nodes, all in one room.
    #[arg(long, default_value_t = 600)]
    pub subscribers: usize,
    /// Messages per second from the one publisher.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Messages to publish.
    #[arg(long, default_value_t = 3000)]
    pub messages: u64,
    /// Size of each message's `data`, bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
}

pub async fn fanout(fleet: &mut Fleet, args: &FanoutArgs) -> Result<Report> {
    let n = fleet.nodes.len();
    let plan = DeliveryPlan {
        placement: (0..args.subscribers).map(|i| (i % n, 0)).collect(),
        rooms: vec!["bench-fanout".into()],
        publishers: vec![PubSpec {
            url: fleet.nodes[0].ws_url.clone(),
            rooms: vec![(0, "bench-fanout".into())],
            rate: Some(args.rate),
            count: Some(args.messages),
            duration: None,
            window: 64,
            payload: args.payload,
            first: 0,
            step: 1,
            target: fleet.target,
        }],
        drain: Duration::from_secs(10),
        timelines: false,
    };
    let (d, ()) = run_delivery(fleet, plan, async |_| {}).await?;
    let a = account(&d);
    let mut r = Report::new("fanout", &fleet.label);
    r.put(
        "params",
        "subscribers × rate, messages, payload",
        serde_json::json!({"subscribers": args.subscribers, "rate": args.rate, "messages": args.messages, "payload": args.payload}),
        format!(
            "{} × {} msg/s, {} messages, {} B",
            args.subscribers, args.rate, args.messages, args.payload
        ),
    );
    report_delivery(&mut r, fleet, &d, &a);
    Ok(r)
}
