//! The scenarios. Each is bounded in messages and time and stops by itself.
//!
//! Most share one shape ([`run_delivery`]): connect and subscribe every
//! subscriber, snapshot the CPU of every process, run the publishers, wait
//! until each subscriber holds every message its room acknowledged (or a
//! drain deadline passes), snapshot again, and compare what was delivered
//! with what was acknowledged.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{self, PubReport, PubSpec, StopAt, SubReport};
use crate::fleet::Fleet;
use crate::hist::Histogram;
use crate::procfs;
use crate::report::{Report, ms, num, show};

/// How many connections are opened at once.
const CONNECT_PARALLEL: usize = 64;

/// CPU seconds of each group of processes at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnap {
    servers: f64,
    redis: f64,
    sentinels: f64,
    bench: f64,
    /// Every busy CPU second on the machine (ours and other users').
    machine: f64,
    at: Option<std::time::Instant>,
}

impl CpuSnap {
    pub fn take(fleet: &Fleet) -> Self {
        Self {
            servers: procfs::cpu_total(&fleet.server_pids()),
            redis: procfs::cpu_total(&fleet.redis_pids()),
            sentinels: procfs::cpu_total(&fleet.sentinel_pids()),
            bench: procfs::self_cpu(),
            machine: procfs::machine_busy_seconds(),
            at: Some(std::time::Instant::now()),
        }
    }

    fn delta(&self, before: &CpuSnap) -> CpuSnap {
        CpuSnap {
            servers: self.servers - before.servers,
            redis: self.redis - before.redis,
            sentinels: self.sentinels - before.sentinels,
            bench: self.bench - before.bench,
            machine: self.machine - before.machine,
            at: None,
        }
    }
}

/// Opens one subscriber per `(node, room)` entry, in parallel.
async fn connect_subscribers(
    fleet: &Fleet,
    placement: &[(usize, usize)],
    rooms: &[String],
) -> Result<Vec<(usize, usize, client::Ws)>> {
    let jobs = placement.iter().map(|&(node, room)| {
        let url = fleet.nodes[node].ws_url.clone();
        let name = rooms[room].clone();
        async move {
            let mut ws = client::connect(&url).await?;
            client::subscribe(&mut ws, &name).await?;
            anyhow::Ok((node, room, ws))
        }
    });
    let results: Vec<Result<_>> = futures_util::stream::iter(jobs)
        .buffer_unordered(CONNECT_PARALLEL)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Everything a delivery run measured.
pub struct Delivery {
    pub subs: Vec<SubReport>,
    pub pubs: Vec<PubReport>,
    pub cpu: CpuSnap,
    /// From the first publish to the last frame received (s).
    pub active_secs: f64,
    /// Wall time between the CPU snapshots (s).
    pub wall_secs: f64,
    pub rooms: usize,
    pub server_delivered: Option<f64>,
    pub slow_consumers: Option<f64>,
    pub start_us: u64,
}

pub struct DeliveryPlan {
    pub placement: Vec<(usize, usize)>,
    pub rooms: Vec<String>,
    pub publishers: Vec<PubSpec>,
    /// After the publishers finish, how long subscribers may take to catch up.
    pub drain: Duration,
    /// Keep every arrival / publish outcome (failover).
    pub timelines: bool,
}

/// Runs `plan`; `during` runs alongside the publishers (the failover kills
/// the master there) and its result is handed back.
pub async fn run_delivery<F, T>(
    fleet: &mut Fleet,
    plan: DeliveryPlan,
    during: F,
) -> Result<(Delivery, T)>
where
    F: AsyncFnOnce(&mut Fleet) -> T,
{
    let conns = connect_subscribers(fleet, &plan.placement, &plan.rooms)
        .await
        .context("connecting subscribers")?;
    let (stop_tx, stop_rx) = watch::channel::<Option<StopAt>>(None);
    let mut sub_tasks = Vec::new();
    for (node, room, ws) in conns {
        sub_tasks.push(tokio::spawn(client::run_subscriber(
            ws,
            node,
            room,
            stop_rx.clone(),
            plan.timelines,
        )));
    }
    let delivered_before = fleet.metric("chorus_messages_delivered_total").await;
    // Let the connection set-up settle before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = CpuSnap::take(fleet);
    let start_us = client::now_us();
    let pub_tasks: Vec<_> = plan
        .publishers
        .into_iter()
        .map(|spec| tokio::spawn(client::run_publisher(spec, plan.timelines)))
        .collect();
    let during = during(fleet).await;
    let mut pubs = Vec::new();
    for t in pub_tasks {
        pubs.push(t.await.context("publisher task")??);
    }
    let mut expect = vec![0u64; plan.rooms.len()];
    for p in &pubs {
        for &(room, _) in &p.acked {
            expect[room] += 1;
        }
    }
    let _ = stop_tx.send(Some(StopAt {
        expect: Arc::new(expect),
        deadline: Instant::now() + plan.drain,
    }));
    let mut subs = Vec::new();
    for t in sub_tasks {
        subs.push(t.await.context("subscriber task")?);
    }
    let after = CpuSnap::take(fleet);
    let last = subs
        .iter()
        .map(|s| s.last_frame_at)
        .max()
        .unwrap_or(start_us);
    let server_delivered = match (
        delivered_before,
        fleet.metric("chorus_messages_delivered_total").await,
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let slow_consumers = fleet.metric("chorus_slow_consumers_dropped_total").await;
    let wall_secs = match (before.at, after.at) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    Ok((
        Delivery {
            subs,
            pubs,
            cpu: after.delta(&before),
            active_secs: last.saturating_sub(start_us) as f64 / 1e6,
            wall_secs,
            rooms: plan.rooms.len(),
            server_delivered,
            slow_consumers,
            start_us,
        },
        during,
    ))
}

/// Loss accounting against what the broker acknowledged.
pub struct Accounting {
    pub acked: u64,
    pub expected: u64,
    pub received_distinct: u64,
    pub frames: u64,
    pub lost: u64,
    pub unacked_delivered: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub offset_gaps: u64,
    pub closed: usize,
    pub latency: Histogram,
    /// Acknowledged messages lost, summed over each node's subscribers.
    pub lost_per_node: std::collections::BTreeMap<usize, u64>,
}

pub fn account(d: &Delivery) -> Accounting {
    let mut per_room: Vec<Vec<u64>> = vec![Vec::new(); d.rooms];
    for p in &d.pubs {
        for &(room, seq) in &p.acked {
            per_room[room].push(seq);
        }
    }
    let mut a = Accounting {
        acked: per_room.iter().map(|r| r.len() as u64).sum(),
        expected: 0,
        received_distinct: 0,
        frames: 0,
        lost: 0,
        unacked_delivered: 0,
        duplicates: 0,
        out_of_order: 0,
        offset_gaps: 0,
        closed: 0,
        latency: Histogram::default(),
        lost_per_node: Default::default(),
    };
    for s in &d.subs {
        let acked = &per_room[s.room];
        let got = acked.iter().filter(|&&q| s.seen.contains(q)).count() as u64;
        a.expected += acked.len() as u64;
        a.received_distinct += s.seen.len();
        a.frames += s.frames;
        a.lost += acked.len() as u64 - got;
        *a.lost_per_node.entry(s.node).or_default() += acked.len() as u64 - got;
        a.unacked_delivered += s.seen.len() - got;
        a.duplicates += s.duplicates;
        a.out_of_order += s.out_of_order;
        a.offset_gaps += s.offset_gaps;
        a.closed += usize::from(s.closed.is_some());
        a.latency.merge(&s.latency);
    }
    a
}

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
    r.put(
        "lost",
        "lost / duplicated / out of order",
        a.lost,
        format!("{} / {} / {}", a.lost, a.duplicates, a.out_of_order),
    );
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
}

/// CPU seconds per million deliveries (and per million messages for Redis).
pub fn report_cpu(
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

// ---------------------------------------------------------------- scenarios

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
