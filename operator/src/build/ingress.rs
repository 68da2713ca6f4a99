//! `Ingress <name>`: HTTP(S) entry with cookie affinity (ingress-nginx
//! annotations), so a client behind a changing IP keeps its pod, and long
//! timeouts so idle WebSockets are not cut.

use std::collections::BTreeMap;

use chorus_crds::IngressSpec;
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, ServiceBackendPort,
};

use super::meta::{Component, object_meta};
use crate::cluster::ValidCluster;

/// Name of the affinity cookie.
pub const AFFINITY_COOKIE: &str = "chorus-affinity";

/// WebSocket annotations for ingress-nginx, with cookie affinity unless
/// the spec turns session affinity off.
pub fn annotations(c: &ValidCluster) -> BTreeMap<String, String> {
    let affinity = &c.spec.service.session_affinity;
    let max_age = affinity.timeout_seconds.to_string();
    let sticky = [
        ("nginx.ingress.kubernetes.io/affinity", "cookie"),
        ("nginx.ingress.kubernetes.io/affinity-mode", "persistent"),
        (
            "nginx.ingress.kubernetes.io/session-cookie-name",
            AFFINITY_COOKIE,
        ),
        (
            "nginx.ingress.kubernetes.io/session-cookie-max-age",
            max_age.as_str(),
        ),
    ];
    let timeouts = [
        ("nginx.ingress.kubernetes.io/proxy-read-timeout", "3600"),
        ("nginx.ingress.kubernetes.io/proxy-send-timeout", "3600"),
    ];
    let sticky = if affinity.sticky() { &sticky[..] } else { &[] };
    sticky
        .iter()
        .chain(&timeouts)
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub fn build(c: &ValidCluster, spec: &IngressSpec) -> Ingress {
    let names = &c.names;
    let mut metadata = object_meta(c, &names.service, Component::Server);
    metadata.annotations = Some(annotations(c));
    Ingress {
        metadata,
        spec: Some(K8sIngressSpec {
            ingress_class_name: spec.class_name.clone(),
            tls: spec.tls_secret_name.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: Some(vec![spec.host.clone()]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            rules: Some(vec![IngressRule {
                host: Some(spec.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".to_owned()),
                        path_type: "Prefix".to_owned(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: names.service.clone(),
                                port: Some(ServiceBackendPort {
                                    number: Some(c.spec.service.port),
                                    name: None,
                                }),
                            }),
                            ..Default::default()
                        },
                    }],
                }),
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
    fn ingress_routes_the_host_to_the_service_with_cookie_affinity() {
        let mut mc = MessagingCluster::test().with_ingress("chat.example.com");
        mc.spec.service.session_affinity.timeout_seconds = 600;
        let mut spec = mc.spec.ingress.clone().expect("ingress");
        spec.tls_secret_name = Some("chat-tls".into());
        let ing = build(&valid(&mc), &spec);
        assert_eq!(ing.metadata.name.as_deref(), Some("chat"));
        assert_eq!(ing.metadata.owner_references.expect("owner")[0].uid, UID);
        let annotations = ing.metadata.annotations.expect("annotations");
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/affinity"],
            "cookie"
        );
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/session-cookie-max-age"],
            "600"
        );
        let spec = ing.spec.expect("spec");
        let rule = &spec.rules.expect("rules")[0];
        assert_eq!(rule.host.as_deref(), Some("chat.example.com"));
        let backend = rule.http.clone().expect("http").paths[0]
            .backend
            .service
            .clone()
            .expect("service");
        assert_eq!(backend.name, "chat");
        assert_eq!(backend.port.and_then(|p| p.number), Some(80));
        assert_eq!(
            spec.tls.expect("tls")[0].secret_name.as_deref(),
            Some("chat-tls")
        );
    }

    #[test]
    fn without_session_affinity_the_ingress_sets_no_cookie() {
        let mut mc = MessagingCluster::test().with_ingress("chat.example.com");
        mc.spec.service.session_affinity.type_ = chorus_crds::AffinityType::None;
        let spec = mc.spec.ingress.clone().expect("ingress");
        let annotations = build(&valid(&mc), &spec)
            .metadata
            .annotations
            .expect("annotations");
        assert!(
            !annotations.contains_key("nginx.ingress.kubernetes.io/affinity"),
            "{annotations:?}"
        );
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"],
            "3600"
        );
    }
}
