//! Identities: Ed25519 keys. A [`NodeId`] is a public key, printed as 64 lowercase hex digits;
//! every node, domain and client is named by one.
//!
//! This module does no I/O: secret key bytes come from the caller (see `stardust-keystore`
//! for key files and fresh randomness).

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

/// A public key naming a node, a domain or a client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

impl NodeId {
    /// Wraps raw public key bytes. They are checked to be a valid curve point when used.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw public key.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 10 hex digits, for display in tables and logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(10);
        s
    }

    /// Verifies `signature` over `message` with this key (strict verification: rejects
    /// small-order keys and non-canonical signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), VerifyError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| VerifyError::BadPublicKey)?;
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        key.verify_strict(message, &sig)
            .map_err(|_| VerifyError::BadSignature)
    }
}

/// A node id with its public key decoded once, for a receiver that verifies many
/// signatures by the same key (a session): decoding the point is a fifth of a verification.
#[derive(Debug, Clone)]
pub struct Verifier {
    id: NodeId,
    key: VerifyingKey,
}

impl Verifier {
    /// Decodes `id`'s public key.
    pub fn new(id: NodeId) -> Result<Self, VerifyError> {
        let key = VerifyingKey::from_bytes(&id.0).map_err(|_| VerifyError::BadPublicKey)?;
        Ok(Self { id, key })
    }

    /// The key's node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// [`NodeId::verify`] with the decoded key.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), VerifyError> {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        self.key
            .verify_strict(message, &sig)
            .map_err(|_| VerifyError::BadSignature)
    }
}

/// Decoded keys of recent signers, for a receiver that checks signatures from keys it
/// meets again and again (a domain's clients): each key is decoded once while it stays in.
/// Bounded: when `max` keys are in, the next new one empties it first.
#[derive(Debug)]
pub struct Verifiers {
    keys: std::sync::Mutex<std::collections::HashMap<NodeId, Verifier>>,
    max: usize,
}

impl Verifiers {
    /// Keeps at most `max` keys (at least one).
    pub fn new(max: usize) -> Self {
        Self {
            keys: std::sync::Mutex::new(std::collections::HashMap::new()),
            max: max.max(1),
        }
    }

    /// [`NodeId::verify`], with `id`'s key decoded at most once while it is kept. A key that
    /// is not a valid point is not kept.
    pub fn verify(
        &self,
        id: NodeId,
        message: &[u8],
        signature: &[u8; 64],
    ) -> Result<(), VerifyError> {
        let known = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned();
        let verifier = match known {
            Some(v) => v,
            None => {
                let v = Verifier::new(id)?;
                let mut keys = self
                    .keys
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if keys.len() >= self.max {
                    keys.clear();
                }
                keys.insert(id, v.clone());
                v
            }
        };
        verifier.verify(message, signature)
    }

    /// Keys kept now.
    pub fn len(&self) -> usize {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no key is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a signature did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The public key is not a valid Ed25519 point.
    #[error("the public key is not a valid Ed25519 key")]
    BadPublicKey,
    /// The signature does not match the key and message.
    #[error("bad signature")]
    BadSignature,
}

/// A string that is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id {input:?}: expected 64 lowercase hex digits (an Ed25519 public key)")]
pub struct ParseNodeIdError {
    input: String,
}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseNodeIdError {
            input: s.chars().take(80).collect(),
        };
        if s.len() != 64 {
            return Err(err());
        }
        let bytes = data_encoding::HEXLOWER
            .decode(s.as_bytes())
            .map_err(|_| err())?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| err())?;
        Ok(Self(arr))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A secret signing key and its public [`NodeId`].
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// The identity whose Ed25519 secret key (seed) is `secret`. Callers generate the 32
    /// bytes from a CSPRNG.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(secret),
        }
    }

    /// The 32 secret bytes (handle with care: write them only to protected key files).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public id.
    pub fn id(&self) -> NodeId {
        NodeId(self.key.verifying_key().to_bytes())
    }

    /// Signs `message` (deterministic Ed25519).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8032_test_vector_1() {
        // RFC 8032, section 7.1, TEST 1 (empty message).
        let secret: [u8; 32] = data_encoding::HEXLOWER
            .decode(b"9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .expect("hex")
            .try_into()
            .expect("32 bytes");
        let id = Identity::from_secret_bytes(&secret);
        assert_eq!(
            id.id().to_string(),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let sig = id.sign(b"");
        assert_eq!(
            data_encoding::HEXLOWER.encode(&sig),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        assert_eq!(id.id().verify(b"", &sig), Ok(()));
        assert_eq!(id.id().verify(b"x", &sig), Err(VerifyError::BadSignature));
    }

    #[test]
    fn verifiers_keep_valid_keys_within_their_bound() {
        let keys = Verifiers::new(2);
        let ids: Vec<Identity> = (1..=3u8)
            .map(|i| Identity::from_secret_bytes(&[i; 32]))
            .collect();
        let sig = ids[0].sign(b"m");
        assert_eq!(keys.verify(ids[0].id(), b"m", &sig), Ok(()));
        // Kept: the same answers from the decoded key.
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.verify(ids[0].id(), b"m", &sig), Ok(()));
        assert_eq!(
            keys.verify(ids[0].id(), b"n", &sig),
            Err(VerifyError::BadSignature)
        );
        // Another key's signature does not pass for a kept key.
        assert_eq!(
            keys.verify(ids[1].id(), b"m", &sig),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(keys.len(), 2);
        // Full: a new key empties it first.
        assert_eq!(keys.verify(ids[2].id(), b"m", &ids[2].sign(b"m")), Ok(()));
        assert_eq!(keys.len(), 1);
        // A key that is no point is refused and not kept.
        let bad = (0u8..=255)
            .map(|b| NodeId::from_bytes([b; 32]))
            .find(|id| Verifier::new(*id).is_err())
            .expect("some byte pattern is not a point");
        assert_eq!(keys.verify(bad, b"m", &sig), Err(VerifyError::BadPublicKey));
        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn node_id_parse() {
        let id = Identity::from_secret_bytes(&[7; 32]).id();
        assert_eq!(id.to_string().parse::<NodeId>(), Ok(id));
        assert!("abc".parse::<NodeId>().is_err());
        assert!(id.to_string().to_uppercase().parse::<NodeId>().is_err());
    }
}
