//! chorus-server library

pub mod auth;
