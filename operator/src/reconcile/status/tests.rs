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
        generated_secret: false,
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
    let s = compute(&mc, &valid(&mc), &applied(3, 3, 3), None, now());
    assert_eq!(
        (s.replicas, s.ready_replicas, s.observed_generation),
        (3, 3, Some(1))
    );
    assert_eq!(
        s.selector,
        "app.kubernetes.io/component=server,app.kubernetes.io/instance=chat,app.kubernetes.io/name=chorus"
    );
    assert_eq!(s.redis.master.as_deref(), None);
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
    mc.status = Some(compute(&mc, &valid(&mc), &applied(3, 3, 3), None, now()));
    mc.spec.replicas = 5;
    let s = compute(&mc, &valid(&mc), &applied(3, 3, 3), None, now());
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
    mc.status = Some(compute(&mc, &valid(&mc), &applied(3, 3, 3), None, now()));
    let later = Timestamp::from_second(1_800_000_600).expect("timestamp");
    let s = compute(&mc, &valid(&mc), &applied(2, 3, 3), None, later);
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
    let first = Some("10.0.0.5:6379".to_owned());
    mc.status = Some(compute(&mc, &valid(&mc), &applied(3, 3, 3), first, now()));
    let moved = Some("10.0.0.6:6379".to_owned());
    let new = compute(&mc, &valid(&mc), &applied(3, 3, 3), moved.clone(), now());
    assert_eq!(new.redis.master, moved);
    let ready = new
        .conditions
        .iter()
        .find(|c| c.type_ == "RedisReady")
        .expect("RedisReady");
    assert!(
        ready.message.ends_with("master 10.0.0.6:6379"),
        "{}",
        ready.message
    );
    let reasons: Vec<_> = transitions(&mc, &new, false)
        .iter()
        .map(|n| n.reason)
        .collect();
    assert_eq!(reasons, ["FailoverSeen"]);
}
