//! The contract between the operator and the server: every variable the
//! operator puts in a fleet's ConfigMap (`server_env`) is one the server
//! reads (`chorus_server::Config`, clap, from the environment), its value
//! parses, and the parsed setting is what the MessagingCluster asks for.
//!
//! The server's flags are read from the real environment of a child
//! process (this test binary again, running only
//! [`child_parses_its_environment`]) whose environment is exactly the
//! ConfigMap's data, as in a pod with `envFrom`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use chorus_crds::{
    Delivery, ExternalRedisSpec, MessagingCluster, MessagingClusterSpec, RedisMode, SecretKeyRef,
};
use chorus_operator::build::Names;
use chorus_operator::build::config_map::{
    API_KEY_FILE, JWT_PUBLIC_KEY_FILE, JWT_SECRET_FILE, OUTBOX_DSN_FILE, REDIS_PASSWORD_FILE,
    server_env,
};
use chorus_operator::build::meta::{SENTINEL_PORT, SERVER_PORT};
use chorus_server::Config;
use chorus_server::broker::kafka::KafkaUrl;
use chorus_server::broker::redis::{Addr, RedisUrl, Target};
use clap::{CommandFactory, Parser};
use serde_json::{Value, json};

/// Set in the child's environment: parse and print instead of skipping.
const CHILD: &str = "CONFIG_CONTRACT_CHILD";
const CHILD_TEST: &str = "child_parses_its_environment";
/// The child's line on stdout, among the test harness's.
const MARK: &str = "parsed-config: ";

/// The server as a pod starts it: flags from the environment only.
#[test]
#[ignore = "run by every_variable_the_operator_sets_parses_and_means_what_the_spec_says, in a child process"]
fn child_parses_its_environment() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let config = Config::try_parse_from(["chorus-server"]).unwrap_or_else(|e| panic!("{e}"));
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let parsed = json!({
        "listen": config.listen.to_string(),
        "broker": config.broker.as_str(),
        "delivery": config.delivery.as_str(),
        "history_size": config.history_size,
        "history_ttl_secs": config.history_ttl.as_secs(),
        "max_frame_bytes": config.max_frame_bytes,
        "send_queue": config.send_queue,
        "max_connections": config.max_connections,
        "drain_seconds": config.drain_seconds,
        "log_format": format!("{:?}", config.log_format),
        "redis_password_file": path(&config.redis_password_file),
        "jwt_secret_file": path(&config.jwt_secret_file),
        "api_key_file": path(&config.api_key_file),
        "jwt_public_key_file": path(&config.jwt_public_key_file),
        "max_publish_rate": config.max_publish_rate,
        "upstream_rooms": config.upstream_rooms,
        "upstream_maxlen": config.upstream_maxlen,
        "upstream_kafka": config.upstream_kafka,
        "kafka_ingest": config.kafka_ingest,
        "kafka_ingest_group": config.kafka_ingest_group,
        "kafka_ingest_attempts": config.kafka_ingest_attempts,
        "kafka_ingest_dead_letter": config.kafka_ingest_dead_letter,
        // As the node reads it at start-up (brokers, topics, dead letter).
        "kafka_ingest_parses": chorus_server::ingest::IngestOptions::from_config(&config)
            .map(|o| o.is_some())
            .map_err(|e| e.to_string()),
        "outbox_dsn_file": path(&config.outbox_dsn_file),
        "outbox_table": config.outbox_table.to_string(),
        "outbox_init": config.outbox_init,
        "kafka_partitions": config.kafka_partitions,
        "kafka_timeout_ms": config.kafka_timeout.as_millis() as u64,
    });
    println!("{MARK}{parsed}");
}

/// What `chorus-server` makes of `env` (and nothing else) in its environment.
fn parse_in_child(env: &BTreeMap<String, String>) -> Value {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            CHILD_TEST,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_clear()
        .envs(env)
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the server does not accept the operator's environment {env:#?}:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(MARK).map(|(_, parsed)| parsed))
        .unwrap_or_else(|| panic!("no `{MARK}` line in:\n{stdout}"));
    serde_json::from_str(line).unwrap()
}

/// A `historyTtl` as the CRD defines it (`^[1-9][0-9]{0,6}(s|m|h)$`), in seconds.
fn crd_ttl_secs(ttl: &str) -> u64 {
    let (number, unit) = ttl.split_at(ttl.len() - 1);
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        other => panic!("unit {other} is not in the CRD's pattern"),
    };
    number.parse::<u64>().unwrap() * scale
}

/// A `kafka.timeout` as the CRD defines it (`^[1-9][0-9]{0,6}(ms|s|m)$`), in ms.
fn crd_timeout_ms(timeout: &str) -> u64 {
    let digits = timeout.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let scale = match &timeout[digits.len()..] {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        other => panic!("unit {other} is not in the CRD's pattern"),
    };
    digits.parse::<u64>().unwrap() * scale
}

fn key_ref(name: &str) -> Option<SecretKeyRef> {
    Some(SecretKeyRef {
        name: name.into(),
        key: "k".into(),
    })
}

/// The default spec, changed by `change`.
fn spec(change: impl FnOnce(&mut MessagingClusterSpec)) -> MessagingClusterSpec {
    let mut spec = MessagingClusterSpec::default();
    change(&mut spec);
    spec
}

fn external(spec: &mut MessagingClusterSpec, url: &str) {
    spec.redis.mode = RedisMode::External;
    spec.redis.external = Some(ExternalRedisSpec { url: url.into() });
}

/// A spread of specs: defaults, streams with history, auth on, external
/// Redis with and without a password, limits at their bounds.
fn specs() -> Vec<(&'static str, MessagingClusterSpec)> {
    vec![
        ("defaults", spec(|_| {})),
        (
            "streams",
            spec(|s| {
                s.delivery = Delivery::Streams;
                s.history.size = 50_000;
                s.history.ttl = "24h".into();
            }),
        ),
        ("five sentinels", spec(|s| s.redis.sentinels = 5)),
        (
            "auth",
            spec(|s| {
                s.auth.jwt_secret_ref = key_ref("jwt");
                s.auth.api_key_secret_ref = key_ref("api");
            }),
        ),
        (
            "external redis",
            spec(|s| external(s, "redis://redis.infra:6379/2")),
        ),
        (
            "external sentinel with password",
            spec(|s| {
                external(s, "redis+sentinel://s1.infra:26379,s2.infra:26379/orders");
                s.redis.password_secret_ref = key_ref("redis");
                s.delivery = Delivery::Streams;
                s.history.ttl = "90s".into();
            }),
        ),
        (
            "features",
            spec(|s| {
                s.upstream = Some(chorus_crds::UpstreamSpec {
                    rooms: vec!["orders:*".into(), "support".into()],
                    max_len: 500,
                    topic: None,
                });
                s.limits.max_publish_rate = 20;
                s.auth.jwt_public_key_secret_ref = key_ref("jwt-pem");
                s.logging.format = chorus_crds::LogFormat::Text;
                s.logging.level = "debug,hyper=info".into();
            }),
        ),
        (
            "managed redis cluster",
            spec(|s| {
                s.redis.mode = RedisMode::Cluster;
                s.redis.cluster = Some(chorus_crds::RedisClusterSpec {
                    shards: 4,
                    replicas_per_shard: 2,
                });
            }),
        ),
        (
            "external redis cluster with password",
            spec(|s| {
                external(s, "redis+cluster://c0.infra:6379,c1.infra:6379");
                s.redis.password_secret_ref = key_ref("redis");
                s.delivery = Delivery::Streams;
            }),
        ),
        (
            "outbox",
            spec(|s| {
                s.outbox = Some(chorus_crds::OutboxSpec {
                    dsn_secret_ref: key_ref("orders-db").unwrap(),
                    table: "app.events_out".into(),
                    init: true,
                });
            }),
        ),
        (
            "outbox with defaults",
            spec(|s| {
                s.outbox =
                    serde_json::from_value(json!({"dsnSecretRef": {"name": "db", "key": "dsn"}}))
                        .unwrap();
            }),
        ),
        (
            "kafka with defaults",
            spec(|s| {
                s.delivery = Delivery::Kafka;
                s.kafka = serde_json::from_value(
                    json!({"bootstrapServers": ["kafka-0.kafka.infra.svc:9092"]}),
                )
                .unwrap();
            }),
        ),
        (
            "kafka",
            spec(|s| {
                s.delivery = Delivery::Kafka;
                s.kafka = Some(chorus_crds::KafkaSpec {
                    bootstrap_servers: vec![
                        "k0.infra:9092".into(),
                        "10.1.2.3:19092".into(),
                        "[fd00::7]:9092".into(),
                    ],
                    topic: Some("chat.rooms-v1".into()),
                    partitions: 10_000,
                    timeout: "1500ms".into(),
                });
                s.auth.api_key_secret_ref = key_ref("api");
            }),
        ),
        (
            "kafka with a feed for backends",
            spec(|s| {
                s.delivery = Delivery::Kafka;
                s.kafka = serde_json::from_value(
                    json!({"bootstrapServers": ["k0.infra:9092", "k1.infra:9092"]}),
                )
                .unwrap();
                s.upstream = Some(chorus_crds::UpstreamSpec {
                    rooms: vec!["orders:*".into()],
                    max_len: 500,
                    topic: None,
                });
            }),
        ),
        (
            "ingest from a Kafka beside Redis",
            spec(|s| {
                s.ingest = Some(chorus_crds::IngestSpec {
                    bootstrap_servers: Some(vec!["k0.infra:9092".into(), "10.1.2.3:19092".into()]),
                    topics: vec!["orders.events".into(), "billing.events".into()],
                    group: Some("chat-ingest-v2".into()),
                    attempts: 100,
                    dead_letter_topic: Some("ingest.dead".into()),
                });
            }),
        ),
        (
            "kafka with ingest on its own brokers",
            spec(|s| {
                s.delivery = Delivery::Kafka;
                s.kafka =
                    serde_json::from_value(json!({"bootstrapServers": ["k0.infra:9092"]})).unwrap();
                s.ingest = serde_json::from_value(json!({"topics": ["orders.events"]})).unwrap();
            }),
        ),
        (
            "kafka with a named feed topic",
            spec(|s| {
                s.delivery = Delivery::Kafka;
                s.kafka = serde_json::from_value(
                    json!({"bootstrapServers": ["k0.infra:9092"], "topic": "rooms"}),
                )
                .unwrap();
                s.upstream = Some(chorus_crds::UpstreamSpec {
                    rooms: vec!["*".into()],
                    max_len: 100_000,
                    topic: Some("orders.feed".into()),
                });
            }),
        ),
        (
            "smallest limits",
            spec(|s| {
                s.limits.max_frame_bytes = 256;
                s.limits.send_queue = 1;
                s.limits.max_connections_per_pod = Some(1);
                s.drain_seconds = 0;
            }),
        ),
        (
            "largest limits",
            spec(|s| {
                s.limits.max_frame_bytes = 16_777_216;
                s.limits.send_queue = 65_536;
                s.limits.max_connections_per_pod = Some(1_000_000);
                s.drain_seconds = 3600;
                s.history.size = 1_000_000;
                s.history.ttl = "9999999h".into();
            }),
        ),
    ]
}

/// The broker URL is one the server's own parser accepts (as a node does
/// at start-up), without the password, and names the Redis the spec asks
/// for: its external URL, or the managed group's sentinels, each by the
/// stable name of its pod (`<name>-sentinel-<i>.<name>-sentinel.<ns>.svc`).
fn check_broker(case: &str, spec: &MessagingClusterSpec, broker: Value) {
    let broker = broker.as_str().unwrap_or_default();
    if let (Delivery::Kafka, Some(kafka)) = (spec.delivery, &spec.kafka) {
        let url = KafkaUrl::parse(broker)
            .unwrap_or_else(|e| panic!("{case}: the server rejects CHORUS_BROKER {broker}: {e}"));
        assert_eq!(url.servers, kafka.bootstrap_servers, "{case}: {broker}");
        assert_eq!(url.topic, kafka.topic_of("chat"), "{case}: {broker}");
        return;
    }
    let url = RedisUrl::parse(broker)
        .unwrap_or_else(|e| panic!("{case}: the server rejects CHORUS_BROKER {broker}: {e}"));
    assert_eq!(url.password, None, "{case}: a password in {broker}");
    match (&spec.redis.mode, &spec.redis.external) {
        (RedisMode::External, Some(external)) => assert_eq!(broker, external.url, "{case}"),
        (RedisMode::Cluster, _) => {
            // The first three pods as seeds, by their stable names.
            let seeds = (0..3)
                .map(|i| Addr {
                    host: format!("chat-redis-cluster-{i}.chat-redis-cluster.prod.svc"),
                    port: 6379,
                })
                .collect();
            assert_eq!(url.target, Target::Cluster { seeds }, "{case}: {broker}");
        }
        _ => {
            let sentinels = (0..spec.redis.sentinels)
                .map(|i| Addr {
                    host: format!("chat-sentinel-{i}.chat-sentinel.prod.svc"),
                    port: u16::try_from(SENTINEL_PORT).unwrap(),
                })
                .collect();
            let master = "chorus".to_owned();
            let expected = Target::Sentinel { sentinels, master };
            assert_eq!(url.target, expected, "{case}: {broker}");
        }
    }
}

#[test]
fn every_variable_the_operator_sets_parses_and_means_what_the_spec_says() {
    let read_by_server: BTreeSet<String> = Config::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        // The log filter, read by the logger rather than a flag.
        .chain(["RUST_LOG".to_owned()])
        .collect();
    for (case, spec) in specs() {
        let mut mc = MessagingCluster::new("chat", spec.clone());
        mc.metadata.namespace = Some("prod".into());
        let names = Names::of(&mc).unwrap();
        let env = server_env(&spec, &names);

        // clap ignores a variable it does not know: check the names first.
        let unknown: Vec<&String> = env
            .keys()
            .filter(|k| !read_by_server.contains(*k))
            .collect();
        assert!(
            unknown.is_empty(),
            "{case}: the server reads no {unknown:?}"
        );

        let mut parsed = parse_in_child(&env);
        check_broker(case, &spec, parsed["broker"].take());
        let on_kafka = spec.delivery == Delivery::Kafka;
        let password = !on_kafka
            && (spec.redis.password_secret_ref.is_some() || spec.redis.mode != RedisMode::External);
        let kafka = spec.kafka.as_ref().filter(|_| on_kafka);
        let file = |on: bool, path: &str| if on { json!(path) } else { Value::Null };
        let expected = json!({
            "listen": format!("0.0.0.0:{SERVER_PORT}"),
            "broker": null,
            "delivery": spec.delivery.server_mode(),
            "history_size": spec.history.size,
            "history_ttl_secs": crd_ttl_secs(&spec.history.ttl),
            "max_frame_bytes": spec.limits.max_frame_bytes,
            "send_queue": spec.limits.send_queue,
            "max_connections": chorus_operator::cluster::max_connections(&spec),
            "drain_seconds": spec.drain_seconds,
            "log_format": match spec.logging.format {
                chorus_crds::LogFormat::Json => "Json",
                chorus_crds::LogFormat::Text => "Text",
            },
            "redis_password_file": file(password, REDIS_PASSWORD_FILE),
            "jwt_secret_file": file(spec.auth.jwt_secret_ref.is_some(), JWT_SECRET_FILE),
            "api_key_file": file(spec.auth.api_key_secret_ref.is_some(), API_KEY_FILE),
            "jwt_public_key_file": file(
                spec.auth.jwt_public_key_secret_ref.is_some(),
                JWT_PUBLIC_KEY_FILE
            ),
            "max_publish_rate": spec.limits.max_publish_rate,
            "upstream_rooms": spec.upstream.as_ref().map(|u| u.rooms.clone()).unwrap_or_default(),
            // Redis keeps a stream per room (its length from the spec); on
            // Kafka the feed is a topic on the same brokers.
            "upstream_maxlen": spec.upstream.as_ref().filter(|_| !on_kafka).map_or(100_000, |u| u.max_len),
            "kafka_ingest": spec.ingest.as_ref().map(|i| format!(
                "kafka://{}/{}",
                i.servers(kafka).unwrap().join(","),
                i.topics.join(",")
            )),
            // The server's defaults without spec.ingest.
            "kafka_ingest_group": spec.ingest.as_ref().map_or("chorus-ingest".to_owned(), |i| i.group_of("chat")),
            "kafka_ingest_attempts": spec.ingest.as_ref().map_or(5, |i| i.attempts),
            "kafka_ingest_dead_letter": spec.ingest.as_ref().and_then(|i| i.dead_letter_topic.clone()),
            "kafka_ingest_parses": {"Ok": spec.ingest.is_some()},
            "upstream_kafka": match (&spec.upstream, kafka) {
                (Some(u), Some(k)) => json!(format!(
                    "kafka://{}/{}",
                    k.bootstrap_servers.join(","),
                    u.topic_of("chat")
                )),
                _ => Value::Null,
            },
            "outbox_dsn_file": file(spec.outbox.is_some(), OUTBOX_DSN_FILE),
            "outbox_table": spec.outbox.as_ref().map_or("chorus_outbox", |o| o.table.as_str()),
            "outbox_init": spec.outbox.as_ref().is_some_and(|o| o.init),
            // The server's defaults unless the spec is on Kafka.
            "kafka_partitions": kafka.map_or(12, |k| k.partitions),
            "kafka_timeout_ms": kafka.map_or(5000, |k| crd_timeout_ms(&k.timeout)),
        });
        assert_eq!(parsed, expected, "{case}: {env:#?}");
        assert_eq!(env["RUST_LOG"], spec.logging.level, "{case}");
    }
}
