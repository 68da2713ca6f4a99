//! Prometheus metrics of a node (`GET /metrics`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric of the node, registered once in its own registry.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// WebSocket upgrades refused (connection limit or draining).
    pub connections_refused: Counter,
    /// Rooms with at least one local subscriber.
    pub rooms: Gauge,
    /// Publishes accepted by the broker through this node.
    pub published: Counter,
    /// Publishes that failed (broker unavailable, timeout).
    pub publish_errors: Counter,
    /// `message` frames handed to local subscribers' send queues.
    pub delivered: Counter,
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
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chorus");
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "WebSocket upgrades refused because of the connection limit or a drain",
            connections_refused.clone(),
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
        // 50 µs .. ~1.6 s
        let delivery_latency = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
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
        Self {
            registry,
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
            slow_consumers,
            bad_frames,
            delivery_latency,
            broker_up,
        }
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
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
