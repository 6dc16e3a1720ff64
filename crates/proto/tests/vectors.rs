//! The test vectors of docs/protocol.md, section 11, recomputed from the code.

use stardust_proto::content::ContentId;
use stardust_proto::envelope::{self, Context};
use stardust_proto::identity::Identity;

const DOC: &str = include_str!("../../../docs/protocol.md");

fn vector(name: &str) -> &'static str {
    let prefix = format!("{name}: ");
    DOC.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("docs/protocol.md has no vector {name:?}"))
}

fn hex(s: &str) -> Vec<u8> {
    data_encoding::HEXLOWER.decode(s.as_bytes()).expect("hex")
}

#[test]
fn identity_vector() {
    let secret: [u8; 32] = hex(vector("secret_key")).try_into().expect("32 bytes");
    assert_eq!(
        Identity::from_secret_bytes(&secret).id().to_string(),
        vector("node_id")
    );
}

#[test]
fn content_id_vector() {
    assert_eq!(
        ContentId::of(b"stardust").to_string(),
        vector("content_id(\"stardust\")")
    );
}

#[test]
fn envelope_vector() {
    let secret: [u8; 32] = hex(vector("secret_key")).try_into().expect("32 bytes");
    let id = Identity::from_secret_bytes(&secret);
    let name = "envelope(context stardust/v1/node, body {\"type\":\"draining\"}, key above)";
    let expected = hex(vector(name));
    assert_eq!(
        envelope::seal(&id, Context::Node, br#"{"type":"draining"}"#),
        expected
    );
    let opened =
        envelope::open(&expected, Context::Node, envelope::DEFAULT_MAX_LEN).expect("verifies");
    assert_eq!(opened.signer.to_string(), vector("node_id"));
}

#[test]
fn request_signature_vector() {
    let secret: [u8; 32] = hex(vector("secret_key")).try_into().expect("32 bytes");
    let id = Identity::from_secret_bytes(&secret);
    let name = "request_signature(POST /v1/jobs, time 1700000000000, body {})";
    let [_, _, sig] =
        stardust_proto::request::sign(&id, "POST", "/v1/jobs", 1_700_000_000_000, b"{}");
    assert_eq!(sig, vector(name));
}
