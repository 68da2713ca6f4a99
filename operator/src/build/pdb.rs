//! PodDisruptionBudgets: `<name>-server` (from the spec), `<name>-redis`
//! and `<name>-sentinel` (one pod at a time, so a drain never takes the
//! master and a replica, or a sentinel majority, together).

use k8s_openapi::{
    api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::meta::{Component, label_selector, object_meta};
use crate::cluster::ValidCluster;

fn pdb(
    c: &ValidCluster,
    name: &str,
    component: Component,
    max_unavailable: i32,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: object_meta(c, name, component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(max_unavailable)),
            selector: Some(label_selector(&c.names, component)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn server(c: &ValidCluster) -> PodDisruptionBudget {
    let _names = &c.names;
    pdb(
        c,
        &c.names.server,
        Component::Server,
        c.spec.pod_disruption_budget.max_unavailable,
    )
}

pub fn redis(c: &ValidCluster) -> PodDisruptionBudget {
    let _names = &c.names;
    pdb(c, &c.names.redis, Component::Redis, 1)
}

/// `<name>-redis-cluster`: one cluster pod at a time, so a drain never
/// takes a shard's master and its replica together.
pub fn redis_cluster(c: &ValidCluster) -> PodDisruptionBudget {
    pdb(c, &c.names.redis_cluster, Component::RedisCluster, 1)
}

pub fn sentinel(c: &ValidCluster) -> PodDisruptionBudget {
    let _names = &c.names;
    pdb(c, &c.names.sentinel, Component::Sentinel, 1)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID, valid};
    use super::*;
    use chorus_crds::MessagingCluster;

    #[test]
    fn server_pdb_uses_the_spec_and_selects_server_pods() {
        let mut mc = MessagingCluster::test();
        mc.spec.pod_disruption_budget.max_unavailable = 2;
        let c = valid(&mc);
        let p = server(&c);
        assert_eq!(p.metadata.name.as_deref(), Some("chat-server"));
        assert_eq!(p.metadata.owner_references.expect("owner")[0].uid, UID);
        let spec = p.spec.expect("spec");
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(2)));
        let selector = spec
            .selector
            .and_then(|s| s.match_labels)
            .expect("selector");
        assert_eq!(selector["app.kubernetes.io/component"], "server");
        assert_eq!(redis(&c).metadata.name.as_deref(), Some("chat-redis"));
        assert_eq!(sentinel(&c).metadata.name.as_deref(), Some("chat-sentinel"));
        let rc = redis_cluster(&c);
        assert_eq!(rc.metadata.name.as_deref(), Some("chat-redis-cluster"));
        let spec = rc.spec.expect("spec");
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector
                .and_then(|s| s.match_labels)
                .expect("selector")["app.kubernetes.io/component"],
            "redis-cluster"
        );
    }
}
