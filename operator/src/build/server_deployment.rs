//! `Deployment <name>-server`: the WebSocket server pods.

use std::collections::BTreeMap;

use chorus_crds::SecretKeyRef;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{
            ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar, EnvVarSource,
            ExecAction, HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector,
            PodSpec, PodTemplateSpec, Probe, SecretVolumeSource, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::config_map::{
    API_KEY_FILE, JWT_PUBLIC_KEY_FILE, JWT_SECRET_FILE, OUTBOX_DSN_FILE, REDIS_PASSWORD_FILE,
    outbox_dsn_ref, redis_password_ref,
};
use super::meta::{Component, SERVER_PORT, label_selector, object_meta, pod_labels};
use super::pod_policy::{restricted_security, scratch, spread};
use crate::cluster::ValidCluster;

/// Pod template annotation carrying the configuration hash.
pub const CONFIG_HASH_ANNOTATION: &str = "chorus.dev/config-hash";
/// Seconds the `preStop` hook waits so that endpoints drop the pod before
/// it gets SIGTERM and starts draining.
pub const PRE_STOP_SECONDS: i32 = 5;
/// Slack after the drain before the kubelet kills the pod.
pub const GRACE_SLACK_SECONDS: i32 = 10;

pub fn build(c: &ValidCluster, config_hash: &str) -> Deployment {
    let names = &c.names;
    let spec = &c.spec;
    // The root file system is read-only; a small scratch /tmp in case
    // anything (a library, a panic handler) wants one.
    let (tmp, tmp_mount) = scratch("tmp", "/tmp", "16Mi");
    let mut volumes = vec![tmp];
    let mut mounts = vec![tmp_mount];
    let secret_files = [
        (
            "redis-password",
            redis_password_ref(spec, names),
            REDIS_PASSWORD_FILE,
        ),
        (
            "jwt-secret",
            spec.auth.jwt_secret_ref.clone(),
            JWT_SECRET_FILE,
        ),
        (
            "api-key",
            spec.auth.api_key_secret_ref.clone(),
            API_KEY_FILE,
        ),
        (
            "jwt-public-key",
            spec.auth.jwt_public_key_secret_ref.clone(),
            JWT_PUBLIC_KEY_FILE,
        ),
        ("outbox-dsn", outbox_dsn_ref(spec), OUTBOX_DSN_FILE),
    ];
    for (volume, secret, file) in secret_files {
        if let Some(secret) = secret {
            let (volume, mount) = secret_file(volume, &secret, file);
            volumes.push(volume);
            mounts.push(mount);
        }
    }
    let (pod_security, container_security) = restricted_security();
    let (affinity, topology_spread) = spread(names, Component::Server);
    let http_get = |path: &str| HTTPGetAction {
        path: Some(path.to_owned()),
        port: IntOrString::String("http".to_owned()),
        ..Default::default()
    };
    let container = Container {
        name: "server".to_owned(),
        image: Some(spec.image()),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: names.server.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }]),
        env: Some(vec![EnvVar {
            name: "CHORUS_NODE_ID".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: SERVER_PORT,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(http_get("/readyz")),
            period_seconds: Some(5),
            failure_threshold: Some(2),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(http_get("/healthz")),
            initial_delay_seconds: Some(10),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["sleep".to_owned(), PRE_STOP_SECONDS.to_string()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: spec.resources.clone(),
        security_context: Some(container_security),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let mut built = Deployment {
        metadata: object_meta(c, &names.server, Component::Server),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: label_selector(names, Component::Server),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".to_owned())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(names, Component::Server)),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        config_hash.to_owned(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: Some(i64::from(
                        PRE_STOP_SECONDS + spec.drain_seconds + GRACE_SLACK_SECONDS,
                    )),
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
        super::overrides::apply(&mut spec.template, &c.spec.pods.server);
    }
    built
}

/// A volume with one key of a Secret, mounted read-only as `file`.
fn secret_file(volume: &str, secret: &SecretKeyRef, file: &str) -> (Volume, VolumeMount) {
    let (dir, file_name) = file.rsplit_once('/').unwrap_or(("/", file));
    (
        Volume {
            name: volume.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                items: Some(vec![KeyToPath {
                    key: secret.key.clone(),
                    path: file_name.to_owned(),
                    mode: None,
                }]),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
        VolumeMount {
            name: volume.to_owned(),
            mount_path: dir.to_owned(),
            read_only: Some(true),
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID, valid};
    use super::*;
    use chorus_crds::MessagingCluster;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn deployment(mc: &MessagingCluster) -> Deployment {
        build(&valid(mc), "abc")
    }

    fn pod(d: &Deployment) -> PodSpec {
        d.spec
            .clone()
            .expect("spec")
            .template
            .spec
            .expect("pod spec")
    }

    #[test]
    fn deployment_runs_the_requested_replicas_with_owner_and_labels() {
        let d = deployment(&MessagingCluster::test().with_replicas(5));
        assert_eq!(d.metadata.name.as_deref(), Some("chat-server"));
        assert_eq!(
            d.metadata.owner_references.clone().expect("owner")[0].uid,
            UID
        );
        let spec = d.spec.clone().expect("spec");
        assert_eq!(spec.replicas, Some(5));
        let selector = spec.selector.match_labels.expect("selector");
        assert!(!selector.contains_key("app.kubernetes.io/version"));
        let template_labels = spec
            .template
            .metadata
            .expect("meta")
            .labels
            .expect("labels");
        for (k, v) in &selector {
            assert_eq!(
                template_labels.get(k),
                Some(v),
                "template matches selector on {k}"
            );
        }
    }

    #[test]
    fn server_container_has_probes_env_and_node_id() {
        let c = pod(&deployment(&MessagingCluster::test())).containers[0].clone();
        assert_eq!(
            c.image,
            Some(format!("chorus-server:{}", env!("CARGO_PKG_VERSION")))
        );
        let probe_path = |p: Option<Probe>| p.and_then(|p| p.http_get).and_then(|h| h.path);
        assert_eq!(probe_path(c.readiness_probe), Some("/readyz".to_owned()));
        assert_eq!(probe_path(c.liveness_probe), Some("/healthz".to_owned()));
        assert_eq!(
            c.env_from.expect("envFrom")[0]
                .config_map_ref
                .clone()
                .expect("cm")
                .name,
            "chat-server"
        );
        let node_id = &c.env.expect("env")[0];
        assert_eq!(node_id.name, "CHORUS_NODE_ID");
        assert_eq!(
            node_id
                .value_from
                .clone()
                .and_then(|v| v.field_ref)
                .map(|f| f.field_path),
            Some("metadata.name".to_owned())
        );
        assert_eq!(c.ports.expect("ports")[0].container_port, 8080);
    }

    #[test]
    fn grace_period_outlasts_pre_stop_and_drain() {
        let mut mc = MessagingCluster::test();
        mc.spec.drain_seconds = 60;
        let pod = pod(&deployment(&mc));
        let grace = pod.termination_grace_period_seconds.expect("grace");
        assert!(grace > 60 + i64::from(PRE_STOP_SECONDS), "grace {grace}");
        let pre_stop = pod.containers[0]
            .lifecycle
            .clone()
            .and_then(|l| l.pre_stop)
            .and_then(|h| h.exec);
        assert_eq!(
            pre_stop.and_then(|e| e.command),
            Some(vec!["sleep".to_owned(), "5".to_owned()])
        );
    }

    #[test]
    fn config_hash_is_on_the_pod_template() {
        let d = deployment(&MessagingCluster::test());
        let annotations = d
            .spec
            .expect("spec")
            .template
            .metadata
            .expect("meta")
            .annotations
            .expect("annotations");
        assert_eq!(annotations[CONFIG_HASH_ANNOTATION], "abc");
    }

    #[test]
    fn resources_and_password_file_are_passed_through() {
        let mut mc = MessagingCluster::test();
        mc.spec.resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([(
                "cpu".to_owned(),
                Quantity("250m".to_owned()),
            )])),
            ..Default::default()
        });
        let pod = pod(&deployment(&mc));
        assert_eq!(pod.containers[0].resources, mc.spec.resources);
        let volume = &pod.volumes.expect("volumes")[1];
        let secret = volume.secret.clone().expect("secret");
        assert_eq!(secret.secret_name.as_deref(), Some("chat-redis-auth"));
        assert_eq!(secret.items.expect("items")[0].path, "password");
        let mount = &pod.containers[0].volume_mounts.clone().expect("mounts")[1];
        assert_eq!(mount.mount_path, "/var/run/chorus/redis");
    }

    #[test]
    fn the_outbox_dsn_secret_is_mounted_where_the_config_map_points() {
        let mut mc = MessagingCluster::test().with_external_redis("redis://r:6379");
        mc.spec.outbox = Some(chorus_crds::OutboxSpec {
            dsn_secret_ref: SecretKeyRef {
                name: "orders-db".into(),
                key: "dsn".into(),
            },
            table: "chorus_outbox".into(),
            init: false,
        });
        let pod = pod(&deployment(&mc));
        let volume = &pod.volumes.expect("volumes")[1];
        assert_eq!(volume.name, "outbox-dsn");
        let secret = volume.secret.clone().expect("secret");
        assert_eq!(secret.secret_name.as_deref(), Some("orders-db"));
        let item = &secret.items.expect("items")[0];
        assert_eq!(item.key, "dsn");
        let mount = &pod.containers[0].volume_mounts.clone().expect("mounts")[1];
        assert_eq!(
            format!("{}/{}", mount.mount_path, item.path),
            OUTBOX_DSN_FILE
        );
    }

    #[test]
    fn external_redis_without_password_mounts_only_scratch_tmp() {
        let pod = pod(&deployment(
            &MessagingCluster::test().with_external_redis("redis://r:6379"),
        ));
        let volumes: Vec<_> = pod.volumes.iter().flatten().map(|v| &v.name).collect();
        assert_eq!(volumes, ["tmp"]);
        let mounts: Vec<_> = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, ["/tmp"]);
    }

    #[test]
    fn server_pods_pass_pod_security_restricted_with_a_read_only_root() {
        for mc in [
            MessagingCluster::test(),
            MessagingCluster::test()
                .with_password_secret("mine", "pw")
                .with_autoscaling(2, 5),
        ] {
            let pod = pod(&deployment(&mc));
            assert_eq!(
                super::super::pod_policy::restricted_violations(&pod),
                Vec::<String>::new()
            );
            let sc = pod.containers[0].security_context.clone().expect("sc");
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            let psc = pod.security_context.expect("pod sc");
            assert_eq!((psc.run_as_user, psc.fs_group), (Some(65532), Some(65532)));
        }
    }

    #[test]
    fn server_pods_spread_over_nodes_and_zones() {
        let pod = pod(&deployment(&MessagingCluster::test()));
        let (affinity, spread) = super::super::pod_policy::spread(
            &valid(&MessagingCluster::test()).names,
            Component::Server,
        );
        assert_eq!(pod.affinity, Some(affinity));
        assert_eq!(pod.topology_spread_constraints, Some(spread));
        let selector = pod.topology_spread_constraints.expect("spread")[0]
            .label_selector
            .clone()
            .and_then(|s| s.match_labels)
            .expect("labels");
        assert_eq!(selector["app.kubernetes.io/component"], "server");
    }
}
