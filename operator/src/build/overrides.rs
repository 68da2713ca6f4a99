//! `spec.pods`: a platform team's settings merged into a pod template the
//! builders made. Extra labels and annotations never replace the
//! operator's own (selectors, the config and scripts hashes); every other
//! field that is set replaces the operator's choice.

use chorus_crds::PodOverrides;
use k8s_openapi::api::core::v1::PodTemplateSpec;

pub fn apply(template: &mut PodTemplateSpec, o: &PodOverrides) {
    if o.is_empty() {
        return;
    }
    let meta = template.metadata.get_or_insert_with(Default::default);
    for (map, extra) in [
        (&mut meta.labels, &o.labels),
        (&mut meta.annotations, &o.annotations),
    ] {
        if extra.is_empty() {
            continue;
        }
        let map = map.get_or_insert_with(Default::default);
        for (k, v) in extra {
            map.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let pod = template.spec.get_or_insert_with(Default::default);
    if let Some(v) = &o.node_selector {
        pod.node_selector = Some(v.clone());
    }
    if let Some(v) = &o.tolerations {
        pod.tolerations = Some(v.clone());
    }
    if let Some(v) = &o.affinity {
        pod.affinity = Some(v.clone());
    }
    if let Some(v) = &o.topology_spread_constraints {
        pod.topology_spread_constraints = Some(v.clone());
    }
    if let Some(v) = &o.priority_class_name {
        pod.priority_class_name = Some(v.clone());
    }
    if let Some(v) = &o.image_pull_secrets {
        pod.image_pull_secrets = Some(v.clone());
    }
    if let Some(v) = &o.security_context {
        pod.security_context = Some(v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{TestCluster, valid};
    use chorus_crds::MessagingCluster;
    use k8s_openapi::api::core::v1::Toleration;

    #[test]
    fn overrides_add_labels_and_replace_scheduling_but_never_the_operators_own() {
        let mut mc = MessagingCluster::test();
        let o = PodOverrides {
            labels: [
                ("team".to_owned(), "platform".to_owned()),
                (
                    "app.kubernetes.io/component".to_owned(),
                    "hijack".to_owned(),
                ),
            ]
            .into(),
            annotations: [
                ("chorus.dev/config-hash".to_owned(), "x".to_owned()),
                ("chorus.dev/scripts-hash".to_owned(), "x".to_owned()),
                ("team.example.com/owner".to_owned(), "platform".to_owned()),
            ]
            .into(),
            tolerations: Some(vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            priority_class_name: Some("high".into()),
            ..Default::default()
        };
        mc.spec.pods.server = o.clone();
        mc.spec.pods.redis = o.clone();
        mc.spec.pods.sentinel = o;
        let c = valid(&mc);
        let templates = [
            crate::build::server_deployment::build(&c, "hash")
                .spec
                .expect("spec")
                .template,
            crate::build::redis_statefulset::build(&c)
                .spec
                .expect("spec")
                .template,
            crate::build::sentinel::build(&c)
                .spec
                .expect("spec")
                .template,
        ];
        for t in templates {
            let meta = t.metadata.expect("meta");
            let labels = meta.labels.expect("labels");
            assert_eq!(labels["team"], "platform");
            assert_ne!(labels["app.kubernetes.io/component"], "hijack");
            let annotations = meta.annotations.unwrap_or_default();
            assert_eq!(annotations["team.example.com/owner"], "platform");
            // Whichever hash the operator sets on this template stays its own.
            let own = ["chorus.dev/config-hash", "chorus.dev/scripts-hash"]
                .iter()
                .filter_map(|k| annotations.get(*k))
                .filter(|v| *v != "x")
                .count();
            assert_eq!(own, 1, "{annotations:?}");
            let pod = t.spec.expect("pod");
            assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
            assert_eq!(pod.tolerations.expect("tolerations").len(), 1);
            assert!(
                pod.affinity.is_some(),
                "default spreading kept when not overridden"
            );
        }
    }
}
