//! The `MessagingCluster` custom resource (`chorus.dev/v1alpha1`).
//!
//! - [`spec`]: what the user asks for, with a default for every optional
//!   field and the schema rules the API server enforces (ranges, enums,
//!   patterns, CEL `x-kubernetes-validations`).
//! - [`overrides`]: `spec.pods`, a platform team's settings for the pods.
//! - [`status`]: what the operator reports back.
//! - [`mod@validate`]: the rules a schema cannot express; the operator runs them
//!   before touching anything.

pub mod overrides;
pub mod spec;
pub mod status;
pub mod validate;

pub use overrides::{PodOverrides, PodsSpec};
pub use spec::*;
pub use status::*;
pub use validate::{ValidationError, validate};

/// API group of the custom resource.
pub const GROUP: &str = "chorus.dev";
/// API version of the custom resource.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "chorus.dev/v1alpha1";
/// Kind of the custom resource.
pub const KIND: &str = "MessagingCluster";
