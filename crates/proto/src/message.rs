//! Protocol v1 session messages between a node and its domain.
//!
//! Every frame on the node WebSocket is one signed [`envelope`](crate::envelope). Each message
//! type is bound to exactly one [`Context`] through [`Message::CONTEXT`]; its body is the JSON
//! encoding of the type, with a `"type"` tag on enums.
//!
//! Session (see `docs/protocol.md` for the full sequence):
//!
//! ```text
//! node                                   domain
//!  |  <-- DomainMessage::Challenge ---------|   nonce, domain key
//!  |  --- Hello (ctx hello, nonce) -------->|   node key, hardware, slots
//!  |  <-- DomainMessage::Welcome -----------|   session id, heartbeat interval
//!  |  <-- DomainMessage::Assign ------------|   leases
//!  |  --- NodeMessage::Heartbeat ---------->|   renews every running lease
//!  |  --- ResultBatch (ctx result) -------->|   signed reports
//!  |  <-- DomainMessage::Ack ---------------|   results durably recorded
//! ```

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::envelope::{self, Context, OpenError};
use crate::identity::{Identity, NodeId, Verifier};
use crate::task::{Hardware, LeaseId, RunReport, TaskId, TaskSpec, Tier};

/// A message type with its envelope context.
pub trait Message: Serialize + DeserializeOwned {
    /// The context its envelopes are signed for.
    const CONTEXT: Context;
}

/// A 32-byte random challenge, hex on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Nonce(pub [u8; 32]);

impl Serialize for Nonce {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = data_encoding::HEXLOWER
            .decode(s.as_bytes())
            .map_err(|_| serde::de::Error::custom("nonce: expected 64 lowercase hex digits"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("nonce: expected 32 bytes"))?;
        Ok(Nonce(arr))
    }
}

/// The largest output a node may carry inside its result instead of uploading it first.
pub const MAX_INLINE_OUTPUT: usize = 64 * 1024;

/// Bytes inside a JSON body: standard base64 with padding on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Inline(pub Vec<u8>);

impl std::fmt::Debug for Inline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inline({} bytes)", self.0.len())
    }
}

impl Serialize for Inline {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::BASE64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Inline {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        data_encoding::BASE64
            .decode(s.as_bytes())
            .map(Inline)
            .map_err(|_| serde::de::Error::custom("expected standard padded base64"))
    }
}

/// Domain → node messages (context `stardust/v1/domain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum DomainMessage {
    /// First frame of a session: the node must answer with a [`Hello`] carrying `nonce`.
    Challenge {
        /// Fresh per connection; binds the hello to this session (no replay).
        nonce: Nonce,
        /// Protocol version the domain speaks.
        protocol: u8,
    },
    /// The hello was accepted.
    Welcome {
        /// Session id, for logs.
        session: u64,
        /// How often the node must send a heartbeat.
        heartbeat_ms: u64,
    },
    /// New work. Each assignment is one replica of one task under a lease.
    Assign {
        /// The assignments.
        tasks: Vec<Assignment>,
    },
    /// Stop these leases (task cancelled, or lease reassigned); report nothing for them.
    Cancel {
        /// The leases.
        leases: Vec<LeaseId>,
    },
    /// These results are durably recorded; the node may forget them.
    Ack {
        /// The leases whose results were recorded.
        leases: Vec<LeaseId>,
    },
    /// A message from the node was refused.
    Reject {
        /// Stable machine-readable code (e.g. `bad_signature`, `not_leased`).
        code: String,
        /// Human-readable explanation.
        message: String,
    },
    /// The domain is shutting down: finish running tasks, take none, reconnect later.
    Drain,
}

impl Message for DomainMessage {
    const CONTEXT: Context = Context::Domain;
}

/// One replica of one task, leased to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The lease; results name it.
    pub lease: LeaseId,
    /// What to run.
    pub spec: TaskSpec,
    /// The lease lapses this long after the last heartbeat that listed it.
    pub lease_ms: u64,
}

/// Node → domain hello (context `stardust/v1/hello`); the envelope's signer is the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The challenge nonce of this connection.
    pub nonce: Nonce,
    /// Software name and version, e.g. `stardust-node/0.1.0`.
    pub agent: String,
    /// Tasks it runs at once.
    pub slots: u32,
    /// The probed hardware.
    pub hardware: Hardware,
    /// Its tier (browser nodes say `browser`; native nodes derive it from the hardware).
    pub tier: Tier,
    /// Assignments it keeps queued at most, beside those running; it ignores any beyond.
    /// Absent: 64 per slot (the first reference node's bound). A domain leases a node at
    /// most three quarters of it, leaving room for leases it counts as finished early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
}

impl Hello {
    /// Assignments queued at most when a hello does not say ([`Hello::queue`]).
    pub const DEFAULT_QUEUE_PER_SLOT: u32 = 64;

    /// The node's queue bound: what it says, else [`Hello::DEFAULT_QUEUE_PER_SLOT`] per slot.
    pub fn queue_bound(&self) -> u32 {
        self.queue
            .unwrap_or_else(|| self.slots.saturating_mul(Self::DEFAULT_QUEUE_PER_SLOT))
    }
}

impl Message for Hello {
    const CONTEXT: Context = Context::Hello;
}

/// Gateway → domain hello on a relay link (context `stardust/v1/gateway`); the envelope's
/// signer is the gateway, which the domain must list (docs/protocol.md §5d).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayHello {
    /// The challenge nonce of this link.
    pub nonce: Nonce,
    /// Software name and version, e.g. `stardust-gateway/0.1.0`.
    pub agent: String,
}

impl Message for GatewayHello {
    const CONTEXT: Context = Context::Gateway;
}

/// Other node → domain messages (context `stardust/v1/node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum NodeMessage {
    /// Liveness and lease renewal.
    Heartbeat {
        /// Increases by one per heartbeat.
        seq: u64,
        /// Leases still running; each is renewed.
        running: Vec<LeaseId>,
        /// Slots free for new work (0 while paused by owner policy).
        free_slots: u32,
    },
    /// The node is draining: it finishes running leases and takes no new ones.
    Draining,
}

impl Message for NodeMessage {
    const CONTEXT: Context = Context::Node;
}

/// Results (context `stardust/v1/result`), signed by the node that computed them. The signed
/// envelope is kept by the domain as evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultBatch {
    /// One or more results.
    pub results: Vec<TaskResult>,
}

impl Message for ResultBatch {
    const CONTEXT: Context = Context::Result;
}

/// The result of one lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    /// The lease it answers.
    pub lease: LeaseId,
    /// The task (must match the lease).
    pub task: TaskId,
    /// What the run produced.
    pub report: RunReport,
    /// The output bytes themselves, when at most [`MAX_INLINE_OUTPUT`]: the node then skips
    /// the upload. Absent: the output was uploaded before the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Inline>,
}

impl TaskResult {
    /// Checks inline output bytes against the report (size bound, length, content id).
    pub fn check_inline(&self) -> Result<(), String> {
        let Some(Inline(bytes)) = &self.output else {
            return Ok(());
        };
        if bytes.len() > MAX_INLINE_OUTPUT {
            return Err(format!(
                "inline output of {} bytes; at most {MAX_INLINE_OUTPUT} may travel inside a result",
                bytes.len()
            ));
        }
        if bytes.len() as u64 != self.report.output_len || !self.report.output.matches(bytes) {
            return Err(format!(
                "inline output does not match the report's output {}",
                self.report.output
            ));
        }
        Ok(())
    }
}

/// Why a received frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The envelope itself is bad.
    #[error(transparent)]
    Envelope(#[from] OpenError),
    /// The envelope verified but its body is not a valid message of its context.
    #[error("malformed {context} body: {reason}")]
    Body {
        /// The context.
        context: Context,
        /// The JSON error.
        reason: String,
    },
}

impl DecodeError {
    /// A stable machine-readable code, for `Reject` messages and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Envelope(OpenError::Oversized { .. }) => "oversized",
            DecodeError::Envelope(OpenError::BadSignature | OpenError::BadPublicKey) => {
                "bad_signature"
            }
            DecodeError::Envelope(
                OpenError::WrongContext { .. } | OpenError::UnknownContext(_),
            ) => "wrong_context",
            DecodeError::Envelope(OpenError::UnsupportedVersion(_)) => "unsupported_version",
            DecodeError::Envelope(_) => "malformed_envelope",
            DecodeError::Body { .. } => "malformed_body",
        }
    }
}

/// Serializes `message` and seals it in an envelope for its context.
pub fn encode<M: Message>(identity: &Identity, message: &M) -> Vec<u8> {
    // Serializing these plain data types cannot fail.
    let body = serde_json::to_vec(message).unwrap_or_default();
    envelope::seal(identity, M::CONTEXT, &body)
}

/// Verifies an envelope for `M`'s context and parses its body.
pub fn decode<M: Message>(bytes: &[u8], max_len: usize) -> Result<(NodeId, M), DecodeError> {
    decode_known(bytes, max_len, None)
}

/// [`decode`] for a receiver that expects most frames from one signer: `known`'s decoded
/// key checks that signer's frames (the same checks and errors, less work).
pub fn decode_known<M: Message>(
    bytes: &[u8],
    max_len: usize,
    known: Option<&Verifier>,
) -> Result<(NodeId, M), DecodeError> {
    let opened = envelope::open_known(bytes, M::CONTEXT, max_len, known)?;
    Ok((opened.signer, parse(&opened)?))
}

/// Parses the body of an envelope already opened (and so verified) by
/// [`envelope::open_any`], as `M`: for a receiver that looks at the context first, so the
/// signature is checked once.
pub fn parse<M: Message>(opened: &envelope::Opened<'_>) -> Result<M, DecodeError> {
    if opened.context != M::CONTEXT {
        return Err(OpenError::WrongContext {
            expected: M::CONTEXT,
            found: opened.context,
        }
        .into());
    }
    serde_json::from_slice(opened.body).map_err(|e| DecodeError::Body {
        context: M::CONTEXT,
        reason: e.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod strategies {
    //! Proptest strategies for every message type.
    use proptest::prelude::*;

    use super::*;
    use crate::content::ContentId;
    use crate::task::{Gpu, Limits, MAX_SAFE_INTEGER, RunReport, Status, TrapKind};

    pub fn safe() -> impl Strategy<Value = u64> {
        0..=MAX_SAFE_INTEGER
    }

    fn text() -> impl Strategy<Value = String> {
        ".{0,24}"
    }

    pub fn content_id() -> impl Strategy<Value = ContentId> {
        any::<[u8; 32]>().prop_map(ContentId::from_bytes)
    }

    pub fn limits() -> impl Strategy<Value = Limits> {
        (safe(), safe(), safe(), safe()).prop_map(|(fuel, memory_bytes, wall_ms, output_bytes)| {
            Limits {
                fuel,
                memory_bytes,
                wall_ms,
                output_bytes,
            }
        })
    }

    pub fn spec() -> impl Strategy<Value = TaskSpec> {
        (
            safe(),
            safe(),
            content_id(),
            content_id(),
            prop::collection::vec(text(), 0..5),
            limits(),
            any::<u64>(),
        )
            .prop_map(|(task, job, module, input, args, limits, seed)| TaskSpec {
                task,
                job,
                module,
                input,
                args,
                limits,
                seed,
            })
    }

    fn tier() -> impl Strategy<Value = Tier> {
        prop_oneof![
            Just(Tier::Browser),
            Just(Tier::Small),
            Just(Tier::Standard),
            Just(Tier::Large)
        ]
    }

    fn hardware() -> impl Strategy<Value = Hardware> {
        (
            any::<u32>(),
            safe(),
            text(),
            text(),
            prop::collection::vec(
                (text(), safe()).prop_map(|(name, memory_bytes)| Gpu { name, memory_bytes }),
                0..3,
            ),
            prop::option::of(text()),
            safe(),
            prop::collection::vec(text(), 0..3),
        )
            .prop_map(
                |(
                    cores,
                    memory_bytes,
                    cpu_model,
                    os,
                    gpus,
                    gpu_unusable_reason,
                    micro_scu_per_s,
                    labels,
                )| Hardware {
                    cores,
                    memory_bytes,
                    cpu_model,
                    os,
                    gpus,
                    gpu_unusable_reason,
                    micro_scu_per_s,
                    labels,
                },
            )
    }

    pub fn report() -> impl Strategy<Value = RunReport> {
        let trap = prop_oneof![
            Just(TrapKind::StackOverflow),
            Just(TrapKind::MemoryOutOfBounds),
            Just(TrapKind::Unreachable),
            Just(TrapKind::IntegerDivisionByZero),
            Just(TrapKind::Other),
        ];
        (
            prop::sample::select(Status::ALL.to_vec()),
            prop::option::of(trap),
            prop::option::of(any::<i32>()),
            safe(),
            content_id(),
            safe(),
            safe(),
            prop::option::of(text()),
        )
            .prop_map(
                |(status, trap, exit_code, fuel_used, output, output_len, wall_ms, detail)| {
                    RunReport {
                        status,
                        trap,
                        exit_code,
                        fuel_used,
                        output,
                        output_len,
                        wall_ms,
                        detail,
                    }
                },
            )
    }

    pub fn domain_message() -> impl Strategy<Value = DomainMessage> {
        let leases = || prop::collection::vec(safe(), 0..5);
        prop_oneof![
            (any::<[u8; 32]>(), any::<u8>()).prop_map(|(n, protocol)| DomainMessage::Challenge {
                nonce: Nonce(n),
                protocol
            }),
            (safe(), safe()).prop_map(|(session, heartbeat_ms)| DomainMessage::Welcome {
                session,
                heartbeat_ms
            }),
            prop::collection::vec(
                (safe(), spec(), safe()).prop_map(|(lease, spec, lease_ms)| Assignment {
                    lease,
                    spec,
                    lease_ms
                }),
                0..4
            )
            .prop_map(|tasks| DomainMessage::Assign { tasks }),
            leases().prop_map(|leases| DomainMessage::Cancel { leases }),
            leases().prop_map(|leases| DomainMessage::Ack { leases }),
            (text(), text()).prop_map(|(code, message)| DomainMessage::Reject { code, message }),
            Just(DomainMessage::Drain),
        ]
    }

    pub fn hello() -> impl Strategy<Value = Hello> {
        (
            any::<[u8; 32]>(),
            text(),
            any::<u32>(),
            hardware(),
            tier(),
            any::<Option<u32>>(),
        )
            .prop_map(|(n, agent, slots, hardware, tier, queue)| Hello {
                nonce: Nonce(n),
                agent,
                slots,
                hardware,
                tier,
                queue,
            })
    }

    pub fn node_message() -> impl Strategy<Value = NodeMessage> {
        prop_oneof![
            (safe(), prop::collection::vec(safe(), 0..6), any::<u32>()).prop_map(
                |(seq, running, free_slots)| NodeMessage::Heartbeat {
                    seq,
                    running,
                    free_slots
                }
            ),
            Just(NodeMessage::Draining),
        ]
    }

    pub fn result_batch() -> impl Strategy<Value = ResultBatch> {
        prop::collection::vec(
            (
                safe(),
                safe(),
                report(),
                prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
            )
                .prop_map(|(lease, task, report, output)| TaskResult {
                    lease,
                    task,
                    report,
                    output: output.map(Inline),
                }),
            0..4,
        )
        .prop_map(|results| ResultBatch { results })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::strategies::*;
    use super::*;

    fn roundtrip<M: Message + PartialEq + std::fmt::Debug>(m: &M) -> Result<(), TestCaseError> {
        let id = Identity::from_secret_bytes(&[9; 32]);
        let bytes = encode(&id, m);
        let (signer, back) = decode::<M>(&bytes, envelope::DEFAULT_MAX_LEN)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(signer, id.id());
        prop_assert_eq!(&back, m);
        Ok(())
    }

    proptest! {
        #[test]
        fn domain_messages_roundtrip(m in domain_message()) { roundtrip(&m)?; }
        #[test]
        fn hellos_roundtrip(m in hello()) { roundtrip(&m)?; }
        #[test]
        fn node_messages_roundtrip(m in node_message()) { roundtrip(&m)?; }
        #[test]
        fn result_batches_roundtrip(m in result_batch()) { roundtrip(&m)?; }
    }

    #[test]
    fn a_result_cannot_pass_for_a_hello() {
        let id = Identity::from_secret_bytes(&[9; 32]);
        let bytes = encode(&id, &ResultBatch { results: vec![] });
        let err = decode::<Hello>(&bytes, envelope::DEFAULT_MAX_LEN).expect_err("wrong context");
        assert_eq!(err.code(), "wrong_context");
    }

    #[test]
    fn parse_checks_the_context_of_an_opened_envelope() {
        let id = Identity::from_secret_bytes(&[9; 32]);
        let bytes = encode(&id, &ResultBatch { results: vec![] });
        let opened = envelope::open_any(&bytes, envelope::DEFAULT_MAX_LEN).expect("valid");
        let err = parse::<NodeMessage>(&opened).expect_err("wrong context");
        assert_eq!(err.code(), "wrong_context");
        assert_eq!(
            parse::<ResultBatch>(&opened).expect("parses"),
            ResultBatch { results: vec![] }
        );
    }

    #[test]
    fn malformed_body_is_typed() {
        let id = Identity::from_secret_bytes(&[9; 32]);
        let bytes = envelope::seal(&id, Context::Node, b"{\"type\":\"heartbeat\"}");
        let err =
            decode::<NodeMessage>(&bytes, envelope::DEFAULT_MAX_LEN).expect_err("missing fields");
        assert_eq!(err.code(), "malformed_body");
        let bytes = envelope::seal(
            &id,
            Context::Node,
            b"{\"type\":\"heartbeat\",\"seq\":1,\"running\":[],\"free_slots\":1,\"extra\":1}",
        );
        assert!(
            decode::<NodeMessage>(&bytes, envelope::DEFAULT_MAX_LEN).is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn inline_outputs_are_base64_and_checked_against_the_report() {
        let out = b"hello\n".to_vec();
        let result = TaskResult {
            lease: 1,
            task: 2,
            report: RunReport {
                status: crate::task::Status::Ok,
                trap: None,
                exit_code: Some(0),
                fuel_used: 5,
                output: crate::content::ContentId::of(&out),
                output_len: out.len() as u64,
                wall_ms: 0,
                detail: None,
            },
            output: Some(Inline(out.clone())),
        };
        let json = serde_json::to_value(&result).expect("json");
        assert_eq!(json["output"], "aGVsbG8K");
        assert_eq!(result.check_inline(), Ok(()));
        let wrong = TaskResult {
            output: Some(Inline(b"hellO\n".to_vec())),
            ..result.clone()
        };
        assert!(
            wrong
                .check_inline()
                .expect_err("other bytes")
                .contains("does not match")
        );
        let short = TaskResult {
            report: RunReport {
                output_len: 3,
                ..result.report.clone()
            },
            ..result.clone()
        };
        assert!(short.check_inline().is_err(), "the length is checked too");
        let big = vec![0u8; MAX_INLINE_OUTPUT + 1];
        let too_big = TaskResult {
            report: RunReport {
                output: crate::content::ContentId::of(&big),
                output_len: big.len() as u64,
                ..result.report.clone()
            },
            output: Some(Inline(big)),
            ..result.clone()
        };
        assert!(
            too_big
                .check_inline()
                .expect_err("too big")
                .contains("at most")
        );
        let bad: Result<TaskResult, _> = serde_json::from_value(serde_json::json!({
            "lease": 1, "task": 2, "report": json["report"], "output": "not base64!"
        }));
        assert!(bad.expect_err("bad base64").to_string().contains("base64"));
        let absent = TaskResult {
            output: None,
            ..result
        };
        assert!(
            serde_json::to_value(&absent)
                .expect("json")
                .get("output")
                .is_none()
        );
    }
}
