//! Fleet step (needs a client and the pods' HTTP): the operator reads
//! every server pod's `/metrics` and acts on what they say.
//!
//! - [`reading`] (pure): the figures in one pod's metrics text.
//! - [`model`] (pure): `status.fleet`, `FleetHealthy`, the pods to restart.
//! - [`autoscale`] (pure): the connection autoscaler, the rebalance plan.
//! - [`step`] (here): lists the pods, reads them (at most every
//!   [`READ_INTERVAL`]; a reconcile sooner reuses the last reading, so the
//!   status it writes does not change and trigger another), restarts a pod
//!   whose backplane stays down while it works for the others, scales the
//!   MessagingCluster through its scale subresource (as an HPA would), marks
//!   the least-loaded pods to go first on a scale-in, and asks the busiest
//!   pods to shed connections after a scale-out.
//!
//! Nothing here fails the reconcile: a pod that cannot be read shows in
//! `status.fleet.pods[].error` and `FleetHealthy`, an action that fails in
//! a Warning Event and the log.

pub mod autoscale;
pub mod model;
pub mod reading;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chorus_crds::{AutoscalerStatus, FleetStatus, MessagingCluster};
use futures_util::{StreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::events::EventType,
};
use serde_json::json;
use tracing::{info, warn};

use self::model::{PodSample, Previous, Repairs};
use crate::build::meta::SERVER_PORT;
use crate::build::meta::{Component, selector_string};
use crate::cluster::ValidCluster;
use crate::reconcile::{Context, status::Verdict};

/// The pods are read at most this often.
pub const READ_INTERVAL: Duration = Duration::from_secs(10);
/// How long one pod may take to answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest reason kept from a pod's `/readyz`.
const MAX_REASON: usize = 200;
/// Pods read at once.
const READ_CONCURRENCY: usize = 16;
/// Annotation the ReplicaSet controller reads to pick the pods a scale-in
/// removes (lowest first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// What the operator remembers of one cluster between reconciles.
#[derive(Debug, Default)]
pub struct Memory {
    previous: Previous,
    last: Option<(Instant, Observed)>,
    repairs: Repairs,
    autoscale: autoscale::Memory,
}

/// Per `namespace/name`.
pub type Memories = std::sync::Mutex<HashMap<String, Memory>>;

/// What the fleet step saw.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub status: FleetStatus,
    pub health: Verdict,
}

/// A server pod as listed.
#[derive(Clone, Debug)]
struct ListedPod {
    name: String,
    ip: Option<String>,
    ready: bool,
}

fn listed(pod: &Pod) -> Option<ListedPod> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref();
    Some(ListedPod {
        name: pod.metadata.name.clone()?,
        ip: status
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty()),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
    })
}

fn pod_url(ip: &str, path: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{SERVER_PORT}{path}")
    } else {
        format!("http://{ip}:{SERVER_PORT}{path}")
    }
}

async fn sample(http: reqwest::Client, pod: ListedPod) -> PodSample {
    let reading = read_pod(&http, &pod).await;
    let broker_down = match (&reading, pod.ip.as_deref()) {
        (Ok(r), Some(ip)) if !r.broker_up => why_not_ready(&http, &pod_url(ip, "/readyz")).await,
        _ => None,
    };
    PodSample {
        name: pod.name,
        ready: pod.ready,
        reading,
        broker_down,
    }
}

/// What a pod's `/readyz` (at `url`) says when it is not ready (`broker
/// kafka unavailable: …`), at most [`MAX_REASON`] characters; `None` when
/// it answers ready or not at all.
async fn why_not_ready(http: &reqwest::Client, url: &str) -> Option<String> {
    let answer = http.get(url).timeout(READ_TIMEOUT).send().await.ok()?;
    if answer.status().is_success() {
        return None;
    }
    let text = answer.text().await.ok()?;
    let why = text.trim();
    let why = why.strip_prefix("not ready: ").unwrap_or(why);
    Some(why.chars().take(MAX_REASON).collect())
}

async fn read_pod(http: &reqwest::Client, pod: &ListedPod) -> Result<reading::Reading, String> {
    let ip = pod.ip.as_deref().ok_or("no pod IP yet")?;
    let answer = http
        .get(pod_url(ip, "/metrics"))
        .timeout(READ_TIMEOUT)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("GET /metrics: {}", without_url(&e)))?;
    let text = answer
        .text()
        .await
        .map_err(|e| format!("GET /metrics: {}", without_url(&e)))?;
    reading::parse(&text).map_err(|e| e.to_string())
}

/// reqwest's error text names the URL; the pod is named already.
fn without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection refused or unreachable".to_owned()
    } else if let Some(status) = e.status() {
        format!("HTTP {status}")
    } else {
        "request failed".to_owned()
    }
}

/// Reads the fleet and acts on it. `api_key`: the servers' API key (for
/// the shed call); `master_seen`: the topology step reached the master.
pub async fn step(
    ctx: &Context,
    mc: &MessagingCluster,
    c: &ValidCluster,
    api_key: Option<&str>,
    master_seen: bool,
) -> Option<Observed> {
    let key = format!("{}/{}", c.names.namespace, c.names.instance);
    let now = Instant::now();
    let mut memory = {
        let mut all = ctx.fleet.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, seen)) = all.get(&key).and_then(|m| m.last.as_ref())
            && now.duration_since(*at) < READ_INTERVAL
        {
            return Some(seen.clone());
        }
        all.remove(&key).unwrap_or_default()
    };
    let observed = observe_and_act(ctx, mc, c, api_key, master_seen, &mut memory, now).await;
    if let Some(seen) = &observed {
        memory.last = Some((now, seen.clone()));
    }
    ctx.fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, memory);
    observed
}

async fn observe_and_act(
    ctx: &Context,
    mc: &MessagingCluster,
    c: &ValidCluster,
    api_key: Option<&str>,
    master_seen: bool,
    memory: &mut Memory,
    now: Instant,
) -> Option<Observed> {
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &c.names.namespace);
    let selector = selector_string(&c.names, Component::Server);
    let pods = match pods_api
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            warn!(error = %e, "fleet: listing server pods failed");
            return memory.last.as_ref().map(|(_, seen)| seen.clone());
        }
    };
    let pods: Vec<ListedPod> = pods.iter().filter_map(listed).collect();
    let reads: Vec<_> = pods
        .iter()
        .map(|pod| sample(ctx.http.clone(), pod.clone()))
        .collect();
    let samples: Vec<PodSample> = stream::iter(reads)
        .buffered(READ_CONCURRENCY)
        .collect()
        .await;
    let mut status = model::summarize(&memory.previous, now, &samples);
    let health = model::health(&samples, crate::cluster::max_connections(&c.spec));
    memory.previous = Previous {
        at: Some(now),
        readings: samples
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.reading.clone().ok()?)))
            .collect(),
    };

    // A pod whose backplane stays down while it works for the others.
    if let Some(name) = memory.repairs.next(now, &samples, master_seen) {
        restart(ctx, mc, &pods_api, &name).await;
    }

    // The connection autoscaler.
    if let Some(spec) = &c.spec.autoscaling {
        let load = autoscale::Load {
            connections: status.connections,
            deliveries_per_second: status.deliveries_per_second,
            complete: samples.len() == usize::try_from(c.spec.replicas).unwrap_or(0)
                && samples.iter().all(|s| s.reading.is_ok()),
            replicas: c.spec.replicas,
        };
        if let Some(decision) = autoscale::decide(spec, &load, &mut memory.autoscale, now) {
            status.autoscaler = Some(AutoscalerStatus {
                desired_replicas: decision.desired,
                reason: decision.reason.clone(),
            });
            if let Some(to) = decision.scale_to
                && to != c.spec.replicas
            {
                scale(
                    ctx,
                    mc,
                    c,
                    &pods_api,
                    &samples,
                    to,
                    &decision.reason,
                    memory,
                    now,
                )
                .await;
            }
        }
        rebalance(ctx, mc, c, &pods, &samples, api_key, memory, now).await;
    }
    Some(Observed { status, health })
}

async fn restart(ctx: &Context, mc: &MessagingCluster, pods: &Api<Pod>, name: &str) {
    let note = format!(
        "restarted server pod {name}: its canary has not come back through the backplane for {} s (re-subscribing did not help) while the backplane works for the rest of the fleet",
        model::RESTART_AFTER.as_secs()
    );
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            info!(
                pod = name,
                "fleet: restarted a server pod whose backplane stayed down"
            );
            ctx.metrics.server_pod_restarted();
            ctx.publish(mc, EventType::Warning, "ServerPodRestarted", note)
                .await;
        }
        Err(e) => {
            warn!(pod = name, error = %e, "fleet: restarting a server pod failed");
            ctx.publish(
                mc,
                EventType::Warning,
                "ServerPodRestartFailed",
                format!("could not restart server pod {name}: {e}"),
            )
            .await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn scale(
    ctx: &Context,
    mc: &MessagingCluster,
    c: &ValidCluster,
    pods: &Api<Pod>,
    samples: &[PodSample],
    to: i32,
    reason: &str,
    memory: &mut Memory,
    now: Instant,
) {
    let from = c.spec.replicas;
    if to < from {
        // The ReplicaSet removes the pods of lowest cost first: the
        // least-loaded. Each drains before it goes.
        for s in samples {
            let Ok(r) = &s.reading else { continue };
            let cost = (r.connections.round() as i64).to_string();
            let patch = json!({ "metadata": { "annotations": { DELETION_COST: cost } } });
            if let Err(e) = pods
                .patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                warn!(pod = %s.name, error = %e, "fleet: marking the pod's deletion cost failed");
            }
        }
    }
    let clusters: Api<MessagingCluster> = Api::namespaced(ctx.client.clone(), &c.names.namespace);
    let patch = json!({ "spec": { "replicas": to } });
    match clusters
        .patch_scale(
            &c.names.instance,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            let direction = if to > from { "out" } else { "in" };
            info!(from, to, reason, "fleet: autoscaled");
            ctx.metrics.autoscaled(direction);
            let how = if to < from {
                "; the removed pods drain first (paced reconnects)"
            } else if c.spec.service.session_affinity.sticky() {
                "; new clients go to the new pods (sessionAffinity ClientIP keeps the others on their pods; type None lets the operator move them)"
            } else {
                "; connections will be rebalanced onto the new pods"
            };
            ctx.publish(
                mc,
                EventType::Normal,
                "Autoscaled",
                format!("scaled {from} → {to} server pods: {reason}{how}"),
            )
            .await;
            memory.autoscale.rebalance = (to > from).then(|| autoscale::Rebalance {
                until: now + autoscale::REBALANCE_FOR,
                next_round: now,
                pods: to,
            });
        }
        Err(e) => {
            warn!(error = %e, "fleet: autoscaling failed");
            ctx.publish(
                mc,
                EventType::Warning,
                "AutoscaleFailed",
                format!("could not scale {from} → {to} server pods: {e}"),
            )
            .await;
        }
    }
}

/// A round of the rebalance after a scale-out, once every pod of the new
/// size is ready and read.
#[allow(clippy::too_many_arguments)]
async fn rebalance(
    ctx: &Context,
    mc: &MessagingCluster,
    c: &ValidCluster,
    pods: &[ListedPod],
    samples: &[PodSample],
    api_key: Option<&str>,
    memory: &mut Memory,
    now: Instant,
) {
    let Some(plan) = &memory.autoscale.rebalance else {
        return;
    };
    // Sticky sessions send a reconnecting client back to its pod: moving
    // clients would only make them reconnect.
    if now >= plan.until || c.spec.service.session_affinity.sticky() {
        memory.autoscale.rebalance = None;
        return;
    }
    let pods_in: Vec<(bool, bool)> = samples
        .iter()
        .map(|s| (s.ready, s.reading.is_ok()))
        .collect();
    if !plan.round_due(now, c.spec.replicas, &pods_in) {
        return;
    }
    let load: Vec<(String, i64)> = samples
        .iter()
        .filter_map(|s| {
            Some((
                s.name.clone(),
                s.reading.as_ref().ok()?.connections.round() as i64,
            ))
        })
        .collect();
    let shed = autoscale::shed_plan(&load);
    if shed.is_empty() {
        memory.autoscale.rebalance = None;
        return;
    }
    let mut moved = Vec::new();
    for (name, count) in &shed {
        let Some(ip) = pods
            .iter()
            .find(|p| &p.name == name)
            .and_then(|p| p.ip.as_deref())
        else {
            continue;
        };
        let mut request = ctx
            .http
            .post(pod_url(ip, "/api/v1/admin/shed"))
            .timeout(READ_TIMEOUT)
            .json(&json!({ "connections": count, "seconds": autoscale::SHED_SECONDS }));
        if let Some(key) = api_key {
            request = request.bearer_auth(key);
        }
        match request
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
        {
            Ok(_) => {
                ctx.metrics.shed(u64::try_from(*count).unwrap_or(0));
                moved.push(format!("{name}: {count}"));
            }
            Err(e) => {
                warn!(pod = %name, error = %without_url(&e), "fleet: asking a pod to shed connections failed")
            }
        }
    }
    if !moved.is_empty() {
        let note = format!(
            "rebalancing: asked the busiest pods to move connections (paced reconnects over {} s): {}",
            autoscale::SHED_SECONDS,
            moved.join(", ")
        );
        info!(%note, "fleet: rebalance");
        ctx.publish(mc, EventType::Normal, "Rebalanced", note).await;
    }
    if let Some(plan) = memory.autoscale.rebalance.as_mut() {
        plan.next_round = now + autoscale::REBALANCE_ROUND;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::{Router, http::StatusCode, routing::get};

    use super::*;

    /// A server answering `/readyz` with `status` and `body`; its URL.
    async fn readyz(status: StatusCode, body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/readyz", get(move || async move { (status, body) }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/readyz")
    }

    #[tokio::test]
    async fn a_pods_reason_for_not_being_ready_is_read_from_its_readyz() {
        let http = reqwest::Client::new();
        let down = readyz(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: broker kafka unavailable: metadata: Local: Broker transport failure\n",
        )
        .await;
        assert_eq!(
            why_not_ready(&http, &down).await.as_deref(),
            Some("broker kafka unavailable: metadata: Local: Broker transport failure")
        );
        let long: &'static str =
            Box::leak(format!("not ready: {}", "x".repeat(500)).into_boxed_str());
        let long = readyz(StatusCode::SERVICE_UNAVAILABLE, long).await;
        assert_eq!(
            why_not_ready(&http, &long).await.map(|w| w.len()),
            Some(MAX_REASON)
        );
        let up = readyz(StatusCode::OK, "ready\n").await;
        assert_eq!(why_not_ready(&http, &up).await, None, "back up meanwhile");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = format!("http://{}/readyz", closed.local_addr().unwrap());
        drop(closed);
        assert_eq!(why_not_ready(&http, &gone).await, None);
    }
}
