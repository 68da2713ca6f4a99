//! A real Apache Kafka broker (4.x, KRaft mode, one node that is both
//! broker and controller) on a free port of 127.0.0.1 (or of another
//! address of this machine, [`KafkaBroker::launch_on`]), from the jars that
//! `scripts/kafka/install.sh` copies from Maven Central into
//! `~/.cache/chorus/kafka/<version>/lib` (installed on first use when
//! missing). Its storage is formatted in the broker's own directory, so a
//! [`Daemon::restart`] keeps every topic and record, as a broker pod with a
//! volume would. Ready when a metadata request lists the broker.
//!
//! Start-up on this machine's two shared cores: formatting ~3 s, the broker
//! ~10 s more (a JVM with a small heap, C1 only).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::daemon::{Daemon, DaemonSpec, Probe, deref_daemon};
use crate::process::{ProcSpec, free_port, workdir};
use crate::{Error, Result};

/// How long the broker may take to format its storage and be ready, or to
/// come back after a restart (a JVM on two shared cores).
pub const KAFKA_START_LIMIT: Duration = Duration::from_secs(90);

/// Overrides where the broker's jars are (a directory of `*.jar`).
pub const KAFKA_LIB_ENV: &str = "CHORUS_KAFKA_LIB";

/// Logging: warnings, plus the broker's start and stop lines.
const LOG4J2: &str = "\
rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
logger.broker.name=kafka.server.BrokerServer
logger.broker.level=INFO
";

/// A single-node Kafka broker. Kill, restart, freeze and thaw come from its
/// [`Daemon`]; a restart keeps the data.
pub struct KafkaBroker {
    daemon: Daemon,
    /// The address clients use: it listens there and advertises it.
    host: String,
}

deref_daemon!(KafkaBroker);

impl KafkaBroker {
    /// [`KafkaBroker::launch`], panicking with the error (for tests).
    pub async fn start() -> Self {
        Self::launch().await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Formats a fresh storage directory, starts the broker on 127.0.0.1
    /// and waits until it answers a metadata request.
    pub async fn launch() -> Result<Self> {
        Self::launch_on("127.0.0.1").await
    }

    /// [`KafkaBroker::launch`] listening on (and advertising) `host`, an
    /// address of this machine that clients elsewhere can reach, e.g. the
    /// node IP of a one-node Kubernetes cluster on this machine for its
    /// pods. Its controller stays on 127.0.0.1.
    pub async fn launch_on(host: &str) -> Result<Self> {
        let lib = lib_dir().await?;
        let port = free_port();
        let controller = free_port();
        let dir = workdir("kafka")?;
        let config = dir.path().join("server.properties");
        write(
            &config,
            &server_properties(host, port, controller, dir.path()),
        )?;
        let log4j = dir.path().join("log4j2.properties");
        write(&log4j, LOG4J2)?;
        let java = |main: &str, args: &[&str]| -> Vec<String> {
            let mut all: Vec<String> = [
                "-Xms128m",
                "-Xmx384m",
                "-XX:+UseSerialGC",
                // C1 only: starts in about half the time on two cores.
                "-XX:TieredStopAtLevel=1",
            ]
            .map(String::from)
            .into();
            all.push(format!("-Dlog4j2.configurationFile={}", log4j.display()));
            all.push("-cp".into());
            all.push(format!("{}/*", lib.display()));
            all.push(main.into());
            all.extend(args.iter().map(|a| a.to_string()));
            all
        };
        let config_arg = config.display().to_string();
        // Any fixed 22-character base64 id does: each broker is its own cluster.
        let format = java(
            "kafka.tools.StorageTool",
            &["format", "-t", "Q2hvcnVzVGVzdENsdXN0ZQ", "-c", &config_arg],
        );
        let out = tokio::process::Command::new("java")
            .args(&format)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| Error::Spawn {
                program: "java (kafka.tools.StorageTool)".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Io {
                what: format!(
                    "format the Kafka storage: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                source: std::io::Error::other(out.status.to_string()),
            });
        }
        let bootstrap = format!("{host}:{port}");
        let mut daemon = Daemon::spawn(DaemonSpec {
            port,
            proc: ProcSpec {
                name: format!("kafka :{port}"),
                program: "java".into(),
                args: java("kafka.Kafka", &[&config_arg]),
                env: Vec::new(),
                log: dir.path().join("kafka.log"),
                group: false,
            },
            dir,
            ready_when: "Kafka to answer a metadata request".into(),
            probe: metadata_probe(bootstrap),
        })?;
        daemon.ready(KAFKA_START_LIMIT).await?;
        Ok(Self {
            daemon,
            host: host.to_owned(),
        })
    }

    /// `host:port`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// `kafka://<host>:<port>/<topic>`, a node's `--broker`.
    pub fn url(&self, topic: &str) -> String {
        format!("kafka://{}/{topic}", self.bootstrap())
    }

    /// Starts the broker again on the same port with the same data, and
    /// waits until it is ready (within [`KAFKA_START_LIMIT`]).
    pub async fn restart_kafka(&mut self) {
        self.daemon
            .proc()
            .respawn()
            .unwrap_or_else(|e| panic!("{e}"));
        self.daemon
            .ready(KAFKA_START_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Deletes the records of a partition before Kafka offset `before`, as
    /// retention would.
    pub async fn delete_records(&self, topic: &str, partition: i32, before: i64) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(before))
            .unwrap_or_else(|e| panic!("{e}"));
        self.admin()
            .delete_records(&tpl, &AdminOptions::new())
            .await
            .unwrap_or_else(|e| panic!("delete records of {topic}/{partition}: {e}"));
    }

    fn admin(&self) -> AdminClient<DefaultClientContext> {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .unwrap_or_else(|e| panic!("Kafka admin client: {e}"))
    }

    /// Creates `topic` with `partitions` partitions (replication 1); an
    /// existing one is left as it is.
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        let results = self
            .admin()
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap_or_else(|e| panic!("create topic {topic}: {e}"));
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => panic!("create topic {name}: {code}"),
            }
        }
    }
}

/// The broker's configuration: one KRaft node listening on `host`, its
/// controller on loopback; internal topics with one partition and one
/// replica, so they are created quickly.
fn server_properties(host: &str, port: u16, controller: u16, dir: &Path) -> String {
    format!(
        "process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# A restarted broker is fenced until its previous session expires.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
",
        data = dir.join("data").display()
    )
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(Error::io(format!("write {}", path.display())))
}

/// The directory of the broker's jars: [`KAFKA_LIB_ENV`], or what
/// `scripts/kafka/install.sh` prints (it installs them when missing).
async fn lib_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(KAFKA_LIB_ENV) {
        return Ok(dir.into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka/install.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|source| Error::Spawn {
            program: script.display().to_string(),
            source,
        })?;
    let printed = String::from_utf8_lossy(&out.stdout);
    match printed.lines().last() {
        Some(dir) if out.status.success() => Ok(dir.trim().into()),
        _ => Err(Error::Io {
            what: format!("install the Kafka jars with {}", script.display()),
            source: std::io::Error::other(out.status.to_string()),
        }),
    }
}

/// A probe that the broker at `bootstrap` answers a metadata request and
/// lists itself.
pub fn metadata_probe(bootstrap: String) -> Probe {
    Arc::new(move || {
        let bootstrap = bootstrap.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || answers_metadata(&bootstrap))
                .await
                .unwrap_or(false)
        })
    })
}

fn answers_metadata(bootstrap: &str) -> bool {
    let Ok(consumer) = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "0")
        .create::<BaseConsumer>()
    else {
        return false;
    };
    consumer
        .fetch_metadata(None, Duration::from_millis(500))
        .is_ok_and(|m| !m.brokers().is_empty())
}
