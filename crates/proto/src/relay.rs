//! Relay records: how a connection gateway carries many node sessions over one link to its
//! domain (`docs/protocol.md` §5d).
//!
//! A link message is one or more records back to back. Each record (integers little-endian):
//!
//! ```text
//! offset  size  field
//! 0       1     kind: 1 open, 2 frame, 3 close, 4 text
//! 1       4     session: the gateway's number for the node's connection
//! 5       4     n = payload length
//! 9       n     payload: open → the node's address (UTF-8, ≤ 64 bytes);
//!               frame → one WebSocket binary frame, untouched (a signed envelope);
//!               close → a reason (UTF-8, ≤ 256 bytes, may be empty); text → empty
//! ```
//!
//! The gateway never opens, checks or signs envelopes: the node's frames reach the domain
//! with the node's own signatures, and the domain's reach the node with the domain's.

use std::fmt;

/// Bytes before a record's payload.
pub const HEADER_LEN: usize = 9;
/// Longest node address an `open` carries.
pub const MAX_ADDRESS_LEN: usize = 64;
/// Longest reason a `close` carries.
pub const MAX_REASON_LEN: usize = 256;

const OPEN: u8 = 1;
const FRAME: u8 = 2;
const CLOSE: u8 = 3;
const TEXT: u8 = 4;

/// One record, borrowing the link message it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// Gateway → domain: a node connected; its session follows under this number.
    Open {
        /// The gateway's number for the connection, unique among its open ones.
        session: u32,
        /// The node's network address as the gateway saw it (`ip:port`).
        address: &'a str,
    },
    /// Either way: one binary frame of the node's session.
    Frame {
        /// The session.
        session: u32,
        /// The frame, exactly as sent.
        bytes: &'a [u8],
    },
    /// Either way: the session ended (gateway → domain: the node's connection closed;
    /// domain → gateway: close the node's connection). A number is reused only after its
    /// `close` was sent.
    Close {
        /// The session.
        session: u32,
        /// Why, for logs (may be empty).
        reason: &'a str,
    },
    /// Gateway → domain: the node sent a text frame (protocol v1 frames are binary; the
    /// domain refuses it on the session as it would on a direct connection).
    Text {
        /// The session.
        session: u32,
    },
}

impl Record<'_> {
    /// The session the record belongs to.
    pub fn session(&self) -> u32 {
        match *self {
            Record::Open { session, .. }
            | Record::Frame { session, .. }
            | Record::Close { session, .. }
            | Record::Text { session } => session,
        }
    }

    /// The record's length on the wire.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.payload().len()
    }

    /// Never: a record has at least a header. (For `len`'s lint.)
    pub fn is_empty(&self) -> bool {
        false
    }

    fn payload(&self) -> &[u8] {
        match self {
            Record::Open { address, .. } => address.as_bytes(),
            Record::Frame { bytes, .. } => bytes,
            Record::Close { reason, .. } => reason.as_bytes(),
            Record::Text { .. } => &[],
        }
    }

    /// Appends the record to a link message.
    ///
    /// # Panics
    /// On a payload over 4 GiB (a caller bug: frames are bounded long before that).
    pub fn write(&self, out: &mut Vec<u8>) {
        let kind = match self {
            Record::Open { .. } => OPEN,
            Record::Frame { .. } => FRAME,
            Record::Close { .. } => CLOSE,
            Record::Text { .. } => TEXT,
        };
        let payload = self.payload();
        let n = u32::try_from(payload.len()).expect("relay payload over 4 GiB");
        out.reserve(HEADER_LEN + payload.len());
        out.push(kind);
        out.extend_from_slice(&self.session().to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(payload);
    }
}

/// Why a link message was refused. A receiver drops the whole link on any of them: a
/// gateway and its domain are run by the same operator, and a broken record means a broken
/// peer, not a node to argue with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A record's header or payload runs past the message's end.
    #[error("truncated relay record")]
    Truncated,
    /// A kind this implementation does not know.
    #[error("unknown relay record kind {0}")]
    UnknownKind(u8),
    /// A frame longer than the receiver accepts, or an address or reason over its bound.
    #[error("relay {what} of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// Which payload.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// An address or reason that is not UTF-8, or a `text` record with a payload.
    #[error("malformed relay {0}")]
    Malformed(&'static str),
}

/// Reads the records of one link message, in order; a frame longer than `max_frame` is
/// refused. Iteration ends at the first error.
pub fn records(message: &[u8], max_frame: usize) -> Records<'_> {
    Records {
        rest: message,
        max_frame,
        failed: false,
    }
}

/// The iterator of [`records`].
pub struct Records<'a> {
    rest: &'a [u8],
    max_frame: usize,
    failed: bool,
}

impl fmt::Debug for Records<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("left", &self.rest.len())
            .finish()
    }
}

impl<'a> Records<'a> {
    fn read(&mut self) -> Result<Record<'a>, RelayError> {
        let header = self.rest.get(..HEADER_LEN).ok_or(RelayError::Truncated)?;
        let kind = header[0];
        let session = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
        let n = u32::from_le_bytes([header[5], header[6], header[7], header[8]]) as usize;
        let (what, max) = match kind {
            OPEN => ("address", MAX_ADDRESS_LEN),
            FRAME => ("frame", self.max_frame),
            CLOSE => ("reason", MAX_REASON_LEN),
            TEXT => ("text", 0),
            other => return Err(RelayError::UnknownKind(other)),
        };
        if n > max {
            return Err(if kind == TEXT {
                RelayError::Malformed("text record (it carries no payload)")
            } else {
                RelayError::Oversized { what, len: n, max }
            });
        }
        let payload = self
            .rest
            .get(HEADER_LEN..HEADER_LEN + n)
            .ok_or(RelayError::Truncated)?;
        self.rest = &self.rest[HEADER_LEN + n..];
        let text = |what| std::str::from_utf8(payload).map_err(|_| RelayError::Malformed(what));
        Ok(match kind {
            OPEN => Record::Open {
                session,
                address: text("address (not UTF-8)")?,
            },
            FRAME => Record::Frame {
                session,
                bytes: payload,
            },
            CLOSE => Record::Close {
                session,
                reason: text("reason (not UTF-8)")?,
            },
            _ => Record::Text { session },
        })
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, RelayError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let r = self.read();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(records: &[Record<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            r.write(&mut out);
        }
        out
    }

    #[test]
    fn a_message_of_every_kind_reads_back_in_order() {
        let sent = [
            Record::Open {
                session: 7,
                address: "127.0.0.2:40000",
            },
            Record::Frame {
                session: 7,
                bytes: b"SDST...",
            },
            Record::Text { session: 7 },
            Record::Frame {
                session: u32::MAX,
                bytes: &[],
            },
            Record::Close {
                session: 7,
                reason: "node closed",
            },
        ];
        let bytes = message(&sent);
        assert_eq!(bytes.len(), sent.iter().map(Record::len).sum::<usize>());
        let read: Vec<_> = records(&bytes, 1024)
            .collect::<Result<_, _>>()
            .expect("well-formed");
        assert_eq!(read, sent);
        // The layout is the documented one.
        assert_eq!(&bytes[..9], &[1, 7, 0, 0, 0, 15, 0, 0, 0]);
    }

    #[test]
    fn bad_records_are_refused_with_their_reason_and_end_the_message() {
        let frame = |n: usize| {
            message(&[Record::Frame {
                session: 1,
                bytes: &vec![0; n],
            }])
        };
        assert_eq!(
            records(&frame(11), 10).next(),
            Some(Err(RelayError::Oversized {
                what: "frame",
                len: 11,
                max: 10
            }))
        );
        let whole = frame(10);
        for cut in 1..whole.len() {
            let mut it = records(&whole[..cut], 10);
            assert_eq!(it.next(), Some(Err(RelayError::Truncated)), "cut at {cut}");
            assert_eq!(it.next(), None, "nothing after an error");
        }
        let mut unknown = frame(0);
        unknown[0] = 9;
        assert_eq!(
            records(&unknown, 10).next(),
            Some(Err(RelayError::UnknownKind(9)))
        );
        let long = "x".repeat(MAX_ADDRESS_LEN + 1);
        let open = message(&[Record::Open {
            session: 1,
            address: &long,
        }]);
        assert!(matches!(
            records(&open, 10).next(),
            Some(Err(RelayError::Oversized {
                what: "address",
                ..
            }))
        ));
        let mut bad_utf8 = message(&[Record::Close {
            session: 1,
            reason: "ab",
        }]);
        bad_utf8[HEADER_LEN] = 0xff;
        assert!(matches!(
            records(&bad_utf8, 10).next(),
            Some(Err(RelayError::Malformed(_)))
        ));
        let mut text = message(&[Record::Close {
            session: 1,
            reason: "ab",
        }]);
        text[0] = TEXT;
        assert!(matches!(
            records(&text, 10).next(),
            Some(Err(RelayError::Malformed(_)))
        ));
        // A good record before a bad one is still read.
        let mut two = frame(1);
        two.extend_from_slice(&[2, 0]);
        let mut it = records(&two, 10);
        assert!(matches!(it.next(), Some(Ok(Record::Frame { .. }))));
        assert_eq!(it.next(), Some(Err(RelayError::Truncated)));
        assert_eq!(it.next(), None);
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec((any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20)) {
            let sent: Vec<Record<'_>> = frames
                .iter()
                .map(|(s, b)| Record::Frame { session: *s, bytes: b })
                .collect();
            let bytes = message(&sent);
            let read: Vec<_> = records(&bytes, 300).collect::<Result<_, _>>().expect("well-formed");
            prop_assert_eq!(read, sent);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for r in records(&bytes, 64) {
                let _ = r;
            }
        }
    }
}
