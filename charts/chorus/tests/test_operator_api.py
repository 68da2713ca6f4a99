"""The Rust reading behind the RBAC derivation, on small known inputs."""

from __future__ import annotations

from operator_api import (
    _blank_strings_and_comments,
    _strip_test_modules,
    functions,
    imports,
    resolve,
)


def test_use_trees_expand_to_full_paths():
    text = """
    use k8s_openapi::{
        NamespaceResourceScope,
        api::{apps::v1::{Deployment, StatefulSet}, core::v1::Secret as S},
    };
    use kube::{Api, api::PostParams};
    """
    found = imports(text)
    assert found["Deployment"] == ("k8s_openapi", "api", "apps", "v1", "Deployment")
    assert found["S"] == ("k8s_openapi", "api", "core", "v1", "Secret")
    assert found["PostParams"] == ("kube", "api", "PostParams")


def test_kinds_resolve_through_k8s_openapi_and_the_crd():
    uses = imports("use k8s_openapi::api::{apps::v1::Deployment, core::v1::ResourceRequirements};\nuse chorus_crds::MessagingCluster;")
    deployment = resolve("Deployment", uses)
    assert (deployment.group, deployment.plural, deployment.namespaced) == ("apps", "deployments", True)
    mc = resolve("MessagingCluster", uses)
    assert (mc.group, mc.plural) == ("chorus.dev", "messagingclusters")
    assert resolve("ResourceRequirements", uses) is None  # not an API resource
    assert resolve("K", uses) is None  # a generic parameter


def test_strings_and_comments_cannot_unbalance_braces_or_fake_calls():
    text = 'fn a() { let s = format!("{x}}"); // api.delete(\n api.get_opt(n) }\nfn b() { r#"}"#; }'
    blanked = _blank_strings_and_comments(text)
    bodies = functions(blanked)
    assert len(bodies) == 2
    assert "delete" not in bodies[0] and "get_opt" in bodies[0]


def test_test_modules_are_left_out():
    text = "fn live() { api.patch(x) }\n#[cfg(test)]\nmod tests {\n fn t() { api.delete(x) }\n}\n"
    stripped = _strip_test_modules(text)
    assert "patch" in stripped and "delete" not in stripped
