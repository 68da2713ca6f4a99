//! The figures the scenarios report: deliveries, loss, latency, CPU per
//! million deliveries, how busy the machine was, peak memory.

use crate::fleet::Fleet;
use crate::hist::Histogram;
use crate::procfs;
use crate::report::{Report, ms, num, show};
use crate::scenarios::{Accounting, CpuSnap, Delivery};

/// The figures every delivery scenario reports.
pub fn report_delivery(r: &mut Report, fleet: &Fleet, d: &Delivery, a: &Accounting) {
    let publish_errors: u64 = d.pubs.iter().flat_map(|p| p.errors.values()).sum();
    let unanswered: u64 = d.pubs.iter().map(|p| p.unanswered).sum();
    r.put(
        "published_ok",
        "publishes acknowledged",
        a.acked,
        format!(
            "{} (errors {publish_errors}, unanswered {unanswered})",
            a.acked
        ),
    );
    let mut errs = serde_json::Map::new();
    for p in &d.pubs {
        for (code, n) in &p.errors {
            let prev = errs
                .get(code)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            errs.insert(code.clone(), (prev + n).into());
        }
    }
    r.put_json("publish_errors", errs);
    r.put_json("publish_unanswered", unanswered);
    r.put(
        "deliveries_expected",
        "deliveries expected",
        a.expected,
        a.expected.to_string(),
    );
    r.put(
        "deliveries",
        "deliveries received",
        a.frames,
        format!("{} ({} distinct)", a.frames, a.received_distinct),
    );
    let refused = d
        .pubs
        .iter()
        .filter_map(|p| p.errors.get("rate_limited"))
        .sum::<u64>();
    r.put(
        "outcome",
        "delivered / shed by policy / lost (of expected)",
        serde_json::json!({
            "delivered": a.expected - a.shed - a.lost, "shed": a.shed, "lost": a.lost,
            "shed_subscribers": a.shed_subscribers, "publishes_refused": refused,
        }),
        format!(
            "{} / {} ({} subscribers dropped 1008) / {} — publishes refused (pushed back): {refused}",
            a.expected - a.shed - a.lost,
            a.shed,
            a.shed_subscribers,
            a.lost
        ),
    );
    r.put(
        "lost",
        "lost / duplicated / out of order",
        a.lost,
        format!("{} / {} / {}", a.lost, a.duplicates, a.out_of_order),
    );
    r.put_json("shed", a.shed);
    r.put_json("publishes_refused", refused);
    if let Some(mean) = a.bytes.checked_div(a.frames) {
        r.put_json("frame_text_bytes", mean);
    }
    let per_node: serde_json::Map<String, serde_json::Value> = a
        .lost_per_node
        .iter()
        .map(|(&n, &lost)| (fleet.nodes[n].name.clone(), lost.into()))
        .collect();
    r.put_json("lost_per_node", per_node);
    r.put_json("duplicates", a.duplicates);
    r.put_json("out_of_order", a.out_of_order);
    r.put_json("offset_gaps", a.offset_gaps);
    r.put_json("unacked_delivered", a.unacked_delivered);
    r.put(
        "subscribers_closed",
        "subscribers closed by server",
        a.closed,
        format!(
            "{} (slow consumers dropped: {})",
            a.closed,
            d.slow_consumers.map_or("n/a".into(), |v| v.to_string())
        ),
    );
    let h = &a.latency;
    r.put(
        "latency_ms",
        "latency p50 / p90 / p99 / max",
        serde_json::json!({
            "p50": ms(h.quantile(0.5)), "p90": ms(h.quantile(0.9)),
            "p99": ms(h.quantile(0.99)), "max": ms(h.max()), "mean": num(Some(h.mean() / 1000.0)),
        }),
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} ms",
            ms(h.quantile(0.5)),
            ms(h.quantile(0.9)),
            ms(h.quantile(0.99)),
            ms(h.max())
        ),
    );
    let mut ack = Histogram::default();
    for p in &d.pubs {
        ack.merge(&p.ack_latency);
    }
    r.put(
        "publish_ack_ms",
        "publish → ok p50 / p99",
        serde_json::json!({"p50": ms(ack.quantile(0.5)), "p99": ms(ack.quantile(0.99))}),
        format!(
            "{:.2} / {:.2} ms",
            ms(ack.quantile(0.5)),
            ms(ack.quantile(0.99))
        ),
    );
    let lag = d.pubs.iter().map(|p| p.max_lag_us).max().unwrap_or(0);
    r.put(
        "publisher_max_lag_ms",
        "publisher behind schedule (max)",
        ms(lag),
        format!("{:.1} ms", ms(lag)),
    );
    let rate = a.frames as f64 / d.active_secs.max(1e-9);
    r.put(
        "deliveries_per_sec",
        "deliveries / s",
        num(Some(rate)),
        format!("{rate:.0} over {:.2} s", d.active_secs),
    );
    if let Some(v) = d.server_delivered {
        r.put_json("server_delivered", v);
    }
    report_cpu(r, fleet, &d.cpu, d.wall_secs, a.frames, a.acked);
    report_shards(r, d);
}

/// Per Redis master (one, or each shard of a cluster): CPU seconds, the
/// publish scripts it ran (its own rooms' messages) and its CPU per million
/// of them.
fn report_shards(r: &mut Report, d: &Delivery) {
    if d.shards.is_empty() {
        return;
    }
    let mut json = Vec::new();
    let mut shown = Vec::new();
    for s in &d.shards {
        let per_m = (s.scripts > 0).then(|| s.cpu_s / s.scripts as f64 * 1e6);
        json.push(serde_json::json!({
            "port": s.port, "cpu_s": num(Some(s.cpu_s)), "messages": s.scripts,
            "cpu_s_per_m_messages": num(per_m),
        }));
        shown.push(format!(
            ":{} {:.2} s / {} msgs ({})",
            s.port,
            s.cpu_s,
            s.scripts,
            show(per_m, " s/1M")
        ));
    }
    r.put(
        "redis_shards",
        "per redis master: CPU / own messages",
        json,
        shown.join(", "),
    );
}

/// CPU seconds per million deliveries (and per million messages for Redis).
fn report_cpu(
    r: &mut Report,
    fleet: &Fleet,
    cpu: &CpuSnap,
    wall: f64,
    deliveries: u64,
    messages: u64,
) {
    let measurable = fleet.measurable();
    let per_m = |secs: f64| (measurable && deliveries > 0).then(|| secs / deliveries as f64 * 1e6);
    let servers = measurable.then_some(cpu.servers);
    let redis = measurable.then_some(cpu.redis);
    r.put(
        "cpu_s",
        "CPU s: servers / redis / sentinels / bench",
        serde_json::json!({
            "servers": num(servers), "redis": num(redis),
            "sentinels": num(measurable.then_some(cpu.sentinels)), "bench": num(Some(cpu.bench)),
            "wall": num(Some(wall)),
        }),
        format!(
            "{} / {} / {} / {} (wall {wall:.2} s)",
            show(servers, ""),
            show(redis, ""),
            show(measurable.then_some(cpu.sentinels), ""),
            show(Some(cpu.bench), "")
        ),
    );
    let total = per_m(cpu.servers + cpu.redis);
    r.put(
        "cpu_s_per_m_deliveries",
        "CPU s / 1M deliveries (servers+redis)",
        num(total),
        format!(
            "{} (servers {}, redis {})",
            show(total, ""),
            show(per_m(cpu.servers), ""),
            show(per_m(cpu.redis), "")
        ),
    );
    r.put_json("cpu_s_per_m_deliveries_servers", num(per_m(cpu.servers)));
    r.put_json("cpu_s_per_m_deliveries_redis", num(per_m(cpu.redis)));
    let redis_per_msg = (measurable && messages > 0).then(|| cpu.redis / messages as f64 * 1e6);
    r.put(
        "redis_cpu_s_per_m_messages",
        "redis CPU s / 1M messages",
        num(redis_per_msg),
        show(redis_per_msg, ""),
    );
    report_machine(r, cpu, wall);
    report_memory(r, fleet);
}

/// How busy the shared machine was: CPU used by processes outside this
/// benchmark (other users' builds) makes every figure noisier.
fn report_machine(r: &mut Report, cpu: &CpuSnap, wall: f64) {
    let ours = cpu.servers + cpu.redis + cpu.sentinels + cpu.bench;
    let others = (cpu.machine - ours).max(0.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let load = procfs::loadavg();
    r.put(
        "machine",
        "machine: busy cores (others) / loadavg",
        serde_json::json!({"busy_cores": num(Some(cpu.machine / wall.max(1e-9))), "others_cores": num(Some(others / wall.max(1e-9))), "cores": cores, "loadavg1": load}),
        format!(
            "{:.2} of {cores} ({:.2} not ours) / {load:.2}",
            cpu.machine / wall.max(1e-9),
            others / wall.max(1e-9)
        ),
    );
}

pub fn report_memory(r: &mut Report, fleet: &Fleet) {
    let mut peaks = serde_json::Map::new();
    let mut shown = Vec::new();
    for n in &fleet.nodes {
        if let Some(b) = n.pid().and_then(procfs::peak_rss_bytes) {
            let mib = b as f64 / (1024.0 * 1024.0);
            peaks.insert(n.name.clone(), num(Some(mib)));
            shown.push(format!("{} {mib:.1}", n.name));
        }
    }
    if !shown.is_empty() {
        r.put(
            "peak_rss_mib",
            "peak RSS per node (MiB)",
            peaks,
            shown.join(", "),
        );
    }
}
