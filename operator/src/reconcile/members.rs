//! Members of a managed Redis group, as the Redis topology step needs them:
//! Redis pod IPs in StatefulSet order (index 0 is pod 0, the first-start
//! master) and the Sentinel pod IPs. Sentinel reports members by IP
//! (`resolve-hostnames no`), so these are what the topology step compares.
//!
//! [`from_pods`] is pure; [`observe`] lists the pods (needs a client).

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};

use crate::build::Names;
use crate::build::meta::{Component, selector_string};

/// Listing the group's pods failed.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    #[error("listing {component} pods: {source}")]
    List {
        component: &'static str,
        #[source]
        source: kube::Error,
    },
}

/// IPs of the group's running pods (Redis listens on
/// [`REDIS_PORT`](crate::build::meta::REDIS_PORT), Sentinel on
/// [`SENTINEL_PORT`](crate::build::meta::SENTINEL_PORT)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    /// By StatefulSet ordinal; `None` where that pod has no IP yet.
    pub redis: Vec<Option<String>>,
    /// Sentinels with an IP, sorted by pod name.
    pub sentinels: Vec<String>,
}

impl Members {
    /// Every Redis pod up to the expected count has an IP, and so does
    /// every expected sentinel: the topology step can see the whole group.
    pub fn complete(&self, redis: i32, sentinels: i32) -> bool {
        let redis_up = self.redis.iter().take_while(|ip| ip.is_some()).count();
        i32::try_from(redis_up).is_ok_and(|n| n >= redis)
            && i32::try_from(self.sentinels.len()).is_ok_and(|n| n >= sentinels)
    }
}

fn ip(pod: &Pod) -> Option<String> {
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    (!terminating && !ip.is_empty()).then_some(ip)
}

/// The group from the listed pods.
pub fn from_pods(names: &Names, redis_pods: &[Pod], sentinel_pods: &[Pod]) -> Members {
    let prefix = format!("{}-", names.redis);
    let mut redis: Vec<Option<String>> = Vec::new();
    for pod in redis_pods {
        let ordinal = pod
            .metadata
            .name
            .as_deref()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|o| o.parse::<usize>().ok());
        if let Some(ordinal) = ordinal {
            if redis.len() <= ordinal {
                redis.resize(ordinal + 1, None);
            }
            redis[ordinal] = ip(pod);
        }
    }
    let mut sentinels: Vec<(String, String)> = sentinel_pods
        .iter()
        .filter_map(|p| Some((p.metadata.name.clone()?, ip(p)?)))
        .collect();
    sentinels.sort();
    Members {
        redis,
        sentinels: sentinels.into_iter().map(|(_, a)| a).collect(),
    }
}

/// Lists the Redis and Sentinel pods of the cluster.
pub async fn observe(client: &Client, names: &Names) -> Result<Members, MembersError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &names.namespace);
    let list = |component: Component| {
        let pods = pods.clone();
        let selector = selector_string(names, component);
        async move {
            pods.list(&ListParams::default().labels(&selector))
                .await
                .map(|l| l.items)
                .map_err(|source| MembersError::List {
                    component: component.as_str(),
                    source,
                })
        }
    };
    let redis = list(Component::Redis).await?;
    let sentinels = list(Component::Sentinel).await?;
    Ok(from_pods(names, &redis, &sentinels))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::build::fixtures::TestCluster;
    use crate::mock_api::{Reply, expect, pair, serve};
    use chorus_crds::MessagingCluster;
    use http::Method;
    use serde_json::json;

    fn pod(name: &str, ip: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": ip.map(|ip| json!({"podIP": ip})).unwrap_or(json!({}))
        }))
        .unwrap()
    }

    fn names() -> Names {
        Names::of(&MessagingCluster::test()).unwrap()
    }

    #[test]
    fn redis_pods_are_ordered_by_ordinal_and_gaps_stay_visible() {
        let redis = [
            pod("chat-redis-2", Some("10.0.0.12")),
            pod("chat-redis-0", Some("10.0.0.10")),
            pod("chat-redis-1", None),
        ];
        let sentinels = [
            pod("chat-sentinel-b", Some("10.0.1.2")),
            pod("chat-sentinel-a", Some("fd00::1")),
            pod("chat-sentinel-c", None),
        ];
        let m = from_pods(&names(), &redis, &sentinels);
        assert_eq!(
            m.redis,
            [
                Some("10.0.0.10".to_owned()),
                None,
                Some("10.0.0.12".to_owned())
            ]
        );
        assert_eq!(m.sentinels, ["fd00::1", "10.0.1.2"]);
        assert!(!m.complete(3, 2), "pod 1 has no IP yet");
        assert!(m.complete(1, 2));
        assert!(!m.complete(1, 3));
    }

    #[test]
    fn terminating_and_foreign_pods_are_left_out() {
        let mut leaving = pod("chat-redis-0", Some("10.0.0.10"));
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let m = from_pods(
            &names(),
            &[leaving, pod("other-redis-1", Some("10.0.9.9"))],
            &[],
        );
        assert_eq!(m.redis, [None]);
    }

    #[tokio::test]
    async fn observe_lists_redis_then_sentinel_pods_by_selector() {
        let (client, mut handle) = pair();
        let observing = tokio::spawn(async move { observe(&client, &names()).await });
        let list = |items: Vec<Pod>| json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items});
        let pods = "/api/v1/namespaces/default/pods";
        let seen = serve(
            &mut handle,
            vec![
                expect(
                    Method::GET,
                    pods,
                    Reply::Json(200, list(vec![pod("chat-redis-0", Some("10.0.0.10"))])),
                ),
                expect(
                    Method::GET,
                    pods,
                    Reply::Json(200, list(vec![pod("chat-sentinel-x", Some("10.0.1.1"))])),
                ),
            ],
        )
        .await;
        let members = observing.await.unwrap().unwrap();
        assert_eq!(members.redis, [Some("10.0.0.10".to_owned())]);
        assert_eq!(members.sentinels, ["10.0.1.1"]);
        assert!(
            seen[0]
                .query
                .contains("app.kubernetes.io%2Fcomponent%3Dredis"),
            "{}",
            seen[0].query
        );
        assert!(
            seen[1]
                .query
                .contains("app.kubernetes.io%2Fcomponent%3Dsentinel"),
            "{}",
            seen[1].query
        );
    }
}
