//! ocigc: an online garbage collector for container registries stored in object-store buckets.
//!
//! Data flows one way: [`store`] listing → [`layout`] partition by repository → [`retention`]
//! (which tags go) → [`gc`] mark →
//! plan → delete → [`report`].

pub mod cli;
pub mod config;
pub mod cost;
pub mod daemon;
pub mod digest;
pub mod du;
pub mod failpoint;
pub mod gc;
pub mod layout;
pub mod manifest;
pub mod metrics;
pub mod namespace;
pub mod report;
pub mod retention;
pub mod store;
