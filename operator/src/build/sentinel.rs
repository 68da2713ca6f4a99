//! `Deployment <name>-sentinel`: the Sentinel group monitoring master
//! `chorus`. Sentinels rewrite their config, so each writes a fresh one to
//! an emptyDir at start; a restarted sentinel rediscovers the group.

use chorus_crds::MessagingCluster;
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

use super::BuildError;
use super::meta::{
    Component, Names, REDIS_PORT, SENTINEL_MASTER_NAME, SENTINEL_PORT, label_selector, labels,
    object_meta,
};
use super::redis_statefulset::{password_env, ping_probe};

/// Sentinels that must agree before a failover: a majority.
pub fn quorum(sentinels: i32) -> i32 {
    sentinels / 2 + 1
}

fn start_script(mc: &MessagingCluster, names: &Names) -> String {
    format!(
        r#"set -eu
umask 077
cat > /data/sentinel.conf <<END_OF_CONFIG
port {sport}
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel monitor {master_name} {master} {port} {quorum}
sentinel auth-pass {master_name} "$REDIS_PASSWORD"
sentinel down-after-milliseconds {master_name} 5000
sentinel failover-timeout {master_name} 60000
sentinel parallel-syncs {master_name} 1
END_OF_CONFIG
exec redis-sentinel /data/sentinel.conf
"#,
        sport = SENTINEL_PORT,
        master_name = SENTINEL_MASTER_NAME,
        master = names.redis_pod_host(0),
        port = REDIS_PORT,
        quorum = quorum(mc.spec.redis.sentinels),
    )
}

pub fn build(mc: &MessagingCluster, names: &Names) -> Result<Deployment, BuildError> {
    // Sentinels themselves do not require the password.
    let probe = ping_probe(SENTINEL_PORT, false);
    let container = Container {
        name: "sentinel".to_owned(),
        image: Some(mc.spec.redis.image.clone()),
        command: Some(vec![
            "sh".to_owned(),
            "-c".to_owned(),
            start_script(mc, names),
        ]),
        env: Some(password_env(mc, names)),
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
    Ok(Deployment {
        metadata: object_meta(mc, names, &names.sentinel, Component::Sentinel)?,
        spec: Some(DeploymentSpec {
            replicas: Some(mc.spec.redis.sentinels),
            selector: label_selector(names, Component::Sentinel),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(names, Component::Sentinel)),
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
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID};
    use super::*;

    #[test]
    fn quorum_is_a_majority() {
        assert_eq!([1, 3, 5].map(quorum), [1, 2, 3]);
    }

    #[test]
    fn sentinels_monitor_pod_zero_as_master_chorus() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.sentinels = 5;
        let d = build(&mc, &Names::of(&mc).expect("names")).expect("builds");
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
        assert!(
            script.contains("sentinel monitor chorus chat-redis-0.chat-redis.default.svc 6379 3"),
            "{script}"
        );
        assert!(
            script.contains("sentinel auth-pass chorus \"$REDIS_PASSWORD\""),
            "{script}"
        );
        assert_eq!(c.ports.clone().expect("ports")[0].container_port, 26379);
    }
}
