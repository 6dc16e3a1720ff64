//! Signed envelopes: the unit that crosses the wire between identities.
//!
//! Layout (all integers little-endian), see `docs/protocol.md` for the normative text:
//!
//! ```text
//! offset      size  field
//! 0           4     magic "SDST"
//! 4           1     version (1)
//! 5           1     n = context length (1..=64)
//! 6           n     context, ASCII, e.g. "stardust/v1/result"
//! 6+n         32    signer public key (Ed25519)
//! 38+n        4     m = body length
//! 42+n        m     body (UTF-8 JSON for every v1 context)
//! 42+n+m      64    Ed25519 signature over bytes [0, 42+n+m)
//! ```
//!
//! The signature covers the exact bytes that were transmitted, context included, so a
//! message signed for one purpose can never be replayed as another and verification never
//! re-serializes anything.

use std::fmt;

use crate::identity::{Identity, NodeId, Verifier, VerifyError};

/// The four magic bytes that open every envelope.
pub const MAGIC: [u8; 4] = *b"SDST";

/// The envelope format version this crate writes and reads.
pub const VERSION: u8 = 1;

/// Default upper bound on a whole envelope: 16 MiB.
pub const DEFAULT_MAX_LEN: usize = 16 << 20;

const MAX_CONTEXT_LEN: usize = 64;
const FIXED_LEN: usize = 4 + 1 + 1 + 32 + 4 + 64;

/// What an envelope is for; part of the signed bytes (domain separation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Context {
    /// A node's hello, answering the domain's challenge.
    Hello,
    /// Any other node → domain session message (heartbeat, draining).
    Node,
    /// Task results, signed by the node that computed them.
    Result,
    /// Domain → node session messages (challenge, assignments, cancel, drain).
    Domain,
    /// A REST request signed by a client key.
    Request,
    /// A ledger event signed by the domain key.
    Ledger,
    /// A connection gateway's hello, answering the domain's challenge on a relay link.
    Gateway,
}

impl Context {
    /// Every context, for iteration in tests and docs.
    pub const ALL: [Context; 7] = [
        Context::Hello,
        Context::Node,
        Context::Result,
        Context::Domain,
        Context::Request,
        Context::Ledger,
        Context::Gateway,
    ];

    /// The context string, as signed.
    pub const fn as_str(self) -> &'static str {
        match self {
            Context::Hello => "stardust/v1/hello",
            Context::Node => "stardust/v1/node",
            Context::Result => "stardust/v1/result",
            Context::Domain => "stardust/v1/domain",
            Context::Request => "stardust/v1/request",
            Context::Ledger => "stardust/v1/ledger",
            Context::Gateway => "stardust/v1/gateway",
        }
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str().as_bytes() == b)
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an envelope was refused. Every variant is a clean rejection of untrusted bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Longer than the receiver accepts (checked before anything else is read).
    #[error("envelope of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Actual length.
        len: usize,
        /// Accepted maximum.
        max: usize,
    },
    /// Too short, or a length field points past the end.
    #[error("truncated envelope")]
    Truncated,
    /// Bytes after the signature.
    #[error("{0} unexpected bytes after the signature")]
    TrailingBytes(usize),
    /// Does not start with `SDST`.
    #[error("not a stardust envelope (bad magic)")]
    BadMagic,
    /// A version this implementation does not speak.
    #[error("unsupported envelope version {0} (this node speaks version {VERSION})")]
    UnsupportedVersion(u8),
    /// The context is not one of protocol v1's.
    #[error("unknown context {0:?}")]
    UnknownContext(String),
    /// A valid context, but not the one the receiver expects here.
    #[error("wrong context: expected {expected}, got {found}")]
    WrongContext {
        /// What the receiver expected.
        expected: Context,
        /// What the envelope says.
        found: Context,
    },
    /// The signer key is not a valid Ed25519 key.
    #[error("the signer key is not a valid Ed25519 key")]
    BadPublicKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
}

/// A verified envelope, borrowing the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened<'a> {
    /// The context it was signed for.
    pub context: Context,
    /// Who signed it.
    pub signer: NodeId,
    /// The body bytes, exactly as signed.
    pub body: &'a [u8],
}

/// Builds and signs an envelope around `body`.
///
/// # Panics
/// Never for v1 contexts; a body over 4 GiB cannot be framed and is a caller bug, so it
/// panics rather than silently truncating.
pub fn seal(identity: &Identity, context: Context, body: &[u8]) -> Vec<u8> {
    let ctx = context.as_str().as_bytes();
    let body_len = u32::try_from(body.len()).expect("envelope body over 4 GiB");
    let mut out = Vec::with_capacity(FIXED_LEN + ctx.len() + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(ctx.len() as u8);
    out.extend_from_slice(ctx);
    out.extend_from_slice(identity.id().as_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(body);
    let sig = identity.sign(&out);
    out.extend_from_slice(&sig);
    out
}

/// Parses and verifies `bytes` without asserting its context; at most `max_len` bytes.
pub fn open_any(bytes: &[u8], max_len: usize) -> Result<Opened<'_>, OpenError> {
    open_any_known(bytes, max_len, None)
}

/// [`open_any`], verifying with `known`'s decoded key when the envelope's signer is that key
/// (any other signer is verified as usual): the same checks and errors, less work.
pub fn open_any_known<'a>(
    bytes: &'a [u8],
    max_len: usize,
    known: Option<&Verifier>,
) -> Result<Opened<'a>, OpenError> {
    if bytes.len() > max_len {
        return Err(OpenError::Oversized {
            len: bytes.len(),
            max: max_len,
        });
    }
    if bytes.len() < FIXED_LEN + 1 {
        return Err(OpenError::Truncated);
    }
    if bytes[0..4] != MAGIC {
        return Err(OpenError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(OpenError::UnsupportedVersion(bytes[4]));
    }
    let n = bytes[5] as usize;
    if n == 0 || n > MAX_CONTEXT_LEN {
        return Err(OpenError::UnknownContext(
            String::from_utf8_lossy(bytes.get(6..6 + n).unwrap_or(&[])).into_owned(),
        ));
    }
    let ctx_bytes = bytes.get(6..6 + n).ok_or(OpenError::Truncated)?;
    let context = Context::from_bytes(ctx_bytes).ok_or_else(|| {
        OpenError::UnknownContext(String::from_utf8_lossy(ctx_bytes).into_owned())
    })?;
    let key_at = 6 + n;
    let key: [u8; 32] = bytes
        .get(key_at..key_at + 32)
        .ok_or(OpenError::Truncated)?
        .try_into()
        .map_err(|_| OpenError::Truncated)?;
    let len_at = key_at + 32;
    let len_bytes: [u8; 4] = bytes
        .get(len_at..len_at + 4)
        .ok_or(OpenError::Truncated)?
        .try_into()
        .map_err(|_| OpenError::Truncated)?;
    let m = u32::from_le_bytes(len_bytes) as usize;
    let body_at = len_at + 4;
    let sig_at = body_at.checked_add(m).ok_or(OpenError::Truncated)?;
    let end = sig_at + 64;
    if bytes.len() < end {
        return Err(OpenError::Truncated);
    }
    if bytes.len() > end {
        return Err(OpenError::TrailingBytes(bytes.len() - end));
    }
    let sig: [u8; 64] = bytes[sig_at..end]
        .try_into()
        .map_err(|_| OpenError::Truncated)?;
    let signer = NodeId::from_bytes(key);
    let verified = match known {
        Some(v) if v.id() == signer => v.verify(&bytes[..sig_at], &sig),
        _ => signer.verify(&bytes[..sig_at], &sig),
    };
    verified.map_err(|e| match e {
        VerifyError::BadPublicKey => OpenError::BadPublicKey,
        _ => OpenError::BadSignature,
    })?;
    Ok(Opened {
        context,
        signer,
        body: &bytes[body_at..sig_at],
    })
}

/// Parses and verifies `bytes`, requiring `expected` as its context.
pub fn open(bytes: &[u8], expected: Context, max_len: usize) -> Result<Opened<'_>, OpenError> {
    open_known(bytes, expected, max_len, None)
}

/// [`open`], verifying with `known`'s decoded key when the envelope's signer is that key
/// (as [`open_any_known`]).
pub fn open_known<'a>(
    bytes: &'a [u8],
    expected: Context,
    max_len: usize,
    known: Option<&Verifier>,
) -> Result<Opened<'a>, OpenError> {
    let opened = open_any_known(bytes, max_len, known)?;
    if opened.context != expected {
        return Err(OpenError::WrongContext {
            expected,
            found: opened.context,
        });
    }
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn identity() -> Identity {
        Identity::from_secret_bytes(&[1; 32])
    }

    #[test]
    fn seal_then_open() {
        let id = identity();
        let env = seal(&id, Context::Result, b"{\"x\":1}");
        let opened = open(&env, Context::Result, DEFAULT_MAX_LEN).expect("valid");
        assert_eq!(opened.signer, id.id());
        assert_eq!(opened.body, b"{\"x\":1}");
    }

    #[test]
    fn a_known_key_verifies_the_same_as_an_unknown_one() {
        let id = identity();
        let other = Identity::from_secret_bytes(&[3; 32]);
        let known = Verifier::new(id.id()).expect("a valid key");
        let env = seal(&id, Context::Node, b"{}");
        let opened = open_any_known(&env, DEFAULT_MAX_LEN, Some(&known)).expect("valid");
        assert_eq!(opened.signer, id.id());
        // Another signer is verified with its own key.
        let theirs = seal(&other, Context::Node, b"{}");
        let opened = open_any_known(&theirs, DEFAULT_MAX_LEN, Some(&known)).expect("valid");
        assert_eq!(opened.signer, other.id());
        // The context is still checked.
        assert_eq!(
            open_known(&env, Context::Result, DEFAULT_MAX_LEN, Some(&known)).map(|o| o.signer),
            Err(OpenError::WrongContext {
                expected: Context::Result,
                found: Context::Node
            })
        );
        assert_eq!(
            open_known(&env, Context::Node, DEFAULT_MAX_LEN, Some(&known)).map(|o| o.signer),
            Ok(id.id())
        );
        // A flipped body byte fails either way.
        for (env, who) in [(env, "known"), (theirs, "other")] {
            let mut bad = env.clone();
            let at = bad.len() - 65;
            bad[at] ^= 1;
            assert_eq!(
                open_any_known(&bad, DEFAULT_MAX_LEN, Some(&known)).map(|o| o.signer),
                Err(OpenError::BadSignature),
                "{who}"
            );
        }
    }

    #[test]
    fn each_rejection_is_typed() {
        let id = identity();
        let env = seal(&id, Context::Result, b"body");
        assert_eq!(
            open(&env, Context::Hello, DEFAULT_MAX_LEN),
            Err(OpenError::WrongContext {
                expected: Context::Hello,
                found: Context::Result
            })
        );
        assert_eq!(
            open(&env, Context::Result, 10),
            Err(OpenError::Oversized {
                len: env.len(),
                max: 10
            })
        );
        let mut bad = env.clone();
        bad[0] = b'X';
        assert_eq!(open_any(&bad, DEFAULT_MAX_LEN), Err(OpenError::BadMagic));
        let mut bad = env.clone();
        bad[4] = 2;
        assert_eq!(
            open_any(&bad, DEFAULT_MAX_LEN),
            Err(OpenError::UnsupportedVersion(2))
        );
        let mut bad = env.clone();
        let body_at = env.len() - 64 - 4;
        bad[body_at] ^= 1;
        assert_eq!(
            open_any(&bad, DEFAULT_MAX_LEN),
            Err(OpenError::BadSignature)
        );
        let mut bad = env.clone();
        bad.push(0);
        assert_eq!(
            open_any(&bad, DEFAULT_MAX_LEN),
            Err(OpenError::TrailingBytes(1))
        );
        assert_eq!(
            open_any(&env[..env.len() - 1], DEFAULT_MAX_LEN),
            Err(OpenError::Truncated)
        );
        // A context that is not v1's, with a valid signature over it.
        let mut forged = env.clone();
        let ctx_at = 6;
        forged[ctx_at + 9] = b'X'; // "stardust/X1/result"
        let sig_at = forged.len() - 64;
        let sig = id.sign(&forged[..sig_at]);
        forged[sig_at..].copy_from_slice(&sig);
        assert!(matches!(
            open_any(&forged, DEFAULT_MAX_LEN),
            Err(OpenError::UnknownContext(_))
        ));
    }

    proptest! {
        #[test]
        fn roundtrip_any_body(body in proptest::collection::vec(any::<u8>(), 0..2048), ctx in 0usize..Context::ALL.len()) {
            let id = identity();
            let context = Context::ALL[ctx];
            let env = seal(&id, context, &body);
            let opened = open(&env, context, DEFAULT_MAX_LEN).expect("valid");
            prop_assert_eq!(opened.body, &body[..]);
            prop_assert_eq!(opened.signer, id.id());
        }

        #[test]
        fn flipping_any_bit_is_rejected(body in proptest::collection::vec(any::<u8>(), 0..64), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let env = seal(&identity(), Context::Node, &body);
            let mut bad = env.clone();
            let i = pos.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(open_any(&bad, DEFAULT_MAX_LEN).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = open_any(&bytes, DEFAULT_MAX_LEN);
        }
    }
}
