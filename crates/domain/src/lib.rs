//! The Stardust domain coordinator: owns the lifecycle of jobs from submission to verified
//! results.
//!
//! - [`Domain`]: the running service (REST API v1, node WebSocket sessions, dispatcher,
//!   lease expiry), configured by [`Config`].
//! - [`gateway`]: a connection gateway, relaying many nodes' sessions to the domain over one
//!   link.
//! - [`store`]: durable state on SQLite or PostgreSQL, one code path, every transition one
//!   transaction.
//! - The dashboard at `/` (live over server-sent events), the contributor widget at
//!   `/widget/{node}` and Prometheus metrics at `/metrics`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
mod cores;
mod dispatch;
pub mod gateway;
mod http;
mod metrics;
mod outbox;
pub mod ratelimit;
mod recorder;
mod service;
pub mod store;
mod tls;

pub use config::{Config, Cores, Rate};
pub use service::{Domain, StartError, now_ms, runtime};
