//! The Chorus operator: turns a `MessagingCluster` into the server fleet,
//! its Redis Sentinel group and Services.
//!
//! - [`crd`]: the CRD as installed and printed.
//! - [`build`]: pure builders, one per object kind.
//! - [`reconcile`]: the validate → build → apply → status pipeline.
//! - [`metrics`]: reconcile metrics.

pub mod build;
pub mod crd;
pub mod metrics;
pub mod reconcile;
