//! `StatefulSet <name>-redis`: the managed Redis pods. Every pod starts as
//! a standalone Redis with the password; who is master and who replicates
//! it is set at run time by the operator's Redis topology step (pod 0 on
//! first start, then whatever Sentinel agrees on), which addresses pods by
//! IP, as Sentinel does (`resolve-hostnames no`). Nothing here pins a role,
//! so a restarted pod never comes back claiming a role it lost.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetSpec},
        core::v1::{
            Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
            PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe,
            SecretKeySelector, Volume, VolumeMount, VolumeResourceRequirements,
        },
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};

use super::meta::{
    Component, REDIS_PORT, label_selector, object_meta, pod_labels, selector_labels,
};
use crate::cluster::ValidCluster;

/// Name of the data volume (and of the PVC template).
pub const DATA_VOLUME: &str = "data";

/// The container's start script. Redis reads the password from the
/// environment into a config file so it never shows in `ps`.
fn start_script(c: &ValidCluster) -> String {
    let persistence = if c.spec.redis.storage.is_some() {
        "appendonly yes\nappendfsync everysec"
    } else {
        "appendonly no\nsave \"\""
    };
    format!(
        r#"set -eu
umask 077
cat > /tmp/redis.conf <<END_OF_CONFIG
port {port}
dir /data
{persistence}
requirepass "$REDIS_PASSWORD"
masterauth "$REDIS_PASSWORD"
END_OF_CONFIG
exec redis-server /tmp/redis.conf
"#,
        port = REDIS_PORT,
    )
}

/// `REDIS_PASSWORD` from the password Secret.
pub fn password_env(c: &ValidCluster) -> Vec<EnvVar> {
    c.password
        .clone()
        .map(|r| EnvVar {
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
        })
        .into_iter()
        .collect()
}

/// `redis-cli ping` on `port`, for probes.
pub fn ping_probe(port: i32, with_password: bool) -> Probe {
    let auth = if with_password {
        " --no-auth-warning -a \"$REDIS_PASSWORD\""
    } else {
        ""
    };
    Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "sh".to_owned(),
                "-c".to_owned(),
                format!("redis-cli -p {port}{auth} ping | grep -q PONG"),
            ]),
        }),
        period_seconds: Some(5),
        timeout_seconds: Some(3),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

pub fn build(c: &ValidCluster) -> StatefulSet {
    let names = &c.names;
    let redis = &c.spec.redis;
    let storage = redis.storage.as_ref();
    let mut liveness = ping_probe(REDIS_PORT, true);
    liveness.initial_delay_seconds = Some(15);
    liveness.period_seconds = Some(10);
    let container = Container {
        name: "redis".to_owned(),
        image: Some(redis.image.clone()),
        command: Some(vec!["sh".to_owned(), "-c".to_owned(), start_script(c)]),
        env: Some(password_env(c)),
        ports: Some(vec![ContainerPort {
            name: Some("redis".to_owned()),
            container_port: REDIS_PORT,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        readiness_probe: Some(ping_probe(REDIS_PORT, true)),
        liveness_probe: Some(liveness),
        volume_mounts: Some(vec![VolumeMount {
            name: DATA_VOLUME.to_owned(),
            mount_path: "/data".to_owned(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    // Without storage the data volume is an emptyDir; with it, a PVC per pod.
    let volumes = storage.is_none().then(|| {
        vec![Volume {
            name: DATA_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }]
    });
    let claims = storage.map(|s| {
        vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(DATA_VOLUME.to_owned()),
                // PVC templates are immutable: selector labels only, no version.
                labels: Some(selector_labels(names, Component::Redis)),
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
        }]
    });
    StatefulSet {
        metadata: object_meta(c, &names.redis, Component::Redis),
        spec: Some(StatefulSetSpec {
            replicas: Some(redis.replicas),
            service_name: Some(names.redis.clone()),
            selector: label_selector(names, Component::Redis),
            // Start all pods at once: roles are assigned afterwards.
            pod_management_policy: Some("Parallel".to_owned()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(names, Component::Redis)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes,
                    ..Default::default()
                }),
            },
            volume_claim_templates: claims,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID, valid};
    use super::*;
    use chorus_crds::MessagingCluster;

    fn sts(mc: &MessagingCluster) -> StatefulSet {
        build(&valid(mc))
    }

    fn script(s: &StatefulSet) -> String {
        let pod = s.spec.clone().expect("spec").template.spec.expect("pod");
        pod.containers[0].command.clone().expect("command")[2].clone()
    }

    #[test]
    fn statefulset_runs_redis_replicas_behind_the_headless_service() {
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
        let c = &spec.template.spec.expect("pod").containers[0];
        assert_eq!(c.image.as_deref(), Some("redis:7.0"));
        let pw = c.env.clone().expect("env")[0]
            .value_from
            .clone()
            .and_then(|v| v.secret_key_ref)
            .expect("secret");
        assert_eq!(
            (pw.name.as_str(), pw.key.as_str()),
            ("chat-redis-auth", "password")
        );
        assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
    }

    #[test]
    fn pods_start_with_the_password_and_no_fixed_role() {
        let script = script(&sts(&MessagingCluster::test()));
        assert!(
            script.contains("requirepass \"$REDIS_PASSWORD\""),
            "{script}"
        );
        assert!(
            script.contains("masterauth \"$REDIS_PASSWORD\""),
            "{script}"
        );
        // Roles are set by the topology step, by IP; a pinned `replicaof`
        // or a host name announce would fight it.
        assert!(
            !script.contains("replicaof") && !script.contains("announce"),
            "{script}"
        );
    }

    #[test]
    fn without_storage_data_is_ephemeral_and_aof_off() {
        let s = sts(&MessagingCluster::test());
        let spec = s.spec.clone().expect("spec");
        assert!(spec.volume_claim_templates.is_none());
        let volumes = spec.template.spec.expect("pod").volumes.expect("volumes");
        assert!(volumes[0].empty_dir.is_some());
        assert!(script(&s).contains("appendonly no"));
    }

    #[test]
    fn with_storage_each_pod_gets_a_claim_and_aof() {
        let s = sts(&MessagingCluster::test().with_storage("5Gi"));
        let spec = s.spec.clone().expect("spec");
        assert!(spec.template.spec.clone().expect("pod").volumes.is_none());
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
        assert!(script(&s).contains("appendonly yes"));
    }
}
