//! Test fixtures: `MessagingCluster::test().with_replicas(5)`.

use chorus_crds::{
    AutoscalingSpec, ExternalRedisSpec, IngressSpec, MessagingCluster, MessagingClusterSpec,
    RedisMode, SecretKeyRef, StorageSpec,
};

/// uid of the fixture cluster, as the API server would have assigned it.
pub const UID: &str = "6f1d0f4e-0000-4000-8000-000000000001";
/// Namespace the operator runs in, in tests.
pub const OPERATOR_NAMESPACE: &str = "chorus-system";

use k8s_openapi::{
    api::core::v1::ResourceRequirements, apimachinery::pkg::api::resource::Quantity,
};

/// `mc` after validation, for the builders (which take a validated cluster).
pub fn valid(mc: &MessagingCluster) -> crate::cluster::ValidCluster {
    crate::cluster::validate(mc, OPERATOR_NAMESPACE).expect("the fixture is valid")
}

/// Fixture builder methods on `MessagingCluster`.
pub trait TestCluster: Sized {
    /// `chat` in namespace `default`, generation 1, default spec.
    fn test() -> Self;
    fn with_replicas(self, replicas: i32) -> Self;
    /// Also requests CPU, which autoscaling needs.
    fn with_autoscaling(self, min: i32, max: i32) -> Self;
    fn with_ingress(self, host: &str) -> Self;
    fn with_storage(self, size: &str) -> Self;
    fn with_external_redis(self, url: &str) -> Self;
    fn with_password_secret(self, name: &str, key: &str) -> Self;
    fn with_generation(self, generation: i64) -> Self;
    /// `delivery: kafka` on these bootstrap servers, other Kafka settings
    /// at their defaults.
    fn with_kafka(self, servers: &[&str]) -> Self;
}

impl TestCluster for MessagingCluster {
    fn test() -> Self {
        let mut mc = MessagingCluster::new("chat", MessagingClusterSpec::default());
        mc.metadata.namespace = Some("default".into());
        mc.metadata.uid = Some(UID.into());
        mc.metadata.generation = Some(1);
        mc
    }

    fn with_replicas(mut self, replicas: i32) -> Self {
        self.spec.replicas = replicas;
        self
    }

    fn with_autoscaling(mut self, min: i32, max: i32) -> Self {
        // The autoscaler needs a CPU request to measure against.
        let cpu = Quantity("250m".to_owned());
        self.spec.resources = Some(ResourceRequirements {
            requests: Some([("cpu".to_owned(), cpu)].into()),
            ..Default::default()
        });
        self.spec.autoscaling = Some(AutoscalingSpec {
            min_replicas: min,
            max_replicas: max,
            target_cpu_utilization_percentage: 70,
            connections_per_pod: None,
            deliveries_per_second_per_pod: None,
        });
        self
    }

    fn with_ingress(mut self, host: &str) -> Self {
        self.spec.ingress = Some(IngressSpec {
            host: host.into(),
            class_name: None,
            tls_secret_name: None,
        });
        self
    }

    fn with_storage(mut self, size: &str) -> Self {
        self.spec.redis.storage = Some(StorageSpec {
            size: size.into(),
            storage_class_name: None,
        });
        self
    }

    fn with_external_redis(mut self, url: &str) -> Self {
        self.spec.redis.mode = RedisMode::External;
        self.spec.redis.external = Some(ExternalRedisSpec { url: url.into() });
        self
    }

    fn with_password_secret(mut self, name: &str, key: &str) -> Self {
        self.spec.redis.password_secret_ref = Some(SecretKeyRef {
            name: name.into(),
            key: key.into(),
        });
        self
    }

    fn with_generation(mut self, generation: i64) -> Self {
        self.metadata.generation = Some(generation);
        self
    }

    fn with_kafka(mut self, servers: &[&str]) -> Self {
        self.spec.delivery = chorus_crds::Delivery::Kafka;
        self.spec.kafka = Some(
            serde_json::from_value(serde_json::json!({ "bootstrapServers": servers }))
                .expect("a Kafka block"),
        );
        self
    }
}

/// The plain `name=value` environment of a StatefulSet's first container.
pub fn env_of(
    s: &k8s_openapi::api::apps::v1::StatefulSet,
) -> std::collections::BTreeMap<String, String> {
    let pod = s.spec.clone().expect("spec").template.spec.expect("pod");
    pod.containers[0]
        .env
        .clone()
        .expect("env")
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect()
}
