//! Stardust protocol v1: the types and rules every party (domain, native node, browser node,
//! SDK) shares. Normative description: `docs/protocol.md`; this crate is its reference
//! implementation and the test vectors there are checked against it.
//!
//! Pure logic: no I/O, no async, no clocks, no randomness. Callers bring key material and
//! time.
//!
//! - [`identity`]: Ed25519 identities ([`identity::Identity`], [`identity::NodeId`]).
//! - [`content`]: BLAKE3 content ids ([`content::ContentId`]).
//! - [`envelope`]: signed envelopes whose signature covers the exact transmitted bytes and a
//!   domain-separation [`envelope::Context`].
//! - [`task`]: task specs, limits, outcomes and run reports.
//! - [`message`]: the node ↔ domain messages of protocol v1.
//! - [`job`]: job specs and the expansion of parameter sweeps into tasks.
//! - [`rand`]: SplitMix64, the protocol's deterministic generator.
//! - [`relay`]: the records a connection gateway relays node sessions in.
//! - [`request`]: signed REST requests.
//! - [`scu`]: the Standard Compute Unit, defined from metered fuel.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod content;
pub mod envelope;
pub mod identity;
pub mod job;
pub mod message;
pub mod rand;
pub mod relay;
pub mod request;
pub mod scu;
pub mod task;

/// The protocol version this crate implements.
pub const PROTOCOL_VERSION: u8 = 1;
