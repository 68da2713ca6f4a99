//! The scenarios, one a file. Each is bounded in messages and time and
//! stops by itself, and returns a [`Report`](crate::report::Report).
//!
//! Most share one shape ([`run_delivery`], in [`delivery`]): connect and
//! subscribe every subscriber, snapshot the CPU of every process, run the
//! publishers, wait until each subscriber holds every message its room
//! acknowledged (or a drain deadline passes), snapshot again, and compare
//! what was delivered with what was acknowledged. The figures they print
//! are in [`crate::report`].

pub mod delivery;
mod failover;
mod fanout;
mod idle;
mod rooms;
mod saturate;

pub use delivery::{Accounting, CpuSnap, Delivery, DeliveryPlan, account, run_delivery};
pub use failover::{FailoverArgs, failover};
pub use fanout::{FanoutArgs, fanout};
pub use idle::{IdleArgs, idle};
pub use rooms::{RoomsArgs, rooms};
pub use saturate::{SaturateArgs, saturate};
