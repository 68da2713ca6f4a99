//! PodDisruptionBudgets: `<name>-server` (from the spec), `<name>-redis`
//! and `<name>-sentinel` (one pod at a time, so a drain never takes the
//! master and a replica, or a sentinel majority, together).

use chorus_crds::MessagingCluster;
use k8s_openapi::{
    api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::BuildError;
use super::meta::{Component, Names, label_selector, object_meta};

fn pdb(
    mc: &MessagingCluster,
    names: &Names,
    name: &str,
    component: Component,
    max_unavailable: i32,
) -> Result<PodDisruptionBudget, BuildError> {
    Ok(PodDisruptionBudget {
        metadata: object_meta(mc, names, name, component)?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(max_unavailable)),
            selector: Some(label_selector(names, component)),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn server(mc: &MessagingCluster, names: &Names) -> Result<PodDisruptionBudget, BuildError> {
    pdb(
        mc,
        names,
        &names.server,
        Component::Server,
        mc.spec.pod_disruption_budget.max_unavailable,
    )
}

pub fn redis(mc: &MessagingCluster, names: &Names) -> Result<PodDisruptionBudget, BuildError> {
    pdb(mc, names, &names.redis, Component::Redis, 1)
}

pub fn sentinel(mc: &MessagingCluster, names: &Names) -> Result<PodDisruptionBudget, BuildError> {
    pdb(mc, names, &names.sentinel, Component::Sentinel, 1)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID};
    use super::*;

    #[test]
    fn server_pdb_uses_the_spec_and_selects_server_pods() {
        let mut mc = MessagingCluster::test();
        mc.spec.pod_disruption_budget.max_unavailable = 2;
        let names = Names::of(&mc).expect("names");
        let p = server(&mc, &names).expect("builds");
        assert_eq!(p.metadata.name.as_deref(), Some("chat-server"));
        assert_eq!(p.metadata.owner_references.expect("owner")[0].uid, UID);
        let spec = p.spec.expect("spec");
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(2)));
        let selector = spec
            .selector
            .and_then(|s| s.match_labels)
            .expect("selector");
        assert_eq!(selector["app.kubernetes.io/component"], "server");
        assert_eq!(
            redis(&mc, &names).expect("builds").metadata.name.as_deref(),
            Some("chat-redis")
        );
        assert_eq!(
            sentinel(&mc, &names)
                .expect("builds")
                .metadata
                .name
                .as_deref(),
            Some("chat-sentinel")
        );
    }
}
