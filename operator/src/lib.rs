//! The Chorus operator: turns a `MessagingCluster` into the server fleet,
//! its Redis Sentinel group and Services.
//!
//! - [`crd`]: the CRD as installed and printed.
//! - [`build`]: pure builders, one per object kind.

pub mod build;
pub mod crd;
