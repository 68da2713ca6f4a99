//! Status computation and transition events, from applied objects.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::build::fixtures::{TestCluster, valid};
use crate::reconcile::apply::AppliedRedis;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus, StatefulSet, StatefulSetStatus};
use kube::runtime::events::EventType;

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).expect("timestamp")
}

fn applied(ready: i32, replicas: i32, redis_ready: i32) -> Applied {
    let mut deployment = Deployment::default();
    deployment.metadata.generation = Some(2);
    deployment.status = Some(DeploymentStatus {
        observed_generation: Some(2),
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        updated_replicas: Some(replicas),
        ..Default::default()
    });
    let statefulset = StatefulSet {
        status: Some(StatefulSetStatus {
            ready_replicas: Some(redis_ready),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sentinel_statefulset = StatefulSet {
        status: Some(StatefulSetStatus {
            ready_replicas: Some(3),
            ..Default::default()
        }),
        ..Default::default()
    };
    Applied {
        server_deployment: deployment,
        redis: Some(AppliedRedis {
            statefulset,
            sentinel_statefulset,
        }),
        redis_cluster: None,
        generated_secret: false,
    }
}

/// A healthy group as the topology step reports it.
fn group(master: &str) -> GroupSeen {
    GroupSeen {
        master: Some(master.to_owned()),
        replicas_linked: 2,
        sentinels_agreeing: 3,
        replication_lag_bytes: None,
        problem: None,
    }
}

fn cond<'a>(s: &'a MessagingClusterStatus, t: &str) -> &'a Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .expect("condition")
}

#[test]
fn healthy_cluster_is_ready_and_not_progressing() {
    let mc = MessagingCluster::test();
    let s = compute(
        &mc,
        &valid(&mc),
        &applied(3, 3, 3),
        Some(&group("m:6379")),
        now(),
    );
    assert_eq!(
        (s.replicas, s.ready_replicas, s.observed_generation),
        (3, 3, Some(1))
    );
    assert_eq!(
        s.selector,
        "app.kubernetes.io/component=server,app.kubernetes.io/instance=chat,app.kubernetes.io/name=chorus"
    );
    assert_eq!(s.redis.master.as_deref(), Some("m:6379"));
    assert_eq!(
        s.endpoints.websocket.as_deref(),
        Some("ws://chat.default.svc:80/ws")
    );
    assert_eq!(cond(&s, "Ready").status, "True");
    assert_eq!(cond(&s, "Progressing").status, "False");
    assert_eq!(cond(&s, "Degraded").status, "False");
    assert_eq!(cond(&s, "RedisReady").status, "True");
}

#[test]
fn scale_up_is_progressing_and_emits_scaled_once() {
    let mut mc = MessagingCluster::test();
    mc.status = Some(compute(
        &mc,
        &valid(&mc),
        &applied(3, 3, 3),
        Some(&group("m:6379")),
        now(),
    ));
    mc.spec.replicas = 5;
    let s = compute(
        &mc,
        &valid(&mc),
        &applied(3, 3, 3),
        Some(&group("m:6379")),
        now(),
    );
    let p = cond(&s, "Progressing");
    assert_eq!((p.status.as_str(), p.reason.as_str()), ("True", "Scaling"));
    assert_eq!(p.message, "scaling server pods from 3 to 5");
    assert_eq!(cond(&s, "Ready").status, "False");
    let reasons: Vec<_> = transitions(&mc, &s, false)
        .iter()
        .map(|n| n.reason)
        .collect();
    assert_eq!(reasons, ["Scaled"]);
    mc.status = Some(s.clone());
    assert_eq!(
        transitions(&mc, &s, false),
        [],
        "no repeat while still scaling"
    );
}

#[test]
fn unchanged_conditions_keep_their_transition_time() {
    let mut mc = MessagingCluster::test();
    mc.status = Some(compute(
        &mc,
        &valid(&mc),
        &applied(3, 3, 3),
        Some(&group("m:6379")),
        now(),
    ));
    let later = Timestamp::from_second(1_800_000_600).expect("timestamp");
    let s = compute(
        &mc,
        &valid(&mc),
        &applied(2, 3, 3),
        Some(&group("m:6379")),
        later,
    );
    assert_eq!(cond(&s, "RedisReady").last_transition_time, Time(now()));
    assert_eq!(cond(&s, "Ready").last_transition_time, Time(later));
}

#[test]
fn redis_not_ready_is_named_in_ready_and_redis_ready() {
    let mc = MessagingCluster::test();
    let s = compute(&mc, &valid(&mc), &applied(3, 3, 1), None, now());
    assert_eq!(cond(&s, "RedisReady").reason, "RedisStarting");
    assert!(
        cond(&s, "RedisReady")
            .message
            .starts_with("1/3 Redis pods and 3/3 sentinels are ready")
    );
    assert_eq!(cond(&s, "Ready").reason, "RedisNotReady");
    assert_eq!(s.redis.ready_replicas, 1);
}

#[test]
fn first_apply_emits_created_and_invalid_spec_warns_once() {
    let mc = MessagingCluster::test();
    let s = compute(&mc, &valid(&mc), &applied(0, 0, 0), None, now());
    let reasons: Vec<_> = transitions(&mc, &s, true)
        .iter()
        .map(|n| n.reason)
        .collect();
    assert_eq!(reasons, ["Created", "PasswordGenerated"]);

    let mut mc = MessagingCluster::test();
    mc.status = Some(s);
    let bad = invalid(&mc, "metadata.name: too long".into(), now());
    assert_eq!(cond(&bad, "Degraded").status, "True");
    assert_eq!(
        bad.selector,
        mc.status.as_ref().expect("status").selector,
        "observations kept"
    );
    let notices = transitions(&mc, &bad, false);
    assert_eq!(notices.len(), 1);
    assert_eq!(
        (notices[0].type_, notices[0].reason),
        (EventType::Warning, "InvalidSpec")
    );
    mc.status = Some(bad.clone());
    assert_eq!(transitions(&mc, &bad, false), []);
}

#[test]
fn master_change_is_a_failover_event() {
    let mut mc = MessagingCluster::test();
    let first = group("chat-redis-0.chat-redis.default.svc:6379");
    mc.status = Some(compute(
        &mc,
        &valid(&mc),
        &applied(3, 3, 3),
        Some(&first),
        now(),
    ));
    let moved = group("chat-redis-1.chat-redis.default.svc:6379");
    let new = compute(&mc, &valid(&mc), &applied(3, 3, 3), Some(&moved), now());
    assert_eq!(new.redis.master, moved.master);
    let ready = new
        .conditions
        .iter()
        .find(|c| c.type_ == "RedisReady")
        .expect("RedisReady");
    assert!(
        ready
            .message
            .starts_with("master chat-redis-1.chat-redis.default.svc:6379; 2/2 replicas linked"),
        "{}",
        ready.message
    );
    let reasons: Vec<_> = transitions(&mc, &new, false)
        .iter()
        .map(|n| n.reason)
        .collect();
    assert_eq!(reasons, ["FailoverSeen"]);
}

#[test]
fn a_group_without_a_usable_master_is_not_ready_and_says_why() {
    let mc = MessagingCluster::test();
    let lost = GroupSeen {
        master: None,
        replicas_linked: 0,
        sentinels_agreeing: 0,
        replication_lag_bytes: None,
        problem: Some("no member is master and the sentinels do not agree on one".to_owned()),
    };
    let s = compute(&mc, &valid(&mc), &applied(3, 3, 3), Some(&lost), now());
    let r = cond(&s, "RedisReady");
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "NoMaster")
    );
    assert!(
        r.message.starts_with("no member is master"),
        "{}",
        r.message
    );
    assert_eq!(
        s.redis.master, None,
        "no master is shown that does not answer"
    );
    assert_eq!(cond(&s, "Ready").reason, "RedisNotReady");

    let split = GroupSeen {
        sentinels_agreeing: 1,
        replication_lag_bytes: None,
        ..group("chat-redis-2.chat-redis.default.svc:6379")
    };
    let s = compute(&mc, &valid(&mc), &applied(3, 3, 3), Some(&split), now());
    assert_eq!(cond(&s, "RedisReady").reason, "SentinelsDisagree");
}

#[test]
fn a_failed_step_degrades_a_computed_status_and_recovery_is_an_event() {
    let mut mc = MessagingCluster::test();
    mc.status = Some(compute(
        &mc,
        &valid(&mc),
        &applied(3, 3, 3),
        Some(&group("m:6379")),
        now(),
    ));
    let later = Timestamp::from_second(1_800_000_600).expect("timestamp");
    // The failed reconcile did not see the group.
    let mut s = compute(&mc, &valid(&mc), &applied(3, 3, 2), None, later);
    degrade(
        &mut s,
        mc.status.as_ref(),
        FailedStep::ApplyRefused,
        "applying StatefulSet chat-redis: Forbidden".into(),
        Some(1),
        later,
    );
    let d = cond(&s, "Degraded");
    assert_eq!(
        (d.status.as_str(), d.reason.as_str(), d.observed_generation),
        ("True", "ApplyRefused", Some(1))
    );
    assert_eq!(d.last_transition_time, Time(later));
    assert_eq!(s.conditions.len(), 4, "replaced, not added");
    assert_eq!(s.redis.ready_replicas, 2, "observed in this reconcile");
    let notices = transitions(&mc, &s, false);
    assert_eq!(
        notices
            .iter()
            .map(|n| (n.type_, n.reason))
            .collect::<Vec<_>>(),
        [(EventType::Warning, "ApplyRefused")]
    );

    mc.status = Some(s);
    let healthy = compute(
        &mc,
        &valid(&mc),
        &applied(3, 3, 3),
        Some(&group("m:6379")),
        later,
    );
    let notices = transitions(&mc, &healthy, false);
    let reasons: Vec<_> = notices.iter().map(|n| n.reason).collect();
    assert_eq!(reasons, ["Recovered", "Ready"]);
    assert!(notices[0].note.contains("was ApplyRefused"), "{notices:?}");
}

#[test]
fn a_step_that_failed_before_observing_keeps_the_previous_observations() {
    let mut mc = MessagingCluster::test().with_generation(7);
    mc.status = Some(compute(
        &mc,
        &valid(&mc),
        &applied(3, 3, 3),
        Some(&group("m:6379")),
        now(),
    ));
    let s = failed(
        &mc,
        FailedStep::Dereference,
        "reading Secret x: forbidden".into(),
        now(),
    );
    assert_eq!(s.ready_replicas, 3);
    assert_eq!(s.observed_generation, Some(7));
    assert_eq!(cond(&s, "Ready").status, "True", "not re-judged");
    assert_eq!(cond(&s, "Degraded").reason, "DereferenceFailed");
    for step in FailedStep::ALL {
        assert_eq!(FailedStep::of_reason(step.reason()), Some(step));
    }
}

/// What the fleet step read: pods `(name, reaches Kafka, why not)`.
fn kafka_fleet(pods: &[(&str, bool, Option<&str>)]) -> chorus_crds::FleetStatus {
    chorus_crds::FleetStatus {
        pods_reporting: pods.len() as i32,
        pods: pods
            .iter()
            .map(|(name, up, why)| chorus_crds::FleetPodStatus {
                name: (*name).to_owned(),
                broker_up: *up,
                broker_down: why.map(str::to_owned),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn on_kafka() -> MessagingCluster {
    MessagingCluster::test().with_kafka(&["k0.infra:9092", "k1.infra:9092"])
}

#[test]
fn kafka_reached_by_every_pod_is_ready_without_any_redis() {
    let mc = on_kafka();
    let fleet = kafka_fleet(&[("a", true, None), ("b", true, None), ("c", true, None)]);
    let s = compute_kafka(&mc, &valid(&mc), &applied(3, 3, 0), Some(&fleet), now());
    let kafka = s.kafka.clone().expect("status.kafka");
    assert!(kafka.reachable);
    assert_eq!(kafka.bootstrap_servers, ["k0.infra:9092", "k1.infra:9092"]);
    assert_eq!(kafka.topic, "chorus-chat");
    assert_eq!(kafka.pods_reaching, 3);
    assert_eq!(
        kafka.message,
        "3 server pods reach Kafka at k0.infra:9092,k1.infra:9092, topic chorus-chat"
    );
    assert_eq!(cond(&s, "KafkaReachable").status, "True");
    assert_eq!(cond(&s, "Ready").status, "True");
    assert_eq!(
        cond(&s, "Ready").message,
        "3/3 server pods ready and Kafka reachable"
    );
    assert!(
        s.conditions.iter().all(|c| c.type_ != "RedisReady"),
        "no Redis condition: {:?}",
        s.conditions
    );
    assert_eq!(s.redis, chorus_crds::RedisStatus::default());
    let created: Vec<_> = transitions(&mc, &s, false)
        .into_iter()
        .map(|n| (n.reason, n.note))
        .collect();
    assert_eq!(
        created,
        [
            (
                "Created",
                "created 3 server pods using Kafka at k0.infra:9092,k1.infra:9092".to_owned()
            ),
            (
                "Ready",
                "3/3 server pods ready and Kafka reachable".to_owned()
            )
        ]
    );
}

#[test]
fn kafka_down_is_named_with_each_pods_reason_in_ready_and_kafka_reachable() {
    let mc = on_kafka();
    let why = "broker kafka unavailable: metadata of chorus-chat: Local: Broker transport failure";
    let fleet = kafka_fleet(&[("a", false, Some(why)), ("b", false, None)]);
    // The pods' readiness fails with Kafka.
    let s = compute_kafka(&mc, &valid(&mc), &applied(0, 3, 0), Some(&fleet), now());
    let reachable = cond(&s, "KafkaReachable");
    assert_eq!(
        (reachable.status.as_str(), reachable.reason.as_str()),
        ("False", "KafkaUnreachable")
    );
    assert_eq!(
        reachable.message,
        format!(
            "no server pod reaches Kafka at k0.infra:9092,k1.infra:9092, topic chorus-chat: a ({why}); b"
        )
    );
    let ready = cond(&s, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "KafkaUnreachable")
    );
    assert!(
        ready.message.ends_with("; 0/3 server pods ready"),
        "{ready:?}"
    );
    let kafka = s.kafka.clone().expect("status.kafka");
    assert!(!kafka.reachable);
    assert_eq!(kafka.pods_reaching, 0);
    assert_eq!(kafka.message, reachable.message);
}

#[test]
fn kafka_out_of_reach_of_some_pods_or_not_reported_yet_is_not_reachable() {
    let mc = on_kafka();
    let c = valid(&mc);
    let some = kafka_fleet(&[("a", true, None), ("b", false, Some("metadata: timed out"))]);
    let s = compute_kafka(&mc, &c, &applied(3, 3, 0), Some(&some), now());
    assert_eq!(
        cond(&s, "KafkaReachable").reason,
        "KafkaUnreachableFromSomePods"
    );
    assert!(
        cond(&s, "KafkaReachable")
            .message
            .starts_with("1/2 server pods cannot reach Kafka"),
        "{:?}",
        cond(&s, "KafkaReachable")
    );
    assert_eq!(s.kafka.as_ref().map(|k| k.pods_reaching), Some(1));
    assert_eq!(cond(&s, "Ready").reason, "KafkaUnreachable");

    // No pod has answered yet: not known, so not reachable; Ready names the
    // pods while they start, and the missing reports once they are ready.
    let s = compute_kafka(&mc, &c, &applied(0, 3, 0), None, now());
    assert_eq!(cond(&s, "KafkaReachable").reason, "NotReported");
    assert_eq!(cond(&s, "Ready").reason, "ServerPodsNotReady");
    assert_eq!(s.kafka.as_ref().map(|k| k.reachable), Some(false));
    let mut silent = kafka_fleet(&[("a", true, None)]);
    silent.pods[0].error = Some("GET /metrics: timed out".into());
    let s = compute_kafka(&mc, &c, &applied(3, 3, 0), Some(&silent), now());
    assert_eq!(cond(&s, "Ready").reason, "NotReported");
    assert!(
        cond(&s, "KafkaReachable")
            .message
            .contains("(a: GET /metrics: timed out)"),
        "{:?}",
        cond(&s, "KafkaReachable")
    );
}

#[test]
fn a_redis_cluster_is_ready_only_when_ok_and_every_slot_is_served() {
    use crate::redis_cluster::{ClusterReport, Shard};
    let mut mc = MessagingCluster::test();
    mc.spec.redis.mode = chorus_crds::RedisMode::Cluster;
    let c = valid(&mc);
    let mut applied = applied(3, 3, 0);
    applied.redis = None;
    applied.redis_cluster = Some(StatefulSet {
        status: Some(StatefulSetStatus {
            ready_replicas: Some(6),
            ..Default::default()
        }),
        ..Default::default()
    });
    let shard = |k: u16, master: &str, replica: &str| Shard {
        master: master.to_owned(),
        slots: if k == 0 { 5462 } else { 5461 },
        ranges: if k == 0 {
            vec![(0, 5460), (16383, 16383)]
        } else {
            vec![(k * 5461, k * 5461 + 5460)]
        },
        replicas: vec![replica.to_owned()],
        replicas_linked: 1,
    };
    let mut report = ClusterReport {
        state: Some("ok".to_owned()),
        slots_covered: 16384,
        shards: vec![
            shard(0, "chat-redis-cluster-0", "chat-redis-cluster-3"),
            shard(1, "chat-redis-cluster-1", "chat-redis-cluster-4"),
            shard(2, "chat-redis-cluster-2", "chat-redis-cluster-5"),
        ],
        ..ClusterReport::default()
    };
    let at = |report: &ClusterReport| {
        compute_with(&mc, &c, &applied, RedisSeen::Cluster(Some(report)), now())
    };
    let s = at(&report);
    assert_eq!(cond(&s, "RedisReady").status, "True");
    assert_eq!(cond(&s, "RedisReady").reason, "RedisClusterReady");
    assert_eq!(cond(&s, "Ready").status, "True");
    let cluster = s.redis.cluster.clone().expect("status.redis.cluster");
    assert_eq!(cluster.state.as_deref(), Some("ok"));
    assert_eq!(cluster.shards.len(), 3);
    assert_eq!(cluster.shards[0].slot_ranges, "0-5460,16383");
    assert_eq!(cluster.shards[2].replicas, ["chat-redis-cluster-5"]);
    assert_eq!(s.redis.ready_replicas, 6);
    // Slots still moving to a new shard: every slot is served, still Ready.
    report.slots_to_move = 1000;
    let s = at(&report);
    assert_eq!(cond(&s, "RedisReady").status, "True");
    assert!(
        cond(&s, "RedisReady")
            .message
            .contains("1000 slots still to move")
    );
    // A slot unserved (a master down without a replica): not Ready.
    report.slots_covered = 10923;
    report.state = Some("fail".to_owned());
    report.waiting = Some("the master of a shard (10.0.0.7:6379) does not answer".to_owned());
    let s = at(&report);
    assert_eq!(cond(&s, "RedisReady").status, "False");
    assert_eq!(cond(&s, "RedisReady").reason, "RedisClusterNotReady");
    assert!(
        cond(&s, "RedisReady").message.contains("10923/16384"),
        "{}",
        cond(&s, "RedisReady").message
    );
    assert_eq!(cond(&s, "Ready").status, "False");
    assert_eq!(
        s.redis.cluster.expect("cluster").problem.as_deref(),
        report.waiting.as_deref()
    );
    // Before its pods run.
    let s = compute_with(&mc, &c, &applied, RedisSeen::Cluster(None), now());
    assert_eq!(cond(&s, "RedisReady").reason, "RedisStarting");
}
