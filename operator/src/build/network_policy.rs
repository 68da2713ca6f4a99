//! `NetworkPolicy <name>-redis`: only this cluster's server, Redis and
//! Sentinel pods, and the operator (which manages the topology), reach the
//! managed Redis and Sentinel ports.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::networking::v1::{
        NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
        NetworkPolicySpec,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
        util::intstr::IntOrString,
    },
};

use super::meta::{Component, MANAGED_BY, Names, REDIS_PORT, SENTINEL_PORT, object_meta};
use crate::cluster::ValidCluster;

fn instance_pods(names: &Names, components: &[Component]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "chorus".to_owned()),
            (
                "app.kubernetes.io/instance".to_owned(),
                names.instance.clone(),
            ),
        ])),
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "app.kubernetes.io/component".to_owned(),
            operator: "In".to_owned(),
            values: Some(components.iter().map(|c| c.as_str().to_owned()).collect()),
        }]),
    }
}

pub fn build(c: &ValidCluster) -> NetworkPolicy {
    let names = &c.names;
    let port = |p: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: object_meta(c, &names.redis, Component::Redis),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(instance_pods(
                names,
                &[Component::Redis, Component::Sentinel],
            )),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![
                    NetworkPolicyPeer {
                        pod_selector: Some(instance_pods(
                            names,
                            &[Component::Server, Component::Redis, Component::Sentinel],
                        )),
                        ..Default::default()
                    },
                    NetworkPolicyPeer {
                        // The operator, in whichever namespace it runs.
                        namespace_selector: Some(LabelSelector::default()),
                        pod_selector: Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([(
                                "app.kubernetes.io/name".to_owned(),
                                MANAGED_BY.to_owned(),
                            )])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ]),
                ports: Some(vec![port(REDIS_PORT), port(SENTINEL_PORT)]),
            }]),
            egress: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID, valid};
    use super::*;
    use chorus_crds::MessagingCluster;

    #[test]
    fn only_cluster_pods_and_the_operator_reach_redis() {
        let mc = MessagingCluster::test();
        let np = build(&valid(&mc));
        assert_eq!(np.metadata.name.as_deref(), Some("chat-redis"));
        assert_eq!(np.metadata.owner_references.expect("owner")[0].uid, UID);
        let spec = np.spec.expect("spec");
        let protected = spec
            .pod_selector
            .expect("selector")
            .match_expressions
            .expect("exprs")[0]
            .clone();
        assert_eq!(
            protected.values,
            Some(vec!["redis".to_owned(), "sentinel".to_owned()])
        );
        let rule = &spec.ingress.expect("ingress")[0];
        let from = rule.from.clone().expect("from");
        let clients = from[0].pod_selector.clone().expect("pods");
        assert_eq!(
            clients.match_labels.expect("labels")["app.kubernetes.io/instance"],
            "chat"
        );
        assert!(
            clients.match_expressions.expect("exprs")[0]
                .values
                .clone()
                .expect("values")
                .contains(&"server".to_owned())
        );
        assert_eq!(
            from[1]
                .pod_selector
                .clone()
                .and_then(|p| p.match_labels)
                .expect("operator")["app.kubernetes.io/name"],
            "chorus-operator"
        );
        let ports: Vec<_> = rule
            .ports
            .clone()
            .expect("ports")
            .into_iter()
            .filter_map(|p| p.port)
            .collect();
        assert_eq!(ports, [IntOrString::Int(6379), IntOrString::Int(26379)]);
    }
}
