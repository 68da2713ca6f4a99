//! End-to-end test against a real cluster. Runs only with `CHORUS_E2E=1`
//! and `KUBECONFIG` set (kind, k3d or any cluster where the caller may
//! create namespaces and CRDs); otherwise prints that it is skipped.
//!
//! It installs the CRD, starts the operator binary for a fresh namespace,
//! applies `examples/basic.yaml`, waits for the owned objects and the
//! status, scales through the scale subresource and sees the Deployment
//! follow, checks that invalid manifests are refused by the API server
//! with a message naming the field, and stops the operator with SIGTERM.
//! Pods need not become ready (the cluster may not have the images).

#![allow(clippy::unwrap_used)]

use std::{io::Write, path::Path, process::Stdio, time::Duration};

use chorus_crds::{MessagingCluster, RedisMode};
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    core::v1::{ConfigMap, Namespace, Secret, Service},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::process::{Child, Command};

const TIMEOUT: Duration = Duration::from_secs(120);

fn enabled() -> bool {
    let on = std::env::var("CHORUS_E2E").as_deref() == Ok("1")
        && std::env::var_os("KUBECONFIG").is_some();
    if !on {
        // Straight to stderr, past the test harness's capture, so the skip is visible.
        let _ = writeln!(
            std::io::stderr(),
            "e2e: skipped (set CHORUS_E2E=1 and KUBECONFIG to run it against a cluster)"
        );
    }
    on
}

/// Polls `check` every second until it returns `Some`, or panics after [`TIMEOUT`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn start_operator(namespace: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chorus-operator"))
        .args([
            "run",
            "--namespace",
            namespace,
            "--lease-namespace",
            namespace,
            "--identity",
            "e2e",
        ])
        .args(["--metrics-listen", "127.0.0.1:0", "--log-format", "text"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting chorus-operator")
}

fn basic_example(namespace: &str) -> MessagingCluster {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/basic.yaml");
    let mut mc: MessagingCluster =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    mc.metadata.namespace = Some(namespace.to_owned());
    mc
}

/// Creates `spec` (raw JSON, so it may break the types too) as
/// MessagingCluster `name`; returns the API server's refusal message.
async fn refusal(api: &Api<DynamicObject>, name: &str, spec: serde_json::Value) -> String {
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "chorus.dev/v1alpha1", "kind": "MessagingCluster",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => panic!("the API server accepted invalid MessagingCluster {name}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        Err(e) => panic!("creating {name}: {e}"),
    }
}

#[tokio::test]
async fn basic_cluster_end_to_end() {
    if !enabled() {
        return;
    }
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG points to a reachable cluster");
    let namespace = format!("chorus-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("creating the test namespace");

    chorus_operator::crd::install(client.clone(), Duration::from_secs(60))
        .await
        .expect("CRD installs");
    let mut operator = start_operator(&namespace);

    // Apply the example as a user would (`kubectl apply --server-side`).
    let mcs: Api<MessagingCluster> = Api::namespaced(client.clone(), &namespace);
    let example = basic_example(&namespace);
    assert_eq!(example.spec.redis.mode, RedisMode::Managed);
    mcs.patch(
        "chat",
        &PatchParams::apply("e2e-test"),
        &Patch::Apply(&example),
    )
    .await
    .expect("example applies");

    // Owned objects appear, owned by the cluster.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let server = eventually("Deployment chat-server", || async {
        deployments.get_opt("chat-server").await.ok().flatten()
    })
    .await;
    assert_eq!(server.owner_references()[0].kind, "MessagingCluster");
    assert_eq!(server.spec.clone().unwrap().replicas, Some(3));
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    eventually("StatefulSet chat-redis", || async {
        statefulsets.get_opt("chat-redis").await.ok().flatten()
    })
    .await;
    eventually("Deployment chat-sentinel", || async {
        deployments.get_opt("chat-sentinel").await.ok().flatten()
    })
    .await;
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    for name in ["chat", "chat-redis", "chat-sentinel"] {
        eventually(&format!("Service {name}"), || async {
            services.get_opt(name).await.ok().flatten()
        })
        .await;
    }
    let chat = services.get("chat").await.unwrap();
    assert_eq!(
        chat.spec.unwrap().session_affinity.as_deref(),
        Some("ClientIP")
    );
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    eventually("ConfigMap chat-server", || async {
        config_maps.get_opt("chat-server").await.ok().flatten()
    })
    .await;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
    eventually("PodDisruptionBudget chat-server", || async {
        pdbs.get_opt("chat-server").await.ok().flatten()
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let secret = eventually("Secret chat-redis-auth", || async {
        secrets.get_opt("chat-redis-auth").await.ok().flatten()
    })
    .await;

    // Status is written.
    let status = eventually("status with observedGeneration", || async {
        let mc = mcs.get("chat").await.ok()?;
        let status = mc.status?;
        (status.observed_generation == mc.metadata.generation && !status.selector.is_empty())
            .then_some(status)
    })
    .await;
    let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    for expected in ["Ready", "Progressing", "Degraded", "RedisReady"] {
        assert!(types.contains(&expected), "conditions {types:?}");
    }
    assert_eq!(
        status.endpoints.websocket.as_deref(),
        Some(format!("ws://chat.{namespace}.svc:80/ws").as_str())
    );

    // `kubectl scale mc/chat --replicas=5` goes through the scale subresource.
    let scale = mcs.get_scale("chat").await.expect("scale subresource");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
    mcs.patch_scale(
        "chat",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .expect("scaling");
    eventually("Deployment chat-server at 5 replicas", || async {
        let d = deployments.get("chat-server").await.ok()?;
        (d.spec?.replicas == Some(5)).then_some(())
    })
    .await;
    let secret_after = secrets.get("chat-redis-auth").await.unwrap();
    assert_eq!(
        secret_after.data, secret.data,
        "the generated password is never regenerated"
    );

    // Bad manifests are refused by the API server, naming the field.
    let raw: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &ApiResource::erase::<MessagingCluster>(&()),
    );
    let message = refusal(&raw, "bad-replicas", json!({"replicas": -1})).await;
    assert!(message.contains("spec.replicas"), "{message}");
    let message = refusal(&raw, "bad-redis", json!({"redis": {"mode": "external"}})).await;
    assert!(message.contains("spec.redis.external"), "{message}");
    let message = refusal(&raw, "bad-delivery", json!({"delivery": "carrier-pigeon"})).await;
    assert!(message.contains("spec.delivery"), "{message}");

    // SIGTERM stops the operator cleanly.
    let pid = operator.id().expect("operator running").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), operator.wait())
        .await
        .expect("operator stops")
        .unwrap();
    assert!(exit.success(), "operator exited with {exit}");

    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .expect("deleting the test namespace");
}
