//! `spec.pods`: what a platform team sets on the pods the operator builds
//! (scheduling, labels for their tooling, pull secrets, security), per
//! component. The operator's own labels, probes and commands are not
//! overridable.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, Toleration, TopologySpreadConstraint,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Overrides per component.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodsSpec {
    /// The WebSocket server pods.
    #[serde(default, skip_serializing_if = "PodOverrides::is_empty")]
    pub server: PodOverrides,
    /// The managed Redis pods.
    #[serde(default, skip_serializing_if = "PodOverrides::is_empty")]
    pub redis: PodOverrides,
    /// The managed Sentinel pods.
    #[serde(default, skip_serializing_if = "PodOverrides::is_empty")]
    pub sentinel: PodOverrides,
}

/// Set on a component's pod template. Unset fields keep the operator's
/// choice; a set one replaces it (for `affinity` and
/// `topologySpreadConstraints` that means the default spreading is
/// replaced too). `labels` cannot change the `app.kubernetes.io/*` labels
/// the selectors use.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Extra pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Nodes the pods may run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Replaces the default spreading over nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Replaces the default spreading over zones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Secrets for pulling the image from a private registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Replaces the pod-level security context (the default passes Pod
    /// Security "restricted"; a replacement must keep `runAsNonRoot` for
    /// that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
}

impl PodOverrides {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

impl PodsSpec {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}
