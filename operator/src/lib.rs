//! Chorus operator library: the parts of the operator that tests and the
//! binary share.

pub mod topology;
