//! `failover`: continuous publishing while the Redis master is SIGKILLed
//! and the Sentinel group promotes its replica.

use std::time::Duration;

use anyhow::Result;

use crate::client::{self, PubSpec};
use crate::fleet::Fleet;
use crate::report::{Report, num, report_delivery, show};
use crate::scenarios::{DeliveryPlan, account, run_delivery};

#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// Subscribers of the one room, spread over the nodes.
    #[arg(long, default_value_t = 30)]
    pub subscribers: usize,
    /// Messages per second, published continuously.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// How long to publish, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// When to SIGKILL the master, seconds after publishing started.
    #[arg(long, default_value_t = 5.0)]
    pub kill_after: f64,
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
}

pub async fn failover(fleet: &mut Fleet, args: &FailoverArgs) -> Result<Report> {
    anyhow::ensure!(
        fleet.sentinel_group().is_some(),
        "failover needs the Sentinel group the bench starts itself"
    );
    let n = fleet.nodes.len();
    let room = "bench-failover".to_string();
    let plan = DeliveryPlan {
        placement: (0..args.subscribers).map(|i| (i % n, 0)).collect(),
        rooms: vec![room.clone()],
        publishers: vec![PubSpec {
            url: fleet.nodes[0].ws_url.clone(),
            rooms: vec![(0, room)],
            rate: Some(args.rate),
            count: None,
            duration: Some(Duration::from_secs_f64(args.duration)),
            window: 64,
            payload: args.payload,
            first: 0,
            step: 1,
            target: fleet.target,
        }],
        drain: Duration::from_secs(10),
        timelines: true,
    };
    let kill_after = Duration::from_secs_f64(args.kill_after);
    let (d, (kill_us, promoted_us)) = run_delivery(fleet, plan, async |fleet: &mut Fleet| {
        tokio::time::sleep(kill_after).await;
        let kill_us = client::now_us();
        let Some(group) = fleet.sentinel_group() else {
            return (kill_us, None);
        };
        let old = group.master.port;
        group.master.kill();
        let what = "a quorum of sentinels to name a new master";
        let promoted = chorus_testkit::wait::until(what, Duration::from_secs(30), async || {
            let master = group.agreed_master().await;
            master.filter(|&m| m != old).map(|_| client::now_us())
        })
        .await
        .ok();
        (kill_us, promoted)
    })
    .await?;
    let a = account(&d);
    let mut r = Report::new("failover", &fleet.label);
    r.put(
        "params",
        "subscribers, rate, duration, kill at",
        serde_json::json!({"subscribers": args.subscribers, "rate": args.rate, "duration": args.duration, "kill_after": args.kill_after}),
        format!(
            "{} subscribers, {} msg/s for {} s, master SIGKILLed at {} s",
            args.subscribers, args.rate, args.duration, args.kill_after
        ),
    );
    let since_kill = |t: u64| t.saturating_sub(kill_us) as f64 / 1e6;
    r.put(
        "sentinels_promoted_s",
        "sentinels named the replica after",
        num(promoted_us.map(since_kill)),
        show(promoted_us.map(since_kill), " s"),
    );
    let timeline: Vec<(u64, bool)> = d
        .pubs
        .iter()
        .flat_map(|p| p.timeline.iter().copied())
        .collect();
    let first_ok = timeline
        .iter()
        .filter(|(t, ok)| *ok && *t > kill_us)
        .map(|(t, _)| *t)
        .min();
    let failed_after = timeline
        .iter()
        .filter(|(t, ok)| !*ok && *t > kill_us)
        .count();
    r.put(
        "publish_resumed_s",
        "publishes succeed again after",
        num(first_ok.map(since_kill)),
        format!(
            "{} ({failed_after} publishes refused meanwhile)",
            show(first_ok.map(since_kill), " s")
        ),
    );
    let mut resumed: Vec<f64> = d
        .subs
        .iter()
        .filter_map(|s| {
            s.arrivals
                .iter()
                .filter(|(t, _)| *t > kill_us)
                .map(|(_, at)| *at)
                .min()
        })
        .map(since_kill)
        .collect();
    resumed.sort_by(f64::total_cmp);
    let med = resumed.get(resumed.len() / 2).copied();
    let max = resumed.last().copied();
    r.put(
        "delivery_resumed_s",
        "delivery resumed after (median / max)",
        serde_json::json!({"median": num(med), "max": num(max), "subscribers_resumed": resumed.len()}),
        format!(
            "{} / {} ({} of {} subscribers)",
            show(med, " s"),
            show(max, " s"),
            resumed.len(),
            d.subs.len()
        ),
    );
    // Acknowledged messages missing at each subscriber, split by when they were published.
    report_delivery(&mut r, fleet, &d, &a);
    Ok(r)
}
