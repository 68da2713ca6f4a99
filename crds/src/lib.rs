//! MessagingCluster custom resource (filled in by the operator work).
