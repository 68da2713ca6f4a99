//! chorus-testkit: the external processes that Chorus tests and benchmarks
//! run on loopback, each on a free port in its own temporary directory,
//! killed (SIGKILL) and cleaned up when its handle is dropped.
//!
//! - [`process`]: a free port, a private directory, a [`Proc`] (spawn with
//!   a log file, kill, respawn, SIGSTOP, SIGCONT, SIGTERM, log tail) and
//!   [`ChildGuard`] for one-off commands.
//! - [`daemon`]: what every kind of server shares: a [`Proc`] on a port
//!   with a readiness probe ([`Daemon`]: launch, kill, restart on the same
//!   port, freeze, thaw). Each kind below dereferences to its `Daemon`.
//! - [`wait`]: readiness and conditions polled with a deadline, never a
//!   fixed sleep.
//! - [`redis`]: `redis-server` ([`RedisServer`]) and one-shot commands.
//! - [`sentinel`]: `redis-sentinel` ([`Sentinel`]) and a monitored group
//!   of master, replicas and sentinels with small timeouts ([`SentinelGroup`]).
//! - [`kafka`]: an Apache Kafka broker in KRaft mode ([`KafkaBroker`]),
//!   from jars cached by `scripts/kafka/install.sh`.
//! - [`chorus`]: the `chorus-server` binary ([`ChorusServer`]), ready when
//!   `/readyz` answers 200.
//! - [`prometheus`]: a Prometheus server ([`Prometheus`]) scraping given
//!   targets and evaluating a rule file every second, asked through its
//!   HTTP API.
//!
//! Constructors come in two forms: `launch` returns an [`Error`] (the bench
//! reports it), `start` panics with that error's message (tests). Helpers
//! that tests call in the middle of a scenario (`query`, `restart`,
//! `freeze`) panic like an assertion would.
//!
//! Adding a process kind (Kafka, PostgreSQL) is one module of the same
//! shape as [`redis`]: an options struct; a `launch(options) -> Result<Self>`
//! that takes a [`free_port`] and a [`process::workdir`], writes its
//! configuration there, and calls [`Daemon::launch`] with the command line
//! and a [`daemon::Probe`] in its own protocol (Kafka: a metadata request
//! from a client crate or `kafka-broker-api-versions.sh`; PostgreSQL:
//! `pg_isready`, or a `tokio-postgres` connection); a `url()`; and
//! `deref_daemon!` so kill, restart, freeze and thaw need no new code. A
//! group (a KRaft quorum, a primary with standbys) is a struct of such
//! members whose `launch` waits until they see each other, as
//! [`SentinelGroup::launch`] does. The program must be on `PATH`;
//! `scripts/test.sh` installs it.

pub mod chorus;
pub mod daemon;
mod error;
pub mod kafka;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod sentinel;
pub mod wait;

pub use chorus::ChorusServer;
pub use daemon::Daemon;
pub use error::{Error, Result};
pub use kafka::KafkaBroker;
pub use process::{ChildGuard, Proc, ProcSpec, free_port};
pub use prometheus::{Prometheus, PrometheusOptions, Target};
pub use redis::{RedisOptions, RedisServer};
pub use sentinel::{GroupOptions, MASTER_NAME, Monitor, Sentinel, SentinelGroup};
