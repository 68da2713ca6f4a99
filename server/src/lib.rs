//! chorus-server: a WebSocket messaging node.
//!
//! - [`protocol`]: wire frames and room names (no I/O)
//! - [`hub`]: the node's room registry and fan-out to local subscribers
//! - [`broker`]: the message bus between nodes (memory, Redis Pub/Sub)
//! - [`transport`]: axum routes, the WebSocket connection loop, HTTP API
//! - [`session`]: one connection's protocol state (subscriptions, replies,
//!   replays, grants), between the transport and the node
//! - [`node`]: what the handlers share (hub, broker, auth, metrics, drain);
//!   it stands between the sessions and the broker
//! - [`outbox`]: the transactional outbox relay (PostgreSQL → rooms, in
//!   commit order)
//! - [`ingest`]: backend Kafka topics → rooms (`--kafka-ingest`)
//! - [`config`], [`metrics`], [`auth`], [`shutdown`]; [`secret`]: secrets kept
//!   out of `Debug`; `sync`: poison-tolerant std locks

pub mod auth;
pub mod broker;
pub mod config;
pub mod hub;
pub mod ingest;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod protocol;
pub mod secret;
pub mod session;
pub mod shutdown;
mod sync;
pub mod transport;
pub mod upstream;

pub use config::Config;
pub use node::Node;
pub use transport::{app, run};
