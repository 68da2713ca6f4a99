//! The backend side of upstream streams: a consumer-group reader.
//!
//! With `--upstream-rooms`, every client publish to a matching room is also
//! appended (atomically with its delivery) to the Redis stream
//! `chorus:upstream:<room>` with the fields `offset`, `epoch`, `data` (the
//! JSON the client published), `from` (the publisher's session) and `ts`
//! (microseconds since the Unix epoch). Backend replicas read those streams
//! through one consumer group, so each message is processed by exactly one
//! replica:
//!
//! 1. `XAUTOCLAIM` first takes over entries that another consumer (or this
//!    one) read but did not acknowledge within `claim_idle` — a replica that
//!    crashed mid-way loses nothing;
//! 2. an entry read `max_attempts` times without success is moved to the
//!    dead-letter stream `chorus:upstream-dead:<room>` (same fields plus
//!    `id` and `attempts`) and acknowledged;
//! 3. then `XREADGROUP … >` takes new entries;
//! 4. a handled entry is `XACK`ed; a failed one stays pending for a retry.
//!
//! With `--upstream-kafka` the same messages go to a Kafka topic instead,
//! one [`UpstreamRecord`] per message; backends read it with a Kafka
//! consumer group (`server/examples/kafka_to_postgres.rs`).

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};

/// Headers of the Kafka records the feed writes (`--upstream-kafka`) and
/// that the ingest reads (`--kafka-ingest`: room and idempotency key).
pub const ROOM_HEADER: &str = "chorus-room";
pub const OFFSET_HEADER: &str = "chorus-offset";
pub const EPOCH_HEADER: &str = "chorus-epoch";
pub const IDEMPOTENCY_KEY_HEADER: &str = "chorus-idempotency-key";

/// One client publish as the Kafka feed (`--upstream-kafka`) writes it: the
/// record's value is this as JSON, with the fields of a Redis upstream
/// entry (`offset`, `epoch`, `data`, `from`, `ts`) plus the `room` (a Redis
/// entry has it in its stream's name). The record's key is the room, so a
/// room's records share a partition.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpstreamRecord {
    pub room: String,
    pub offset: u64,
    pub epoch: String,
    /// The JSON the client published, as it published it.
    pub data: Box<serde_json::value::RawValue>,
    /// The publisher's session.
    pub from: String,
    /// Publish time, microseconds since the Unix epoch.
    pub ts: u64,
}

pub const UPSTREAM_PREFIX: &str = "chorus:upstream:";
pub const DEAD_LETTER_PREFIX: &str = "chorus:upstream-dead:";

/// The upstream stream of a room (the prefix, then the whole room name).
pub fn upstream_key(room: &str) -> String {
    format!("{UPSTREAM_PREFIX}{room}")
}

/// The dead-letter stream of a room.
pub fn dead_letter_key(room: &str) -> String {
    format!("{DEAD_LETTER_PREFIX}{room}")
}

#[derive(Clone)]
pub struct ConsumerConfig {
    /// `redis://[:password@]host:port[/db]` of the master.
    pub redis_url: String,
    /// Consumer group: one per backend service.
    pub group: String,
    /// This replica's name within the group (e.g. the pod name).
    pub consumer: String,
    /// Rooms to consume (their streams are `chorus:upstream:<room>`).
    pub rooms: Vec<String>,
    /// Entries read per call at most.
    pub batch: usize,
    /// How long one read waits for new entries.
    pub block: Duration,
    /// Entries pending longer than this are taken over.
    pub claim_idle: Duration,
    /// Deliveries after which an entry goes to the dead-letter stream.
    pub max_attempts: u64,
}

// By hand: the URL may carry the Redis password.
impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("redis_url", &crate::secret::redact_url(&self.redis_url))
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("rooms", &self.rooms)
            .field("batch", &self.batch)
            .field("block", &self.block)
            .field("claim_idle", &self.claim_idle)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

impl ConsumerConfig {
    pub fn new(redis_url: &str, group: &str, consumer: &str, rooms: Vec<String>) -> Self {
        Self {
            redis_url: redis_url.to_string(),
            group: group.to_string(),
            consumer: consumer.to_string(),
            rooms,
            batch: 32,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

/// How long any call may wait for Redis's answer: a blocking read
/// legitimately waits `block` before Redis answers (the client library's own
/// default, 500 ms, would cut every idle read of the default 1 s block).
fn response_timeout(block: Duration) -> Duration {
    block + RESPONSE_MARGIN
}

/// Time Redis has to answer on top of a blocking read's wait.
const RESPONSE_MARGIN: Duration = Duration::from_secs(2);

/// One client publish, as a backend receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamMessage {
    pub room: String,
    /// Stream entry id (for `ack`).
    pub id: String,
    pub offset: u64,
    pub epoch: String,
    pub data: serde_json::Value,
    /// Publisher session.
    pub from: String,
    pub published_at_us: u64,
    /// How many times this entry has been handed out (1 on the first try).
    pub attempt: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("malformed upstream entry {id} in {stream}: {why}")]
    Malformed {
        stream: String,
        id: String,
        why: String,
    },
}

pub struct Consumer {
    cfg: ConsumerConfig,
    conn: MultiplexedConnection,
    streams: Vec<String>,
}

impl Consumer {
    /// Connects and creates the group on every stream (from the start of the
    /// stream, so nothing appended before the first consumer is skipped).
    pub async fn connect(cfg: ConsumerConfig) -> Result<Self, UpstreamError> {
        let client = redis::Client::open(cfg.redis_url.as_str())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(response_timeout(cfg.block)));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let streams: Vec<String> = cfg.rooms.iter().map(|r| upstream_key(r)).collect();
        for stream in &streams {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(&cfg.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            if let Err(e) = created
                && e.code() != Some("BUSYGROUP")
            {
                return Err(e.into());
            }
        }
        Ok(Self { cfg, conn, streams })
    }

    /// The next entries to handle: stuck ones first, then new ones.
    pub async fn next_batch(&mut self) -> Result<Vec<UpstreamMessage>, UpstreamError> {
        let mut out = Vec::new();
        for stream in self.streams.clone() {
            out.extend(self.claim_stuck(&stream).await?);
        }
        if !out.is_empty() {
            return Ok(out);
        }
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(self.cfg.batch)
            .arg("BLOCK")
            .arg(self.cfg.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.streams);
        for _ in &self.streams {
            read.arg(">");
        }
        let reply: Option<StreamReadReply> = read.query_async(&mut self.conn).await?;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                out.push(parse(&key.key, &entry, 1)?);
            }
        }
        Ok(out)
    }

    /// Takes over entries pending longer than `claim_idle`; dead-letters the
    /// ones that used up their attempts.
    async fn claim_stuck(&mut self, stream: &str) -> Result<Vec<UpstreamMessage>, UpstreamError> {
        let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg(self.cfg.claim_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(self.cfg.batch)
            .query_async(&mut self.conn)
            .await?;
        let mut out = Vec::new();
        for entry in claimed.claimed {
            let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(stream)
                .arg(&self.cfg.group)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1)
                .query_async(&mut self.conn)
                .await?;
            let attempt = pending.ids.first().map_or(1, |p| p.times_delivered as u64);
            if attempt > self.cfg.max_attempts {
                self.dead_letter(stream, &entry, attempt - 1).await?;
                continue;
            }
            out.push(parse(stream, &entry, attempt)?);
        }
        Ok(out)
    }

    async fn dead_letter(
        &mut self,
        stream: &str,
        entry: &StreamId,
        attempts: u64,
    ) -> Result<(), UpstreamError> {
        let room = stream.strip_prefix(UPSTREAM_PREFIX).unwrap_or(stream);
        let mut add = redis::cmd("XADD");
        add.arg(dead_letter_key(room)).arg("*");
        let mut fields: Vec<(&String, &redis::Value)> = entry.map.iter().collect();
        fields.sort_by_key(|(k, _)| k.as_str());
        for (k, v) in fields {
            if let redis::Value::BulkString(b) = v {
                add.arg(k).arg(b.as_slice());
            }
        }
        add.arg("id").arg(&entry.id).arg("attempts").arg(attempts);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(add)
            .cmd("XACK")
            .arg(stream)
            .arg(&self.cfg.group)
            .arg(&entry.id);
        let _: redis::Value = pipe.query_async(&mut self.conn).await?;
        tracing::warn!(stream, id = %entry.id, attempts, "upstream entry moved to the dead-letter stream");
        Ok(())
    }

    /// Marks an entry handled.
    pub async fn ack(&mut self, msg: &UpstreamMessage) -> Result<(), UpstreamError> {
        let _: i64 = redis::cmd("XACK")
            .arg(upstream_key(&msg.room))
            .arg(&self.cfg.group)
            .arg(&msg.id)
            .query_async(&mut self.conn)
            .await?;
        Ok(())
    }
}

fn parse(stream: &str, entry: &StreamId, attempt: u64) -> Result<UpstreamMessage, UpstreamError> {
    let fields: HashMap<&str, String> = entry
        .map
        .iter()
        .filter_map(|(k, v)| match v {
            redis::Value::BulkString(b) => {
                Some((k.as_str(), String::from_utf8_lossy(b).into_owned()))
            }
            _ => None,
        })
        .collect();
    let bad = |why: &str| UpstreamError::Malformed {
        stream: stream.to_string(),
        id: entry.id.clone(),
        why: why.to_string(),
    };
    let field = |name: &str| {
        fields
            .get(name)
            .cloned()
            .ok_or_else(|| bad(&format!("missing `{name}`")))
    };
    Ok(UpstreamMessage {
        room: stream
            .strip_prefix(UPSTREAM_PREFIX)
            .unwrap_or(stream)
            .to_string(),
        id: entry.id.clone(),
        offset: field("offset")?
            .parse()
            .map_err(|_| bad("`offset` is not a number"))?,
        epoch: field("epoch")?,
        data: serde_json::from_str(&field("data")?).map_err(|_| bad("`data` is not JSON"))?,
        from: field("from").unwrap_or_default(),
        published_at_us: field("ts").ok().and_then(|t| t.parse().ok()).unwrap_or(0),
        attempt,
    })
}
