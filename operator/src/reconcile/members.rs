//! The pods of a managed Redis group, as the topology and roll steps need
//! them: which exist and run, which are ready, and which template revision
//! each runs (the roll step replaces outdated Redis pods one by one).
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

/// One pod of the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberPod {
    pub name: String,
    /// `controller-revision-hash`: the StatefulSet template it runs.
    pub revision: Option<String>,
    /// Has an address and is not being deleted.
    pub running: bool,
    /// Its `Ready` condition is true.
    pub ready: bool,
}

/// The group's pods, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub redis: Vec<MemberPod>,
    pub sentinels: Vec<MemberPod>,
}

impl Members {
    /// At least one Redis pod and one sentinel run: there is someone to
    /// talk to.
    pub fn started(&self) -> bool {
        self.redis.iter().any(|p| p.running) && self.sentinels.iter().any(|p| p.running)
    }
}

fn member(pod: &Pod) -> Option<MemberPod> {
    let status = pod.status.as_ref();
    let has_ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .is_some_and(|ip| !ip.is_empty());
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    Some(MemberPod {
        name: pod.metadata.name.clone()?,
        revision: pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("controller-revision-hash"))
            .cloned(),
        running: has_ip && pod.metadata.deletion_timestamp.is_none(),
        ready,
    })
}

/// The pods of StatefulSet `prefix` among `pods`, sorted by name.
fn ours(prefix: &str, pods: &[Pod]) -> Vec<MemberPod> {
    let prefix = format!("{prefix}-");
    let mut out: Vec<MemberPod> = pods
        .iter()
        .filter_map(member)
        .filter(|m| {
            m.name
                .strip_prefix(&prefix)
                .is_some_and(|o| o.parse::<u32>().is_ok())
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The group from the listed pods (pods of other StatefulSets left out).
pub fn from_pods(names: &Names, redis_pods: &[Pod], sentinel_pods: &[Pod]) -> Members {
    Members {
        redis: ours(&names.redis, redis_pods),
        sentinels: ours(&names.sentinel, sentinel_pods),
    }
}

async fn list(
    client: &Client,
    names: &Names,
    component: Component,
) -> Result<Vec<Pod>, MembersError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &names.namespace);
    let selector = selector_string(names, component);
    pods.list(&ListParams::default().labels(&selector))
        .await
        .map(|l| l.items)
        .map_err(|source| MembersError::List {
            component: component.as_str(),
            source,
        })
}

/// Lists the Redis and Sentinel pods of the cluster.
pub async fn observe(client: &Client, names: &Names) -> Result<Members, MembersError> {
    let redis = list(client, names, Component::Redis).await?;
    let sentinels = list(client, names, Component::Sentinel).await?;
    Ok(from_pods(names, &redis, &sentinels))
}

/// Lists the pods of a managed Redis Cluster (`redis.mode: cluster`).
pub async fn observe_cluster(
    client: &Client,
    names: &Names,
) -> Result<Vec<MemberPod>, MembersError> {
    let pods = list(client, names, Component::RedisCluster).await?;
    Ok(ours(&names.redis_cluster, &pods))
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

    fn pod(name: &str, ip: Option<&str>, revision: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"controller-revision-hash": revision}},
            "status": {
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        }))
        .unwrap()
    }

    fn names() -> Names {
        Names::of(&MessagingCluster::test()).unwrap()
    }

    #[test]
    fn pods_carry_their_revision_readiness_and_whether_they_run() {
        let mut leaving = pod("chat-redis-0", Some("10.0.0.10"), "r1", true);
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let redis = [
            pod("chat-redis-2", Some("10.0.0.12"), "r2", true),
            leaving,
            pod("chat-redis-1", None, "r2", false),
            pod("other-redis-1", Some("10.0.9.9"), "x", true),
        ];
        let m = from_pods(&names(), &redis, &[]);
        let summary: Vec<_> = m
            .redis
            .iter()
            .map(|p| (p.name.as_str(), p.revision.as_deref(), p.running, p.ready))
            .collect();
        assert_eq!(
            summary,
            [
                ("chat-redis-0", Some("r1"), false, true),
                ("chat-redis-1", Some("r2"), false, false),
                ("chat-redis-2", Some("r2"), true, true),
            ]
        );
        assert!(!m.started(), "no sentinel yet");
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
                    Reply::Json(
                        200,
                        list(vec![pod("chat-redis-0", Some("10.0.0.10"), "a", true)]),
                    ),
                ),
                expect(
                    Method::GET,
                    pods,
                    Reply::Json(
                        200,
                        list(vec![pod("chat-sentinel-0", Some("10.0.1.1"), "b", true)]),
                    ),
                ),
            ],
        )
        .await;
        let members = observing.await.unwrap().unwrap();
        assert_eq!(members.redis[0].name, "chat-redis-0");
        assert!(members.started());
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
