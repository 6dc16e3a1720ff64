//! Content ids: BLAKE3 of bytes (modules, inputs, outputs), printed as `b3:` + 64 hex digits.

use std::fmt;
use std::str::FromStr;

/// The printable prefix of a content id.
pub const PREFIX: &str = "b3:";

/// The BLAKE3 hash of some bytes, naming them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId([u8; 32]);

impl ContentId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Wraps a raw 32-byte hash.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32-byte hash.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// True when `bytes` hash to this id.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        Self::of(bytes) == *self
    }

    /// The 64 lowercase hex digits, without the prefix (for file names).
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

/// A string that is not a content id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid content id {input:?}: expected \"b3:\" followed by 64 lowercase hex digits")]
pub struct ParseContentIdError {
    input: String,
}

impl FromStr for ContentId {
    type Err = ParseContentIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseContentIdError {
            input: s.chars().take(80).collect(),
        };
        let hex = s.strip_prefix(PREFIX).ok_or_else(err)?;
        if hex.len() != 64 {
            return Err(err());
        }
        let bytes = data_encoding::HEXLOWER
            .decode(hex.as_bytes())
            .map_err(|_| err())?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| err())?;
        Ok(Self(arr))
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.to_hex())
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({self})")
    }
}

impl serde::Serialize for ContentId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ContentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hash_of_empty_input() {
        // BLAKE3 of the empty string, from the BLAKE3 reference test vectors.
        assert_eq!(
            ContentId::of(b"").to_string(),
            "b3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn parse_roundtrip_and_rejects() {
        let id = ContentId::of(b"stardust");
        assert_eq!(id.to_string().parse::<ContentId>(), Ok(id));
        assert!(id.matches(b"stardust"));
        assert!(!id.matches(b"stardusT"));
        for bad in [
            "",
            "b3:",
            "b3:zz",
            &id.to_hex(),
            &id.to_string().to_uppercase(),
            &format!("{id}00"),
        ] {
            assert!(bad.parse::<ContentId>().is_err(), "{bad:?} parsed");
        }
    }
}
