//! Status step: computes `MessagingCluster.status` from what the apply
//! step got back (pure, [`compute`]), names the notable transitions as
//! Kubernetes Events (pure, [`transitions`]) and writes the status by
//! server-side apply (needs a client, [`patch`]).

use chorus_crds::{
    API_VERSION, EndpointsStatus, KIND, MessagingCluster, MessagingClusterStatus, RedisMode,
    RedisStatus, condition,
};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::events::EventType,
};

use super::apply::{Applied, FIELD_MANAGER};
use crate::build::meta::{Component, selector_string};
use crate::build::{Names, config_map::broker_url};

/// Writing the status failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("patching status of MessagingCluster {name}: {source}")]
    Patch {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// An Event to publish about a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub type_: EventType,
    /// PascalCase.
    pub reason: &'static str,
    pub note: String,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Keeps `lastTransitionTime` of conditions whose status did not change.
fn carry_transition_times(old: Option<&MessagingClusterStatus>, new: &mut [Condition]) {
    for c in new {
        let previous = old
            .into_iter()
            .flat_map(|s| &s.conditions)
            .find(|o| o.type_ == c.type_);
        if let Some(previous) = previous
            && previous.status == c.status
        {
            c.last_transition_time = previous.last_transition_time.clone();
        }
    }
}

/// Where the servers are reached.
fn endpoints(mc: &MessagingCluster, names: &Names) -> EndpointsStatus {
    let (ws, http) = match &mc.spec.ingress {
        Some(ingress) => {
            let tls = ingress.tls_secret_name.is_some();
            let host = &ingress.host;
            (
                format!("{}://{host}/ws", if tls { "wss" } else { "ws" }),
                format!("{}://{host}", if tls { "https" } else { "http" }),
            )
        }
        None => {
            let authority = format!(
                "{}.{}.svc:{}",
                names.service, names.namespace, mc.spec.service.port
            );
            (
                format!("ws://{authority}/ws"),
                format!("http://{authority}"),
            )
        }
    };
    EndpointsStatus {
        websocket: Some(ws),
        publish: Some(format!("{http}/api/v1/rooms/{{room}}/messages")),
    }
}

/// The status after a successful apply. `observed_master` is the master
/// the Sentinels agree on, when the Redis topology step has seen one.
pub fn compute(
    mc: &MessagingCluster,
    names: &Names,
    applied: &Applied,
    observed_master: Option<String>,
    now: Timestamp,
) -> MessagingClusterStatus {
    let old = mc.status.as_ref();
    let generation = mc.metadata.generation;
    let desired = mc.spec.replicas;
    let dep_status = applied.server_deployment.status.clone().unwrap_or_default();
    let dep_generation = applied.server_deployment.metadata.generation;
    let replicas = dep_status.replicas.unwrap_or(0);
    let ready = dep_status.ready_replicas.unwrap_or(0);
    let updated = dep_status.updated_replicas.unwrap_or(0);

    let (redis, redis_ok, redis_reason, redis_message) = match &applied.redis {
        Some(group) => {
            let want_redis = mc.spec.redis.replicas;
            let want_sentinels = mc.spec.redis.sentinels;
            let redis_ready = group
                .statefulset
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            let sentinels_ready = group
                .sentinel_deployment
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            // Only the topology step knows the master (by pod IP).
            let master = observed_master;
            let ok = redis_ready >= want_redis && sentinels_ready >= want_sentinels;
            let master_note = match &master {
                Some(m) => format!("master {m}"),
                None => "no master reported yet".to_owned(),
            };
            let (reason, message) = if ok {
                (
                    "RedisGroupReady",
                    format!(
                        "{redis_ready} Redis pods and {sentinels_ready} sentinels are ready; {master_note}"
                    ),
                )
            } else {
                (
                    "RedisStarting",
                    format!(
                        "{redis_ready}/{want_redis} Redis pods and {sentinels_ready}/{want_sentinels} sentinels \
                         are ready; see `kubectl get pods -l app.kubernetes.io/instance={}`",
                        names.instance
                    ),
                )
            };
            (
                RedisStatus {
                    master,
                    ready_replicas: redis_ready,
                    sentinels_ready,
                },
                ok,
                reason,
                message,
            )
        }
        None => {
            let url = broker_url(&mc.spec, names);
            (
                RedisStatus {
                    master: Some(url.clone()),
                    ready_replicas: 0,
                    sentinels_ready: 0,
                },
                true,
                "ExternalRedis",
                format!(
                    "using external Redis {url}; its health shows in the server pods' readiness"
                ),
            )
        }
    };

    let rolled_out = dep_status.observed_generation >= dep_generation;
    let (progressing, progress_reason, progress_message) = if replicas != desired {
        (
            true,
            "Scaling",
            format!("scaling server pods from {replicas} to {desired}"),
        )
    } else if !rolled_out || updated < desired || ready < desired {
        (
            true,
            "RollingOut",
            format!("{updated}/{desired} server pods updated, {ready}/{desired} ready"),
        )
    } else {
        (
            false,
            "Complete",
            format!("all {desired} server pods run the current configuration"),
        )
    };
    let servers_ok = ready >= desired && !progressing;
    let (ready_ok, ready_reason, ready_message) = match (servers_ok, redis_ok) {
        (true, true) => (
            true,
            "AllReplicasReady",
            format!("{ready}/{desired} server pods ready and Redis ready"),
        ),
        (false, _) => (
            false,
            "ServerPodsNotReady",
            format!("{ready}/{desired} server pods ready"),
        ),
        (true, false) => (false, "RedisNotReady", redis_message.clone()),
    };

    let mut conditions = vec![
        condition(
            condition::READY,
            ready_ok,
            ready_reason,
            ready_message,
            generation,
            now,
        ),
        condition(
            condition::PROGRESSING,
            progressing,
            progress_reason,
            progress_message,
            generation,
            now,
        ),
        condition(
            condition::DEGRADED,
            false,
            "AsExpected",
            "the spec is valid and applied".to_owned(),
            generation,
            now,
        ),
        condition(
            condition::REDIS_READY,
            redis_ok,
            redis_reason,
            redis_message,
            generation,
            now,
        ),
    ];
    carry_transition_times(old, &mut conditions);
    MessagingClusterStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        selector: selector_string(names, Component::Server),
        redis,
        endpoints: endpoints(mc, names),
        conditions,
    }
}

/// The status of a spec that failed validation: everything observed
/// before stays, `Degraded` says why, nothing was applied.
pub fn invalid(mc: &MessagingCluster, message: String, now: Timestamp) -> MessagingClusterStatus {
    let old = mc.status.as_ref();
    let mut status = old.cloned().unwrap_or_default();
    status.observed_generation = mc.metadata.generation;
    let degraded = condition(
        condition::DEGRADED,
        true,
        "InvalidSpec",
        message,
        mc.metadata.generation,
        now,
    );
    status.conditions.retain(|c| c.type_ != condition::DEGRADED);
    status.conditions.push(degraded);
    carry_transition_times(old, &mut status.conditions);
    status
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
            notice(EventType::Warning, "InvalidSpec", d.message.clone());
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
        };
        notice(
            EventType::Normal,
            "Created",
            format!("created {} server pods{redis}", mc.spec.replicas),
        );
    } else if is_true(old, condition::DEGRADED) {
        notice(
            EventType::Normal,
            "SpecAccepted",
            "the spec is valid again and was applied".to_owned(),
        );
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

/// Writes the status subresource by server-side apply.
pub async fn patch(
    client: &Client,
    names: &Names,
    status: &MessagingClusterStatus,
) -> Result<(), StatusError> {
    let api: Api<MessagingCluster> = Api::namespaced(client.clone(), &names.namespace);
    let body = serde_json::json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status });
    api.patch_status(
        &names.instance,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(drop)
    .map_err(|source| StatusError::Patch {
        name: names.instance.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::super::apply::AppliedRedis;
    use super::*;
    use crate::build::fixtures::TestCluster;
    use k8s_openapi::api::apps::v1::{
        Deployment, DeploymentStatus, StatefulSet, StatefulSetStatus,
    };

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
        let sentinel_deployment = Deployment {
            status: Some(DeploymentStatus {
                ready_replicas: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        };
        Applied {
            server_deployment: deployment,
            redis: Some(AppliedRedis {
                statefulset,
                sentinel_deployment,
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
        let names = Names::of(&mc).expect("names");
        let s = compute(&mc, &names, &applied(3, 3, 3), None, now());
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
        let names = Names::of(&mc).expect("names");
        mc.status = Some(compute(&mc, &names, &applied(3, 3, 3), None, now()));
        mc.spec.replicas = 5;
        let s = compute(&mc, &names, &applied(3, 3, 3), None, now());
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
        let names = Names::of(&mc).expect("names");
        mc.status = Some(compute(&mc, &names, &applied(3, 3, 3), None, now()));
        let later = Timestamp::from_second(1_800_000_600).expect("timestamp");
        let s = compute(&mc, &names, &applied(2, 3, 3), None, later);
        assert_eq!(cond(&s, "RedisReady").last_transition_time, Time(now()));
        assert_eq!(cond(&s, "Ready").last_transition_time, Time(later));
    }

    #[test]
    fn redis_not_ready_is_named_in_ready_and_redis_ready() {
        let mc = MessagingCluster::test();
        let s = compute(
            &mc,
            &Names::of(&mc).expect("names"),
            &applied(3, 3, 1),
            None,
            now(),
        );
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
        let s = compute(
            &mc,
            &Names::of(&mc).expect("names"),
            &applied(0, 0, 0),
            None,
            now(),
        );
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
        let names = Names::of(&mc).expect("names");
        let first = Some("10.0.0.5:6379".to_owned());
        mc.status = Some(compute(&mc, &names, &applied(3, 3, 3), first, now()));
        let moved = Some("10.0.0.6:6379".to_owned());
        let new = compute(&mc, &names, &applied(3, 3, 3), moved.clone(), now());
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
}
