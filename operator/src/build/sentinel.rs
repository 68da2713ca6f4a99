//! `StatefulSet <name>-sentinel`: the Sentinel group for master `chorus`.
//!
//! Each sentinel runs `sentinel.sh start` from the group ConfigMap: with
//! the group's password (clients and peer sentinels must authenticate),
//! announcing its stable DNS name and resolving the members' names, and a
//! loop that gives a sentinel monitoring nothing what its peers monitor (or
//! the member serving as master). Sentinel rewrites its config file, so it
//! lives on an emptyDir that survives container restarts.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetSpec},
        core::v1::{
            Container, ContainerPort, EmptyDirVolumeSource, PodSpec, PodTemplateSpec,
            ResourceRequirements, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};

use super::meta::{Component, SENTINEL_PORT, label_selector, object_meta, pod_labels};
use super::pod_policy::{restricted_security, spread};
use super::redis_group::{self};
use super::redis_statefulset::{
    SCRIPTS_HASH_ANNOTATION, env, group_env, group_volumes, script_command, script_probe,
};
use crate::cluster::ValidCluster;

/// How long sentinels wait before they call a silent master down.
pub const DOWN_AFTER: std::time::Duration = std::time::Duration::from_secs(5);
/// Sentinel's failover timeout for the group.
pub const FAILOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sentinels that must agree before a failover: a majority.
pub fn quorum(sentinels: i32) -> i32 {
    sentinels / 2 + 1
}

/// Requests and limits of a sentinel: it keeps a few KiB of state.
fn resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), q("20m")),
            ("memory".to_owned(), q("32Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), q("64Mi"))])),
        ..Default::default()
    }
}

pub fn build(c: &ValidCluster) -> StatefulSet {
    let names = &c.names;
    let (mut volumes, mut mounts) = group_volumes(c);
    volumes.push(Volume {
        name: "data".to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: "data".to_owned(),
        mount_path: "/data".to_owned(),
        ..Default::default()
    });
    let (pod_security, container_security) = restricted_security();
    let (affinity, topology_spread) = spread(names, Component::Sentinel);
    let mut env_vars = group_env(c, &names.sentinel, SENTINEL_PORT);
    env_vars.extend([
        env("CHORUS_QUORUM", quorum(c.spec.redis.sentinels).to_string()),
        env("CHORUS_DOWN_AFTER_MS", DOWN_AFTER.as_millis().to_string()),
        env(
            "CHORUS_FAILOVER_TIMEOUT_MS",
            FAILOVER_TIMEOUT.as_millis().to_string(),
        ),
    ]);
    let container = Container {
        name: "sentinel".to_owned(),
        image: Some(c.spec.redis.image.clone()),
        command: Some(script_command("sentinel.sh", "start")),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("sentinel".to_owned()),
            container_port: SENTINEL_PORT,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        resources: Some(resources()),
        readiness_probe: Some(script_probe("sentinel.sh", "ready", 5, 2)),
        liveness_probe: Some(script_probe("sentinel.sh", "ready", 10, 6)),
        volume_mounts: Some(mounts),
        security_context: Some(container_security),
        ..Default::default()
    };
    let mut built = StatefulSet {
        metadata: object_meta(c, &names.sentinel, Component::Sentinel),
        spec: Some(StatefulSetSpec {
            replicas: Some(c.spec.redis.sentinels),
            service_name: Some(names.sentinel.clone()),
            selector: label_selector(names, Component::Sentinel),
            pod_management_policy: Some("Parallel".to_owned()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(names, Component::Sentinel)),
                    annotations: Some(BTreeMap::from([(
                        SCRIPTS_HASH_ANNOTATION.to_owned(),
                        redis_group::scripts_hash(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    security_context: Some(pod_security),
                    affinity: Some(affinity),
                    topology_spread_constraints: Some(topology_spread),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(spec) = built.spec.as_mut() {
        super::overrides::apply(&mut spec.template, &c.spec.pods.sentinel);
    }
    built
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
    fn sentinels_run_the_group_script_with_the_password_and_their_dns_names() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.sentinels = 5;
        let s = build(&valid(&mc));
        assert_eq!(s.metadata.name.as_deref(), Some("chat-sentinel"));
        assert_eq!(
            s.metadata.owner_references.clone().expect("owner")[0].uid,
            UID
        );
        let spec = s.spec.expect("spec");
        assert_eq!(spec.replicas, Some(5));
        assert_eq!(spec.service_name.as_deref(), Some("chat-sentinel"));
        assert_eq!(
            spec.selector.match_labels.expect("selector")["app.kubernetes.io/component"],
            "sentinel"
        );
        let c = &spec.template.spec.expect("pod").containers[0];
        assert_eq!(
            c.command.clone().expect("command"),
            ["sh", "/etc/chorus/sentinel.sh", "start"]
        );
        let env = c.env.clone().expect("env");
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
                .clone()
        };
        assert_eq!(
            value("CHORUS_SELF").value.as_deref(),
            Some("$(POD_NAME).chat-sentinel.default.svc:26379")
        );
        assert_eq!(value("CHORUS_QUORUM").value.as_deref(), Some("3"));
        assert!(
            value("REDIS_PASSWORD").value_from.is_some(),
            "sentinels require the group's password"
        );
        assert_eq!(c.ports.clone().expect("ports")[0].container_port, 26379);
    }

    #[test]
    fn sentinel_pods_pass_pod_security_restricted() {
        let s = build(&valid(&MessagingCluster::test()));
        let pod = s.spec.expect("spec").template.spec.expect("pod");
        assert_eq!(
            crate::build::pod_policy::restricted_violations(&pod),
            Vec::<String>::new()
        );
    }
}
