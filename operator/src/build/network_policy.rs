//! `NetworkPolicy <name>-redis` (on by default): only this cluster's
//! server, Redis and Sentinel pods, and the operator's pods in the
//! operator's namespace (it manages the topology), reach the managed Redis,
//! waiting-room and Sentinel ports. Whoever else could reach a sentinel
//! could point it at a host of their own and collect the Redis password
//! from every server.

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

use super::meta::{
    CLUSTER_BUS_PORT, Component, MANAGED_BY, Names, REDIS_PORT, SENTINEL_PORT, object_meta,
};
use super::redis_group::WAITING_PORT;
use crate::cluster::ValidCluster;

/// The label the API server sets on every Namespace to its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

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

fn tcp(p: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

/// The operator's pods, in the operator's namespace.
fn operator_pods(c: &ValidCluster) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_owned(),
                c.operator_namespace.clone(),
            )])),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pods_of(names: &Names, components: &[Component]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(instance_pods(names, components)),
        ..Default::default()
    }
}

/// `NetworkPolicy <name>-redis` in `redis.mode: cluster`: the server pods,
/// the cluster's own pods (replication, `MIGRATE`) and the operator reach
/// Redis's port; only the cluster's pods reach the cluster bus.
pub fn redis_cluster(c: &ValidCluster) -> NetworkPolicy {
    let names = &c.names;
    NetworkPolicy {
        metadata: object_meta(c, &names.redis, Component::Redis),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(instance_pods(names, &[Component::RedisCluster])),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![
                        pods_of(names, &[Component::Server, Component::RedisCluster]),
                        operator_pods(c),
                    ]),
                    ports: Some(vec![tcp(REDIS_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![pods_of(names, &[Component::RedisCluster])]),
                    ports: Some(vec![tcp(CLUSTER_BUS_PORT)]),
                },
            ]),
            egress: None,
        }),
    }
}

pub fn build(c: &ValidCluster) -> NetworkPolicy {
    let names = &c.names;
    let port = tcp;
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
                    pods_of(
                        names,
                        &[Component::Server, Component::Redis, Component::Sentinel],
                    ),
                    operator_pods(c),
                ]),
                ports: Some(vec![
                    port(REDIS_PORT),
                    port(WAITING_PORT),
                    port(SENTINEL_PORT),
                ]),
            }]),
            egress: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{OPERATOR_NAMESPACE, TestCluster, UID, valid};
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
        assert_eq!(from.len(), 2, "nobody else: {from:?}");
        assert_eq!(
            from[1]
                .pod_selector
                .clone()
                .and_then(|p| p.match_labels)
                .expect("operator")["app.kubernetes.io/name"],
            "chorus-operator"
        );
        // Only the operator's namespace, not every namespace.
        assert_eq!(
            from[1]
                .namespace_selector
                .clone()
                .and_then(|n| n.match_labels)
                .expect("operator namespace"),
            BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                OPERATOR_NAMESPACE.to_owned()
            )])
        );
        assert!(
            from[0].namespace_selector.is_none(),
            "fleet pods: own namespace only"
        );
        let ports: Vec<_> = rule
            .ports
            .clone()
            .expect("ports")
            .into_iter()
            .filter_map(|p| p.port)
            .collect();
        assert_eq!(
            ports,
            [
                IntOrString::Int(6379),
                IntOrString::Int(6380),
                IntOrString::Int(26379)
            ]
        );
    }

    #[test]
    fn in_cluster_mode_only_cluster_pods_reach_the_bus_and_servers_reach_redis() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.mode = chorus_crds::RedisMode::Cluster;
        let np = redis_cluster(&valid(&mc));
        assert_eq!(np.metadata.name.as_deref(), Some("chat-redis"));
        let spec = np.spec.expect("spec");
        let protected = spec
            .pod_selector
            .and_then(|p| p.match_expressions)
            .expect("exprs")[0]
            .values
            .clone();
        assert_eq!(protected, Some(vec!["redis-cluster".to_owned()]));
        let rules = spec.ingress.expect("ingress");
        let summary: Vec<(Vec<String>, Vec<IntOrString>)> = rules
            .iter()
            .map(|r| {
                let from = r
                    .from
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|p| p.pod_selector)
                    .flat_map(|s| {
                        s.match_expressions
                            .unwrap_or_default()
                            .into_iter()
                            .flat_map(|e| e.values.unwrap_or_default())
                            .chain(s.match_labels.unwrap_or_default().into_values())
                    })
                    .collect();
                let ports = r
                    .ports
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|p| p.port)
                    .collect();
                (from, ports)
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    vec![
                        "server".to_owned(),
                        "redis-cluster".to_owned(),
                        "chat".to_owned(),
                        "chorus".to_owned(),
                        "chorus-operator".to_owned()
                    ],
                    vec![IntOrString::Int(6379)]
                ),
                (
                    vec![
                        "redis-cluster".to_owned(),
                        "chat".to_owned(),
                        "chorus".to_owned()
                    ],
                    vec![IntOrString::Int(16379)]
                ),
            ]
        );
    }
}
