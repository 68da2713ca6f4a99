//! Status step: computes `MessagingCluster.status` from what the apply
//! step got back (pure, [`compute`], one function per condition in
//! [`conditions`]), names the notable transitions as Kubernetes Events
//! (pure, [`transitions`]) and writes the status by server-side apply
//! (needs a client, [`patch`]).
//!
//! When a step fails, the status is still written: [`failed`] keeps what
//! was observed before and [`degrade`] sets `Degraded` with the failed
//! step ([`FailedStep`]) as reason and the error as message.

mod conditions;
mod events;
#[cfg(test)]
mod tests;

pub use conditions::{GroupSeen, Verdict};
pub use events::{Notice, transitions};

use chorus_crds::{
    API_VERSION, EndpointsStatus, FleetStatus, KIND, MessagingCluster, MessagingClusterStatus,
    RedisStatus, condition,
};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use super::apply::{Applied, FIELD_MANAGER};
use crate::build::meta::{Component, selector_string};
use crate::cluster::ValidCluster;

/// The step of a reconcile that failed, named by `Degraded`'s reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailedStep {
    /// The spec failed validation; nothing was applied.
    InvalidSpec,
    /// Reading the password Secret or the group's pods failed.
    Dereference,
    /// The API server refused an object built from the spec as invalid;
    /// the other objects were applied.
    ApplyRefused,
    /// Writing an object failed.
    Apply,
    /// The Redis group could not be observed or corrected.
    RedisGroup,
    /// Replacing an outdated Redis pod failed.
    Roll,
    /// Writing the status failed.
    Status,
}

impl FailedStep {
    pub const ALL: [FailedStep; 7] = [
        FailedStep::InvalidSpec,
        FailedStep::Dereference,
        FailedStep::ApplyRefused,
        FailedStep::Apply,
        FailedStep::RedisGroup,
        FailedStep::Roll,
        FailedStep::Status,
    ];

    /// `Degraded`'s reason, and the Warning Event's.
    pub fn reason(self) -> &'static str {
        match self {
            FailedStep::InvalidSpec => "InvalidSpec",
            FailedStep::Dereference => "DereferenceFailed",
            FailedStep::ApplyRefused => "ApplyRefused",
            FailedStep::Apply => "ApplyFailed",
            FailedStep::RedisGroup => "RedisGroupUnreachable",
            FailedStep::Roll => "RollFailed",
            FailedStep::Status => "StatusFailed",
        }
    }

    /// The step a `Degraded` reason names.
    pub fn of_reason(reason: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.reason() == reason)
    }
}

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
fn endpoints(c: &ValidCluster) -> EndpointsStatus {
    let names = &c.names;
    let (ws, http) = match &c.spec.ingress {
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
                names.service, names.namespace, c.spec.service.port
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

/// What the Redis step of a reconcile observed.
#[derive(Clone, Copy, Debug)]
pub enum RedisSeen<'a> {
    /// The managed Sentinel group as the topology step saw it (or
    /// external Redis: nothing to see).
    Group(Option<&'a GroupSeen>),
    /// `redis.mode: cluster`: the cluster step's report (`None` before
    /// its pods run).
    Cluster(Option<&'a crate::redis_cluster::ClusterReport>),
}

/// The status after a successful apply. `seen`: the managed Redis group
/// as the topology step observed it.
pub fn compute(
    mc: &MessagingCluster,
    c: &ValidCluster,
    applied: &Applied,
    seen: Option<&GroupSeen>,
    now: Timestamp,
) -> MessagingClusterStatus {
    compute_with(mc, c, applied, RedisSeen::Group(seen), now)
}

/// [`compute`] for any kind of Redis.
pub fn compute_with(
    mc: &MessagingCluster,
    c: &ValidCluster,
    applied: &Applied,
    seen: RedisSeen<'_>,
    now: Timestamp,
) -> MessagingClusterStatus {
    let servers = conditions::Servers::of(c, applied);
    let (redis, redis_ready) = match seen {
        RedisSeen::Group(group) => conditions::redis(c, applied, group),
        RedisSeen::Cluster(report) => conditions::redis_cluster(c, applied, report),
    };
    let progressing = conditions::progressing(&servers);
    let ready = conditions::ready(&servers, &progressing, &redis_ready);
    let backplane = (condition::REDIS_READY, redis_ready);
    let mut status = assemble(mc, c, &servers, ready, progressing, backplane, now);
    status.redis = redis;
    status
}

/// The status after a successful apply with `delivery: kafka`: no Redis;
/// `status.kafka` and `KafkaReachable` from what the server pods report
/// (`fleet`: `None` before they could be listed), and `Ready` needs it.
pub fn compute_kafka(
    mc: &MessagingCluster,
    c: &ValidCluster,
    applied: &Applied,
    fleet: Option<&FleetStatus>,
    now: Timestamp,
) -> MessagingClusterStatus {
    let servers = conditions::Servers::of(c, applied);
    let (kafka, reachable) = conditions::kafka(c, fleet);
    let progressing = conditions::progressing(&servers);
    let ready = conditions::ready_on_kafka(&servers, &progressing, &reachable);
    let backplane = (condition::KAFKA_REACHABLE, reachable);
    let mut status = assemble(mc, c, &servers, ready, progressing, backplane, now);
    status.kafka = Some(kafka);
    status
}

/// The status from the conditions' verdicts; `backplane`: the condition
/// of what the servers fan out through (`RedisReady`, `KafkaReachable`).
fn assemble(
    mc: &MessagingCluster,
    c: &ValidCluster,
    servers: &conditions::Servers,
    ready: Verdict,
    progressing: Verdict,
    backplane: (&str, Verdict),
    now: Timestamp,
) -> MessagingClusterStatus {
    let at =
        |type_: &str, v: Verdict| condition(type_, v.ok, v.reason, v.message, c.generation, now);
    let mut conditions = vec![
        at(condition::READY, ready),
        at(condition::PROGRESSING, progressing),
        at(condition::DEGRADED, conditions::not_degraded()),
        at(backplane.0, backplane.1),
    ];
    carry_transition_times(mc.status.as_ref(), &mut conditions);
    MessagingClusterStatus {
        observed_generation: c.generation,
        replicas: servers.replicas,
        ready_replicas: servers.ready,
        selector: selector_string(&c.names, Component::Server),
        redis: RedisStatus::default(),
        kafka: None,
        endpoints: endpoints(c),
        conditions,
        fleet: None,
    }
}

/// Adds what the fleet step saw: `status.fleet` and `FleetHealthy` (both
/// absent when the pods could not be listed yet).
pub fn with_fleet(
    status: &mut MessagingClusterStatus,
    mc: &MessagingCluster,
    fleet: Option<crate::fleet::Observed>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let Some(fleet) = fleet else { return };
    let v = fleet.health;
    let mut healthy = [condition(
        condition::FLEET_HEALTHY,
        v.ok,
        v.reason,
        v.message,
        generation,
        now,
    )];
    carry_transition_times(mc.status.as_ref(), &mut healthy);
    status.conditions.extend(healthy);
    status.fleet = Some(fleet.status);
}

/// Sets `Degraded` to True, naming the failed step and its error, in a
/// status otherwise computed from what was observed; the other conditions
/// stay as they are.
pub fn degrade(
    status: &mut MessagingClusterStatus,
    old: Option<&MessagingClusterStatus>,
    step: FailedStep,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    let degraded = condition(
        condition::DEGRADED,
        true,
        step.reason(),
        message,
        generation,
        now,
    );
    match status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == condition::DEGRADED)
    {
        Some(c) => *c = degraded,
        None => status.conditions.push(degraded),
    }
    carry_transition_times(old, &mut status.conditions);
}

/// The status after a step failed before anything new was observed:
/// everything observed before stays, `Degraded` says which step failed
/// and why.
pub fn failed(
    mc: &MessagingCluster,
    step: FailedStep,
    message: String,
    now: Timestamp,
) -> MessagingClusterStatus {
    let old = mc.status.as_ref();
    let mut status = old.cloned().unwrap_or_default();
    status.observed_generation = mc.metadata.generation;
    degrade(&mut status, old, step, message, mc.metadata.generation, now);
    status
}

/// The status of a spec that failed validation: nothing was applied.
pub fn invalid(mc: &MessagingCluster, message: String, now: Timestamp) -> MessagingClusterStatus {
    failed(mc, FailedStep::InvalidSpec, message, now)
}

/// Writes the status subresource of `namespace/name` by server-side apply.
pub async fn patch(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &MessagingClusterStatus,
) -> Result<(), StatusError> {
    let api: Api<MessagingCluster> = Api::namespaced(client.clone(), namespace);
    let body = serde_json::json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(drop)
    .map_err(|source| StatusError::Patch {
        name: name.to_owned(),
        source,
    })
}
