//! `Deployment <name>-sentinel`: the Sentinel group for master `chorus`.
//!
//! Sentinels start monitoring nothing, with `resolve-hostnames no`: the
//! operator's Redis topology step tells them (`SENTINEL MONITOR chorus <ip>
//! 6379 <quorum>`, `auth-pass`, timings) which pod is master, by pod IP, and
//! re-points or resets them when they follow a stale master. Sentinel
//! rewrites its config file, so it lives on an emptyDir that survives
//! container restarts; it is only written when missing.

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Container, ContainerPort, EmptyDirVolumeSource, PodSpec, PodTemplateSpec, Volume,
            VolumeMount,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::meta::{Component, SENTINEL_PORT, label_selector, object_meta, pod_labels};
use super::redis_statefulset::ping_probe;
use crate::cluster::ValidCluster;

/// Sentinels that must agree before a failover: a majority. The topology
/// step passes it to `SENTINEL MONITOR`.
pub fn quorum(sentinels: i32) -> i32 {
    sentinels / 2 + 1
}

fn start_script() -> String {
    format!(
        r#"set -eu
umask 077
if [ ! -f /data/sentinel.conf ]; then
cat > /data/sentinel.conf <<END_OF_CONFIG
port {SENTINEL_PORT}
sentinel resolve-hostnames no
END_OF_CONFIG
fi
exec redis-sentinel /data/sentinel.conf
"#
    )
}

pub fn build(c: &ValidCluster) -> Deployment {
    let names = &c.names;
    // Sentinels themselves do not require a password.
    let probe = ping_probe(SENTINEL_PORT, false);
    let container = Container {
        name: "sentinel".to_owned(),
        image: Some(c.spec.redis.image.clone()),
        command: Some(vec!["sh".to_owned(), "-c".to_owned(), start_script()]),
        ports: Some(vec![ContainerPort {
            name: Some("sentinel".to_owned()),
            container_port: SENTINEL_PORT,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        readiness_probe: Some(probe.clone()),
        liveness_probe: Some(probe),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".to_owned(),
            mount_path: "/data".to_owned(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Deployment {
        metadata: object_meta(c, &names.sentinel, Component::Sentinel),
        spec: Some(DeploymentSpec {
            replicas: Some(c.spec.redis.sentinels),
            selector: label_selector(names, Component::Sentinel),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(names, Component::Sentinel)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "data".to_owned(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
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

    #[test]
    fn quorum_is_a_majority() {
        assert_eq!([1, 3, 5].map(quorum), [1, 2, 3]);
    }

    #[test]
    fn sentinels_start_unconfigured_and_address_by_ip() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.sentinels = 5;
        let d = build(&valid(&mc));
        assert_eq!(d.metadata.name.as_deref(), Some("chat-sentinel"));
        assert_eq!(
            d.metadata.owner_references.clone().expect("owner")[0].uid,
            UID
        );
        let spec = d.spec.expect("spec");
        assert_eq!(spec.replicas, Some(5));
        assert_eq!(
            spec.selector.match_labels.expect("selector")["app.kubernetes.io/component"],
            "sentinel"
        );
        let c = &spec.template.spec.expect("pod").containers[0];
        let script = &c.command.clone().expect("command")[2];
        assert!(script.contains("sentinel resolve-hostnames no"), "{script}");
        assert!(
            !script.contains("sentinel monitor"),
            "the topology step monitors: {script}"
        );
        assert!(
            script.contains("if [ ! -f /data/sentinel.conf ]"),
            "{script}"
        );
        assert_eq!(c.ports.clone().expect("ports")[0].container_port, 26379);
        assert!(c.env.is_none(), "sentinel pods need no password");
    }
}
