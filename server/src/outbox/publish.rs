//! One batch of outbox rows through the node's publish path.
//!
//! Rows arrive in commit order. Each room's rows are published one after
//! the other (a room's next row waits for the previous one's answer), rooms
//! side by side. The first failure in a room stops that room: its later
//! rows stay in the table for the next round, so a room's order survives a
//! broker that fails half-way. A row that can never be published (a room
//! name or key the protocol refuses, `data` over the size limit) is
//! rejected: logged, counted and deleted, not retried forever.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::value::RawValue;

use crate::broker::{BrokerError, PublishRequest};
use crate::node::Node;
use crate::protocol::{RoomName, check_key};

/// One row as the relay read it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub room: String,
    /// `data` as JSON text.
    pub data: String,
    pub key: Option<String>,
    /// Seconds from its transaction's commit to the read.
    pub age: f64,
}

/// What became of a batch.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Published (or already published under the same key): to delete.
    pub published: Vec<i64>,
    /// Never publishable: to delete.
    pub rejected: Vec<i64>,
    /// A publish failed: the rest of its room stays for later.
    pub failed: Option<BrokerError>,
    /// Seconds from commit to publish, per published row.
    pub latencies: Vec<f64>,
}

impl Outcome {
    /// Every row to delete.
    pub fn done(&self) -> Vec<i64> {
        self.published
            .iter()
            .chain(&self.rejected)
            .copied()
            .collect()
    }
}

/// A row checked against the protocol's rules, or why it never can be published.
fn request(
    row: &OutboxRow,
    key_prefix: &str,
    max_data_bytes: usize,
) -> Result<PublishRequest, String> {
    let room = RoomName::parse(&row.room).map_err(|e| e.to_string())?;
    if let Some(key) = &row.key {
        check_key(key)?;
    }
    if row.data.len() > max_data_bytes {
        return Err(format!(
            "data is {} bytes, over --max-frame-bytes ({max_data_bytes})",
            row.data.len()
        ));
    }
    let data = RawValue::from_string(row.data.clone()).map_err(|e| e.to_string())?;
    Ok(PublishRequest {
        room,
        data,
        from: None,
        key: Some(
            row.key
                .clone()
                .unwrap_or_else(|| format!("{key_prefix}{}", row.id)),
        ),
    })
}

/// Publishes `rows` (in commit order) through `node`: each room in order,
/// rooms concurrently. Rows without a key get `<key_prefix><id>`.
pub async fn publish_batch(
    node: &Arc<Node>,
    rows: Vec<OutboxRow>,
    key_prefix: &str,
    max_data_bytes: usize,
) -> Outcome {
    let mut outcome = Outcome::default();
    // Rooms in the order they first appear, each with its rows in order.
    let mut rooms: Vec<(String, Vec<(OutboxRow, PublishRequest)>)> = Vec::new();
    for row in rows {
        let req = match request(&row, key_prefix, max_data_bytes) {
            Ok(req) => req,
            Err(why) => {
                tracing::warn!(id = row.id, room = %row.room, %why, "outbox row rejected: never publishable, deleted");
                outcome.rejected.push(row.id);
                continue;
            }
        };
        match rooms.iter_mut().find(|(room, _)| *room == row.room) {
            Some((_, list)) => list.push((row, req)),
            None => rooms.push((row.room.clone(), vec![(row, req)])),
        }
    }
    let rooms = rooms.into_iter().map(|(_, list)| {
        let node = node.clone();
        async move {
            let start = std::time::Instant::now();
            let mut done = Vec::new();
            for (row, req) in list {
                match node.publish(req).await {
                    Ok(_) => done.push((row.id, row.age + secs(start.elapsed()))),
                    Err(e) => return (done, Some(e)),
                }
            }
            (done, None)
        }
    });
    for (done, failed) in join_all(rooms).await {
        for (id, latency) in done {
            outcome.published.push(id);
            outcome.latencies.push(latency);
        }
        if failed.is_some() && outcome.failed.is_none() {
            outcome.failed = failed;
        }
    }
    outcome
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::hub::{ConnHandle, Outbound};
    use crate::node::Node;

    fn row(id: i64, room: &str, data: &str, key: Option<&str>) -> OutboxRow {
        OutboxRow {
            id,
            room: room.into(),
            data: data.into(),
            key: key.map(Into::into),
            age: 0.0,
        }
    }

    #[tokio::test]
    async fn rows_reach_their_rooms_in_order_and_bad_ones_are_rejected() {
        let node = Node::start(Config::defaults()).await.unwrap();
        let (handle, mut queue) = ConnHandle::new(16);
        let room = RoomName::parse("a").unwrap();
        let member = crate::hub::Member {
            handle,
            sent: Default::default(),
        };
        node.subscribe(crate::hub::ConnId(1), member, &room, None)
            .await
            .unwrap();
        let rows = vec![
            row(1, "a", r#"{"n":1}"#, None),
            row(2, "bad room", "1", None),
            row(3, "b", "3", None),
            row(4, "a", r#"{"n":2}"#, Some("k")),
            // Over the size limit.
            row(5, "a", "[1,2,3,4]", None),
            // Already published under key `k`: not delivered again.
            row(6, "a", r#"{"n":0}"#, Some("k")),
        ];
        let outcome = publish_batch(&node, rows, "outbox:7:", 8).await;
        assert_eq!(outcome.rejected, [2, 5]);
        let mut published = outcome.published.clone();
        published.sort();
        assert_eq!(published, [1, 3, 4, 6]);
        assert!(outcome.failed.is_none());
        let mut seen = Vec::new();
        while let Some(Outbound::Message(delivery)) = queue.try_recv() {
            seen.push(delivery.frame.to_string());
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].contains(r#""data":{"n":1}"#), "{seen:?}");
        assert!(seen[1].contains(r#""data":{"n":2}"#), "{seen:?}");
    }
}
