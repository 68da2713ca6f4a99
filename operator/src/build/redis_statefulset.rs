//! `StatefulSet <name>-redis`: the managed Redis members. Each runs
//! `redis.sh start` from the group ConfigMap ([`super::redis_group`]): it
//! asks the sentinels (and its peers) who the master is before it serves,
//! so the group heals itself without the operator and a pod that restarted
//! empty never serves under the old master's name. A master hands over to
//! a replica before it stops (`preStop`); a replica is ready once its link
//! to the master is up.
//!
//! Pods start in parallel; updates are `OnDelete`: the operator rolls them
//! itself, replicas first and the master last (after a failover), instead of
//! the StatefulSet controller's highest-ordinal-first order.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy},
        core::v1::{
            ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
            EnvVarSource, ExecAction, LifecycleHandler, ObjectFieldSelector, PersistentVolumeClaim,
            PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, SecretKeySelector, Volume,
            VolumeMount, VolumeResourceRequirements,
        },
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};

use super::meta::{
    Component, REDIS_PORT, SENTINEL_MASTER_NAME, label_selector, object_meta, pod_labels,
    selector_labels,
};
use super::pod_policy::{restricted_security, scratch, spread};
use super::redis_group::{self, GROUP_DIR, WAITING_PORT};
use crate::cluster::ValidCluster;
use chorus_crds::Delivery;

/// Name of the data volume (and of the PVC template).
pub const DATA_VOLUME: &str = "data";
/// Pod template annotation carrying the scripts' hash.
pub const SCRIPTS_HASH_ANNOTATION: &str = "chorus.dev/scripts-hash";
/// How long a stopping master waits for the sentinels to name another.
pub const PRESTOP_SECONDS: i64 = 30;

/// Extra `redis.conf` lines: persistence and memory.
///
/// Persistence (AOF, fsync every second) is on with storage and, on the
/// pod's own volume, whenever the history matters (`delivery: streams`).
/// `maxmemory-policy noeviction`: a full Redis refuses writes (publishes
/// answer `unavailable`) instead of silently evicting history.
pub fn redis_conf(c: &ValidCluster) -> String {
    let persistent = c.spec.redis.storage.is_some() || c.spec.delivery == Delivery::Streams;
    let mut lines = vec![if persistent {
        "appendonly yes\nappendfsync everysec".to_owned()
    } else {
        "appendonly no\nsave \"\"".to_owned()
    }];
    lines.push("maxmemory-policy noeviction".to_owned());
    if let Some(bytes) = memory_limit(c) {
        // Room for replication buffers and fork copy-on-write.
        lines.push(format!("maxmemory {}", bytes / 10 * 8));
    }
    lines.join("\n")
}

/// The Redis container's memory limit in bytes, when one is set.
fn memory_limit(c: &ValidCluster) -> Option<u64> {
    let limits = c.spec.redis.resources.as_ref()?.limits.as_ref()?;
    parse_quantity(&limits.get("memory")?.0)
}

/// Bytes of a Kubernetes memory quantity (`512Mi`, `1G`, `1048576`).
pub(crate) fn parse_quantity(q: &str) -> Option<u64> {
    let split = q.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(q.len());
    let (number, unit) = q.split_at(split);
    let n: u64 = number.parse().ok()?;
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// A plain `name=value` environment variable.
pub fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// What both scripts read: [`pod_env`], the group folder, the master
/// name, `/data`.
pub fn group_env(c: &ValidCluster, service: &str, port: i32) -> Vec<EnvVar> {
    let mut out = pod_env(c, service, port);
    out.extend([
        env("CHORUS_GROUP_DIR", GROUP_DIR),
        env("CHORUS_MASTER_NAME", SENTINEL_MASTER_NAME),
        env("CHORUS_DATA", "/data"),
    ]);
    out
}

/// What every Redis pod knows of itself: `POD_NAME`, `REDIS_PASSWORD` from
/// the password Secret, `CHORUS_SELF` (its DNS name on the headless
/// Service `service`, and `port`).
pub fn pod_env(c: &ValidCluster, service: &str, port: i32) -> Vec<EnvVar> {
    let mut out = vec![EnvVar {
        name: "POD_NAME".to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    out.extend(c.password.clone().map(|r| EnvVar {
        name: "REDIS_PASSWORD".to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: r.name,
                key: r.key,
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }));
    out.push(env(
        "CHORUS_SELF",
        format!("$(POD_NAME).{service}.{}.svc:{port}", c.names.namespace),
    ));
    out
}

/// A named TCP container port.
pub fn container_port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

/// `sh <script> <command>`, as a probe or hook command.
pub fn script_command(script: &str, command: &str) -> Vec<String> {
    vec![
        "sh".to_owned(),
        format!("{GROUP_DIR}/{script}"),
        command.to_owned(),
    ]
}

/// An exec probe running `script command`.
pub fn script_probe(script: &str, command: &str, period: i32, failures: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(script_command(script, command)),
        }),
        period_seconds: Some(period),
        // A few bounded redis-cli calls.
        timeout_seconds: Some(10),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The volumes every group pod has: the scripts and a writable `/tmp`.
pub fn group_volumes(c: &ValidCluster) -> (Vec<Volume>, Vec<VolumeMount>) {
    // The root file system is read-only: redis.conf goes to /tmp.
    let (tmp, tmp_mount) = scratch("tmp", "/tmp", "16Mi");
    let volumes = vec![
        Volume {
            name: "group".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: redis_group::config_map_name(&c.names),
                default_mode: Some(0o555),
                ..Default::default()
            }),
            ..Default::default()
        },
        tmp,
    ];
    let mounts = vec![
        VolumeMount {
            name: "group".to_owned(),
            mount_path: GROUP_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        },
        tmp_mount,
    ];
    (volumes, mounts)
}

/// The data volume at `/data`: an emptyDir without storage (it survives
/// container restarts, not the pod), else a PVC per pod from the returned
/// claim template (selector labels of `component` only: templates are
/// immutable).
pub fn data_volume(
    c: &ValidCluster,
    component: Component,
    volumes: &mut Vec<Volume>,
    mounts: &mut Vec<VolumeMount>,
) -> Option<Vec<PersistentVolumeClaim>> {
    mounts.push(VolumeMount {
        name: DATA_VOLUME.to_owned(),
        mount_path: "/data".to_owned(),
        ..Default::default()
    });
    let Some(s) = c.spec.redis.storage.as_ref() else {
        volumes.push(Volume {
            name: DATA_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        return None;
    };
    Some(vec![PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_owned()),
            labels: Some(selector_labels(&c.names, component)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: s.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(s.size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }])
}

pub fn build(c: &ValidCluster) -> StatefulSet {
    let names = &c.names;
    let redis = &c.spec.redis;
    let (mut volumes, mut mounts) = group_volumes(c);
    let claims = data_volume(c, Component::Redis, &mut volumes, &mut mounts);
    let (_, container_security) = restricted_security();
    let mut env_vars = group_env(c, &names.redis, REDIS_PORT);
    env_vars.extend([
        env("CHORUS_BOOTSTRAP", redis_group::redis_member(names, 0)),
        env("CHORUS_CONF", "/tmp/redis.conf"),
        env("CHORUS_REDIS_CONF", redis_conf(c)),
        env("CHORUS_PRESTOP_SECONDS", PRESTOP_SECONDS.to_string()),
    ]);
    let container = Container {
        name: "redis".to_owned(),
        image: Some(redis.image.clone()),
        command: Some(script_command("redis.sh", "start")),
        env: Some(env_vars),
        ports: Some(vec![
            container_port("redis", REDIS_PORT),
            container_port("waiting", WAITING_PORT),
        ]),
        resources: redis.resources.clone(),
        readiness_probe: Some(script_probe("redis.sh", "ready", 5, 2)),
        // Loading a large data set can take a while: only a member that
        // answers on neither port for a minute is restarted.
        liveness_probe: Some(script_probe("redis.sh", "alive", 10, 6)),
        lifecycle: Some(k8s_openapi::api::core::v1::Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(script_command("redis.sh", "prestop")),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        security_context: Some(container_security),
        ..Default::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        // preStop's hand-over, then redis-server's own shutdown.
        termination_grace_period_seconds: Some(PRESTOP_SECONDS + 30),
        ..Default::default()
    };
    let set = RedisPods {
        name: &names.redis,
        component: Component::Redis,
        replicas: redis.replicas,
        scripts_hash: redis_group::scripts_hash(),
        claims,
    };
    // Members decide their roles themselves: no need to start in order.
    set.statefulset(c, pod)
}

/// A StatefulSet of Redis pods (a Sentinel group's members, or a Redis
/// Cluster's nodes): started in parallel (they find or are given their
/// roles, in no order), `OnDelete` updates (the operator decides when a
/// pod may go), the scripts' hash on the template, Pod Security
/// "restricted", spread over nodes and zones, then `spec.pods.redis`.
pub struct RedisPods<'a> {
    pub name: &'a str,
    pub component: Component,
    pub replicas: i32,
    pub scripts_hash: String,
    pub claims: Option<Vec<PersistentVolumeClaim>>,
}

impl RedisPods<'_> {
    /// The StatefulSet running `pod` (its containers, volumes and grace
    /// period; the security context and spreading are filled in here).
    pub fn statefulset(self, c: &ValidCluster, mut pod: PodSpec) -> StatefulSet {
        let names = &c.names;
        let (pod_security, _) = restricted_security();
        let (affinity, topology_spread) = spread(names, self.component);
        pod.security_context = Some(pod_security);
        pod.affinity = Some(affinity);
        pod.topology_spread_constraints = Some(topology_spread);
        let mut built = StatefulSet {
            metadata: object_meta(c, self.name, self.component),
            spec: Some(StatefulSetSpec {
                replicas: Some(self.replicas),
                service_name: Some(self.name.to_owned()),
                selector: label_selector(names, self.component),
                pod_management_policy: Some("Parallel".to_owned()),
                update_strategy: Some(StatefulSetUpdateStrategy {
                    type_: Some("OnDelete".to_owned()),
                    ..Default::default()
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels(names, self.component)),
                        annotations: Some(BTreeMap::from([(
                            SCRIPTS_HASH_ANNOTATION.to_owned(),
                            self.scripts_hash,
                        )])),
                        ..Default::default()
                    }),
                    spec: Some(pod),
                },
                volume_claim_templates: self.claims,
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Some(spec) = built.spec.as_mut() {
            super::overrides::apply(&mut spec.template, &c.spec.pods.redis);
        }
        built
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID, env_of, valid};
    use super::*;
    use chorus_crds::MessagingCluster;

    fn sts(mc: &MessagingCluster) -> StatefulSet {
        build(&valid(mc))
    }

    #[test]
    fn members_run_the_group_script_by_their_dns_names() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.replicas = 5;
        let s = sts(&mc);
        assert_eq!(s.metadata.name.as_deref(), Some("chat-redis"));
        assert_eq!(
            s.metadata.owner_references.clone().expect("owner")[0].uid,
            UID
        );
        let spec = s.spec.clone().expect("spec");
        assert_eq!(spec.replicas, Some(5));
        assert_eq!(spec.service_name.as_deref(), Some("chat-redis"));
        assert_eq!(
            spec.update_strategy.and_then(|u| u.type_).as_deref(),
            Some("OnDelete")
        );
        let pod = spec.template.spec.expect("pod");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("redis:7.0"));
        assert_eq!(
            c.command.clone().expect("command"),
            ["sh", "/etc/chorus/redis.sh", "start"]
        );
        let env = env_of(&s);
        assert_eq!(
            env["CHORUS_SELF"],
            "$(POD_NAME).chat-redis.default.svc:6379"
        );
        assert_eq!(
            env["CHORUS_BOOTSTRAP"],
            "chat-redis-0.chat-redis.default.svc:6379"
        );
        let pw = c.env.clone().expect("env")[1]
            .value_from
            .clone()
            .and_then(|v| v.secret_key_ref)
            .expect("secret");
        assert_eq!(
            (pw.name.as_str(), pw.key.as_str()),
            ("chat-redis-auth", "password")
        );
        assert!(c.lifecycle.clone().and_then(|l| l.pre_stop).is_some());
        assert!(pod.termination_grace_period_seconds.expect("grace") > PRESTOP_SECONDS);
    }

    #[test]
    fn redis_pods_pass_pod_security_restricted_and_spread() {
        for mc in [
            MessagingCluster::test(),
            MessagingCluster::test().with_storage("1Gi"),
        ] {
            let pod = sts(&mc).spec.expect("spec").template.spec.expect("pod");
            assert_eq!(
                crate::build::pod_policy::restricted_violations(&pod),
                Vec::<String>::new()
            );
            assert!(pod.affinity.is_some() && pod.topology_spread_constraints.is_some());
        }
    }

    #[test]
    fn scaling_the_group_does_not_change_the_pod_template() {
        let mut five = MessagingCluster::test();
        five.spec.redis.replicas = 5;
        let a = sts(&MessagingCluster::test()).spec.expect("spec").template;
        let b = sts(&five).spec.expect("spec").template;
        assert_eq!(a, b, "member lists are read from the ConfigMap, live");
    }

    #[test]
    fn without_storage_data_is_ephemeral_and_aof_off_in_pubsub_mode() {
        let s = sts(&MessagingCluster::test());
        let spec = s.spec.clone().expect("spec");
        assert!(spec.volume_claim_templates.is_none());
        let volumes = spec.template.spec.expect("pod").volumes.expect("volumes");
        assert!(
            volumes
                .iter()
                .any(|v| v.name == DATA_VOLUME && v.empty_dir.is_some())
        );
        assert!(env_of(&s)["CHORUS_REDIS_CONF"].contains("appendonly no"));
    }

    #[test]
    fn streams_delivery_keeps_an_append_only_file_even_without_storage() {
        let mut mc = MessagingCluster::test();
        mc.spec.delivery = Delivery::Streams;
        let conf = &env_of(&sts(&mc))["CHORUS_REDIS_CONF"];
        assert!(conf.contains("appendonly yes"), "{conf}");
        assert!(conf.contains("maxmemory-policy noeviction"), "{conf}");
    }

    #[test]
    fn a_memory_limit_sets_maxmemory_below_it() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("1Gi".to_owned()),
            )])),
            ..Default::default()
        });
        let conf = &env_of(&sts(&mc))["CHORUS_REDIS_CONF"];
        assert!(conf.contains("maxmemory 858993456"), "{conf}");
        assert_eq!(parse_quantity("512Mi"), Some(512 << 20));
        assert_eq!(parse_quantity("2G"), Some(2_000_000_000));
        assert_eq!(parse_quantity("1.5Gi"), None);
    }

    #[test]
    fn with_storage_each_pod_gets_a_claim_and_aof() {
        let s = sts(&MessagingCluster::test().with_storage("5Gi"));
        let spec = s.spec.clone().expect("spec");
        let volumes = spec
            .template
            .spec
            .clone()
            .expect("pod")
            .volumes
            .expect("volumes");
        assert!(!volumes.iter().any(|v| v.name == DATA_VOLUME));
        let claim = &spec.volume_claim_templates.expect("claims")[0];
        assert_eq!(claim.metadata.name.as_deref(), Some("data"));
        assert!(
            !claim
                .metadata
                .labels
                .clone()
                .expect("labels")
                .contains_key("app.kubernetes.io/version")
        );
        let requests = claim
            .spec
            .clone()
            .and_then(|s| s.resources)
            .and_then(|r| r.requests)
            .expect("requests");
        assert_eq!(requests["storage"], Quantity("5Gi".to_owned()));
        assert!(env_of(&s)["CHORUS_REDIS_CONF"].contains("appendonly yes"));
    }
}
