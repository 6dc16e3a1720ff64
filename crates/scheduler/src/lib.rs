//! Stardust scheduling rules, as pure functions over snapshots: no I/O, no clocks (callers
//! pass `now`), so the domain's behaviour can be tested and simulated deterministically.
//!
//! - [`matching`]: which nodes may take a task (filter), which is best (score), and, when
//!   none may, *why* ("3 nodes: 2 lack 4 GiB memory, 1 busy"), the question HTCondor users
//!   ask most.
//! - [`quorum`]: when the replicas of a task agree.
//! - [`reputation`]: a node's record (Beta posterior with forgetting) and adaptive
//!   replication.
//! - [`pricing`]: price per SCU from supply and demand, charges, a job's maximum.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod matching;
pub mod pricing;
pub mod quorum;
pub mod reputation;
