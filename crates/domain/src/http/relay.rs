//! Relay links from connection gateways (`/v1/relay`, docs/protocol.md §5d).
//!
//! A gateway holds its nodes' sockets and carries their sessions over one WebSocket here; so a
//! domain serves more nodes than one process may hold sockets. Each relayed session is a
//! node session like any other ([`super::session::run`]): the node's hello answers the
//! domain's own challenge, and every frame is checked against the node's key. The gateway
//! only moves bytes.
//!
//! ```text
//!  gateway ══link══▶ reader (this task) ──records──▶ each session's inbound (bounded)
//!                                                       └──▶ session::run (a task each)
//!          ◀══link══ writer (packs records) ◀──────────── each session's writer
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use stardust_proto::identity::NodeId;
use stardust_proto::message::{self, DomainMessage, GatewayHello, Nonce, encode};
use stardust_proto::relay::{self, Record};
use tokio::sync::mpsc;

use super::ApiError;
use super::session::{FrameRx, FrameTx, Inbound};
use crate::service::{Shared, next_session};

/// Records waiting for the link's writer.
const LINK_QUEUE: usize = 8192;
/// Frames queued for one relayed session; a session that falls this far behind is closed
/// (its node reconnects and re-sends what was not acknowledged).
const SESSION_INBOUND: usize = 64;
/// The writer packs waiting records into one message up to this size.
const PACK_BYTES: usize = 256 << 10;
/// Largest link message beyond the largest frame: the packing and the record headers.
const LINK_SLACK: usize = PACK_BYTES + (64 << 10);
/// How long a gateway has to answer the challenge.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Sessions one link carries at most.
const MAX_SESSIONS_PER_LINK: usize = 1 << 20;

pub(super) async fn connect(
    ws: WebSocketUpgrade,
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
) -> Response {
    if shared.config.gateways.is_empty() {
        shared.rejections.count("relay_not_enabled");
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this domain accepts no gateways (stardust domain --gateway-key)",
        )
        .into_response();
    }
    let max = shared.config.max_frame_bytes + LINK_SLACK;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(64 << 10)
        .write_buffer_size(64 << 10)
        .on_upgrade(move |socket| link(socket, shared, addr))
}

/// What a session (or the reader) hands the link's writer.
enum Out {
    Frame(u32, Vec<u8>),
    Close(u32, &'static str),
}

/// A relayed session's writing half: its frames go out on the link under its number.
struct RelayTx {
    session: u32,
    link: mpsc::Sender<Out>,
}

impl FrameTx for RelayTx {
    async fn send(&mut self, frame: Vec<u8>) -> bool {
        self.link
            .send(Out::Frame(self.session, frame))
            .await
            .is_ok()
    }

    async fn close(&mut self) {
        let _ = self.link.send(Out::Close(self.session, "")).await;
    }

    /// A relayed session's frames share its gateway's link with other nodes' frames: a
    /// submission does not wait on that link, its frames are queued.
    fn writes_at_once(&self) -> bool {
        false
    }
}

/// A relayed session's inbound frames: a bounded queue that takes no memory while empty (a
/// tokio channel keeps a block of 32 slots per session, 1.2 KiB: 120 MiB at 100,000
/// sessions). The link's reader pushes ([`Inbox::push`]); the session reads ([`RelayRx`]).
#[derive(Default)]
struct Inbox {
    state: std::sync::Mutex<InboxState>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct InboxState {
    frames: std::collections::VecDeque<Inbound>,
    /// The link's reader let the session go (its close came, or the link dropped).
    closed: bool,
    /// The session ended.
    gone: bool,
}

/// Why [`Inbox::push`] refused a frame.
enum Refused {
    /// [`SESSION_INBOUND`] frames wait already.
    Full,
    /// The session ended.
    Gone,
}

impl Inbox {
    fn push(&self, frame: Inbound) -> Result<(), Refused> {
        let Ok(mut s) = self.state.lock() else {
            return Err(Refused::Gone);
        };
        if s.gone {
            return Err(Refused::Gone);
        }
        if s.frames.len() >= SESSION_INBOUND {
            return Err(Refused::Full);
        }
        s.frames.push_back(frame);
        drop(s);
        // Stores a permit when the session is not waiting yet: no wake-up is lost.
        self.ready.notify_one();
        Ok(())
    }

    fn gone(&self) -> bool {
        self.state.lock().map_or(true, |s| s.gone)
    }
}

/// The link reader's end of a session's [`Inbox`]; dropping it ends the session's input.
struct InboxTx(Arc<Inbox>);

impl Drop for InboxTx {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.closed = true;
        }
        self.0.ready.notify_one();
    }
}

/// A relayed session's reading half: what the link's reader routed to it.
struct RelayRx(Arc<Inbox>);

impl FrameRx for RelayRx {
    async fn recv(&mut self) -> Inbound {
        loop {
            {
                let Ok(mut s) = self.0.state.lock() else {
                    return Inbound::Closed;
                };
                if let Some(frame) = s.frames.pop_front() {
                    if s.frames.is_empty() && s.frames.capacity() > 8 {
                        s.frames = Default::default();
                    }
                    return frame;
                }
                if s.closed {
                    return Inbound::Closed;
                }
            }
            self.0.ready.notified().await;
        }
    }
}

impl Drop for RelayRx {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.gone = true;
            s.frames.clear();
        }
    }
}

async fn link(socket: WebSocket, shared: Arc<Shared>, addr: SocketAddr) {
    let (mut sink, mut stream) = socket.split();
    let Some(gateway) = handshake(&mut sink, &mut stream, &shared).await else {
        let _ = sink.close().await;
        return;
    };
    tracing::info!(gateway = %gateway.short(), %addr, "gateway connected");
    shared.metrics.gateways.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Out>(LINK_QUEUE);
    // The reader's own records (closes of sessions it refused) never wait for room: a
    // reader blocked on its writer, while the peer's is blocked on it, would stall the
    // link both ways. Each session is closed once, so room for as many closes as a link
    // carries sessions is enough; a gateway that fills it anyway loses its link.
    let (closes, closes_rx) = mpsc::channel::<Out>(MAX_SESSIONS_PER_LINK);
    let writer = tokio::spawn(write_link(sink, rx, closes_rx));
    let mut sessions: HashMap<u32, InboxTx> = HashMap::new();
    let mut shutdown = shared.shutdown.clone();
    let max = shared.config.max_frame_bytes;
    let why = loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break "the domain is stopping".to_string(),
            m = stream.next() => m,
        };
        let bytes = match message {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break "link closed".into(),
            Some(Ok(Message::Text(_))) => break "a text message on the link".into(),
            Some(Ok(_)) => continue,
        };
        if let Err(e) = route(&shared, &tx, &closes, &mut sessions, &bytes, max) {
            shared.rejections.count("bad_relay_record");
            break e;
        }
    };
    tracing::info!(gateway = %gateway.short(), %addr, sessions = sessions.len(), why, "gateway disconnected");
    // Every relayed session's inbound ends: each unregisters and ends; the writer stops
    // once they have (or at the link's first failed send).
    drop(sessions);
    drop(tx);
    drop(closes);
    let _ = writer.await;
    shared.metrics.gateways.fetch_sub(1, Ordering::Relaxed);
}

/// Challenge, the gateway's signed hello, its key checked against the domain's list.
async fn handshake(
    sink: &mut SplitSink<WebSocket, Message>,
    stream: &mut SplitStream<WebSocket>,
    shared: &Shared,
) -> Option<NodeId> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).ok()?;
    let challenge = encode(
        &shared.identity,
        &DomainMessage::Challenge {
            nonce: Nonce(nonce),
            protocol: stardust_proto::PROTOCOL_VERSION,
        },
    );
    sink.send(Message::Binary(challenge.into())).await.ok()?;
    let first = tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await;
    let Ok(Some(Ok(Message::Binary(bytes)))) = first else {
        shared.rejections.count("no_gateway_hello");
        return None;
    };
    let refuse = |code: &str, why: String| {
        shared.rejections.count("bad_gateway_hello");
        let reject = DomainMessage::Reject {
            code: code.to_string(),
            message: why,
        };
        Message::Binary(encode(&shared.identity, &reject).into())
    };
    let answer = match message::decode::<GatewayHello>(&bytes, 64 << 10) {
        Err(e) => Err(refuse(e.code(), e.to_string())),
        Ok((_, hello)) if hello.nonce != Nonce(nonce) => Err(refuse(
            "replay",
            "the hello does not answer this link's challenge".into(),
        )),
        Ok((key, _)) if !shared.config.gateways.contains(&key) => Err(refuse(
            "unknown_gateway",
            format!("this domain does not list gateway {key} (stardust domain --gateway-key)"),
        )),
        Ok((key, _)) => Ok(key),
    };
    match answer {
        Ok(key) => {
            let welcome = DomainMessage::Welcome {
                session: next_session(shared),
                heartbeat_ms: shared.config.heartbeat_ms,
            };
            let frame = encode(&shared.identity, &welcome);
            sink.send(Message::Binary(frame.into())).await.ok()?;
            Some(key)
        }
        Err(reject) => {
            let _ = sink.send(reject).await;
            None
        }
    }
}

/// Routes one link message's records, without waiting for anything. An error ends the link
/// (a broken gateway).
fn route(
    shared: &Arc<Shared>,
    link: &mpsc::Sender<Out>,
    closes: &mpsc::Sender<Out>,
    sessions: &mut HashMap<u32, InboxTx>,
    message: &Bytes,
    max_frame: usize,
) -> Result<(), String> {
    for record in relay::records(message, max_frame) {
        let record = record.map_err(|e| e.to_string())?;
        let session = record.session();
        let inbound = match record {
            Record::Open { address, .. } => {
                if sessions.get(&session).is_some_and(|s| !s.0.gone()) {
                    return Err(format!("session {session} opened while open"));
                }
                let refused = match address.parse::<SocketAddr>() {
                    Err(_) => Some("bad_address"),
                    Ok(a) if !shared.per_addr.allow(&a.ip()) => {
                        shared.rejections.count("rate_limited_address");
                        Some("rate_limited")
                    }
                    Ok(_) if sessions.len() >= MAX_SESSIONS_PER_LINK => Some("link_full"),
                    Ok(a) => {
                        let inbox = Arc::new(Inbox::default());
                        sessions.insert(session, InboxTx(inbox.clone()));
                        let relayed = RelayTx {
                            session,
                            link: link.clone(),
                        };
                        tokio::spawn(super::session::run(
                            relayed,
                            RelayRx(inbox),
                            shared.clone(),
                            a,
                        ));
                        None
                    }
                };
                if let Some(why) = refused {
                    closes
                        .try_send(Out::Close(session, why))
                        .map_err(|_| "too many closes waiting for the link's writer".to_string())?;
                }
                continue;
            }
            Record::Close { .. } => {
                // The session's inbound ends: it unregisters, and its close goes back.
                sessions.remove(&session);
                continue;
            }
            Record::Frame { bytes, .. } => Inbound::Binary(message.slice_ref(bytes)),
            Record::Text { .. } => Inbound::Text,
        };
        // A frame for a session the domain already ended (its close is on its way) is
        // dropped.
        let Some(tx) = sessions.get(&session) else {
            continue;
        };
        match tx.0.push(inbound) {
            Ok(()) => {}
            Err(Refused::Full) => {
                shared.rejections.count("relayed_session_behind");
                tracing::warn!(session, "a relayed session fell behind; closing it");
                sessions.remove(&session);
            }
            Err(Refused::Gone) => {
                sessions.remove(&session);
            }
        }
    }
    Ok(())
}

/// Writes what the sessions send, packing the records waiting into one message.
async fn write_link(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Out>,
    mut closes: mpsc::Receiver<Out>,
) {
    let put = |out: Out, buf: &mut Vec<u8>| match out {
        Out::Frame(session, bytes) => Record::Frame {
            session,
            bytes: &bytes,
        }
        .write(buf),
        Out::Close(session, reason) => Record::Close { session, reason }.write(buf),
    };
    while let Some(buf) = pack(&mut rx, &mut closes, put).await {
        if sink.send(Message::Binary(buf.into())).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

/// The next link message: what waits in `urgent` and `rx` (the first record awaited), up to
/// [`PACK_BYTES`]; `None` once `rx` has closed. Shared with the gateway's writer.
pub(crate) async fn pack<T>(
    rx: &mut mpsc::Receiver<T>,
    urgent: &mut mpsc::Receiver<T>,
    put: impl Fn(T, &mut Vec<u8>),
) -> Option<Vec<u8>> {
    let first = tokio::select! {
        biased;
        Some(r) = urgent.recv() => r,
        r = rx.recv() => r?,
    };
    let mut buf = Vec::with_capacity(4096);
    put(first, &mut buf);
    while buf.len() < PACK_BYTES {
        match urgent.try_recv().or_else(|_| rx.try_recv()) {
            Ok(r) => put(r, &mut buf),
            Err(_) => break,
        }
    }
    Some(buf)
}
