//! The shape most scenarios share ([`run_delivery`]): connect and
//! subscribe every subscriber, snapshot the CPU of every process, run the
//! publishers, wait until each subscriber holds every message its room
//! acknowledged (or a drain deadline passes), snapshot again; then
//! [`account`] compares what was delivered with what was acknowledged.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{self, PubReport, PubSpec, StopAt, SubReport};
use crate::fleet::{Fleet, RedisLoad};
use crate::hist::Histogram;
use crate::procfs;

/// How many connections are opened at once.
const CONNECT_PARALLEL: usize = 64;

/// CPU seconds of each group of processes at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnap {
    pub servers: f64,
    pub redis: f64,
    pub sentinels: f64,
    pub bench: f64,
    /// Every busy CPU second on the machine (ours and other users').
    pub machine: f64,
    pub at: Option<std::time::Instant>,
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

    pub fn delta(&self, before: &CpuSnap) -> CpuSnap {
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
pub(crate) async fn connect_subscribers(
    fleet: &Fleet,
    placement: &[(usize, usize)],
    rooms: &[String],
) -> Result<Vec<(usize, usize, client::Ws)>> {
    let jobs = placement.iter().map(|&(node, room)| {
        let url = fleet.nodes[node].ws_url.clone();
        let name = rooms[room].clone();
        let target = fleet.target;
        async move {
            let mut ws = client::connect(&url, target).await?;
            client::subscribe(&mut ws, &name, target).await?;
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
    /// Each Redis master's CPU and publish scripts over the run.
    pub shards: Vec<RedisLoad>,
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
            fleet.target,
            node,
            room,
            stop_rx.clone(),
            plan.timelines,
        )));
    }
    let delivered_before = fleet.metric("chorus_messages_delivered_total").await;
    // Let the connection set-up settle before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loads_before = fleet.redis_loads().await;
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
    let shards = RedisLoad::deltas(&fleet.redis_loads().await, &loads_before);
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
            shards,
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
    /// Acknowledged, not delivered, to subscribers the server still served
    /// at the end.
    pub lost: u64,
    /// Acknowledged, not delivered, to subscribers the server dropped as
    /// slow consumers (close 1008): shed by policy.
    pub shed: u64,
    /// Subscribers closed with 1008.
    pub shed_subscribers: usize,
    /// Bytes of the text of every message frame received.
    pub bytes: u64,
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
        shed: 0,
        shed_subscribers: 0,
        bytes: 0,
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
        a.bytes += s.bytes;
        if s.closed_code == Some(1008) {
            a.shed += acked.len() as u64 - got;
            a.shed_subscribers += 1;
        } else {
            a.lost += acked.len() as u64 - got;
            *a.lost_per_node.entry(s.node).or_default() += acked.len() as u64 - got;
        }
        a.unacked_delivered += s.seen.len() - got;
        a.duplicates += s.duplicates;
        a.out_of_order += s.out_of_order;
        a.offset_gaps += s.offset_gaps;
        a.closed += usize::from(s.closed.is_some());
        a.latency.merge(&s.latency);
    }
    a
}
