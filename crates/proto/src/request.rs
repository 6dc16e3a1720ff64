//! Signed REST requests (context `stardust/v1/request`).
//!
//! A client signs each request with its key; the domain identifies clients by that key. The
//! signature covers, as bytes:
//!
//! ```text
//! "stardust/v1/request" 0x00 METHOD 0x0a PATH_AND_QUERY 0x0a TIME_MS 0x0a HEX(BLAKE3(BODY))
//! ```
//!
//! and travels in three headers: [`KEY_HEADER`] (the NodeId), [`TIME_HEADER`] (Unix time in
//! milliseconds, decimal) and [`SIGNATURE_HEADER`] (128 hex digits). The domain accepts a
//! time within [`MAX_SKEW_MS`] of its clock and each signature once.

use crate::envelope::Context;
use crate::identity::{Identity, NodeId, Verifiers, VerifyError};

/// Header carrying the signer's NodeId.
pub const KEY_HEADER: &str = "x-stardust-key";
/// Header carrying the signing time, Unix milliseconds.
pub const TIME_HEADER: &str = "x-stardust-time";
/// Header carrying the Ed25519 signature, hex.
pub const SIGNATURE_HEADER: &str = "x-stardust-signature";
/// Largest accepted difference between the signing time and the domain's clock.
pub const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

/// The bytes a request signature covers.
pub fn signing_bytes(method: &str, path_and_query: &str, time_ms: i64, body: &[u8]) -> Vec<u8> {
    signing_bytes_hashed(
        method,
        path_and_query,
        time_ms,
        blake3::hash(body).as_bytes(),
    )
}

/// [`signing_bytes`] from the body's BLAKE3 hash (its [`crate::content::ContentId`]), for a
/// receiver that hashed a large body elsewhere.
pub fn signing_bytes_hashed(
    method: &str,
    path_and_query: &str,
    time_ms: i64,
    body_hash: &[u8; 32],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + path_and_query.len());
    out.extend_from_slice(Context::Request.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(method.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(path_and_query.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(time_ms.to_string().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(data_encoding::HEXLOWER.encode(body_hash).as_bytes());
    out
}

/// The three header values (key, time, signature) for a request.
pub fn sign(
    identity: &Identity,
    method: &str,
    path_and_query: &str,
    time_ms: i64,
    body: &[u8],
) -> [String; 3] {
    let sig = identity.sign(&signing_bytes(method, path_and_query, time_ms, body));
    [
        identity.id().to_string(),
        time_ms.to_string(),
        data_encoding::HEXLOWER.encode(&sig),
    ]
}

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A header is missing or malformed.
    #[error("missing or malformed {0} header")]
    Header(&'static str),
    /// The time is too far from the domain's clock.
    #[error(
        "request time is {skew_ms} ms away from the domain's clock (at most {MAX_SKEW_MS} allowed)"
    )]
    Skew {
        /// The difference.
        skew_ms: i64,
    },
    /// The signature does not verify.
    #[error("bad request signature")]
    BadSignature,
}

/// Checks a request's headers against its method, path, body and the current time; returns
/// the signer. `keys` keeps signers' decoded keys across requests (a domain's clients sign
/// request after request).
#[expect(
    clippy::too_many_arguments,
    reason = "the three headers, the request's three parts, the clock and the key cache"
)]
pub fn verify(
    key: Option<&str>,
    time: Option<&str>,
    signature: Option<&str>,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now_ms: i64,
    keys: Option<&Verifiers>,
) -> Result<NodeId, AuthError> {
    let hash = blake3::hash(body);
    let (method, path) = (method, path_and_query);
    verify_hashed(
        key,
        time,
        signature,
        method,
        path,
        hash.as_bytes(),
        now_ms,
        keys,
    )
}

/// [`verify`] with the body's BLAKE3 hash instead of the body.
#[expect(
    clippy::too_many_arguments,
    reason = "the three headers, the request's three parts, the clock and the key cache"
)]
pub fn verify_hashed(
    key: Option<&str>,
    time: Option<&str>,
    signature: Option<&str>,
    method: &str,
    path_and_query: &str,
    body_hash: &[u8; 32],
    now_ms: i64,
    keys: Option<&Verifiers>,
) -> Result<NodeId, AuthError> {
    let key: NodeId = key
        .and_then(|k| k.parse().ok())
        .ok_or(AuthError::Header(KEY_HEADER))?;
    let time: i64 = time
        .and_then(|t| t.parse().ok())
        .ok_or(AuthError::Header(TIME_HEADER))?;
    let sig: [u8; 64] = signature
        .and_then(|s| data_encoding::HEXLOWER.decode(s.as_bytes()).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or(AuthError::Header(SIGNATURE_HEADER))?;
    let skew = (now_ms - time).abs();
    if skew > MAX_SKEW_MS {
        return Err(AuthError::Skew { skew_ms: skew });
    }
    let message = signing_bytes_hashed(method, path_and_query, time, body_hash);
    match keys {
        Some(keys) => keys.verify(key, &message, &sig),
        None => key.verify(&message, &sig),
    }
    .map_err(|e: VerifyError| match e {
        VerifyError::BadPublicKey | VerifyError::BadSignature => AuthError::BadSignature,
    })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_and_each_rejection() {
        // The same answers whether the signer's key is decoded each time or kept.
        let kept = Verifiers::new(4);
        for keys in [None, Some(&kept), Some(&kept)] {
            rejections(keys);
        }
        // The signer's key and the other one claimed, each once.
        assert_eq!(kept.len(), 2);
    }

    fn rejections(keys: Option<&Verifiers>) {
        let id = Identity::from_secret_bytes(&[5; 32]);
        let [k, t, s] = sign(&id, "POST", "/v1/jobs", 1_000_000, b"{}");
        let h = |k: Option<&str>, s: Option<&str>, m: &str, p: &str, b: &[u8], now| {
            verify(k, Some(&t), s, m, p, b, now, keys)
        };
        let v = |m: &str, p: &str, b: &[u8], now| h(Some(&k), Some(&s), m, p, b, now);
        assert_eq!(v("POST", "/v1/jobs", b"{}", 1_000_500), Ok(id.id()));
        assert_eq!(
            v("GET", "/v1/jobs", b"{}", 1_000_000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            v("POST", "/v1/jobs?x=1", b"{}", 1_000_000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            v("POST", "/v1/jobs", b"{ }", 1_000_000),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            v("POST", "/v1/jobs", b"{}", 1_000_000 + MAX_SKEW_MS + 1),
            Err(AuthError::Skew { .. })
        ));
        // The body's hash in its place: the same answers.
        let hashed = |b: &[u8]| {
            let h = *blake3::hash(b).as_bytes();
            verify_hashed(
                Some(&k),
                Some(&t),
                Some(&s),
                "POST",
                "/v1/jobs",
                &h,
                1_000_000,
                keys,
            )
        };
        assert_eq!(hashed(b"{}"), Ok(id.id()));
        assert_eq!(hashed(b"{ }"), Err(AuthError::BadSignature));
        // Another key claimed for the same signature.
        let other = Identity::from_secret_bytes(&[6; 32]).id().to_string();
        assert_eq!(
            h(Some(&other), Some(&s), "POST", "/v1/jobs", b"{}", 1_000_000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            h(None, Some(&s), "POST", "/v1/jobs", b"{}", 1_000_000),
            Err(AuthError::Header(KEY_HEADER))
        );
        assert_eq!(
            h(Some(&k), Some("zz"), "POST", "/v1/jobs", b"{}", 1_000_000),
            Err(AuthError::Header(SIGNATURE_HEADER))
        );
    }
}
