//! What every pod of the fleet carries, whatever it runs: the Pod Security
//! "restricted" level ([`restricted_security`], with [`scratch`] volumes
//! for what must stay writable under a read-only root file system) and
//! spreading over nodes and zones ([`spread`]). The server, Redis and
//! Sentinel builders all call these, so the three stay alike.

use k8s_openapi::{
    api::core::v1::{
        Affinity, Capabilities, EmptyDirVolumeSource, PodAffinityTerm, PodAntiAffinity,
        PodSecurityContext, SeccompProfile, SecurityContext, TopologySpreadConstraint, Volume,
        VolumeMount, WeightedPodAffinityTerm,
    },
    apimachinery::pkg::api::resource::Quantity,
};

use super::meta::{Component, Names, label_selector};

/// The non-root user and group every container of the fleet runs as (the
/// images' `nonroot` user; Redis data and config files belong to it).
pub const RUN_AS: i64 = 65532;
/// Node label the anti-affinity spreads over.
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";
/// Node label the topology spread constraint spreads over.
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";

/// Pod and container security contexts that pass the Pod Security
/// "restricted" level: non-root (uid and gid [`RUN_AS`]), no privilege
/// escalation, every capability dropped, seccomp `RuntimeDefault`, and a
/// read-only root file system: mount a [`scratch`] volume wherever the
/// program writes. `fsGroup` makes mounted Secrets (mode 0440) and
/// PersistentVolumes readable and writable by that group; it is applied
/// only when the volume's root does not already match, so a large Redis
/// volume is not walked at every start.
pub fn restricted_security() -> (PodSecurityContext, SecurityContext) {
    let pod = PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        fs_group_change_policy: Some("OnRootMismatch".to_owned()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..Default::default()
    };
    let container = SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        ..Default::default()
    };
    (pod, container)
}

/// A writable `emptyDir` of at most `size_limit` (e.g. `16Mi`), named
/// `name` and mounted at `mount_path`: the place for what a program writes
/// under [`restricted_security`]'s read-only root file system.
pub fn scratch(name: &str, mount_path: &str, size_limit: &str) -> (Volume, VolumeMount) {
    (
        Volume {
            name: name.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: None,
                size_limit: Some(Quantity(size_limit.to_owned())),
            }),
            ..Default::default()
        },
        VolumeMount {
            name: name.to_owned(),
            mount_path: mount_path.to_owned(),
            ..Default::default()
        },
    )
}

/// Spreads `component`'s pods of one cluster: preferably one per node
/// (hostname anti-affinity), and evenly over zones (`maxSkew: 1`). Both
/// are preferences (`ScheduleAnyway`): a one-node or one-zone cluster
/// still runs every pod.
pub fn spread(names: &Names, component: Component) -> (Affinity, Vec<TopologySpreadConstraint>) {
    let selector = label_selector(names, component);
    let affinity = Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(selector.clone()),
                        topology_key: HOSTNAME_KEY.to_owned(),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let zones = TopologySpreadConstraint {
        label_selector: Some(selector),
        max_skew: 1,
        topology_key: ZONE_KEY.to_owned(),
        when_unsatisfiable: "ScheduleAnyway".to_owned(),
        ..Default::default()
    };
    (affinity, vec![zones])
}

/// What keeps `pod` from the Pod Security "restricted" level (Kubernetes
/// 1.28's checks, baseline included), one line per problem; empty when it
/// passes. For builder tests: every pod the operator builds must pass.
#[cfg(test)]
pub fn restricted_violations(pod: &k8s_openapi::api::core::v1::PodSpec) -> Vec<String> {
    let mut problems = Vec::new();
    let psc = pod.security_context.clone().unwrap_or_default();
    for (set, what) in [
        (pod.host_network, "hostNetwork"),
        (pod.host_pid, "hostPID"),
        (pod.host_ipc, "hostIPC"),
    ] {
        if set == Some(true) {
            problems.push(format!("{what} is set"));
        }
    }
    const VOLUME_TYPES: &str = "configMap, csi, downwardAPI, emptyDir, ephemeral, persistentVolumeClaim, projected, secret";
    for v in pod.volumes.iter().flatten() {
        let allowed = [
            v.config_map.is_some(),
            v.csi.is_some(),
            v.downward_api.is_some(),
            v.empty_dir.is_some(),
            v.ephemeral.is_some(),
            v.persistent_volume_claim.is_some(),
            v.projected.is_some(),
            v.secret.is_some(),
        ];
        if !allowed.contains(&true) {
            problems.push(format!("volume {}: only {VOLUME_TYPES}", v.name));
        }
    }
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|s| s.type_.as_str());
    let containers = pod.init_containers.iter().flatten().chain(&pod.containers);
    for c in containers {
        let name = &c.name;
        let sc = c.security_context.clone().unwrap_or_default();
        if sc.privileged == Some(true) {
            problems.push(format!("{name}: privileged"));
        }
        if sc.allow_privilege_escalation != Some(false) {
            problems.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        if sc.run_as_non_root.or(psc.run_as_non_root) != Some(true) {
            problems.push(format!("{name}: runAsNonRoot is not true"));
        }
        if sc.run_as_user.or(psc.run_as_user) == Some(0) {
            problems.push(format!("{name}: runAsUser is 0"));
        }
        let seccomp = sc.seccomp_profile.as_ref().map(|s| s.type_.as_str());
        if !matches!(
            seccomp.or(pod_seccomp),
            Some("RuntimeDefault" | "Localhost")
        ) {
            problems.push(format!(
                "{name}: seccompProfile is not RuntimeDefault or Localhost"
            ));
        }
        let caps = sc.capabilities.unwrap_or_default();
        if !caps.drop.iter().flatten().any(|d| d == "ALL") {
            problems.push(format!("{name}: capabilities do not drop ALL"));
        }
        if caps.add.iter().flatten().any(|a| a != "NET_BIND_SERVICE") {
            problems.push(format!(
                "{name}: adds a capability besides NET_BIND_SERVICE"
            ));
        }
        if c.ports.iter().flatten().any(|p| p.host_port.is_some()) {
            problems.push(format!("{name}: hostPort"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::TestCluster;
    use super::*;
    use chorus_crds::MessagingCluster;
    use k8s_openapi::api::core::v1::{Container, HostPathVolumeSource, PodSpec};

    fn names() -> Names {
        Names::of(&MessagingCluster::test()).expect("names")
    }

    fn pod_with(security: (PodSecurityContext, SecurityContext)) -> PodSpec {
        let (pod, container) = security;
        let (volume, mount) = scratch("tmp", "/tmp", "16Mi");
        PodSpec {
            security_context: Some(pod),
            containers: vec![Container {
                name: "redis".to_owned(),
                security_context: Some(container),
                volume_mounts: Some(vec![mount]),
                ..Default::default()
            }],
            volumes: Some(vec![volume]),
            ..Default::default()
        }
    }

    #[test]
    fn restricted_security_passes_the_restricted_level() {
        let pod = pod_with(restricted_security());
        assert_eq!(restricted_violations(&pod), Vec::<String>::new());
        let (psc, sc) = restricted_security();
        assert_eq!(
            (psc.run_as_user, psc.run_as_group, psc.fs_group),
            (Some(65532), Some(65532), Some(65532))
        );
        assert_eq!(sc.read_only_root_filesystem, Some(true));
    }

    #[test]
    fn the_check_catches_what_the_api_server_would_refuse() {
        let mut pod = pod_with((PodSecurityContext::default(), SecurityContext::default()));
        pod.volumes.get_or_insert_default().push(Volume {
            name: "host".to_owned(),
            host_path: Some(HostPathVolumeSource {
                path: "/".to_owned(),
                type_: None,
            }),
            ..Default::default()
        });
        let problems = restricted_violations(&pod);
        for expected in [
            "volume host",
            "allowPrivilegeEscalation",
            "runAsNonRoot",
            "seccompProfile",
            "drop ALL",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected} not in {problems:?}"
            );
        }
    }

    #[test]
    fn spread_prefers_other_nodes_and_zones_for_the_same_component() {
        let (affinity, constraints) = spread(&names(), Component::Redis);
        let terms = affinity
            .pod_anti_affinity
            .expect("anti-affinity")
            .preferred_during_scheduling_ignored_during_execution
            .expect("preferred, so a one-node cluster runs every pod");
        assert_eq!(terms.len(), 1);
        let term = &terms[0].pod_affinity_term;
        assert_eq!(term.topology_key, "kubernetes.io/hostname");
        let selector = term.label_selector.clone().expect("selector");
        assert_eq!(selector, label_selector(&names(), Component::Redis));
        assert!(
            !selector
                .match_labels
                .expect("labels")
                .contains_key("app.kubernetes.io/version"),
            "an operator upgrade must not change who counts as a peer"
        );
        assert!(affinity.pod_affinity.is_none() && affinity.node_affinity.is_none());
        assert_eq!(constraints.len(), 1);
        let zones = &constraints[0];
        assert_eq!(
            (
                zones.topology_key.as_str(),
                zones.max_skew,
                zones.when_unsatisfiable.as_str()
            ),
            ("topology.kubernetes.io/zone", 1, "ScheduleAnyway")
        );
        assert_eq!(
            zones.label_selector,
            Some(label_selector(&names(), Component::Redis))
        );
    }
}
