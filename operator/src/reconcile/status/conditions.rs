//! One function per condition, each from the facts it needs.

use chorus_crds::{FleetStatus, KafkaStatus, RedisClusterStatus, RedisStatus, ShardStatus};

use crate::build::config_map::broker_url;
use crate::cluster::ValidCluster;
use crate::reconcile::apply::Applied;
use crate::topology::{RedisRole, TopologyReport, Waiting};

/// A condition's value before it gets its type, generation and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    /// PascalCase.
    pub reason: &'static str,
    pub message: String,
}

impl Verdict {
    pub fn new(ok: bool, reason: &'static str, message: String) -> Self {
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

/// What the topology step saw of a managed group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupSeen {
    /// The master, when it answers as master.
    pub master: Option<String>,
    /// Replicas whose link to it is up.
    pub replicas_linked: usize,
    /// Sentinels that name it.
    pub sentinels_agreeing: usize,
    /// Bytes of the replication stream the furthest-behind linked replica
    /// has yet to apply (`None`: no master or no linked replica).
    pub replication_lag_bytes: Option<u64>,
    /// Why there is no usable master, when there is none.
    pub problem: Option<String>,
}

impl GroupSeen {
    pub fn from_report(report: &TopologyReport) -> Self {
        let master = report
            .master
            .as_ref()
            .filter(|_| report.master_reachable)
            .map(ToString::to_string);
        let problem = match (&master, &report.waiting) {
            (Some(_), _) => None,
            (None, Some(waiting)) => Some(describe(waiting)),
            (None, None) => Some("the master does not answer".to_owned()),
        };
        Self {
            replication_lag_bytes: master.as_ref().and_then(|_| replication_lag(report)),
            master,
            replicas_linked: report.ready_replicas(),
            sentinels_agreeing: report.sentinels_agreeing,
            problem,
        }
    }
}

/// The master's offset minus the lowest offset of a replica linked to it.
fn replication_lag(report: &TopologyReport) -> Option<u64> {
    let master = report.master.as_ref()?;
    let roles = || {
        report
            .observed
            .redis
            .iter()
            .filter_map(|n| Some((&n.addr, n.role.as_ref().ok()?)))
    };
    let master_offset = roles().find_map(|(addr, role)| match role {
        RedisRole::Master { offset } if addr == master => Some(*offset),
        _ => None,
    })?;
    roles()
        .filter_map(|(_, role)| match role {
            RedisRole::Replica {
                master: of,
                link_up: true,
                offset,
            } if of == master => Some(master_offset.saturating_sub(*offset)),
            _ => None,
        })
        .max()
}

fn describe(waiting: &Waiting) -> String {
    match waiting {
        Waiting::FailoverInProgress => "Sentinel is failing over".to_owned(),
        Waiting::MasterUnreachable => {
            "the sentinels' master does not answer; Sentinel fails over once it is down long enough"
                .to_owned()
        }
        Waiting::MasterNotAMember => "the sentinels name a master outside the group".to_owned(),
        Waiting::MasterIsReplica => "the sentinels' master reports itself a replica".to_owned(),
        Waiting::FirstMasterUnreachable => "a new group: pod 0 does not answer yet".to_owned(),
        Waiting::MembersUnreachable => {
            "no sentinel knows a master and a member that may hold data does not answer".to_owned()
        }
        Waiting::NoMaster => "no member is master and the sentinels do not agree on one".to_owned(),
    }
}

/// `status.redis` and `RedisReady`: the managed group as the topology step
/// saw it (`seen`; `None` before its pods run), or the external URL.
pub fn redis(
    c: &ValidCluster,
    applied: &Applied,
    seen: Option<&GroupSeen>,
) -> (RedisStatus, Verdict) {
    let Some(group) = &applied.redis else {
        let url = broker_url(&c.spec, &c.names);
        return (
            RedisStatus {
                master: Some(url.clone()),
                ..RedisStatus::default()
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
    let ready = |sts: &k8s_openapi::api::apps::v1::StatefulSet| {
        sts.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    };
    let redis_ready = ready(&group.statefulset);
    let sentinels_ready = ready(&group.sentinel_statefulset);
    let status = |master: Option<String>| RedisStatus {
        master,
        ready_replicas: redis_ready,
        sentinels_ready,
        replicas_linked: None,
        replication_lag_bytes: None,
        cluster: None,
    };
    let pods = format!(
        "{redis_ready}/{want_redis} Redis pods and {sentinels_ready}/{want_sentinels} sentinels are ready"
    );
    let Some(seen) = seen else {
        return (
            status(None),
            Verdict::new(
                false,
                "RedisStarting",
                format!(
                    "{pods}; see `kubectl get pods -l app.kubernetes.io/instance={}`",
                    c.names.instance
                ),
            ),
        );
    };
    let majority = usize::try_from(want_sentinels / 2 + 1).unwrap_or(1);
    let verdict = match (&seen.master, &seen.problem) {
        (None, problem) => Verdict::new(
            false,
            "NoMaster",
            format!("{}; {pods}", problem.as_deref().unwrap_or("no master")),
        ),
        (Some(m), _) if seen.sentinels_agreeing < majority => Verdict::new(
            false,
            "SentinelsDisagree",
            format!(
                "master {m}, but only {}/{want_sentinels} sentinels name it; {pods}",
                seen.sentinels_agreeing
            ),
        ),
        (Some(m), _) => Verdict::new(
            true,
            "RedisGroupReady",
            format!(
                "master {m}; {}/{} replicas linked; {}/{want_sentinels} sentinels agree",
                seen.replicas_linked,
                want_redis - 1,
                seen.sentinels_agreeing
            ),
        ),
    };
    let mut redis = status(seen.master.clone());
    if seen.master.is_some() {
        redis.replicas_linked = i32::try_from(seen.replicas_linked).ok();
        redis.replication_lag_bytes = seen
            .replication_lag_bytes
            .and_then(|b| i64::try_from(b).ok());
    }
    (redis, verdict)
}

/// `Ready` with `delivery: kafka`: every server pod ready and settled, and
/// Kafka reachable from them. Kafka is named first when it is the cause.
pub fn ready_on_kafka(s: &Servers, progressing: &Verdict, kafka: &Verdict) -> Verdict {
    let pods = format!("{}/{} server pods ready", s.ready, s.desired);
    match kafka.reason {
        _ if kafka.ok => {
            let v = ready(s, progressing, kafka);
            if v.ok {
                Verdict::new(true, v.reason, format!("{pods} and Kafka reachable"))
            } else {
                v
            }
        }
        KAFKA_NOT_REPORTED if s.ready < s.desired || progressing.ok => ready(s, progressing, kafka),
        KAFKA_NOT_REPORTED => Verdict::new(false, KAFKA_NOT_REPORTED, kafka.message.clone()),
        _ => Verdict::new(
            false,
            "KafkaUnreachable",
            format!("{}; {pods}", kafka.message),
        ),
    }
}

/// `KafkaReachable`'s reason while no server pod has answered.
pub const KAFKA_NOT_REPORTED: &str = "NotReported";

/// `status.kafka` and `KafkaReachable`, from what the server pods report
/// (`status.fleet`: each pod's `chorus_broker_up` and, when it is down,
/// its `/readyz`): the servers check the topic's metadata every second,
/// from where the traffic goes, so their word is what counts.
pub fn kafka(c: &ValidCluster, fleet: Option<&FleetStatus>) -> (KafkaStatus, Verdict) {
    let servers = c
        .kafka()
        .map(|k| k.bootstrap_servers.clone())
        .unwrap_or_default();
    let topic = c
        .kafka()
        .map(|k| k.topic_of(&c.names.instance))
        .unwrap_or_default();
    let pods = fleet.map(|f| f.pods.as_slice()).unwrap_or_default();
    let answered: Vec<_> = pods.iter().filter(|p| p.error.is_none()).collect();
    let up = answered.iter().filter(|p| p.broker_up).count();
    let down: Vec<String> = answered
        .iter()
        .filter(|p| !p.broker_up)
        .map(|p| match &p.broker_down {
            Some(why) => format!("{} ({why})", p.name),
            None => p.name.clone(),
        })
        .collect();
    let at = format!("Kafka at {}, topic {topic}", servers.join(","));
    let verdict = if answered.is_empty() {
        let why = pods
            .iter()
            .find_map(|p| Some(format!(" ({}: {})", p.name, p.error.as_ref()?)))
            .unwrap_or_default();
        Verdict::new(
            false,
            KAFKA_NOT_REPORTED,
            format!("no server pod has reported on {at} yet{why}; each checks it every second"),
        )
    } else if down.is_empty() {
        Verdict::new(
            true,
            "KafkaReachable",
            format!("{up} server pods reach {at}"),
        )
    } else if up == 0 {
        Verdict::new(
            false,
            "KafkaUnreachable",
            format!("no server pod reaches {at}: {}", down.join("; ")),
        )
    } else {
        Verdict::new(
            false,
            "KafkaUnreachableFromSomePods",
            format!(
                "{}/{} server pods cannot reach {at}: {}",
                down.len(),
                answered.len(),
                down.join("; ")
            ),
        )
    };
    let status = KafkaStatus {
        reachable: verdict.ok,
        bootstrap_servers: servers,
        topic,
        pods_reaching: i32::try_from(up).unwrap_or(i32::MAX),
        message: verdict.message.clone(),
    };
    (status, verdict)
}

/// `status.redis` and `RedisReady` in `redis.mode: cluster`: ready when the
/// cluster is `ok` and serves all 16384 slots (while a new shard still
/// receives slots too: every slot is served meanwhile).
pub fn redis_cluster(
    c: &ValidCluster,
    applied: &Applied,
    report: Option<&crate::redis_cluster::ClusterReport>,
) -> (RedisStatus, Verdict) {
    use crate::redis_cluster::{SLOTS, ranges_text};
    let want = crate::build::redis_cluster::pods(c);
    let ready = applied
        .redis_cluster
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let pods = format!("{ready}/{want} Redis Cluster pods are ready");
    let mut status = RedisStatus {
        ready_replicas: ready,
        ..RedisStatus::default()
    };
    let Some(report) = report else {
        return (
            status,
            Verdict::new(
                false,
                "RedisStarting",
                format!(
                    "{pods}; see `kubectl get pods -l app.kubernetes.io/instance={},app.kubernetes.io/component=redis-cluster`",
                    c.names.instance
                ),
            ),
        );
    };
    let shards: Vec<ShardStatus> = report
        .shards
        .iter()
        .map(|s| ShardStatus {
            master: s.master.clone(),
            slots: i32::try_from(s.slots).unwrap_or(i32::MAX),
            slot_ranges: ranges_text(&s.ranges),
            replicas: s.replicas.clone(),
            replicas_linked: i32::try_from(s.replicas_linked).unwrap_or(i32::MAX),
        })
        .collect();
    let replicas: usize = report.shards.iter().map(|s| s.replicas.len()).sum();
    let linked: usize = report.shards.iter().map(|s| s.replicas_linked).sum();
    let problem = report.waiting.clone().or_else(|| {
        (!report.unreachable.is_empty()).then(|| {
            let names: Vec<&str> = report.unreachable.iter().map(|(n, _)| n.as_str()).collect();
            format!("not answering: {}", names.join(", "))
        })
    });
    let state = report.state.clone().unwrap_or_else(|| "unknown".to_owned());
    let verdict = if report.whole() {
        let moving = match report.slots_to_move {
            0 => String::new(),
            n => format!("; {n} slots still to move to new shards"),
        };
        Verdict::new(
            true,
            "RedisClusterReady",
            format!(
                "{} shards serve all {SLOTS} slots; {linked}/{replicas} replicas linked{moving}",
                shards.len()
            ),
        )
    } else {
        Verdict::new(
            false,
            "RedisClusterNotReady",
            format!(
                "cluster_state {state}, {}/{SLOTS} slots served; {}; {pods}",
                report.slots_covered,
                problem.as_deref().unwrap_or("the cluster is forming")
            ),
        )
    };
    status.cluster = Some(RedisClusterStatus {
        state: report.state.clone(),
        slots_covered: i32::try_from(report.slots_covered).unwrap_or(0),
        slots_to_move: i32::try_from(report.slots_to_move).unwrap_or(0),
        shards,
        problem,
    });
    (status, verdict)
}
