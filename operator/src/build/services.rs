//! Services: `<name>` (clients, sticky), `<name>-redis` (headless, stable
//! pod DNS for replication and Sentinel) and `<name>-sentinel`.

use k8s_openapi::{
    api::core::v1::{ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::meta::{Component, REDIS_PORT, SENTINEL_PORT, object_meta, selector_labels};
use crate::cluster::ValidCluster;

fn port(name: &str, port: i32, target: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

/// `Service <name>`: what clients connect to. `sessionAffinity: ClientIP`
/// keeps a client on the pod holding its WebSocket.
pub fn client(c: &ValidCluster) -> Service {
    let names = &c.names;
    let s = &c.spec.service;
    let mut http = port("http", s.port, 0);
    http.target_port = Some(IntOrString::String("http".to_owned()));
    Service {
        metadata: object_meta(c, &names.service, Component::Server),
        spec: Some(ServiceSpec {
            type_: Some(s.type_.as_str().to_owned()),
            selector: Some(selector_labels(names, Component::Server)),
            ports: Some(vec![http]),
            session_affinity: Some("ClientIP".to_owned()),
            session_affinity_config: Some(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(s.session_affinity.timeout_seconds),
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `Service <name>-redis`: headless, publishing not-ready pods so that a
/// replica can resolve its master while both start.
pub fn redis_headless(c: &ValidCluster) -> Service {
    let names = &c.names;
    Service {
        metadata: object_meta(c, &names.redis, Component::Redis),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(names, Component::Redis)),
            ports: Some(vec![port("redis", REDIS_PORT, REDIS_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `Service <name>-sentinel`: the address in the servers' broker URL.
pub fn sentinel(c: &ValidCluster) -> Service {
    let names = &c.names;
    Service {
        metadata: object_meta(c, &names.sentinel, Component::Sentinel),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(names, Component::Sentinel)),
            ports: Some(vec![port("sentinel", SENTINEL_PORT, SENTINEL_PORT)]),
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
    fn redis_service_is_headless_and_sentinel_service_is_not() {
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
        let sentinel = sentinel(&c);
        assert_eq!(sentinel.metadata.name.as_deref(), Some("chat-sentinel"));
        let spec = sentinel.spec.expect("spec");
        assert_eq!(spec.cluster_ip, None);
        assert_eq!(spec.ports.expect("ports")[0].port, 26379);
    }
}
