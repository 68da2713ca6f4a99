//! The notable transitions between two statuses, as Kubernetes Events.

use chorus_crds::{MessagingCluster, MessagingClusterStatus, RedisMode, condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::events::EventType;

use super::FailedStep;

/// An Event to publish about a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub type_: EventType,
    /// PascalCase.
    pub reason: &'static str,
    pub note: String,
}

fn find<'a>(status: Option<&'a MessagingClusterStatus>, type_: &str) -> Option<&'a Condition> {
    status.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

fn is_true(status: Option<&MessagingClusterStatus>, type_: &str) -> bool {
    find(status, type_).is_some_and(|c| c.status == "True")
}

/// Notable transitions between the old and the new status, as Events.
pub fn transitions(
    mc: &MessagingCluster,
    new: &MessagingClusterStatus,
    generated_secret: bool,
) -> Vec<Notice> {
    let old = mc.status.as_ref();
    let new = Some(new);
    let mut notices = Vec::new();
    let mut notice = |type_, reason, note: String| {
        notices.push(Notice {
            type_,
            reason,
            note,
        })
    };

    let degraded = find(new, condition::DEGRADED);
    if let Some(d) = degraded.filter(|d| d.status == "True") {
        let before = find(old, condition::DEGRADED);
        if before.is_none_or(|b| b.status != "True" || b.message != d.message) {
            let reason = FailedStep::of_reason(&d.reason).map_or("Degraded", FailedStep::reason);
            notice(EventType::Warning, reason, d.message.clone());
        }
        return notices;
    }
    let never_applied = old.is_none_or(|o| o.selector.is_empty());
    if never_applied {
        let redis = match mc.spec.redis.mode {
            RedisMode::Managed => format!(
                " and a Redis group of {} with {} sentinels",
                mc.spec.redis.replicas, mc.spec.redis.sentinels
            ),
            RedisMode::External => " using external Redis".to_owned(),
            RedisMode::Cluster => {
                let shape = mc.spec.redis.cluster_shape();
                format!(
                    " and a Redis Cluster of {} shards with {} replicas each",
                    shape.shards, shape.replicas_per_shard
                )
            }
        };
        let backplane = match crate::cluster::on_kafka(&mc.spec) {
            Some(kafka) => format!(" using Kafka at {}", kafka.bootstrap_servers.join(",")),
            None => redis,
        };
        notice(
            EventType::Normal,
            "Created",
            format!("created {} server pods{backplane}", mc.spec.replicas),
        );
    } else if let Some(was) = find(old, condition::DEGRADED).filter(|d| d.status == "True") {
        if was.reason == FailedStep::InvalidSpec.reason() {
            notice(
                EventType::Normal,
                "SpecAccepted",
                "the spec is valid again and was applied".to_owned(),
            );
        } else {
            notice(
                EventType::Normal,
                "Recovered",
                format!(
                    "every step succeeded again (was {}: {})",
                    was.reason, was.message
                ),
            );
        }
    }
    if generated_secret {
        notice(
            EventType::Normal,
            "PasswordGenerated",
            "generated the Redis password Secret".to_owned(),
        );
    }
    let scaling = find(new, condition::PROGRESSING).filter(|c| c.reason == "Scaling");
    let was_scaling = find(old, condition::PROGRESSING)
        .is_some_and(|c| Some(&c.message) == scaling.map(|s| &s.message));
    if let (Some(scaling), false, false) = (scaling, was_scaling, never_applied) {
        notice(EventType::Normal, "Scaled", scaling.message.clone());
    }
    match (
        is_true(old, condition::READY),
        is_true(new, condition::READY),
    ) {
        (false, true) => notice(
            EventType::Normal,
            "Ready",
            find(new, condition::READY)
                .map(|c| c.message.clone())
                .unwrap_or_default(),
        ),
        // Pods not ready during a scale or rollout are expected; a Warning
        // is only for pods that fail while nothing is changing.
        (true, false) if !is_true(new, condition::PROGRESSING) => notice(
            EventType::Warning,
            "NotReady",
            find(new, condition::READY)
                .map(|c| c.message.clone())
                .unwrap_or_default(),
        ),
        _ => {}
    }
    let old_master = old.and_then(|s| s.redis.master.as_ref());
    let new_master = new.and_then(|s| s.redis.master.as_ref());
    // Only a managed group fails over; an external URL (`…://…`) changes
    // with the spec, which is not a failover.
    let managed = |m: &String| !m.contains("://");
    if let (Some(a), Some(b)) = (old_master, new_master)
        && a != b
        && managed(a)
        && managed(b)
        && mc.spec.redis.mode == RedisMode::Managed
    {
        notice(
            EventType::Normal,
            "FailoverSeen",
            format!("Redis master moved from {a} to {b}"),
        );
    }
    notices
}
