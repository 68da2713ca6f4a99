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
//! - [`redis_cluster`]: a Redis Cluster ([`RedisCluster`]): shards of a
//!   master and replicas joined by `redis-cli --cluster create`, with slot
//!   migration and master failover helpers; or nodes left unjoined, for
//!   code that builds the cluster itself (the operator).
//! - [`postgres`]: PostgreSQL ([`Postgres`]): `initdb` into its directory,
//!   the server on a free port (as an unprivileged user when run as root).
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
//! Adding a process kind (Kafka, a Redis Cluster) is one module of the same
//! shape as [`redis`]: an options struct; a `launch(options) -> Result<Self>`
//! that takes a [`free_port`] and a [`process::workdir`], writes its
//! configuration there, and calls [`Daemon::launch`] with the command line
//! and a [`daemon::Probe`] in its own protocol (Kafka: a metadata request
//! from a client crate or `kafka-broker-api-versions.sh`; [`postgres`]
//! connects with `tokio-postgres`); a `url()`; and
//! `deref_daemon!` so kill, restart, freeze and thaw need no new code. A
//! group (a KRaft quorum, a primary with standbys) is a struct of such
//! members whose `launch` waits until they see each other, as
//! [`SentinelGroup::launch`] does. The program must be on `PATH` (or, like
//! PostgreSQL's, where its Debian package puts it); `scripts/test.sh`
//! installs it.

pub mod chorus;
pub mod daemon;
mod error;
pub mod kafka;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod redis_cluster;
pub mod sentinel;
pub mod wait;

pub use chorus::ChorusServer;
pub use daemon::Daemon;
pub use error::{Error, Result};
pub use kafka::KafkaBroker;
pub use postgres::{Postgres, PostgresOptions};
pub use process::{ChildGuard, Proc, ProcSpec, free_port};
pub use prometheus::{Prometheus, PrometheusOptions, Target};
pub use redis::{RedisOptions, RedisServer};
pub use redis_cluster::{ClusterOptions, Migration, RedisCluster};
pub use sentinel::{GroupOptions, MASTER_NAME, Monitor, Sentinel, SentinelGroup};
