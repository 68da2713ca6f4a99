//! Prometheus metrics of a node (`GET /metrics`).
//!
//! Every label takes its values from a fixed list — refusal reasons
//! ([`REFUSALS`]), close reasons ([`CLOSES`]), protocol error codes
//! ([`ErrorCode::ALL`]) — and every such series is exported at 0 from the
//! start, so that rates and alerts work before the first event. The
//! standard process metrics (`process_*`, unprefixed) are read from
//! `/proc/self` at each scrape.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::protocol::ErrorCode;

/// Why a WebSocket upgrade was refused (`chorus_connections_refused_total{reason}`):
/// `--max-connections` reached, the node draining, no valid token, or a
/// request that is not a WebSocket upgrade (a proxy that drops the
/// `Upgrade` header, say).
pub const REFUSALS: [&str; 4] = ["limit", "draining", "auth", "bad_request"];

/// Why a WebSocket connection ended (`chorus_connections_closed_total{reason}`),
/// as the node logs it.
pub const CLOSES: [&str; 10] = [
    "client_closed",
    "client_gone",
    "slow_consumer",
    "drained",
    "rebalanced",
    "binary_frame",
    "token_expired",
    "replay_failed",
    "protocol_error",
    "socket_error",
];

/// Buckets of `chorus_delivery_latency_seconds`: 100 µs to 10 s in 1-2.5-5
/// steps, so `histogram_quantile(0.99, …)` is within a step of the truth from
/// a healthy loopback (sub-millisecond) to a failover (seconds).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Code {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: &'static str,
}

/// Every metric of the node, registered once in its own registry.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// `--max-connections`: with `connections`, how near the node is to refusing.
    pub max_connections: Gauge,
    /// WebSocket upgrades refused, by [`REFUSALS`] reason.
    connections_refused: Family<Reason, Counter>,
    /// WebSocket connections ended, by [`CLOSES`] reason.
    connections_closed: Family<Reason, Counter>,
    /// Error frames and HTTP error bodies sent, by code.
    errors: Family<Code, Counter>,
    /// Rooms with at least one local subscriber.
    pub rooms: Gauge,
    /// Publishes accepted by the broker through this node.
    pub published: Counter,
    /// Publishes that failed (broker unavailable, timeout).
    pub publish_errors: Counter,
    /// `message` frames handed to local subscribers (written or queued).
    pub delivered: Counter,
    /// Of those, frames the fan-out wrote to the socket itself, whole.
    pub direct_writes: Counter,
    /// Publishes refused because the room's fan-out on this node was behind.
    pub publishes_congested: Counter,
    /// Connections closed because their send queue overflowed.
    pub slow_consumers: Counter,
    /// Client frames refused as malformed (bad_frame, bad_room, too_large, binary).
    pub bad_frames: Counter,
    /// Time from a publish being accepted to its fan-out on this node.
    pub delivery_latency: Histogram,
    /// 1 while the broker is reachable.
    pub broker_up: Gauge,
    /// Times the broker link was re-established after a loss.
    pub broker_reconnects: Counter,
    /// Last round-trip time of the canary through Redis Pub/Sub.
    pub canary_rtt: Gauge<f64, AtomicU64>,
    /// Canaries that came back through Redis Pub/Sub: stops rising when the
    /// subscription no longer delivers.
    pub canary_round_trips: Counter,
    /// Messages a node read from history to fill a gap in its live feed.
    pub gap_filled: Counter,
    /// Messages a node could not fill from history (told as `history_gone`).
    pub lost_from_history: Counter,
    /// Rooms given a new epoch because the master lacked acknowledged messages.
    pub epoch_resets: Counter,
    /// Messages replayed to recovering clients (`subscribe` with `since`).
    pub replayed: Counter,
    /// Recoveries refused because the history no longer covered the gap.
    pub history_gone: Counter,
    /// Open plain HTTP connections (not yet, or never, upgraded).
    pub http_connections: Gauge,
    /// HTTP connections refused at `--max-http-connections`.
    pub http_connections_refused: Counter,
    /// 1 while the outbox relay is connected to PostgreSQL.
    pub outbox_up: Gauge,
    /// Committed outbox rows waiting to be relayed, at the relay's last look.
    pub outbox_pending: Gauge,
    /// Seconds since the oldest waiting outbox row's transaction committed.
    pub outbox_lag: Gauge<f64, AtomicU64>,
    /// Outbox rows published (or found already published) and deleted.
    pub outbox_relayed: Counter,
    /// Outbox rows that can never be published (deleted, logged).
    pub outbox_rejected: Counter,
    /// Time from an outbox row's commit to its publish.
    pub outbox_latency: Histogram,
    /// Kafka partitions this node reads (those of the rooms it serves).
    pub kafka_partitions_read: Gauge,
    /// 1 while the Kafka ingest consumer reaches its cluster.
    pub kafka_ingest_up: Gauge,
    /// Topics the Kafka ingest reads (0: the ingest is off), so that a 0 in
    /// `kafka_ingest_up` means down only where there is an ingest.
    pub kafka_ingest_topics: Gauge,
    /// Records of backend topics published to their rooms.
    pub kafka_ingested: Counter,
    /// Records of backend topics moved to a dead-letter topic.
    pub kafka_ingest_dead_lettered: Counter,
    /// Records of each partition this node consumes not yet handled.
    pub kafka_ingest_lag: Family<TopicPartition, Gauge>,
    /// Client publishes written to the `--upstream-kafka` topic.
    pub upstream_kafka_records: Counter,
    /// Client publishes delivered whose `--upstream-kafka` record was not
    /// acknowledged (the client was told `outcome_unknown`).
    pub upstream_kafka_failed: Counter,
}

/// A partition of a Kafka topic, as a label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: String,
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        #[cfg(target_os = "linux")]
        root.register_collector(Box::new(process::Collector::new()));
        let registry = root.sub_registry_with_prefix("chorus");
        registry.register(
            "build",
            "The version of this chorus-server (always 1)",
            Info::new(Build {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let max_connections = Gauge::default();
        registry.register(
            "max_connections",
            "WebSocket connections this node accepts at once (--max-connections)",
            max_connections.clone(),
        );
        let connections_refused = labelled(
            registry,
            "connections_refused",
            "WebSocket upgrades refused, by reason: limit (--max-connections), draining, auth (no valid token), bad_request (not a WebSocket upgrade)",
            REFUSALS.map(|reason| Reason { reason }),
        );
        let connections_closed = labelled(
            registry,
            "connections_closed",
            "WebSocket connections ended, by reason (as logged)",
            CLOSES.map(|reason| Reason { reason }),
        );
        let errors = labelled(
            registry,
            "errors",
            "Error frames and HTTP error bodies sent, by code",
            ErrorCode::ALL.map(|code| Code {
                code: code.as_str(),
            }),
        );
        let rooms = Gauge::default();
        registry.register(
            "rooms",
            "Rooms with at least one subscriber on this node",
            rooms.clone(),
        );
        let published = Counter::default();
        registry.register(
            "messages_published",
            "Messages published through this node",
            published.clone(),
        );
        let publish_errors = Counter::default();
        registry.register(
            "publish_errors",
            "Publishes through this node that failed (broker unavailable or timed out)",
            publish_errors.clone(),
        );
        let delivered = Counter::default();
        registry.register(
            "messages_delivered",
            "Messages handed to local subscribers",
            delivered.clone(),
        );
        let direct_writes = Counter::default();
        registry.register(
            "direct_writes",
            "Message frames the fan-out wrote to a subscriber's socket itself, without waking its connection",
            direct_writes.clone(),
        );
        let publishes_congested = Counter::default();
        registry.register(
            "publishes_congested",
            "Publishes refused (rate_limited) because the room's fan-out on this node was behind",
            publishes_congested.clone(),
        );
        let slow_consumers = Counter::default();
        registry.register(
            "slow_consumers_dropped",
            "Connections closed (1008) because their send queue was full",
            slow_consumers.clone(),
        );
        let bad_frames = Counter::default();
        registry.register(
            "bad_frames",
            "Client frames refused as malformed, too large or binary",
            bad_frames.clone(),
        );
        let delivery_latency = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "delivery_latency_seconds",
            "Time from a publish being accepted to its fan-out on this node",
            delivery_latency.clone(),
        );
        let broker_up = Gauge::default();
        registry.register(
            "broker_up",
            "1 while the broker is reachable, else 0",
            broker_up.clone(),
        );
        let broker_reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Times the broker link was re-established after it was lost",
            broker_reconnects.clone(),
        );
        let canary_rtt = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "redis_canary_rtt_seconds",
            "Last round trip of the canary message through Redis Pub/Sub",
            canary_rtt.clone(),
        );
        let canary_round_trips = Counter::default();
        registry.register(
            "redis_canary_round_trips",
            "Canary messages that came back through Redis Pub/Sub (one a --canary-interval while the subscription delivers)",
            canary_round_trips.clone(),
        );
        let gap_filled = Counter::default();
        registry.register(
            "gap_filled_messages",
            "Messages read from history to fill a gap in this node's live feed",
            gap_filled.clone(),
        );
        let lost_from_history = Counter::default();
        registry.register(
            "gap_lost_messages",
            "Messages missing from history when this node filled a gap (subscribers told history_gone)",
            lost_from_history.clone(),
        );
        let epoch_resets = Counter::default();
        registry.register(
            "epoch_resets",
            "Rooms given a new epoch because the Redis master lacked acknowledged messages",
            epoch_resets.clone(),
        );
        let replayed = Counter::default();
        registry.register(
            "replayed_messages",
            "Messages replayed to recovering clients",
            replayed.clone(),
        );
        let history_gone = Counter::default();
        registry.register(
            "history_gone",
            "Recoveries refused because the history no longer covered what the client missed",
            history_gone.clone(),
        );
        let http_connections = Gauge::default();
        registry.register(
            "http_connections",
            "Open plain HTTP connections (WebSocket connections count once upgraded, in chorus_connections)",
            http_connections.clone(),
        );
        let http_connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "HTTP connections refused because --max-http-connections were open",
            http_connections_refused.clone(),
        );
        let outbox_up = Gauge::default();
        registry.register(
            "outbox_up",
            "1 while the outbox relay is connected to PostgreSQL, else 0",
            outbox_up.clone(),
        );
        let outbox_pending = Gauge::default();
        registry.register(
            "outbox_pending_rows",
            "Committed outbox rows waiting to be relayed, at the relay's last look",
            outbox_pending.clone(),
        );
        let outbox_lag = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "outbox_lag_seconds",
            "Seconds since the oldest waiting outbox row's transaction committed (0: none waits)",
            outbox_lag.clone(),
        );
        let outbox_relayed = Counter::default();
        registry.register(
            "outbox_relayed",
            "Outbox rows published (or found already published under their key) and deleted",
            outbox_relayed.clone(),
        );
        let outbox_rejected = Counter::default();
        registry.register(
            "outbox_rejected",
            "Outbox rows that can never be published (bad room or key, data too large): logged and deleted",
            outbox_rejected.clone(),
        );
        let outbox_latency = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "outbox_relay_latency_seconds",
            "Time from an outbox row's commit to its publish",
            outbox_latency.clone(),
        );
        let kafka_partitions_read = Gauge::default();
        registry.register(
            "kafka_partitions_read",
            "Partitions of the Kafka topic this node reads: those of the rooms it serves",
            kafka_partitions_read.clone(),
        );
        let kafka_ingest_up = Gauge::default();
        registry.register(
            "kafka_ingest_up",
            "1 while the Kafka ingest consumer (--kafka-ingest) reaches its cluster, else 0",
            kafka_ingest_up.clone(),
        );
        let kafka_ingest_topics = Gauge::default();
        registry.register(
            "kafka_ingest_topics",
            "Topics the Kafka ingest (--kafka-ingest) of this node reads; 0 when it is off",
            kafka_ingest_topics.clone(),
        );
        let kafka_ingested = Counter::default();
        registry.register(
            "kafka_ingested",
            "Records of backend Kafka topics published to their rooms (duplicates of an idempotency key included)",
            kafka_ingested.clone(),
        );
        let kafka_ingest_dead_lettered = Counter::default();
        registry.register(
            "kafka_ingest_dead_lettered",
            "Records of backend Kafka topics moved to their dead-letter topic",
            kafka_ingest_dead_lettered.clone(),
        );
        let kafka_ingest_lag = Family::<TopicPartition, Gauge>::default();
        registry.register(
            "kafka_ingest_lag",
            "Records of a backend topic's partition that this node consumes and has not handled yet",
            kafka_ingest_lag.clone(),
        );
        let upstream_kafka_records = Counter::default();
        registry.register(
            "upstream_kafka_records",
            "Client publishes written to the --upstream-kafka topic (acknowledged by Kafka)",
            upstream_kafka_records.clone(),
        );
        let upstream_kafka_failed = Counter::default();
        registry.register(
            "upstream_kafka_failed",
            "Client publishes delivered whose --upstream-kafka record Kafka did not acknowledge (told outcome_unknown)",
            upstream_kafka_failed.clone(),
        );
        Self {
            kafka_ingest_up,
            kafka_ingest_topics,
            kafka_ingested,
            kafka_ingest_dead_lettered,
            kafka_ingest_lag,
            upstream_kafka_records,
            upstream_kafka_failed,
            registry: root,
            max_connections,
            connections_closed,
            errors,
            canary_round_trips,
            outbox_up,
            outbox_pending,
            outbox_lag,
            outbox_relayed,
            outbox_rejected,
            outbox_latency,
            kafka_partitions_read,
            http_connections,
            http_connections_refused,
            gap_filled,
            lost_from_history,
            epoch_resets,
            replayed,
            history_gone,
            broker_reconnects,
            canary_rtt,
            connections,
            connections_refused,
            rooms,
            published,
            publish_errors,
            delivered,
            direct_writes,
            publishes_congested,
            slow_consumers,
            bad_frames,
            delivery_latency,
            broker_up,
        }
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts a refused WebSocket upgrade; `reason` is one of [`REFUSALS`].
    pub fn refused(&self, reason: &'static str) {
        debug_assert!(REFUSALS.contains(&reason), "unlisted refusal {reason}");
        self.connections_refused
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Counts an ended WebSocket connection; `reason` is one of [`CLOSES`].
    pub fn closed(&self, reason: &'static str) {
        debug_assert!(CLOSES.contains(&reason), "unlisted close reason {reason}");
        self.connections_closed
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Counts an error frame or HTTP error body sent with `code`.
    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&Code {
                code: code.as_str(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A counter family registered with one series per label set in `all`, each
/// at 0.
fn labelled<L, const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    all: [L; N],
) -> Family<L, Counter>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Counter>::default();
    for labels in &all {
        drop(family.get_or_create(labels));
    }
    registry.register(name, help, family.clone());
    family
}

/// The standard process metrics, as Prometheus's own client libraries name
/// them, read from `/proc/self` at each scrape.
#[cfg(target_os = "linux")]
mod process {
    use procfs::process::{LimitValue, Process};
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;

    #[derive(Debug)]
    pub struct Collector {
        /// Seconds since the epoch at which the process started (fixed).
        start_time: Option<f64>,
    }

    impl Collector {
        pub fn new() -> Self {
            let start_time = Process::myself()
                .and_then(|me| me.stat())
                .and_then(|stat| {
                    let boot = procfs::boot_time_secs()?;
                    Ok(boot as f64 + stat.starttime as f64 / procfs::ticks_per_second() as f64)
                })
                .ok();
            Self { start_time }
        }
    }

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: f64,
    ) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(value);
        gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
    }

    impl prometheus_client::collector::Collector for Collector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            // A /proc that cannot be read (a sandbox without it) leaves
            // these metrics out rather than failing the scrape.
            let Ok(me) = Process::myself() else {
                return Ok(());
            };
            if let Ok(stat) = me.stat() {
                let ticks = procfs::ticks_per_second() as f64;
                let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / ticks);
                cpu.encode(encoder.encode_descriptor(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds",
                    None,
                    cpu.metric_type(),
                )?)?;
                let rss = stat.rss.saturating_mul(procfs::page_size());
                gauge(
                    &mut encoder,
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    rss as f64,
                )?;
                gauge(
                    &mut encoder,
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    stat.vsize as f64,
                )?;
                gauge(
                    &mut encoder,
                    "process_threads",
                    "Number of OS threads in the process",
                    stat.num_threads as f64,
                )?;
            }
            if let Ok(fds) = me.fd_count() {
                gauge(
                    &mut encoder,
                    "process_open_fds",
                    "Number of open file descriptors",
                    fds as f64,
                )?;
            }
            if let Ok(limits) = me.limits()
                && let LimitValue::Value(max) = limits.max_open_files.soft_limit
            {
                gauge(
                    &mut encoder,
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    max as f64,
                )?;
            }
            if let Some(start) = self.start_time {
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    start,
                )?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_labelled_series_is_exported_at_zero_from_the_start() {
        let text = Metrics::new().render();
        for reason in REFUSALS {
            let line = format!("chorus_connections_refused_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&line), "{line}\n{text}");
        }
        for reason in CLOSES {
            let line = format!("chorus_connections_closed_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&line), "{line}\n{text}");
        }
        for code in ErrorCode::ALL {
            let line = format!("chorus_errors_total{{code=\"{}\"}} 0", code.as_str());
            assert!(text.contains(&line), "{line}\n{text}");
        }
        let build = format!(
            "chorus_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
    }

    #[test]
    fn latency_buckets_rise_in_steps_of_at_most_two_and_a_half() {
        for pair in LATENCY_BUCKETS.windows(2) {
            assert!(pair[1] > pair[0] && pair[1] / pair[0] <= 2.5, "{pair:?}");
        }
        const { assert!(LATENCY_BUCKETS[0] <= 0.0001 && LATENCY_BUCKETS[15] >= 10.0) };
    }
}
