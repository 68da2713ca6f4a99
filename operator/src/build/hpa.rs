//! `HorizontalPodAutoscaler <name>`: scales the MessagingCluster itself
//! through its scale subresource; the operator then scales the Deployment.
//! (Targeting the Deployment would fight the operator over its replicas.)

use chorus_crds::{API_VERSION, AutoscalingSpec, KIND};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};

use super::meta::{Component, object_meta};
use crate::cluster::ValidCluster;

pub fn build(c: &ValidCluster, spec: &AutoscalingSpec) -> HorizontalPodAutoscaler {
    let names = &c.names;
    HorizontalPodAutoscaler {
        metadata: object_meta(c, &names.service, Component::Server),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(API_VERSION.to_owned()),
                kind: KIND.to_owned(),
                name: names.instance.clone(),
            },
            min_replicas: Some(spec.min_replicas),
            max_replicas: spec.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(spec.target_cpu_utilization_percentage),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
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
    fn hpa_targets_the_messaging_cluster_scale_subresource() {
        let mc = MessagingCluster::test().with_autoscaling(3, 12);
        let spec = mc.spec.autoscaling.clone().expect("autoscaling");
        let hpa = build(&valid(&mc), &spec);
        assert_eq!(hpa.metadata.name.as_deref(), Some("chat"));
        assert_eq!(hpa.metadata.owner_references.expect("owner")[0].uid, UID);
        let spec = hpa.spec.expect("spec");
        assert_eq!(
            spec.scale_target_ref.api_version.as_deref(),
            Some("chorus.dev/v1alpha1")
        );
        assert_eq!(spec.scale_target_ref.kind, "MessagingCluster");
        assert_eq!(spec.scale_target_ref.name, "chat");
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(3), 12));
        let target = spec.metrics.expect("metrics")[0]
            .resource
            .clone()
            .expect("resource")
            .target;
        assert_eq!(target.average_utilization, Some(70));
    }
}
