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

async fn run(mc: MessagingCluster, script: Vec<Expect>) -> Outcome {
    let (client, mut handle) = pair();
    let metrics = Arc::new(Metrics::default());
    let reporter = Reporter {
        controller: "chorus-operator".into(),
        instance: None,
    };
    let ctx = Arc::new(Context::new(client, reporter, metrics.clone()));
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
    hpa: Reply,
    events: usize,
}

fn empty_pod_list() -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []})
}

/// Redis and Sentinel pods all ready, as the API server reports them in
/// the apply response of a settled cluster.
fn redis_ready() -> Value {
    json!({"readyReplicas": 3})
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
            expect(
                Method::PATCH,
                &format!("{APPS}/deployments/chat-server"),
                Reply::EchoWithStatus(self.server_status),
            ),
            p(format!("{NS}/services/chat")),
            p(format!("{POLICY}/poddisruptionbudgets/chat-server")),
            expect(Method::DELETE, HPA, self.hpa),
            expect(
                Method::DELETE,
                &format!("{NET}/ingresses/chat"),
                Reply::NotFound,
            ),
            expect(
                Method::DELETE,
                &format!("{NET}/networkpolicies/chat-redis"),
                Reply::NotFound,
            ),
        ]);
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
        generated_secret: false,
    };
    mc.status = Some(super::status::compute(
        &mc,
        &crate::build::fixtures::valid(&mc),
        &applied,
        None,
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
    let script = Script {
        secret_exists: true,
        server_status,
        hpa: Reply::Json(200, deleted),
        events: 0,
    };
    let out = run(mc, script.build()).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let delete = out
        .seen
        .iter()
        .find(|s| s.method == Method::DELETE && s.path == HPA)
        .expect("HPA deleted");
    assert_eq!(delete.body["propagationPolicy"], "Background");
    assert_eq!(out.condition("Ready")["status"], "True");
}

#[tokio::test]
async fn autoscaling_on_applies_an_hpa_targeting_the_cluster() {
    let mc = settled_cluster().with_autoscaling(3, 10);
    let server_status = json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3});
    let mut script = Script {
        secret_exists: true,
        server_status,
        hpa: Reply::Echo,
        events: 0,
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
    let ctx = Arc::new(Context::new(
        client,
        Reporter {
            controller: "chorus-operator".into(),
            instance: None,
        },
        out.metrics.clone(),
    ));
    assert_eq!(
        super::error_policy(Arc::new(mc), error, ctx),
        Action::await_change()
    );
    let degraded = out.condition("Degraded");
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("InvalidSpec"))
    );
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.redis.external.url: "),
        "{degraded}"
    );
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
async fn refused_apply_is_a_user_error_and_outage_is_transient() {
    let invalid = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                         "message": "StatefulSet.apps \"chat-redis\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas' are forbidden"});
    let mc = settled_cluster().with_storage("5Gi");
    let mut script = Script {
        secret_exists: true,
        server_status: json!({}),
        hpa: Reply::NotFound,
        events: 0,
    }
    .build();
    // Secret, two pod lists, ConfigMap, group ConfigMap, headless Service, StatefulSet.
    script.truncate(7);
    script[6].reply = Reply::Json(422, invalid);
    let out = run(mc, script).await;
    let error = out.result.unwrap_err();
    assert!(error.is_user_error(), "{error}");
    assert_eq!(error.metric_label(), "apply");
    assert!(
        error
            .to_string()
            .contains("applying StatefulSet chat-redis"),
        "{error}"
    );

    let unavailable = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503, "message": "etcd leader changed"});
    let mut script = Script {
        secret_exists: false,
        server_status: json!({}),
        hpa: Reply::NotFound,
        events: 0,
    }
    .build();
    script.truncate(4);
    script[3].reply = Reply::Json(503, unavailable);
    let out = run(MessagingCluster::test(), script).await;
    assert!(!out.result.unwrap_err().is_user_error());
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
    assert_eq!(requeue_after(true, false), TOPOLOGY_RESYNC);
    assert_eq!(requeue_after(false, false), TOPOLOGY_RESYNC);
    assert_eq!(requeue_after(false, true), PROGRESS_RESYNC);
    assert_eq!(requeue_after(true, true), RESYNC);
    assert!(TOPOLOGY_RESYNC < PROGRESS_RESYNC);
}

#[tokio::test]
async fn external_redis_removes_the_managed_group_and_reports_the_url() {
    let mc = settled_cluster().with_external_redis("redis://redis.infra:6379");
    let server_status = json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3});
    let d = |path: String| expect(Method::DELETE, &path, Reply::NotFound);
    let mut script = vec![expect(
        Method::PATCH,
        &format!("{NS}/configmaps/chat-server"),
        Reply::Echo,
    )];
    script.extend([
        d(format!("{APPS}/statefulsets/chat-redis")),
        d(format!("{APPS}/statefulsets/chat-sentinel")),
        d(format!("{NS}/configmaps/chat-redis-group")),
        d(format!("{NS}/services/chat-redis")),
        d(format!("{NS}/services/chat-sentinel")),
        d(format!("{POLICY}/poddisruptionbudgets/chat-redis")),
        d(format!("{POLICY}/poddisruptionbudgets/chat-sentinel")),
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
        // The master changes from the managed pod to the external URL: no
        // failover event.
        expect(Method::PATCH, STATUS, Reply::Echo),
    ]);
    let out = run(mc, script).await;
    assert!(out.result.is_ok(), "{:?}", out.result);
    let cm = out.body(Method::PATCH, &format!("{NS}/configmaps/chat-server"));
    assert_eq!(cm["data"]["CHORUS_BROKER"], "redis://redis.infra:6379");
    assert_eq!(out.status()["redis"]["master"], "redis://redis.infra:6379");
    assert_eq!(out.condition("RedisReady")["reason"], "ExternalRedis");
    assert_eq!(out.event_reasons(), Vec::<(String, String)>::new());
}

#[tokio::test]
async fn error_policy_warns_and_waits_on_user_errors_and_backs_off_on_transient_ones() {
    use super::{apply::ApplyError, error_policy};
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
    let (client, mut handle) = pair();
    let metrics = Arc::new(Metrics::default());
    let reporter = Reporter {
        controller: "chorus-operator".into(),
        instance: None,
    };
    let ctx = Arc::new(Context::new(client, reporter, metrics.clone()));
    let mc = Arc::new(MessagingCluster::test());

    let action = error_policy(mc.clone(), &api_error(422, "Invalid"), ctx.clone());
    assert_eq!(action, Action::await_change());
    let seen = serve(
        &mut handle,
        vec![expect(Method::POST, EVENTS, Reply::Created)],
    )
    .await;
    assert_eq!(
        (
            seen[0].body["type"].as_str(),
            seen[0].body["reason"].as_str()
        ),
        (Some("Warning"), Some("ApplyRefused"))
    );
    assert!(
        seen[0].body["note"]
            .as_str()
            .unwrap()
            .contains("applying StatefulSet chat-redis")
    );

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
