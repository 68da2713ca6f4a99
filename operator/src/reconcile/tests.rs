//! Reconcile scenarios against a mocked API server (kube's tower-test
//! pattern): every request must come in the scripted order with the
//! expected method and path; a missing request fails after 1 s, an
//! unexpected extra one leaves the reconcile hanging and fails after 1 s.

#![allow(clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use chorus_crds::MessagingCluster;
use http::Method;
use kube::{runtime::controller::Action, runtime::events::Reporter};
use serde_json::{Value, json};
use tokio::time::timeout;

use super::{Context, Error, reconcile};
use crate::build::fixtures::TestCluster;
use crate::metrics::Metrics;
use crate::mock_api::{Expect, Reply, Seen, expect, pair, serve};

struct Outcome {
    result: Result<Action, Error>,
    seen: Vec<Seen>,
    metrics: Arc<Metrics>,
}

impl Outcome {
    fn body(&self, method: Method, path: &str) -> &Value {
        &self
            .seen
            .iter()
            .find(|s| s.method == method && s.path == path)
            .unwrap_or_else(|| panic!("no {method} {path}"))
            .body
    }

    fn status(&self) -> &Value {
        &self.body(
            Method::PATCH,
            "/apis/chorus.dev/v1alpha1/namespaces/default/messagingclusters/chat/status",
        )["status"]
    }

    fn condition(&self, type_: &str) -> &Value {
        self.status()["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no condition {type_}"))
    }

    /// `Degraded` is True with `reason` and a message starting with
    /// `message`; returns the condition.
    fn assert_degraded(&self, reason: &str, message: &str) -> &Value {
        let degraded = self.condition("Degraded");
        assert_eq!(
            (degraded["status"].as_str(), degraded["reason"].as_str()),
            (Some("True"), Some(reason))
        );
        assert!(
            degraded["message"].as_str().unwrap().starts_with(message),
            "{degraded}"
        );
        degraded
    }

    fn event_reasons(&self) -> Vec<(String, String)> {
        self.seen
            .iter()
            .filter(|s| s.path == "/apis/events.k8s.io/v1/namespaces/default/events")
            .map(|s| {
                (
                    s.body["type"].as_str().unwrap().to_owned(),
                    s.body["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

fn reporter() -> Reporter {
    Reporter {
        controller: "chorus-operator".into(),
        instance: None,
    }
}

async fn run(mc: MessagingCluster, script: Vec<Expect>) -> Outcome {
    let (client, mut handle) = pair();
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(client, reporter(), metrics.clone()));
    let reconciler = tokio::spawn(reconcile(Arc::new(mc), ctx));
    let seen = serve(&mut handle, script).await;
    let result = match timeout(Duration::from_secs(1), reconciler).await {
        Ok(joined) => joined.unwrap(),
        Err(_) => {
            let extra = handle
                .next_request()
                .await
                .map(|(r, _)| format!("{} {}", r.method(), r.uri()));
            panic!("reconcile sent an unexpected request: {extra:?}");
        }
    };
    Outcome {
        result,
        seen,
        metrics,
    }
}

const NS: &str = "/api/v1/namespaces/default";
const APPS: &str = "/apis/apps/v1/namespaces/default";
const POLICY: &str = "/apis/policy/v1/namespaces/default";
const NET: &str = "/apis/networking.k8s.io/v1/namespaces/default";
const HPA: &str = "/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers/chat";
const STATUS: &str = "/apis/chorus.dev/v1alpha1/namespaces/default/messagingclusters/chat/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// The requests of a managed cluster's reconcile, in order.
struct Script {
    secret_exists: bool,
    server_status: Value,
    /// Reply to the GET of the HPA the spec does not ask for.
    hpa: Reply,
    events: usize,
}

/// An object named `name` as the API server returns it, controlled by
/// the MessagingCluster with uid `owner_uid`.
fn owned_object(api_version: &str, kind: &str, name: &str, owner_uid: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind,
           "metadata": {"name": name, "namespace": "default", "uid": format!("uid-of-{name}"),
                        "ownerReferences": [{"apiVersion": "chorus.dev/v1alpha1", "kind": "MessagingCluster",
                                             "name": "chat", "uid": owner_uid, "controller": true}]}})
}

fn owned_hpa() -> Value {
    owned_object(
        "autoscaling/v2",
        "HorizontalPodAutoscaler",
        "chat",
        crate::build::fixtures::UID,
    )
}

fn empty_pod_list() -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []})
}

/// The fleet step lists the server pods (none answer in these scripts).
fn server_pods() -> Expect {
    expect(
        Method::GET,
        &format!("{NS}/pods"),
        Reply::Json(200, empty_pod_list()),
    )
}

/// Redis and Sentinel pods all ready, as the API server reports them in
/// the apply response of a settled cluster.
fn redis_ready() -> Value {
    json!({"readyReplicas": 3})
}

/// The deletes of a Sentinel group's objects that do not exist: each looks first.
fn no_sentinel_group() -> [Expect; 7] {
    let d = |path: String| expect(Method::GET, &path, Reply::NotFound);
    [
        d(format!("{APPS}/statefulsets/chat-redis")),
        d(format!("{APPS}/statefulsets/chat-sentinel")),
        d(format!("{NS}/configmaps/chat-redis-group")),
        d(format!("{NS}/services/chat-redis")),
        d(format!("{NS}/services/chat-sentinel")),
        d(format!("{POLICY}/poddisruptionbudgets/chat-redis")),
        d(format!("{POLICY}/poddisruptionbudgets/chat-sentinel")),
    ]
}

/// The deletes of a Redis Cluster's objects that do not exist: each looks first.
fn no_redis_cluster() -> [Expect; 3] {
    let d = |path: String| expect(Method::GET, &path, Reply::NotFound);
    [
        d(format!("{APPS}/statefulsets/chat-redis-cluster")),
        d(format!("{NS}/services/chat-redis-cluster")),
        d(format!("{POLICY}/poddisruptionbudgets/chat-redis-cluster")),
    ]
}

impl Script {
    fn build(self) -> Vec<Expect> {
        let p = |path: String| expect(Method::PATCH, &path, Reply::Echo);
        let existing = self.secret_exists;
        let redis = |path: String| {
            let reply = if existing {
                Reply::EchoWithStatus(redis_ready())
            } else {
                Reply::Echo
            };
            expect(Method::PATCH, &path, reply)
        };
        // Dereference: the password Secret, then the group's pods (none up yet).
        let mut steps = vec![if self.secret_exists {
            let secret = json!({"apiVersion": "v1", "kind": "Secret",
                                "metadata": {"name": "chat-redis-auth", "namespace": "default"},
                                "data": {"password": "aHVudGVyMg=="}});
            expect(
                Method::GET,
                &format!("{NS}/secrets/chat-redis-auth"),
                Reply::Json(200, secret),
            )
        } else {
            expect(
                Method::GET,
                &format!("{NS}/secrets/chat-redis-auth"),
                Reply::NotFound,
            )
        }];
        for _ in ["redis", "sentinel"] {
            steps.push(expect(
                Method::GET,
                &format!("{NS}/pods"),
                Reply::Json(200, empty_pod_list()),
            ));
        }
        steps.push(p(format!("{NS}/configmaps/chat-server")));
        if !self.secret_exists {
            steps.push(expect(
                Method::POST,
                &format!("{NS}/secrets"),
                Reply::Created,
            ));
        }
        steps.extend([
            p(format!("{NS}/configmaps/chat-redis-group")),
            p(format!("{NS}/services/chat-redis")),
            redis(format!("{APPS}/statefulsets/chat-redis")),
            p(format!("{NS}/services/chat-sentinel")),
            redis(format!("{APPS}/statefulsets/chat-sentinel")),
            p(format!("{POLICY}/poddisruptionbudgets/chat-redis")),
            p(format!("{POLICY}/poddisruptionbudgets/chat-sentinel")),
        ]);
        // No Redis Cluster (`redis.mode: cluster`) to remove.
        steps.extend(no_redis_cluster());
        steps.extend([
            expect(
                Method::PATCH,
                &format!("{APPS}/deployments/chat-server"),
                Reply::EchoWithStatus(self.server_status),
            ),
            p(format!("{NS}/services/chat")),
            p(format!("{POLICY}/poddisruptionbudgets/chat-server")),
            // Deletes look first: only an object this cluster owns goes.
            expect(Method::GET, HPA, self.hpa),
            expect(
                Method::GET,
                &format!("{NET}/ingresses/chat"),
                Reply::NotFound,
            ),
            p(format!("{NET}/networkpolicies/chat-redis")),
        ]);
        steps.push(server_pods());
        steps.push(expect(Method::PATCH, STATUS, Reply::Echo));
        steps.extend((0..self.events).map(|_| expect(Method::POST, EVENTS, Reply::Created)));
        steps
    }
}

/// A cluster that was reconciled before with 3 ready pods.
fn settled_cluster() -> MessagingCluster {
    let mut mc = MessagingCluster::test();
    let deployment = k8s_openapi::api::apps::v1::Deployment {
        status: Some(
            serde_json::from_value(
                json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3}),
            )
            .unwrap(),
        ),
        ..Default::default()
    };
    let redis = |ready: i32| -> Value { json!({"readyReplicas": ready}) };
    let applied = super::apply::Applied {
        server_deployment: deployment,
        redis: Some(super::apply::AppliedRedis {
            statefulset: serde_json::from_value(json!({"metadata": {}, "status": redis(3)}))
                .unwrap(),
            sentinel_statefulset: serde_json::from_value(
                json!({"metadata": {}, "status": redis(3)}),
            )
            .unwrap(),
        }),
        redis_cluster: None,
        generated_secret: false,
    };
    let group = super::status::GroupSeen {
        master: Some("chat-redis-0.chat-redis.default.svc:6379".to_owned()),
        replicas_linked: 2,
        sentinels_agreeing: 3,
        replication_lag_bytes: None,
        problem: None,
    };
    mc.status = Some(super::status::compute(
        &mc,
        &crate::build::fixtures::valid(&mc),
        &applied,
        Some(&group),
        k8s_openapi::jiff::Timestamp::now(),
    ));
    mc
}

#[tokio::test]
async fn new_cluster_applies_every_object_generates_the_password_and_reports_status() {
    let script = Script {
        secret_exists: false,
        server_status: json!({}),
        hpa: Reply::NotFound,
        events: 2,
    };
    let out = run(MessagingCluster::test(), script.build()).await;
    assert!(out.result.is_ok(), "{:?}", out.result);

    for s in out.seen.iter().filter(|s| s.method == Method::PATCH) {
        assert!(
            s.query.contains("fieldManager=chorus-operator"),
            "{} {}",
            s.path,
            s.query
        );
        assert!(s.query.contains("force=true"), "{} {}", s.path, s.query);
        if s.path != STATUS {
            let owner = &s.body["metadata"]["ownerReferences"][0];
            assert_eq!(
                (owner["kind"].as_str(), owner["name"].as_str()),
                (Some("MessagingCluster"), Some("chat")),
                "{}",
                s.path
            );
            assert_eq!(
                s.body["metadata"]["labels"]["app.kubernetes.io/managed-by"], "chorus-operator",
                "{}",
                s.path
            );
        }
    }
    let cm = out.body(Method::PATCH, &format!("{NS}/configmaps/chat-server"));
    assert_eq!(
        cm["data"]["CHORUS_BROKER"],
        "redis+sentinel://chat-sentinel-0.chat-sentinel.default.svc:26379,chat-sentinel-1.chat-sentinel.default.svc:26379,chat-sentinel-2.chat-sentinel.default.svc:26379/chorus"
    );
    let secret = out.body(Method::POST, &format!("{NS}/secrets"));
    assert_eq!(secret["metadata"]["name"], "chat-redis-auth");
    assert_eq!(secret["stringData"]["password"].as_str().unwrap().len(), 32);
    let deployment = out.body(Method::PATCH, &format!("{APPS}/deployments/chat-server"));
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["apiVersion"], "apps/v1");
    let service = out.body(Method::PATCH, &format!("{NS}/services/chat"));
    assert_eq!(service["spec"]["sessionAffinity"], "ClientIP");

    let status = out.status();
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["replicas"], 0);
    assert_eq!(
        status["selector"],
        "app.kubernetes.io/component=server,app.kubernetes.io/instance=chat,app.kubernetes.io/name=chorus"
    );
    assert_eq!(
        status["endpoints"]["websocket"],
        "ws://chat.default.svc:80/ws"
    );
    assert_eq!(out.condition("Ready")["status"], "False");
    assert_eq!(out.condition("Progressing")["reason"], "Scaling");
    assert_eq!(out.condition("Degraded")["status"], "False");
    assert_eq!(out.condition("RedisReady")["reason"], "RedisStarting");
    let events = out.event_reasons();
    assert_eq!(
        events,
        [
            ("Normal".into(), "Created".into()),
            ("Normal".into(), "PasswordGenerated".into())
        ]
    );
    let text = out.metrics.encode().unwrap();
    assert!(
        text.contains(r#"chorus_operator_reconciles_total{result="ok"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn scale_change_resizes_the_deployment_keeps_the_secret_and_reports_scaling() {
    let mc = settled_cluster().with_replicas(5).with_generation(2);
    let server_status = json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3});
    let script = Script {
        secret_exists: true,
        server_status,
        hpa: Reply::NotFound,
        events: 1,
    };
    let out = run(mc, script.build()).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    assert!(
        out.seen
            .iter()
            .all(|s| !(s.method == Method::POST && s.path.ends_with("/secrets"))),
        "password regenerated"
    );
    assert_eq!(
        out.body(Method::PATCH, &format!("{APPS}/deployments/chat-server"))["spec"]["replicas"],
        5
    );
    assert_eq!(out.status()["observedGeneration"], 2);
    assert_eq!(out.status()["replicas"], 3);
    let progressing = out.condition("Progressing");
    assert_eq!(
        (
            progressing["status"].as_str(),
            progressing["reason"].as_str()
        ),
        (Some("True"), Some("Scaling"))
    );
    assert_eq!(progressing["message"], "scaling server pods from 3 to 5");
    assert_eq!(out.event_reasons(), [("Normal".into(), "Scaled".into())]);
}

#[tokio::test]
async fn turning_autoscaling_off_deletes_the_hpa() {
    // The previous generation had `autoscaling`; this one does not.
    let mc = settled_cluster().with_generation(3);
    let deleted = json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200,
                         "details": {"name": "chat", "kind": "horizontalpodautoscalers"}});
    let server_status = json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3});
    let mut script = Script {
        secret_exists: true,
        server_status,
        hpa: Reply::Json(200, owned_hpa()),
        // The script lists no Redis pods: a Ready cluster whose group is
        // gone turns NotReady, with a Warning.
        events: 1,
    }
    .build();
    let at = script.iter().position(|e| e.path == HPA).unwrap() + 1;
    script.insert(at, expect(Method::DELETE, HPA, Reply::Json(200, deleted)));
    let out = run(mc, script).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let delete = out
        .seen
        .iter()
        .find(|s| s.method == Method::DELETE && s.path == HPA)
        .expect("HPA deleted");
    assert_eq!(delete.body["propagationPolicy"], "Background");
    assert_eq!(
        delete.body["preconditions"]["uid"], "uid-of-chat",
        "only the object that was checked"
    );
    // No Redis pods in this script: the group is not seen.
    assert_eq!(out.condition("RedisReady")["reason"], "RedisStarting");
    assert_eq!(
        out.event_reasons(),
        [("Warning".to_owned(), "NotReady".to_owned())]
    );
}

#[tokio::test]
async fn autoscaling_on_applies_an_hpa_targeting_the_cluster() {
    let mc = settled_cluster().with_autoscaling(3, 10);
    let server_status = json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3});
    let mut script = Script {
        secret_exists: true,
        server_status,
        hpa: Reply::Echo,
        // The script lists no Redis pods: a Ready cluster whose group is
        // gone turns NotReady, with a Warning.
        events: 1,
    }
    .build();
    // The HPA step is an apply, not a delete.
    let hpa_step = script.iter_mut().find(|e| e.path == HPA).unwrap();
    hpa_step.method = Method::PATCH;
    let out = run(mc, script).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let hpa = out.body(Method::PATCH, HPA);
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "MessagingCluster");
    assert_eq!(hpa["spec"]["maxReplicas"], 10);
}

#[tokio::test]
async fn invalid_spec_sets_degraded_warns_and_applies_nothing() {
    let mc = settled_cluster()
        .with_external_redis("redis+sentinel://s1:26379")
        .with_generation(4);
    let script = vec![
        expect(Method::PATCH, STATUS, Reply::Echo),
        expect(Method::POST, EVENTS, Reply::Created),
    ];
    let out = run(mc.clone(), script).await;
    let error = out
        .result
        .as_ref()
        .expect_err("an invalid spec ends the reconcile");
    assert!(matches!(error, Error::InvalidSpec(_)), "{error:?}");
    assert!(error.is_user_error());
    // Wait for a change, without another Event (the status step sent one).
    let (client, _handle) = pair();
    let ctx = Arc::new(Context::new(client, reporter(), out.metrics.clone()));
    assert_eq!(
        super::error_policy(Arc::new(mc), error, ctx),
        Action::await_change()
    );
    out.assert_degraded("InvalidSpec", "spec.redis.external.url: ");
    assert_eq!(out.status()["observedGeneration"], 4);
    assert_eq!(
        out.status()["readyReplicas"],
        3,
        "observations of the running fleet are kept"
    );
    assert_eq!(
        out.event_reasons(),
        [("Warning".into(), "InvalidSpec".into())]
    );
    let text = out.metrics.encode().unwrap();
    assert!(
        text.contains(r#"chorus_operator_reconciles_total{result="invalid_spec"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_refused_statefulset_leaves_the_rest_applied_and_degraded_names_it() {
    let invalid = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                         "message": "StatefulSet.apps \"chat-redis\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas' are forbidden"});
    let mc = settled_cluster().with_storage("5Gi").with_generation(2);
    let server_status = json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3});
    let mut script = Script {
        secret_exists: true,
        server_status,
        hpa: Reply::NotFound,
        events: 1,
    }
    .build();
    let sts = format!("{APPS}/statefulsets/chat-redis");
    let at = script.iter().position(|e| e.path == sts).unwrap();
    script[at].reply = Reply::Json(422, invalid);
    // The StatefulSet as it runs, for the status.
    let live = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                      "metadata": {"name": "chat-redis", "namespace": "default"},
                      "status": {"replicas": 3, "readyReplicas": 2}});
    script.insert(at + 1, expect(Method::GET, &sts, Reply::Json(200, live)));
    let out = run(mc, script).await;

    // Everything after the StatefulSet was applied (the script ran to the end).
    let error = out.result.as_ref().unwrap_err();
    assert!(error.is_user_error(), "{error}");
    assert_eq!(error.metric_label(), "apply");
    let degraded = out.assert_degraded("ApplyRefused", "applying StatefulSet chat-redis: ");
    assert!(degraded["message"].as_str().unwrap().contains("Forbidden"));
    assert_eq!(degraded["observedGeneration"], 2);
    // Observed, not assumed: the live StatefulSet's ready pods.
    assert_eq!(out.status()["redis"]["readyReplicas"], 2);
    assert_eq!(out.status()["readyReplicas"], 3);
    assert_eq!(
        out.event_reasons(),
        [("Warning".into(), "ApplyRefused".into())]
    );

    // The rest is applied and the Redis group looked at as on a healthy
    // cluster: no backoff, no waiting for a change that may never come.
    let (client, _handle) = pair();
    let ctx = Arc::new(Context::new(client, reporter(), out.metrics.clone()));
    assert_eq!(
        super::error_policy(Arc::new(settled_cluster()), error, ctx),
        Action::requeue(super::RESYNC)
    );
}

#[tokio::test]
async fn an_outage_during_apply_is_transient_and_degraded_keeps_what_was_observed() {
    let unavailable = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503, "message": "etcd leader changed"});
    let mut script = Script {
        secret_exists: true,
        server_status: json!({}),
        hpa: Reply::NotFound,
        events: 0,
    }
    .build();
    // Secret, two pod lists, then the ConfigMap fails: the status still
    // gets written, then the reconcile ends.
    script.truncate(4);
    script[3].reply = Reply::Json(503, unavailable);
    script.push(expect(Method::PATCH, STATUS, Reply::Echo));
    script.push(expect(Method::POST, EVENTS, Reply::Created));
    let out = run(settled_cluster().with_generation(2), script).await;
    let error = out.result.as_ref().unwrap_err();
    assert!(!error.is_user_error());
    out.assert_degraded("ApplyFailed", "applying ConfigMap chat-server: ");
    assert_eq!(out.status()["readyReplicas"], 3, "observations kept");
    assert_eq!(out.condition("Ready")["status"], "True", "not re-judged");
    assert_eq!(
        out.event_reasons(),
        [("Warning".into(), "ApplyFailed".into())]
    );
}

#[tokio::test]
async fn an_unreadable_secret_is_named_in_degraded() {
    let forbidden = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                           "message": "secrets \"chat-redis-auth\" is forbidden"});
    let script = vec![
        expect(
            Method::GET,
            &format!("{NS}/secrets/chat-redis-auth"),
            Reply::Json(403, forbidden),
        ),
        expect(Method::PATCH, STATUS, Reply::Echo),
        expect(Method::POST, EVENTS, Reply::Created),
    ];
    let out = run(settled_cluster(), script).await;
    assert!(matches!(out.result, Err(Error::Dereference(_))));
    out.assert_degraded("DereferenceFailed", "reading Secret chat-redis-auth: ");
    assert_eq!(
        out.event_reasons(),
        [("Warning".into(), "DereferenceFailed".into())]
    );
}

#[tokio::test]
async fn a_refused_status_write_is_retried_as_a_degraded_status() {
    let invalid = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                         "message": "MessagingCluster.chorus.dev \"chat\" is invalid: status.conditions: Duplicate value"});
    let mut script = Script {
        secret_exists: true,
        server_status: json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3}),
        hpa: Reply::NotFound,
        events: 0,
    }
    .build();
    let at = script.iter().position(|e| e.path == STATUS).unwrap();
    script[at].reply = Reply::Json(422, invalid);
    script.push(expect(Method::PATCH, STATUS, Reply::Echo));
    script.push(expect(Method::POST, EVENTS, Reply::Created));
    let out = run(settled_cluster(), script).await;
    assert!(matches!(out.result, Err(Error::Status(_))));
    let last = out.seen.iter().rfind(|s| s.path == STATUS).unwrap();
    let degraded = last.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap();
    assert_eq!(degraded["reason"], "StatusFailed");
}

#[tokio::test]
async fn only_objects_this_cluster_controls_are_deleted() {
    // The spec asks for no HPA, no Ingress and no NetworkPolicy; objects of
    // those names exist: one of another owner, one of nobody, one ours.
    let mut mc = settled_cluster();
    mc.spec.network_policy.enabled = false;
    let server_status = json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3});
    let mut script = Script {
        secret_exists: true,
        server_status,
        hpa: Reply::Json(
            200,
            owned_object(
                "autoscaling/v2",
                "HorizontalPodAutoscaler",
                "chat",
                "another-cluster-uid",
            ),
        ),
        events: 2,
    }
    .build();
    let ingress = format!("{NET}/ingresses/chat");
    let policy = format!("{NET}/networkpolicies/chat-redis");
    let at = script.iter().position(|e| e.path == ingress).unwrap();
    let ours = owned_object(
        "networking.k8s.io/v1",
        "Ingress",
        "chat",
        crate::build::fixtures::UID,
    );
    script[at].reply = Reply::Json(200, ours.clone());
    script.insert(
        at + 1,
        expect(Method::DELETE, &ingress, Reply::Json(200, ours)),
    );
    let mut nobodys = owned_object("networking.k8s.io/v1", "NetworkPolicy", "chat-redis", "x");
    nobodys["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("ownerReferences");
    let np = script.iter().position(|e| e.path == policy).unwrap();
    script[np] = expect(Method::GET, &policy, Reply::Json(200, nobodys));
    // The two left alone are named in one Warning event, before the status.
    let status_at = script.iter().position(|e| e.path == STATUS).unwrap();
    script.truncate(status_at - 1);
    script.extend([
        expect(Method::POST, EVENTS, Reply::Created),
        server_pods(),
        expect(Method::PATCH, STATUS, Reply::Echo),
        // No Redis pods in this script: the group turns NotReady.
        expect(Method::POST, EVENTS, Reply::Created),
    ]);
    let out = run(mc, script).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let deleted: Vec<_> = out
        .seen
        .iter()
        .filter(|s| s.method == Method::DELETE)
        .map(|s| (s.path.as_str(), s.body["preconditions"]["uid"].as_str()))
        .collect();
    assert_eq!(deleted, [(ingress.as_str(), Some("uid-of-chat"))]);
    let notes: Vec<_> = out
        .seen
        .iter()
        .filter(|s| s.path == EVENTS)
        .map(|s| {
            (
                s.body["reason"].as_str().unwrap(),
                s.body["note"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!((notes[0].0, notes[1].0), ("NotOwned", "NotReady"));
    assert!(
        notes[0]
            .1
            .starts_with("left HorizontalPodAutoscaler chat, NetworkPolicy chat-redis alone"),
        "{notes:?}"
    );
}

#[test]
fn backoff_doubles_up_to_five_minutes() {
    use super::backoff;
    assert_eq!(backoff(1), Duration::from_secs(2));
    assert_eq!(backoff(2), Duration::from_secs(4));
    assert_eq!(backoff(5), Duration::from_secs(32));
    assert_eq!(backoff(9), Duration::from_secs(300));
    assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
}

#[test]
fn a_moving_redis_group_is_looked_at_again_within_seconds() {
    use super::{PROGRESS_RESYNC, RESYNC, TOPOLOGY_RESYNC, requeue_after};
    // A Ready cluster whose Sentinel group is failing over must not wait for
    // the minute-long resync before its status names the new master.
    assert_eq!(requeue_after(true, false, true), TOPOLOGY_RESYNC);
    assert_eq!(requeue_after(false, false, false), TOPOLOGY_RESYNC);
    assert_eq!(requeue_after(false, true, true), PROGRESS_RESYNC);
    assert_eq!(requeue_after(true, true, false), RESYNC);
    // Pods to read: their figures and the autoscaler follow within 15 s.
    assert_eq!(requeue_after(true, true, true), super::FLEET_RESYNC);
    assert!(TOPOLOGY_RESYNC < PROGRESS_RESYNC);
}

/// The requests of a reconcile that runs no Redis group (external Redis,
/// Kafka), up to the status: no Secret or Redis pod is read, each Redis
/// object is looked for to be deleted (none exists), the servers are
/// applied, then their pods listed (`pods`).
fn without_redis_group(server_status: Value, pods: Expect) -> Vec<Expect> {
    // Each delete looks first; none of these exist.
    let d = |path: String| expect(Method::GET, &path, Reply::NotFound);
    let mut script = vec![expect(
        Method::PATCH,
        &format!("{NS}/configmaps/chat-server"),
        Reply::Echo,
    )];
    script.extend(no_sentinel_group());
    script.extend(no_redis_cluster());
    script.extend([
        expect(
            Method::PATCH,
            &format!("{APPS}/deployments/chat-server"),
            Reply::EchoWithStatus(server_status),
        ),
        expect(Method::PATCH, &format!("{NS}/services/chat"), Reply::Echo),
        expect(
            Method::PATCH,
            &format!("{POLICY}/poddisruptionbudgets/chat-server"),
            Reply::Echo,
        ),
        d(HPA.to_owned()),
        d(format!("{NET}/ingresses/chat")),
        d(format!("{NET}/networkpolicies/chat-redis")),
        pods,
        expect(Method::PATCH, STATUS, Reply::Echo),
    ]);
    script
}

#[tokio::test]
async fn external_redis_removes_the_managed_group_and_reports_the_url() {
    let mc = settled_cluster().with_external_redis("redis://redis.infra:6379");
    let server_status = json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3});
    // The master changes from the managed pod to the external URL: no
    // failover event.
    let script = without_redis_group(server_status, server_pods());
    let out = run(mc, script).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let cm = out.body(Method::PATCH, &format!("{NS}/configmaps/chat-server"));
    assert_eq!(cm["data"]["CHORUS_BROKER"], "redis://redis.infra:6379");
    assert_eq!(out.status()["redis"]["master"], "redis://redis.infra:6379");
    assert_eq!(out.condition("RedisReady")["reason"], "ExternalRedis");
    assert_eq!(out.event_reasons(), Vec::<(String, String)>::new());
}

#[tokio::test]
async fn cluster_mode_applies_the_redis_cluster_and_removes_the_sentinel_group() {
    let mut mc = MessagingCluster::test();
    mc.spec.redis.mode = chorus_crds::RedisMode::Cluster;
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "chat-redis-auth", "namespace": "default"},
                        "data": {"password": "aHVudGVyMg=="}});
    let p = |path: String| expect(Method::PATCH, &path, Reply::Echo);
    let d = |path: String| expect(Method::GET, &path, Reply::NotFound);
    let mut script = vec![
        expect(
            Method::GET,
            &format!("{NS}/secrets/chat-redis-auth"),
            Reply::Json(200, secret),
        ),
        // The cluster's pods: none yet.
        expect(
            Method::GET,
            &format!("{NS}/pods"),
            Reply::Json(200, empty_pod_list()),
        ),
        p(format!("{NS}/configmaps/chat-server")),
    ];
    script.extend(no_sentinel_group());
    script.extend([
        p(format!("{NS}/services/chat-redis-cluster")),
        p(format!("{APPS}/statefulsets/chat-redis-cluster")),
        p(format!("{POLICY}/poddisruptionbudgets/chat-redis-cluster")),
        p(format!("{APPS}/deployments/chat-server")),
        p(format!("{NS}/services/chat")),
        p(format!("{POLICY}/poddisruptionbudgets/chat-server")),
        d(HPA.to_owned()),
        d(format!("{NET}/ingresses/chat")),
        p(format!("{NET}/networkpolicies/chat-redis")),
        server_pods(),
        expect(Method::PATCH, STATUS, Reply::Echo),
        expect(Method::POST, EVENTS, Reply::Created),
    ]);
    let out = run(mc, script).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let pods = &out.seen[1];
    assert!(
        pods.query
            .contains("app.kubernetes.io%2Fcomponent%3Dredis-cluster"),
        "{}",
        pods.query
    );
    let cm = out.body(Method::PATCH, &format!("{NS}/configmaps/chat-server"));
    assert!(
        cm["data"]["CHORUS_BROKER"].as_str().unwrap().starts_with(
            "redis+cluster://chat-redis-cluster-0.chat-redis-cluster.default.svc:6379,"
        ),
        "{cm}"
    );
    let sts = out.body(
        Method::PATCH,
        &format!("{APPS}/statefulsets/chat-redis-cluster"),
    );
    assert_eq!(sts["spec"]["replicas"], 6);
    assert_eq!(out.condition("RedisReady")["reason"], "RedisStarting");
    assert_eq!(
        out.event_reasons(),
        [("Normal".to_owned(), "Created".to_owned())]
    );
}

#[tokio::test]
async fn error_policy_looks_again_at_resync_after_refusals_and_backs_off_on_transient_errors() {
    use super::{RESYNC, apply::ApplyError, error_policy};
    let api_error = |code: u16, reason: &str| {
        Error::Apply(ApplyError::Apply {
            kind: "StatefulSet",
            name: "chat-redis".into(),
            source: kube::Error::Api(Box::new(
                serde_json::from_value(
                    json!({"status": "Failure", "code": code, "reason": reason, "message": "m"}),
                )
                .unwrap(),
            )),
        })
    };
    let (client, _handle) = pair();
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(client, reporter(), metrics.clone()));
    let mc = Arc::new(MessagingCluster::test());

    // The reconcile already wrote `Degraded` and its Event: no request here.
    let action = error_policy(mc.clone(), &api_error(422, "Invalid"), ctx.clone());
    assert_eq!(action, Action::requeue(RESYNC));

    let transient = api_error(503, "ServiceUnavailable");
    assert_eq!(
        error_policy(mc.clone(), &transient, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        error_policy(mc.clone(), &transient, ctx.clone()),
        Action::requeue(Duration::from_secs(4))
    );
    let text = metrics.encode().unwrap();
    assert!(
        text.contains(r#"chorus_operator_reconcile_errors_total{error="apply"} 3"#),
        "{text}"
    );
}

#[tokio::test]
async fn kafka_delivery_runs_no_redis_and_reports_kafka_as_the_pods_see_it() {
    let mc = MessagingCluster::test().with_kafka(&["kafka-0.infra:9092", "kafka-1.infra:9092"]);
    // One server pod, scheduled but without an IP yet: it cannot be read.
    let pods = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                      "items": [{"metadata": {"name": "chat-server-a"}, "status": {"phase": "Pending"}}]});
    let pods = expect(Method::GET, &format!("{NS}/pods"), Reply::Json(200, pods));
    let mut script = without_redis_group(json!({}), pods);
    script.push(expect(Method::POST, EVENTS, Reply::Created));
    let out = run(mc, script).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let cm = out.body(Method::PATCH, &format!("{NS}/configmaps/chat-server"));
    assert_eq!(
        cm["data"]["CHORUS_BROKER"],
        "kafka://kafka-0.infra:9092,kafka-1.infra:9092/chorus-chat"
    );
    let deployment = out.body(Method::PATCH, &format!("{APPS}/deployments/chat-server"));
    assert!(
        !deployment.to_string().contains("redis"),
        "the server pods mount no Redis password: {deployment}"
    );
    let kafka = &out.status()["kafka"];
    assert_eq!(kafka["reachable"], false, "not known yet: {kafka}");
    assert_eq!(
        kafka["bootstrapServers"],
        json!(["kafka-0.infra:9092", "kafka-1.infra:9092"])
    );
    assert_eq!(kafka["topic"], "chorus-chat");
    let reachable = out.condition("KafkaReachable");
    assert_eq!(
        (reachable["status"].as_str(), reachable["reason"].as_str()),
        (Some("False"), Some("NotReported"))
    );
    assert!(
        reachable["message"]
            .as_str()
            .unwrap()
            .contains("(chat-server-a: no pod IP yet)"),
        "{reachable}"
    );
    assert_eq!(out.condition("Ready")["status"], "False");
    let types: Vec<&str> = out.status()["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect();
    assert!(!types.contains(&"RedisReady"), "{types:?}");
    assert_eq!(out.event_reasons(), [("Normal".into(), "Created".into())]);
}
