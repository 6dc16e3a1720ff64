//! The Stardust domain coordinator: owns the lifecycle of jobs from submission to verified
//! results.
//!
//! - [`store`]: durable state on SQLite or PostgreSQL, one code path, every transition one
//!   transaction.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod store;
