//! A node's session: its own WebSocket (`/v1/nodes/connect`), or one of the sessions a
//! connection gateway relays (`super::relay`). The session is the same over either
//! ([`Inbound`], [`FrameTx`]).
//!
//! ```text
//!  reader loop (this task)                       writer task
//!   frames ──open/verify──▶ heartbeat / results ──▶ outbox (bounded) ──▶ socket or relay
//!                          dispatcher, expiry ────▶ outbox
//! ```
//!
//! Every frame is a signed envelope (docs/protocol.md §5). A bad frame is answered with a
//! `reject`, counted, and otherwise ignored: it never disturbs the session or anyone else.
//! A session that sends too many bad frames is closed.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use stardust_proto::envelope::{self, Context};
use stardust_proto::identity::{NodeId, Verifier};
use stardust_proto::message::{
    self, Assignment, DecodeError, DomainMessage, Hello, NodeMessage, Nonce, ResultBatch, encode,
};
use stardust_proto::task::{LeaseId, RunReport};

use crate::outbox::{Link, Outbox, Queue};
use crate::service::{Session, Shared, next_session, now_ms};

/// Bad frames tolerated per session before it is closed.
const MAX_BAD_FRAMES: u32 = 64;
/// How long a node has to answer the challenge.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most slots a node may declare.
const MAX_SLOTS: u32 = 1024;

pub(super) async fn connect(
    ws: WebSocketUpgrade,
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
) -> Response {
    let max = shared.config.max_frame_bytes;
    // Small buffers: most frames are heartbeats and acks, and a domain holds many sessions
    // (the 128 KiB defaults cost ~140 KiB of memory per connected node).
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(8 << 10)
        .write_buffer_size(8 << 10)
        .on_upgrade(move |socket| async move {
            let (sink, stream) = socket.split();
            run(WsTx(sink), WsRx(stream), shared, addr).await;
        })
}

/// What a session reads from its node.
pub(crate) enum Inbound {
    /// A binary frame: one envelope.
    Binary(Bytes),
    /// A text frame (refused: protocol v1 frames are binary).
    Text,
    /// The node is gone.
    Closed,
}

/// The reading half of a session's link.
pub(crate) trait FrameRx: Send + 'static {
    /// The next frame; [`Inbound::Closed`] once, and forever after, when the node is gone.
    fn recv(&mut self) -> impl Future<Output = Inbound> + Send;
}

/// The writing half of a session's link.
pub(crate) trait FrameTx: Send + 'static {
    /// Sends one frame; false when the link is gone.
    fn send(&mut self, frame: Vec<u8>) -> impl Future<Output = bool> + Send;
    /// Ends the session towards the node (called once, last).
    fn close(&mut self) -> impl Future<Output = ()> + Send;

    /// Whether a frame on a request's path may be written at once by its sender
    /// ([`crate::outbox::Outbox::write_now`]): a link of the session's own, whose write
    /// does not wait on other nodes' frames.
    fn writes_at_once(&self) -> bool {
        true
    }
}

struct WsRx(SplitStream<WebSocket>);
struct WsTx(SplitSink<WebSocket, Message>);

impl FrameRx for WsRx {
    async fn recv(&mut self) -> Inbound {
        loop {
            return match self.0.next().await {
                Some(Ok(Message::Binary(b))) => Inbound::Binary(b),
                Some(Ok(Message::Text(_))) => Inbound::Text,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Inbound::Closed,
                Some(Ok(_)) => continue,
            };
        }
    }
}

impl FrameTx for WsTx {
    async fn send(&mut self, frame: Vec<u8>) -> bool {
        self.0.send(Message::Binary(frame.into())).await.is_ok()
    }

    async fn close(&mut self) {
        let _ = self.0.close().await;
    }
}

fn reject(code: &str, message: impl Into<String>) -> DomainMessage {
    DomainMessage::Reject {
        code: code.to_string(),
        message: message.into(),
    }
}

/// Runs one node session to its end, then closes its link.
pub(crate) async fn run(
    sink: impl FrameTx,
    mut stream: impl FrameRx,
    shared: Arc<Shared>,
    addr: SocketAddr,
) {
    let at_once = sink.writes_at_once();
    let link = Link::new(sink);
    // Boxed, here and for each frame below: a session spends its life waiting for its next
    // frame, and the future it waits in should not carry room for the handshake's or a
    // frame's locals (at 100,000 sessions, each KiB is 100 MiB).
    let Some(open) = Box::pin(handshake(&link, at_once, &mut stream, &shared, addr)).await else {
        // Nothing more is read: the link's reading half goes before its close is sent
        // (a relay may reuse the session's number once it has the close).
        drop(stream);
        link.lock().await.close().await;
        return;
    };
    serve(link, stream, shared, open).await;
}

/// A session past its hello.
struct Open {
    node: NodeId,
    session_id: u64,
    outbox: Outbox,
    queue: Queue,
}

/// Challenge, hello, the node's row and resumed leases, the session registered and welcomed.
async fn handshake<S: FrameTx>(
    link: &Arc<tokio::sync::Mutex<Link<S>>>,
    at_once: bool,
    stream: &mut impl FrameRx,
    shared: &Arc<Shared>,
    addr: SocketAddr,
) -> Option<Open> {
    let mut nonce = [0u8; 32];
    if getrandom::fill(&mut nonce).is_err() {
        tracing::error!("no randomness for the session challenge");
        return None;
    }
    let challenge = encode(
        &shared.identity,
        &DomainMessage::Challenge {
            nonce: Nonce(nonce),
            protocol: stardust_proto::PROTOCOL_VERSION,
        },
    );
    if !link.lock().await.send(challenge).await {
        return None;
    }
    let max = shared.config.max_frame_bytes;
    let challenged = std::time::Instant::now();
    let first = tokio::time::timeout(HELLO_TIMEOUT, stream.recv()).await;
    let latency_ms = challenged.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
    let Ok(Inbound::Binary(bytes)) = first else {
        shared.rejections.count("no_hello");
        return None;
    };
    let (node, hello) = match message::decode::<Hello>(&bytes, max) {
        Ok(v) => v,
        Err(e) => {
            shared.rejections.count("bad_hello");
            let frame = encode(&shared.identity, &reject(e.code(), e.to_string()));
            link.lock().await.send(frame).await;
            return None;
        }
    };
    if hello.nonce != Nonce(nonce) {
        shared.rejections.count("replayed_hello");
        let frame = encode(
            &shared.identity,
            &reject(
                "replay",
                "the hello does not answer this connection's challenge",
            ),
        );
        link.lock().await.send(frame).await;
        return None;
    }
    if hello.slots == 0 || hello.slots > MAX_SLOTS {
        let frame = encode(
            &shared.identity,
            &reject("bad_hello", format!("slots must be 1..={MAX_SLOTS}")),
        );
        link.lock().await.send(frame).await;
        return None;
    }
    let now = now_ms();
    if let Err(e) = shared
        .store
        .upsert_node(node, &hello.hardware, hello.tier, hello.slots, now)
        .await
    {
        tracing::error!(error = %e, "cannot record node");
        return None;
    }

    let record = match shared.store.node(node).await {
        Ok(Some(n)) => n.record,
        _ => Default::default(),
    };
    let (outbox, queue) = Outbox::new(shared.config.session_queue, at_once.then(|| link.clone()));
    let session_id = next_session(shared);
    let resumed = match shared.store.active_leases(node).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot load the node's leases");
            return None;
        }
    };
    {
        let mut sessions = shared.sessions.lock().await;
        let running = resumed.iter().map(|l| (l.lease, now)).collect();
        // A reconnect replaces the old session; its writer ends when its outbox drops.
        sessions.insert(
            node,
            Session {
                id: session_id,
                node,
                hardware: hello.hardware.clone(),
                record,
                stake_slots: None,
                latency_ms,
                tier: hello.tier,
                slots: hello.slots,
                queue: hello.queue_bound(),
                capacity: hello.slots.saturating_mul(shared.config.lease_ahead.max(1)),
                pace: crate::service::Pace::default(),
                paused: false,
                draining: false,
                running,
                outbox: outbox.clone(),
            },
        );
    }
    tracing::info!(node = %node.short(), %addr, slots = hello.slots, agent = %hello.agent, session = session_id, "node connected");
    let welcome = encode(
        &shared.identity,
        &DomainMessage::Welcome {
            session: session_id,
            heartbeat_ms: shared.config.heartbeat_ms,
        },
    );
    let _ = outbox.try_send(welcome);
    if !resumed.is_empty() {
        let tasks = resumed
            .into_iter()
            .map(|l| Assignment {
                lease: l.lease,
                spec: l.spec,
                lease_ms: shared.config.lease_ms as u64,
            })
            .collect();
        let _ = outbox.try_send(encode(&shared.identity, &DomainMessage::Assign { tasks }));
    }
    shared.wake.notify_one();
    Some(Open {
        node,
        session_id,
        outbox,
        queue,
    })
}

/// Reads the session's frames until the node goes, the domain stops, or the node sent too
/// many bad frames; then unregisters it and closes the link.
async fn serve<S: FrameTx>(
    link: Arc<tokio::sync::Mutex<Link<S>>>,
    mut stream: impl FrameRx,
    shared: Arc<Shared>,
    open: Open,
) {
    let Open {
        node,
        session_id,
        outbox,
        queue,
    } = open;
    let writer = tokio::spawn(queue.write(link.clone()));
    let mut bad = 0u32;
    // The node's key, decoded once for every frame of the session (its hello verified it).
    let verifier = Verifier::new(node).ok();
    let mut shutdown = shared.shutdown.clone();
    let frames = crate::ratelimit::Limiter::new(shared.config.rate_per_session, 1);
    loop {
        let frame = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => {
                let _ = outbox.try_send(encode(&shared.identity, &DomainMessage::Drain));
                break;
            }
            f = stream.recv() => f,
        };
        let bytes = match frame {
            Inbound::Binary(b) => b,
            Inbound::Text => {
                bad += 1;
                shared.rejections.count("text_frame");
                let _ = outbox.try_send(encode(
                    &shared.identity,
                    &reject("text_frame", "protocol v1 frames are binary envelopes"),
                ));
                if bad > MAX_BAD_FRAMES {
                    break;
                }
                continue;
            }
            Inbound::Closed => break,
        };
        if !frames.allow(&()) {
            shared.rejections.count("rate_limited_session");
            let _ = outbox.try_send(encode(
                &shared.identity,
                &reject("rate_limited", "too many frames; slow down"),
            ));
            continue;
        }
        if let Err((code, msg)) = Box::pin(handle_frame(
            &shared,
            node,
            verifier.as_ref(),
            &bytes,
            &outbox,
        ))
        .await
        {
            bad += 1;
            shared.rejections.count(code);
            tracing::debug!(node = %node.short(), code, msg, "refused a frame");
            let _ = outbox.try_send(encode(&shared.identity, &reject(code, msg)));
            if bad > MAX_BAD_FRAMES {
                tracing::warn!(node = %node.short(), "too many bad frames; closing the session");
                break;
            }
        }
    }
    {
        let mut sessions = shared.sessions.lock().await;
        if sessions.get(&node).is_some_and(|s| s.id == session_id) {
            sessions.remove(&node);
        }
    }
    // Nothing more is read: the link's reading half goes before its close is sent (a relay
    // may reuse the session's number once it has the close).
    drop(stream);
    drop(outbox);
    let _ = writer.await;
    link.lock().await.close().await;
    tracing::info!(node = %node.short(), session = session_id, "node disconnected");
}

type FrameResult = Result<(), (&'static str, String)>;

fn decode_err(e: DecodeError) -> (&'static str, String) {
    (e.code(), e.to_string())
}

async fn handle_frame(
    shared: &Shared,
    node: NodeId,
    verifier: Option<&Verifier>,
    bytes: &[u8],
    outbox: &Outbox,
) -> FrameResult {
    let opened = envelope::open_any_known(bytes, shared.config.max_frame_bytes, verifier)
        .map_err(|e| decode_err(e.into()))?;
    if opened.signer != node {
        return Err((
            "wrong_signer",
            "frames must be signed by the session's node key".into(),
        ));
    }
    match opened.context {
        Context::Node => {
            // The envelope was verified above: parse its body only.
            let msg = message::parse::<NodeMessage>(&opened).map_err(decode_err)?;
            match msg {
                NodeMessage::Heartbeat {
                    running,
                    free_slots,
                    ..
                } => heartbeat(shared, node, &running, free_slots).await,
                NodeMessage::Draining => {
                    if let Some(s) = shared.sessions.lock().await.get_mut(&node) {
                        s.draining = true;
                    }
                    Ok(())
                }
                _ => Err(("unexpected", "unknown node message".into())),
            }
        }
        Context::Result => {
            let batch = message::parse::<ResultBatch>(&opened).map_err(decode_err)?;
            results(shared, node, bytes, batch, outbox).await
        }
        other => Err((
            "wrong_context",
            format!("{other} is not accepted on a node session"),
        )),
    }
}

async fn heartbeat(
    shared: &Shared,
    node: NodeId,
    running: &[LeaseId],
    free_slots: u32,
) -> FrameResult {
    let now = now_ms();
    let started = std::time::Instant::now();
    let internal = || ("internal", "internal error".to_string());
    let (reply, answer) = tokio::sync::oneshot::channel();
    let beat = crate::service::Beat {
        node,
        leases: running.to_vec(),
        reply,
    };
    shared.beats.send(beat).await.map_err(|_| internal())?;
    let renewed = answer
        .await
        .map_err(|_| internal())?
        .map_err(|()| internal())?;
    shared
        .metrics
        .heartbeat_latency
        .observe(started.elapsed().as_secs_f64());
    let renewed: HashSet<LeaseId> = renewed.into_iter().collect();
    let recent = now - 2 * shared.config.heartbeat_ms as i64;
    let mut wake = false;
    if let Some(s) = shared.sessions.lock().await.get_mut(&node) {
        let free_before = s.free();
        s.pace.record(0, now);
        // Keep what the node renewed, and what was assigned too recently to be in its list.
        s.running
            .retain(|lease, assigned| renewed.contains(lease) || *assigned > recent);
        s.paused = free_slots == 0 && (s.running.len() as u32) < s.slots;
        // Wake the dispatcher only when this heartbeat freed capacity: a round looks at
        // every session, and an idle node's heartbeat must not cost one (at 5,000 nodes
        // that was the domain's largest cost while idle).
        wake = s.free() > free_before;
    }
    if wake {
        shared.wake.notify_one();
    }
    Ok(())
}

/// Checks a result frame's outputs and files it with the recorder, which answers the node
/// (`ack`, and `reject` for refused results) once it is durable. The session reads on
/// meanwhile, so frames that arrive during a write are recorded together.
async fn results(
    shared: &Shared,
    node: NodeId,
    envelope: &[u8],
    batch: ResultBatch,
    outbox: &Outbox,
) -> FrameResult {
    let mut refused = Vec::new();
    let mut checked = Vec::with_capacity(batch.results.len());
    for r in batch.results {
        let fine = match &r.output {
            Some(_) => r.check_inline(),
            None => check_output(shared, &r.report).await,
        };
        match fine {
            Ok(()) => checked.push(r),
            Err(why) => refused.push((r.lease, why)),
        }
    }
    let filed = crate::recorder::Filed {
        node,
        envelope: envelope.to_vec(),
        results: checked,
        refused,
        outbox: outbox.clone(),
    };
    if filed.results.is_empty() {
        let mut acks = crate::recorder::Acks::new();
        crate::recorder::answer(shared, filed, Vec::new(), &mut acks).await;
        crate::recorder::send_acks(shared, acks);
        return Ok(());
    }
    shared
        .filed
        .send(filed)
        .await
        .map_err(|_| ("internal", "internal error".to_string()))
}

/// A result must name output bytes the node uploaded first.
async fn check_output(shared: &Shared, report: &RunReport) -> Result<(), String> {
    match shared.store.has_blob(report.output).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "output {} was not uploaded before the result",
            report.output
        )),
        Err(e) => {
            tracing::error!(error = %e, "checking an output blob failed");
            Err("internal error".into())
        }
    }
}
