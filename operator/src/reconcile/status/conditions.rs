//! One function per condition, each from the facts it needs.

use chorus_crds::RedisStatus;

use crate::build::config_map::broker_url;
use crate::cluster::ValidCluster;
use crate::reconcile::apply::Applied;

/// A condition's value before it gets its type, generation and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    /// PascalCase.
    pub reason: &'static str,
    pub message: String,
}

impl Verdict {
    fn new(ok: bool, reason: &'static str, message: String) -> Self {
        Self {
            ok,
            reason,
            message,
        }
    }
}

/// What the server Deployment reports.
pub struct Servers {
    pub desired: i32,
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    /// The Deployment controller has seen the latest template.
    pub rolled_out: bool,
}

impl Servers {
    pub fn of(c: &ValidCluster, applied: &Applied) -> Self {
        let deployment = &applied.server_deployment;
        let status = deployment.status.clone().unwrap_or_default();
        Self {
            desired: c.spec.replicas,
            replicas: status.replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            rolled_out: status.observed_generation >= deployment.metadata.generation,
        }
    }
}

/// `Progressing`: pods are being added, removed or replaced.
pub fn progressing(s: &Servers) -> Verdict {
    let desired = s.desired;
    if s.replicas != desired {
        Verdict::new(
            true,
            "Scaling",
            format!("scaling server pods from {} to {desired}", s.replicas),
        )
    } else if !s.rolled_out || s.updated < desired || s.ready < desired {
        Verdict::new(
            true,
            "RollingOut",
            format!(
                "{}/{desired} server pods updated, {}/{desired} ready",
                s.updated, s.ready
            ),
        )
    } else {
        Verdict::new(
            false,
            "Complete",
            format!("all {desired} server pods run the current configuration"),
        )
    }
}

/// `Ready`: every server pod is ready and settled, and Redis is ready.
pub fn ready(s: &Servers, progressing: &Verdict, redis: &Verdict) -> Verdict {
    let servers_ok = s.ready >= s.desired && !progressing.ok;
    match (servers_ok, redis.ok) {
        (true, true) => Verdict::new(
            true,
            "AllReplicasReady",
            format!(
                "{}/{} server pods ready and Redis ready",
                s.ready, s.desired
            ),
        ),
        (false, _) => Verdict::new(
            false,
            "ServerPodsNotReady",
            format!("{}/{} server pods ready", s.ready, s.desired),
        ),
        (true, false) => Verdict::new(false, "RedisNotReady", redis.message.clone()),
    }
}

/// `Degraded` after a valid spec was applied.
pub fn not_degraded() -> Verdict {
    Verdict::new(
        false,
        "AsExpected",
        "the spec is valid and applied".to_owned(),
    )
}

/// `status.redis` and `RedisReady`: the managed group's pods and the master
/// the topology step observed, or the external URL.
pub fn redis(
    c: &ValidCluster,
    applied: &Applied,
    observed_master: Option<String>,
) -> (RedisStatus, Verdict) {
    let Some(group) = &applied.redis else {
        let url = broker_url(&c.spec, &c.names);
        return (
            RedisStatus {
                master: Some(url.clone()),
                ready_replicas: 0,
                sentinels_ready: 0,
            },
            Verdict::new(
                true,
                "ExternalRedis",
                format!(
                    "using external Redis {url}; its health shows in the server pods' readiness"
                ),
            ),
        );
    };
    let want_redis = c.spec.redis.replicas;
    let want_sentinels = c.spec.redis.sentinels;
    let redis_ready = group
        .statefulset
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let sentinels_ready = group
        .sentinel_statefulset
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let ok = redis_ready >= want_redis && sentinels_ready >= want_sentinels;
    let verdict = if ok {
        let master_note = match &observed_master {
            Some(m) => format!("master {m}"),
            None => "no master reported yet".to_owned(),
        };
        Verdict::new(
            true,
            "RedisGroupReady",
            format!(
                "{redis_ready} Redis pods and {sentinels_ready} sentinels are ready; {master_note}"
            ),
        )
    } else {
        Verdict::new(
            false,
            "RedisStarting",
            format!(
                "{redis_ready}/{want_redis} Redis pods and {sentinels_ready}/{want_sentinels} sentinels \
                 are ready; see `kubectl get pods -l app.kubernetes.io/instance={}`",
                c.names.instance
            ),
        )
    };
    (
        RedisStatus {
            master: observed_master,
            ready_replicas: redis_ready,
            sentinels_ready,
        },
        verdict,
    )
}
