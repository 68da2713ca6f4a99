//! Names, labels and metadata shared by every builder.

use std::collections::BTreeMap;

use chorus_crds::MessagingCluster;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use crate::cluster::ValidCluster;

/// Version of this operator, written to `app.kubernetes.io/version`.
pub const OPERATOR_VERSION: &str = env!("CARGO_PKG_VERSION");
/// `app.kubernetes.io/name` of every object.
pub const APP_NAME: &str = "chorus";
/// `app.kubernetes.io/managed-by` of every object.
pub const MANAGED_BY: &str = "chorus-operator";
/// Master name the sentinels monitor (the server's `redis+sentinel://…/chorus`).
pub const SENTINEL_MASTER_NAME: &str = "chorus";
/// Port of the server's HTTP, WebSocket, health and metrics endpoints.
pub const SERVER_PORT: i32 = 8080;
/// Redis port.
pub const REDIS_PORT: i32 = 6379;
/// Sentinel port.
pub const SENTINEL_PORT: i32 = 26379;
/// Redis Cluster bus port of the managed cluster's pods (Redis's default,
/// the client port + 10000).
pub const CLUSTER_BUS_PORT: i32 = REDIS_PORT + 10000;

/// What a set of pods (and its objects) does, the `app.kubernetes.io/component` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Server,
    Redis,
    Sentinel,
    /// The pods of a managed Redis Cluster (`redis.mode: cluster`).
    RedisCluster,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Server => "server",
            Component::Redis => "redis",
            Component::Sentinel => "sentinel",
            Component::RedisCluster => "redis-cluster",
        }
    }
}

/// The names of everything owned by one MessagingCluster, derived once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub instance: String,
    pub namespace: String,
    /// ConfigMap and Deployment of the servers, PDB of the servers.
    pub server: String,
    /// Client Service, HPA and Ingress.
    pub service: String,
    /// Redis StatefulSet, its headless Service, PDB and NetworkPolicy.
    pub redis: String,
    /// Sentinel Deployment, Service and PDB.
    pub sentinel: String,
    /// Generated password Secret.
    pub redis_auth_secret: String,
    /// Redis Cluster StatefulSet, its headless Service and PDB.
    pub redis_cluster: String,
}

impl Names {
    /// `None` without a name or namespace (an object never stored).
    pub fn of(mc: &MessagingCluster) -> Option<Self> {
        let name = mc.metadata.name.clone()?;
        let namespace = mc.metadata.namespace.clone()?;
        Some(Self {
            server: format!("{name}-server"),
            service: name.clone(),
            redis: format!("{name}-redis"),
            sentinel: format!("{name}-sentinel"),
            redis_auth_secret: format!("{name}-redis-auth"),
            redis_cluster: format!("{name}-redis-cluster"),
            instance: name,
            namespace,
        })
    }
}

/// Labels that select a component's pods. Never carries the version:
/// selectors are immutable.
pub fn selector_labels(names: &Names, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), APP_NAME.to_owned()),
        (
            "app.kubernetes.io/instance".to_owned(),
            names.instance.clone(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            component.as_str().to_owned(),
        ),
    ])
}

/// The full `app.kubernetes.io/*` label set of an object or pod template.
pub fn labels(names: &Names, component: Component) -> BTreeMap<String, String> {
    let mut labels = selector_labels(names, component);
    labels.insert("app.kubernetes.io/part-of".to_owned(), APP_NAME.to_owned());
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        MANAGED_BY.to_owned(),
    );
    labels.insert(
        "app.kubernetes.io/version".to_owned(),
        OPERATOR_VERSION.to_owned(),
    );
    labels
}

/// Labels of a pod template: the full set without the operator's version,
/// so that upgrading the operator never rolls pods (a new server image
/// rolls the servers by itself; Redis and Sentinel pods must not move at
/// all).
pub fn pod_labels(names: &Names, component: Component) -> BTreeMap<String, String> {
    let mut labels = labels(names, component);
    labels.remove("app.kubernetes.io/version");
    labels
}

/// `matchLabels` selector of a component's pods.
pub fn label_selector(names: &Names, component: Component) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(names, component)),
        ..Default::default()
    }
}

/// The selector string written to `status.selector` (scale subresource).
pub fn selector_string(names: &Names, component: Component) -> String {
    selector_labels(names, component)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Metadata of an owned object: name, namespace, labels, owner reference.
pub fn object_meta(c: &ValidCluster, name: &str, component: Component) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(c.names.namespace.clone()),
        labels: Some(labels(&c.names, component)),
        owner_references: Some(vec![c.owner.clone()]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::TestCluster;
    use super::*;

    #[test]
    fn names_derive_from_the_cluster_name() {
        let names = Names::of(&MessagingCluster::test()).expect("names");
        assert_eq!(names.server, "chat-server");
        assert_eq!(names.service, "chat");
        assert_eq!(names.redis, "chat-redis");
        assert_eq!(names.sentinel, "chat-sentinel");
        assert_eq!(names.redis_auth_secret, "chat-redis-auth");
    }

    #[test]
    fn selectors_never_carry_the_version() {
        let names = Names::of(&MessagingCluster::test()).expect("names");
        let selector = selector_labels(&names, Component::Server);
        assert!(!selector.contains_key("app.kubernetes.io/version"));
        let all = labels(&names, Component::Server);
        assert_eq!(all["app.kubernetes.io/version"], OPERATOR_VERSION);
        assert_eq!(all["app.kubernetes.io/managed-by"], "chorus-operator");
        assert_eq!(all["app.kubernetes.io/part-of"], "chorus");
        let pod = pod_labels(&names, Component::Redis);
        assert!(!pod.contains_key("app.kubernetes.io/version"));
        assert_eq!(pod["app.kubernetes.io/part-of"], "chorus");
        assert_eq!(
            selector_string(&names, Component::Server),
            "app.kubernetes.io/component=server,app.kubernetes.io/instance=chat,app.kubernetes.io/name=chorus"
        );
    }

    #[test]
    fn owned_objects_point_at_the_cluster_as_controller() {
        let c = super::super::fixtures::valid(&MessagingCluster::test());
        let meta = object_meta(&c, "chat-server", Component::Server);
        assert_eq!(meta.namespace.as_deref(), Some("default"));
        let owner = &meta.owner_references.expect("owner")[0];
        assert_eq!(owner.api_version, "chorus.dev/v1alpha1");
        assert_eq!(owner.kind, "MessagingCluster");
        assert_eq!(owner.name, "chat");
        assert_eq!(owner.uid, super::super::fixtures::UID);
        assert_eq!(owner.controller, Some(true));
    }
}
