//! The Chorus operator: turns a `MessagingCluster` into the server fleet,
//! its Redis Sentinel group and Services.
//!
//! - [`crd`]: the CRD as installed and printed.
//! - [`cluster`]: the validate step, and the validated cluster every later step takes.
//! - [`build`]: pure builders, one per object kind (no client).
//! - [`reconcile`]: the validate → build → apply → status pipeline.
//! - [`controller`]: the kube-runtime Controller around it.
//! - [`render`]: the objects for a manifest, printed without a cluster.
//! - [`leader`]: Lease-based leader election.
//! - [`metrics`], [`http`]: `/metrics` and `/healthz`.
//! - [`topology`]: brings the Redis pods and sentinels to one master (talks to Redis, not Kubernetes).
//! - [`redis_cluster`]: creates and grows a managed Redis Cluster (talks to Redis, not Kubernetes).

pub mod build;
pub mod cluster;
pub mod controller;
pub mod crd;
pub mod fleet;
pub mod http;
pub mod leader;
pub mod metrics;
#[cfg(test)]
mod mock_api;
pub mod reconcile;
pub mod redis_cluster;
pub mod render;
pub mod topology;
