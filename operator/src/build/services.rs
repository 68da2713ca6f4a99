//! Services: `<name>` (clients, sticky), and the headless `<name>-redis`
//! and `<name>-sentinel`, which give every Redis and Sentinel pod a stable
//! DNS name (published before the pod is ready: members resolve each other
//! while they start).

use k8s_openapi::{
    api::core::v1::{ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::meta::{Component, REDIS_PORT, SENTINEL_PORT, object_meta, selector_labels};
use super::redis_group::WAITING_PORT;
use crate::cluster::ValidCluster;

pub(crate) fn port(name: &str, port: i32, target: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

/// `Service <name>`: what clients connect to. `sessionAffinity: ClientIP`
/// (unless the spec says `None`) keeps a client on the pod holding its
/// WebSocket.
pub fn client(c: &ValidCluster) -> Service {
    let names = &c.names;
    let s = &c.spec.service;
    let mut http = port("http", s.port, 0);
    http.target_port = Some(IntOrString::String("http".to_owned()));
    let mut metadata = object_meta(c, &names.service, Component::Server);
    if !s.annotations.is_empty() {
        metadata.annotations = Some(s.annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(s.type_.as_str().to_owned()),
            selector: Some(selector_labels(names, Component::Server)),
            ports: Some(vec![http]),
            session_affinity: Some(
                if s.session_affinity.sticky() {
                    "ClientIP"
                } else {
                    "None"
                }
                .to_owned(),
            ),
            session_affinity_config: s
                .session_affinity
                .sticky()
                .then_some(SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(s.session_affinity.timeout_seconds),
                    }),
                }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A headless Service naming every pod of `component`, ready or not.
pub(crate) fn headless(
    c: &ValidCluster,
    name: &str,
    component: Component,
    ports: Vec<ServicePort>,
) -> Service {
    Service {
        metadata: object_meta(c, name, component),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&c.names, component)),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `Service <name>-redis`: `<name>-redis-<i>.<name>-redis.<ns>.svc`.
pub fn redis_headless(c: &ValidCluster) -> Service {
    headless(
        c,
        &c.names.redis,
        Component::Redis,
        vec![
            port("redis", REDIS_PORT, REDIS_PORT),
            port("waiting", WAITING_PORT, WAITING_PORT),
        ],
    )
}

/// `Service <name>-sentinel`: `<name>-sentinel-<i>.<name>-sentinel.<ns>.svc`,
/// the addresses in the servers' broker URL.
pub fn sentinel(c: &ValidCluster) -> Service {
    headless(
        c,
        &c.names.sentinel,
        Component::Sentinel,
        vec![port("sentinel", SENTINEL_PORT, SENTINEL_PORT)],
    )
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID, valid};
    use super::*;
    use chorus_crds::MessagingCluster;
    use chorus_crds::ServiceType;

    #[test]
    fn client_service_is_sticky_with_the_configured_timeout() {
        let mut mc = MessagingCluster::test();
        mc.spec.service.type_ = ServiceType::LoadBalancer;
        mc.spec.service.port = 443;
        mc.spec.service.session_affinity.timeout_seconds = 600;
        let svc = client(&valid(&mc));
        assert_eq!(svc.metadata.name.as_deref(), Some("chat"));
        assert_eq!(
            svc.metadata.owner_references.clone().expect("owner")[0].uid,
            UID
        );
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(
            spec.session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            Some(600)
        );
        let ports = spec.ports.expect("ports");
        assert_eq!(ports[0].port, 443);
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::String("http".to_owned()))
        );
        assert_eq!(
            spec.selector.expect("selector")["app.kubernetes.io/component"],
            "server"
        );
    }

    #[test]
    fn client_service_without_session_affinity_lets_any_pod_take_a_client() {
        let mut mc = MessagingCluster::test();
        mc.spec.service.session_affinity.type_ = chorus_crds::AffinityType::None;
        let spec = client(&valid(&mc)).spec.expect("spec");
        assert_eq!(spec.session_affinity.as_deref(), Some("None"));
        assert_eq!(spec.session_affinity_config, None);
    }

    #[test]
    fn redis_and_sentinel_services_name_every_pod_ready_or_not() {
        let mc = MessagingCluster::test();
        let c = valid(&mc);
        let redis = redis_headless(&c);
        assert_eq!(redis.metadata.name.as_deref(), Some("chat-redis"));
        let spec = redis.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(
            spec.selector.expect("selector")["app.kubernetes.io/component"],
            "redis"
        );
        let ports: Vec<i32> = spec.ports.expect("ports").iter().map(|p| p.port).collect();
        assert_eq!(ports, [6379, 6380], "serving and waiting-room ports");
        let sentinel = sentinel(&c);
        assert_eq!(sentinel.metadata.name.as_deref(), Some("chat-sentinel"));
        let spec = sentinel.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.ports.expect("ports")[0].port, 26379);
    }
}
