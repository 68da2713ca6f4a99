//! `idle`: idle subscribed connections, and the memory each costs a node.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::fleet::Fleet;
use crate::procfs;
use crate::report::{Report, num, report_memory, show};
use crate::scenarios::CpuSnap;
use crate::scenarios::delivery::connect_subscribers;

#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// Idle subscribed connections per node.
    #[arg(long, default_value_t = 5000)]
    pub per_node: usize,
    /// Rooms they subscribe to (connection i joins room i mod rooms).
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Seconds to wait after the last subscribe before reading memory.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
}

pub async fn idle(fleet: &mut Fleet, args: &IdleArgs) -> Result<Report> {
    let n = fleet.nodes.len();
    let rss = |fleet: &Fleet| -> Vec<Option<u64>> {
        fleet
            .nodes
            .iter()
            .map(|x| x.pid().and_then(procfs::rss_bytes))
            .collect()
    };
    let names: Vec<String> = (0..args.rooms).map(|r| format!("bench-idle-{r}")).collect();
    let placement: Vec<_> = (0..args.per_node * n)
        .map(|i| (i % n, i % args.rooms))
        .collect();
    if let Some(limit) = procfs::open_files_limit()
        && placement.len() as u64 + 256 > limit
    {
        anyhow::bail!(
            "{} connections need more file descriptors than this process may open ({limit}): \
             raise `ulimit -n` or lower --per-node",
            placement.len()
        );
    }
    let before = rss(fleet);
    let bench_before = procfs::rss_bytes(std::process::id());
    let cpu_before = CpuSnap::take(fleet);
    let t0 = std::time::Instant::now();
    let conns = connect_subscribers(fleet, &placement, &names)
        .await
        .context("connecting idle subscribers")?;
    let connect_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let after = rss(fleet);
    let bench_after = procfs::rss_bytes(std::process::id());
    let cpu = CpuSnap::take(fleet).delta(&cpu_before);
    let connections = fleet.metric("chorus_connections").await;
    let mut r = Report::new("idle", &fleet.label);
    r.put(
        "params",
        "connections per node, rooms",
        serde_json::json!({"per_node": args.per_node, "rooms": args.rooms, "nodes": n}),
        format!("{} × {n} node(s), {} rooms", args.per_node, args.rooms),
    );
    r.put(
        "connected",
        "connections open (server count)",
        conns.len(),
        format!(
            "{} ({}), in {connect_secs:.1} s",
            conns.len(),
            connections.map_or("n/a".into(), |c| c.to_string())
        ),
    );
    let mut per_node = serde_json::Map::new();
    let mut shown = Vec::new();
    let mut deltas = Vec::new();
    for (i, node) in fleet.nodes.iter().enumerate() {
        if let (Some(b), Some(a)) = (before[i], after[i]) {
            let per = (a as f64 - b as f64) / args.per_node as f64 / 1024.0;
            deltas.push(per);
            per_node.insert(
                node.name.clone(),
                serde_json::json!({"rss_before_mib": num(Some(b as f64 / 1048576.0)), "rss_after_mib": num(Some(a as f64 / 1048576.0)), "kib_per_conn": num(Some(per))}),
            );
            shown.push(format!(
                "{} {:.0}→{:.0} MiB",
                node.name,
                b as f64 / 1048576.0,
                a as f64 / 1048576.0
            ));
        }
    }
    let mean = (!deltas.is_empty()).then(|| deltas.iter().sum::<f64>() / deltas.len() as f64);
    r.put("nodes", "RSS per node", per_node, shown.join(", "));
    r.put(
        "kib_per_connection",
        "server RSS per idle subscribed connection",
        num(mean),
        show(mean, " KiB"),
    );
    if let (Some(b), Some(a)) = (bench_before, bench_after) {
        let per = (a as f64 - b as f64) / conns.len().max(1) as f64 / 1024.0;
        r.put(
            "bench_kib_per_connection",
            "load generator RSS per connection",
            num(Some(per)),
            format!("{per:.1} KiB (tokio-tungstenite client, 4 KiB read buffer)"),
        );
    }
    r.put(
        "cpu_s",
        "CPU s to connect+subscribe: servers / bench",
        serde_json::json!({"servers": num(fleet.measurable().then_some(cpu.servers)), "redis": num(fleet.measurable().then_some(cpu.redis)), "bench": num(Some(cpu.bench))}),
        format!("{} / {}", show(fleet.measurable().then_some(cpu.servers), ""), show(Some(cpu.bench), "")),
    );
    report_memory(&mut r, fleet);
    drop(conns);
    Ok(r)
}
