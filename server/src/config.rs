//! Command line and environment (`CHORUS_<FLAG>`) of `chorus-server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::secret::{Secret, redact_dsn, redact_url};

/// Every field that may hold a secret has a type whose `Debug` hides it
/// ([`Secret`], [`BrokerUrl`], [`OutboxDsn`]), so `{config:?}` is safe to log.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chorus-server",
    version,
    about = "Chorus WebSocket messaging server: rooms, fan-out across nodes through Redis, graceful drain",
    long_about = None
)]
pub struct Config {
    /// Address to listen on for WebSocket (/ws), HTTP API, health and metrics.
    #[arg(long, env = "CHORUS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Message bus: `memory://` (one process, no Redis), `redis://[:password@]host:port[/db]`,
    /// `redis+sentinel://[:password@]host:port[,host:port…]/<master-name>`,
    /// `redis+cluster://[:password@]host:port[,host:port…]` (Redis Cluster,
    /// sharded Pub/Sub), or `kafka://host:port[,host:port…]/<topic>`.
    #[arg(
        long,
        env = "CHORUS_BROKER",
        default_value = "memory://",
        hide_env_values = true
    )]
    pub broker: BrokerUrl,

    /// `pubsub`: at-most-once live fan-out. `streams`: durable history with recovery (needs Redis).
    #[arg(long, env = "CHORUS_DELIVERY", value_enum, default_value_t = DeliveryMode::Pubsub)]
    pub delivery: DeliveryMode,

    /// Messages of history kept per room in streams mode (approximate cap).
    #[arg(long, env = "CHORUS_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: u64,

    /// How long an idle room's history is kept in streams mode (e.g. `10m`, `1h`).
    #[arg(long, env = "CHORUS_HISTORY_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub history_ttl: Duration,

    /// This node's name in `welcome` frames, logs and metrics. Default: the host name.
    #[arg(long, env = "CHORUS_NODE_ID")]
    pub node_id: Option<String>,

    /// Key that backends must send as `Authorization: Bearer <key>` to the HTTP publish API.
    /// Off when neither this nor --api-key-file is set.
    #[arg(
        long,
        env = "CHORUS_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Option<Secret>,

    /// File holding the backend API key (surrounding whitespace is ignored).
    #[arg(long, env = "CHORUS_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// HS256 secret for client JWTs. When set (or --jwt-secret-file / --jwt-public-key-file),
    /// WebSocket clients must present a token.
    #[arg(
        long,
        env = "CHORUS_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_secret_file"
    )]
    pub jwt_secret: Option<Secret>,

    /// File holding the HS256 secret for client JWTs.
    #[arg(long, env = "CHORUS_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key (RSA or EC P-256) to verify RS256/ES256 client JWTs.
    #[arg(long, env = "CHORUS_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Largest accepted client frame in bytes; larger frames get `too_large`.
    #[arg(long, env = "CHORUS_MAX_FRAME_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(64..))]
    pub max_frame_bytes: u32,

    /// Frames queued per connection before it counts as a slow consumer and is closed (1008).
    #[arg(long, env = "CHORUS_SEND_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub send_queue: u32,

    /// A connection whose socket takes nothing for this long (its client
    /// does not read) is closed as a slow consumer (1008), whether or not
    /// more traffic would overflow its send queue.
    #[arg(long, env = "CHORUS_SEND_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub send_timeout: Duration,

    /// Publishes per second one connection may make (burst: one second's
    /// worth); more get `rate_limited`. 0 turns the limit off.
    #[arg(long, env = "CHORUS_MAX_PUBLISH_RATE", default_value_t = 0)]
    pub max_publish_rate: u32,

    /// Rooms one connection may be subscribed to at once; a `subscribe` past
    /// it gets `too_many_rooms` (the connection stays, in its rooms).
    #[arg(long, env = "CHORUS_MAX_ROOMS_PER_CONNECTION", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rooms_per_connection: u32,

    /// Open WebSocket connections accepted; further upgrades get HTTP 503.
    #[arg(long, env = "CHORUS_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Plain HTTP connections (not yet, or never, upgraded to WebSocket) open
    /// at once; further ones get a 503 and are closed.
    #[arg(long, env = "CHORUS_MAX_HTTP_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_http_connections: u32,

    /// Time a client has to send a request's head, from connecting or from
    /// the previous response on a kept-alive connection: an HTTP connection
    /// idle for this long is closed.
    #[arg(long, env = "CHORUS_HTTP_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub http_header_timeout: Duration,

    /// Time a client has to send a request's body, from the end of its head;
    /// a body not complete by then gets 408.
    #[arg(long, env = "CHORUS_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub http_body_timeout: Duration,

    /// On SIGTERM/SIGINT, spread `reconnect` frames to clients over this many seconds, then exit.
    #[arg(long, env = "CHORUS_DRAIN_SECONDS", default_value_t = 10)]
    pub drain_seconds: u64,

    /// Log format.
    #[arg(long, env = "CHORUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// File holding the Redis password (instead of putting it in the --broker URL).
    #[arg(long, env = "CHORUS_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// Bound on each Redis call (connect, publish, subscribe); a publish that
    /// Redis does not answer in time gets `unavailable`.
    #[arg(long, env = "CHORUS_REDIS_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// How often a canary message is sent round through Redis Pub/Sub to prove
    /// this node's subscription still delivers.
    #[arg(long, env = "CHORUS_CANARY_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub canary_interval: Duration,

    /// A publish carrying an idempotency `key` that was already published to
    /// the room within this window returns the first publish's offset and is
    /// not delivered again.
    #[arg(long, env = "CHORUS_IDEMPOTENCY_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,

    /// Rooms (names, `prefix:*` or `*`; comma-separated) whose client publishes are
    /// also appended to the Redis stream `chorus:upstream:<room>` for backend
    /// consumer groups (needs a Redis broker), or written to the Kafka topic
    /// of --upstream-kafka.
    #[arg(long, env = "CHORUS_UPSTREAM_ROOMS", value_delimiter = ',')]
    pub upstream_rooms: Vec<String>,

    /// Approximate number of entries kept in each upstream stream.
    #[arg(long, env = "CHORUS_UPSTREAM_MAXLEN", default_value_t = 100_000)]
    pub upstream_maxlen: u64,

    /// Partitions of the Kafka topic when a node creates it (it is created
    /// when missing; an existing topic keeps its own count).
    #[arg(long, env = "CHORUS_KAFKA_PARTITIONS", default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub kafka_partitions: u32,

    /// Bound on a Kafka publish (acknowledged by every in-sync replica) and
    /// on metadata requests; a publish not acknowledged in time gets
    /// `outcome_unknown`.
    #[arg(long, env = "CHORUS_KAFKA_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub kafka_timeout: Duration,

    /// Backend Kafka topics to publish into rooms:
    /// `kafka://host:port[,host:port…]/<topic>[,<topic>…]`. This node joins
    /// the consumer group --kafka-ingest-group and publishes each record to
    /// its room (header `chorus-room`, else the record key) through its
    /// --broker, committing offsets once the publishes are acknowledged.
    #[arg(long, env = "CHORUS_KAFKA_INGEST", value_name = "URL")]
    pub kafka_ingest: Option<String>,

    /// Consumer group of the ingest: nodes with the same group share the
    /// topics' partitions.
    #[arg(
        long,
        env = "CHORUS_KAFKA_INGEST_GROUP",
        default_value = "chorus-ingest"
    )]
    pub kafka_ingest_group: String,

    /// Publishes of one ingested record that may fail (a timeout, an
    /// overloaded broker) before it goes to the dead-letter topic. Records
    /// that can never be published (no room, a bad room name, too large)
    /// go at once; while the broker is unavailable the record waits.
    #[arg(long, env = "CHORUS_KAFKA_INGEST_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub kafka_ingest_attempts: u32,

    /// Dead-letter topic of every ingested topic. Default: `<topic>.dead-letter`
    /// for each.
    #[arg(long, env = "CHORUS_KAFKA_INGEST_DEAD_LETTER", value_name = "TOPIC")]
    pub kafka_ingest_dead_letter: Option<String>,

    /// Kafka topic that client publishes to --upstream-rooms are written to
    /// (`kafka://host:port[,host:port…]/<topic>`, keyed by room), instead of
    /// the Redis streams `chorus:upstream:<room>`. Works with any --broker.
    #[arg(long, env = "CHORUS_UPSTREAM_KAFKA", value_name = "URL")]
    pub upstream_kafka: Option<String>,

    /// Origins whose browser pages may call the HTTP API (`/api/v1/…`), e.g.
    /// `https://app.example.com` (comma-separated), or `*` for any origin.
    /// Default: none, so pages on other origins cannot read its answers.
    /// `/chorus.js` may be imported from any origin whatever this says.
    #[arg(long, env = "CHORUS_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_origins: Vec<String>,

    /// PostgreSQL to relay a transactional outbox from
    /// (`postgres://user[:password]@host[:port]/db[?…]` or `host=… user=…`):
    /// rows that backends insert into --outbox-table inside their own
    /// transactions are published to their rooms once those commit, in
    /// commit order. Off when neither this nor --outbox-dsn-file is set.
    #[arg(
        long = "outbox",
        env = "CHORUS_OUTBOX",
        value_name = "DSN",
        hide_env_values = true,
        conflicts_with = "outbox_dsn_file"
    )]
    pub outbox: Option<OutboxDsn>,

    /// File holding the --outbox DSN (a mounted Kubernetes Secret; surrounding
    /// whitespace is ignored).
    #[arg(long, env = "CHORUS_OUTBOX_DSN_FILE", value_name = "PATH")]
    pub outbox_dsn_file: Option<PathBuf>,

    /// The outbox table (`name` or `schema.name`; lower-case letters, digits, `_`).
    #[arg(long, env = "CHORUS_OUTBOX_TABLE", default_value = "chorus_outbox", value_parser = OutboxTable::parse)]
    pub outbox_table: OutboxTable,

    /// Create the outbox table, its index, sequence and commit trigger when
    /// missing (server/sql/outbox.sql) before relaying.
    #[arg(long, env = "CHORUS_OUTBOX_INIT")]
    pub outbox_init: bool,

    /// Rows one relay takes from a partition of rooms at a time.
    #[arg(long, env = "CHORUS_OUTBOX_BATCH", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub outbox_batch: u32,

    /// How often the relay looks for rows when no notification woke it
    /// (LISTEN/NOTIFY wakes it at once; this covers a lost notification).
    #[arg(long, env = "CHORUS_OUTBOX_POLL_INTERVAL", default_value = "1s", value_parser = parse_positive_duration)]
    pub outbox_poll_interval: Duration,

    /// A canary not back within this long marks the subscription dead:
    /// `/readyz` turns 503 and the node reconnects to Redis.
    #[arg(long, env = "CHORUS_CANARY_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub canary_timeout: Duration,
}

/// The `--broker` URL. It may carry a password: its `Debug` form hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `memory`, `redis`, `redis+sentinel`, … (`None` without `://`).
    pub fn scheme(&self) -> Option<&str> {
        self.0.split_once("://").map(|(scheme, _)| scheme)
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl From<String> for BrokerUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.redacted(), f)
    }
}

/// The `--outbox` DSN. It may carry a password: its `Debug` form hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct OutboxDsn(String);

impl OutboxDsn {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The DSN without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        redact_dsn(&self.0)
    }
}

impl From<String> for OutboxDsn {
    fn from(dsn: String) -> Self {
        Self(dsn)
    }
}

impl std::fmt::Debug for OutboxDsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.redacted(), f)
    }
}

/// The `--outbox-table`: a table name, schema-qualified or not, plain
/// enough to need no quoting and to leave room for the names derived from
/// it (`<name>_commit_seq`, `<name>_unstamped`, …) within PostgreSQL's 63
/// bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTable {
    pub schema: Option<String>,
    pub name: String,
}

impl OutboxTable {
    /// Longest table (and schema) name accepted.
    pub const MAX_LEN: usize = 48;

    pub fn parse(value: &str) -> Result<Self, String> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= Self::MAX_LEN
                && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        let (schema, name) = match value.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, value),
        };
        if !plain(name) || schema.is_some_and(|s| !plain(s)) {
            return Err(format!(
                "`{value}` is not a table name: expected `name` or `schema.name`, each 1 to {} of \
                 a-z, 0-9 and _ (not starting with a digit)",
                Self::MAX_LEN
            ));
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for OutboxTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeliveryMode {
    Pubsub,
    Streams,
}

impl DeliveryMode {
    /// The flag's value: `pubsub` or `streams`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pubsub => "pubsub",
            Self::Streams => "streams",
        }
    }
}

impl std::fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Defaults, as if started with no flags (for tests and embedding).
    pub fn defaults() -> Self {
        Self::parse_from(["chorus-server"])
    }

    /// The node id, falling back to the host name.
    pub fn node_id(&self) -> String {
        if let Some(id) = self.node_id.as_deref().filter(|s| !s.is_empty()) {
            return id.to_string();
        }
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "chorus".to_string())
    }
}

/// A duration above zero (`10s`, `1m`).
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// An origin as browsers send it in `Origin` (`scheme://host[:port]`, no
/// path, no trailing slash), or `*`.
fn parse_origin(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value == "*" {
        return Ok(value.to_string());
    }
    let host = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| {
            format!("`{value}` is not an origin: expected http(s)://host[:port] or *")
        })?;
    let printable = |c: char| c.is_ascii_graphic() && !"/?#@,*".contains(c);
    if host.is_empty() || !host.chars().all(printable) {
        return Err(format!(
            "`{value}` is not an origin: expected http(s)://host[:port] with no path or trailing slash, or *"
        ));
    }
    Ok(value.to_string())
}

/// Reads a secret from a file, trimming surrounding whitespace.
pub fn read_secret(path: &std::path::Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = Config::defaults();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.broker.as_str(), "memory://");
        assert_eq!(c.delivery, DeliveryMode::Pubsub);
        assert_eq!(c.max_frame_bytes, 65536);
        assert_eq!(c.history_ttl, Duration::from_secs(600));
        assert_eq!(c.max_rooms_per_connection, 128);
        assert_eq!(c.send_timeout, Duration::from_secs(10));
        assert_eq!(c.max_http_connections, 1024);
        assert_eq!(
            (c.http_header_timeout, c.http_body_timeout),
            (Duration::from_secs(30), Duration::from_secs(30))
        );
    }

    #[test]
    fn flags_parse_and_bad_values_are_refused() {
        let c = Config::try_parse_from([
            "chorus-server",
            "--send-queue",
            "8",
            "--delivery",
            "streams",
            "--history-ttl",
            "1h",
        ])
        .unwrap();
        assert_eq!(
            (c.send_queue, c.delivery, c.history_ttl),
            (8, DeliveryMode::Streams, Duration::from_secs(3600))
        );
        assert!(Config::try_parse_from(["chorus-server", "--send-queue", "0"]).is_err());
        assert!(Config::try_parse_from(["chorus-server", "--delivery", "carrier-pigeon"]).is_err());
        assert!(Config::try_parse_from(["chorus-server", "--listen", "nowhere"]).is_err());
        assert!(Config::try_parse_from(["chorus-server", "--http-header-timeout", "0s"]).is_err());
    }

    #[test]
    fn delivery_modes_print_as_their_flag_values() {
        for mode in DeliveryMode::value_variants() {
            let flag = mode.to_possible_value().unwrap();
            assert_eq!(mode.to_string(), flag.get_name());
        }
    }

    #[test]
    fn cors_origins_are_origins_or_a_star() {
        let c = Config::try_parse_from([
            "chorus-server",
            "--cors-origins",
            "https://app.example.com, http://127.0.0.1:3000",
        ])
        .unwrap();
        assert_eq!(
            c.cors_origins,
            ["https://app.example.com", "http://127.0.0.1:3000"]
        );
        assert!(Config::defaults().cors_origins.is_empty());
        let star = Config::try_parse_from(["chorus-server", "--cors-origins", "*"]).unwrap();
        assert_eq!(star.cors_origins, ["*"]);
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://",
            "ftp://x",
        ] {
            assert!(
                Config::try_parse_from(["chorus-server", "--cors-origins", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }
}
