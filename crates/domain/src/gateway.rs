//! A connection gateway (`stardust gateway`): holds nodes' WebSocket connections and carries
//! their sessions to the domain over one relay link (docs/protocol.md §5d).
//!
//! One process may hold only so many sockets (the descriptor limit); a domain behind a few
//! gateways serves more nodes than that. The gateway never opens, checks or signs a frame:
//! each node still answers the domain's own challenge and signs every frame with its key, and
//! the domain's frames reach the node signed by the domain. A gateway is the operator's: the
//! domain accepts links only from the gateway keys it lists (`--gateway-key`).
//!
//! ```text
//!  node ══ws══▶ reader (a task each) ──records──▶ link writer (packs) ══link══▶ domain
//!  node ◀═ws══ writer (a task each) ◀──frames─── link reader      ◀══link══
//! ```
//!
//! Session numbers: each side sends exactly one `close` per session; the gateway reuses a
//! number only once it has both sent and received that session's `close`, so a late record
//! never reaches the next node given the number. When the link drops, every node's
//! connection is closed (the nodes reconnect with backoff, as after a domain restart) and
//! the gateway dials the domain again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use stardust_proto::identity::{Identity, NodeId};
use stardust_proto::message::{self, DomainMessage, GatewayHello, encode};
use stardust_proto::relay::{self, Record};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite;

/// A gateway's settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where nodes connect (`/v1/nodes/connect`). Default `127.0.0.1:7800`.
    pub listen: SocketAddr,
    /// The domain, `http://HOST:PORT` or `https://HOST:PORT`.
    pub domain: String,
    /// Node connections held at most; beyond, a node is refused (503) and retries. Keep it
    /// under the process's descriptor limit. Default 10,000.
    pub max_sessions: usize,
    /// Largest frame either way. Default 16 MiB, the domain's default.
    pub max_frame_bytes: usize,
    /// Frames queued towards one node before its connection is closed as too slow.
    /// Default 1024, the domain's own per-session queue.
    pub session_queue: usize,
    /// TLS for the link to an `https://` domain (roots to trust). Default: the platform's
    /// roots are not loaded; an `https://` domain needs this.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Serve nodes HTTPS/WSS with this certificate chain and private key (PEM files).
    /// Default: plain HTTP.
    pub serve_tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl GatewayConfig {
    /// Defaults, with the domain given.
    pub fn new(domain: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7800)),
            domain: domain.into(),
            max_sessions: 10_000,
            max_frame_bytes: 16 << 20,
            session_queue: 1024,
            tls: None,
            serve_tls: None,
        }
    }
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The domain URL is not `http://` or `https://`.
    #[error("the domain must be http://HOST:PORT or https://HOST:PORT, not {0:?}")]
    DomainUrl(String),
    /// The certificate or key for serving nodes could not be used.
    #[error("TLS: {0}")]
    Tls(String),
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    state: Arc<GwState>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.addr)
            .field("id", &self.id())
            .finish()
    }
}

/// Records waiting for the link's writer.
const LINK_QUEUE: usize = 8192;
/// The writer packs waiting records into one message up to this size.
const PACK_BYTES: usize = 256 << 10;
/// Largest link message beyond the largest frame.
const LINK_SLACK: usize = PACK_BYTES + (64 << 10);
/// First and longest wait before dialing the domain again.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));

/// What goes out on the link.
enum Out {
    Open(u32, String),
    Frame(u32, Bytes),
    Text(u32),
    Close(u32, &'static str),
}

/// A session number in use.
enum Slot {
    /// The node is connected: frames for it go here; dropping `stop` ends its reader.
    Open {
        conn: u64,
        to_node: mpsc::Sender<Bytes>,
        _stop: oneshot::Sender<()>,
    },
    /// The node is gone and its `close` sent; the number waits for the domain's.
    Closing,
}

/// The current link and the sessions on it.
struct Link {
    out: mpsc::Sender<Out>,
    /// The link reader's own closes: never waited for (see `http::relay`'s reader); room
    /// for one per session the gateway may hold, and more.
    closes: mpsc::Sender<Out>,
    slots: HashMap<u32, Slot>,
    next: u32,
}

struct GwState {
    config: GatewayConfig,
    identity: Identity,
    link: Mutex<Option<Link>>,
    conns: AtomicU64,
    /// Node connections open now (slots in `Open`).
    open: AtomicU64,
    /// Frames relayed, node → domain and domain → node.
    up: AtomicU64,
    down: AtomicU64,
    /// Times the link to the domain came up.
    links: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

impl Gateway {
    /// Binds the listener and starts dialing the domain; nodes are refused (503) until the
    /// link is up.
    pub async fn start(config: GatewayConfig, identity: Identity) -> Result<Self, GatewayError> {
        if !(config.domain.starts_with("http://") || config.domain.starts_with("https://")) {
            return Err(GatewayError::DomainUrl(config.domain));
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| GatewayError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| GatewayError::Listen {
                addr: config.listen,
                source,
            })?;
        let (stop, shutdown) = watch::channel(false);
        let state = Arc::new(GwState {
            config,
            identity,
            link: Mutex::new(None),
            conns: AtomicU64::new(0),
            open: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            links: AtomicU64::new(0),
            shutdown: shutdown.clone(),
        });
        let router = Router::new()
            .route("/v1/nodes/connect", get(connect))
            .route("/v1/health", get(health))
            .route("/metrics", get(metrics))
            .with_state(state.clone());
        let mut server_stop = shutdown.clone();
        let stopped = async move {
            let _ = server_stop.wait_for(|s| *s).await;
        };
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        let server = match &state.config.serve_tls {
            None => tokio::spawn(async move {
                use axum::serve::ListenerExt;
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                if let Err(e) = axum::serve(listener, service)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    tracing::error!(error = %e, "gateway HTTP server failed");
                }
            }),
            Some((cert, key)) => {
                let tls = crate::tls::server_config(cert, key).map_err(GatewayError::Tls)?;
                use axum::serve::ListenerExt;
                // (`tap_io` gives the listener the connection info the service asks for.)
                let listener = crate::tls::TlsListener::new(listener, tls)
                    .map_err(|source| GatewayError::Listen { addr, source })?
                    .tap_io(|_| {});
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, service)
                        .with_graceful_shutdown(stopped)
                        .await
                    {
                        tracing::error!(error = %e, "gateway HTTPS server failed");
                    }
                })
            }
        };
        let dialer = tokio::spawn(dial_loop(state.clone()));
        tracing::info!(%addr, gateway = %state.identity.id(), domain = %state.config.domain, "gateway listening");
        Ok(Self {
            addr,
            stop,
            tasks: vec![server, dialer],
            state,
        })
    }

    /// The address nodes connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gateway's key (list it on the domain with `--gateway-key`).
    pub fn id(&self) -> NodeId {
        self.state.identity.id()
    }

    /// Node connections open now.
    pub fn sessions(&self) -> u64 {
        self.state.open.load(Ordering::Relaxed)
    }

    /// Whether the link to the domain is up.
    pub async fn linked(&self) -> bool {
        self.state.link.lock().await.is_some()
    }

    /// Closes every node connection and the link, and waits for the workers.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        *self.state.link.lock().await = None;
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn health(axum::extract::State(state): axum::extract::State<Arc<GwState>>) -> Response {
    let linked = state.link.lock().await.is_some();
    let body = axum::Json(serde_json::json!({
        "ok": linked,
        "gateway": state.identity.id().to_string(),
        "sessions": state.open.load(Ordering::Relaxed),
    }));
    if linked {
        body.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

/// Prometheus text: sessions, the link, frames relayed.
async fn metrics(axum::extract::State(state): axum::extract::State<Arc<GwState>>) -> Response {
    let linked = u8::from(state.link.lock().await.is_some());
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let text = format!(
        "# HELP stardust_gateway_sessions Node connections relayed now.\n# TYPE stardust_gateway_sessions gauge\nstardust_gateway_sessions {}\n\
         # HELP stardust_gateway_linked Whether the link to the domain is up.\n# TYPE stardust_gateway_linked gauge\nstardust_gateway_linked {linked}\n\
         # HELP stardust_gateway_links_total Times the link to the domain came up.\n# TYPE stardust_gateway_links_total counter\nstardust_gateway_links_total {}\n\
         # HELP stardust_gateway_frames_total Frames relayed, by direction.\n# TYPE stardust_gateway_frames_total counter\n\
         stardust_gateway_frames_total{{direction=\"to_domain\"}} {}\nstardust_gateway_frames_total{{direction=\"to_node\"}} {}\n",
        load(&state.open),
        load(&state.links),
        load(&state.up),
        load(&state.down),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn link_url(domain: &str) -> String {
    let domain = domain.trim_end_matches('/');
    match domain.strip_prefix("https://") {
        Some(rest) => format!("wss://{rest}/v1/relay"),
        None => format!("ws://{}/v1/relay", domain.trim_start_matches("http://")),
    }
}

/// Dials the domain, runs the link until it drops, and dials again with backoff.
async fn dial_loop(state: Arc<GwState>) {
    let mut shutdown = state.shutdown.clone();
    let mut wait = BACKOFF.0;
    loop {
        let ran = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            r = run_link(&state) => r,
        };
        match ran {
            Ok(()) => wait = BACKOFF.0,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "gateway link to the domain failed")
            }
        }
        // Every node on the dropped link is let go: their writers end, their readers stop.
        *state.link.lock().await = None;
        state.open.store(0, Ordering::Relaxed);
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(BACKOFF.1);
    }
}

type DomainWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One link: handshake, then route the domain's records until it drops. `Ok` when it
/// was up and then closed.
async fn run_link(state: &Arc<GwState>) -> Result<(), String> {
    let max = state.config.max_frame_bytes + LINK_SLACK;
    let ws_config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(64 << 10)
        .write_buffer_size(64 << 10);
    let connector = state
        .config
        .tls
        .clone()
        .map(tokio_tungstenite::Connector::Rustls);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_tls_with_config(
            link_url(&state.config.domain),
            Some(ws_config),
            true,
            connector,
        ),
    )
    .await
    .map_err(|_| "connecting timed out".to_string())?
    .map_err(|e| format!("websocket: {e}"))?;
    let domain = handshake(&mut ws, &state.identity).await?;
    tracing::info!(domain = %domain.short(), "gateway linked to the domain");
    state.links.fetch_add(1, Ordering::Relaxed);
    let (sink, mut stream) = ws.split();
    let (out, rx) = mpsc::channel(LINK_QUEUE);
    let (closes, closes_rx) = mpsc::channel(state.config.max_sessions + 1024);
    *state.link.lock().await = Some(Link {
        out,
        closes,
        slots: HashMap::new(),
        next: 0,
    });
    let mut writer = tokio::spawn(write_link(sink, rx, closes_rx));
    let max_frame = state.config.max_frame_bytes;
    let result = loop {
        let message = tokio::select! {
            m = stream.next() => m,
            _ = &mut writer => break Err("the link's writer stopped".to_string()),
        };
        let bytes = match message {
            Some(Ok(tungstenite::Message::Binary(b))) => b,
            Some(Ok(tungstenite::Message::Close(_))) | None => break Ok(()),
            Some(Err(e)) => break Err(format!("websocket: {e}")),
            Some(Ok(tungstenite::Message::Text(_))) => {
                break Err("a text message on the link".into());
            }
            Some(Ok(_)) => continue,
        };
        if let Err(e) = route(state, &bytes, max_frame).await {
            break Err(e);
        }
    };
    writer.abort();
    result
}

/// Answers the domain's challenge with the gateway's signed hello.
async fn handshake(ws: &mut DomainWs, identity: &Identity) -> Result<NodeId, String> {
    async fn next(ws: &mut DomainWs) -> Result<(NodeId, DomainMessage), String> {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(tungstenite::Message::Binary(b)))) => {
                    return message::decode::<DomainMessage>(&b, 64 << 10)
                        .map_err(|e| format!("bad frame from the domain: {e}"));
                }
                Ok(Some(Ok(tungstenite::Message::Close(_)))) | Ok(None) => {
                    return Err("the domain closed the link".into());
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Err(format!("websocket: {e}")),
                Err(_) => return Err("the domain went silent".into()),
            }
        }
    }
    let (domain, challenge) = next(ws).await?;
    let DomainMessage::Challenge { nonce, .. } = challenge else {
        return Err("the domain did not open with a challenge".into());
    };
    let hello = GatewayHello {
        nonce,
        agent: format!("stardust-gateway/{}", env!("CARGO_PKG_VERSION")),
    };
    ws.send(tungstenite::Message::Binary(
        encode(identity, &hello).into(),
    ))
    .await
    .map_err(|e| format!("websocket: {e}"))?;
    match next(ws).await? {
        (signer, DomainMessage::Welcome { .. }) if signer == domain => Ok(domain),
        (_, DomainMessage::Reject { code, message }) => Err(format!(
            "the domain refused this gateway ({code}): {message}"
        )),
        _ => Err("unexpected answer to the gateway's hello".into()),
    }
}

/// Routes one message of the domain's records to the nodes, without waiting for the link's
/// writer.
async fn route(state: &Arc<GwState>, message: &Bytes, max_frame: usize) -> Result<(), String> {
    let mut guard = state.link.lock().await;
    let Some(link) = guard.as_mut() else {
        return Err("the link was dropped".into());
    };
    for record in relay::records(message, max_frame) {
        match record.map_err(|e| e.to_string())? {
            Record::Frame { session, bytes } => {
                let Some(Slot::Open { to_node, .. }) = link.slots.get(&session) else {
                    // The node is gone; its close is on its way.
                    continue;
                };
                state.down.fetch_add(1, Ordering::Relaxed);
                if to_node.try_send(message.slice_ref(bytes)).is_err() {
                    // Full: the node does not read. Let it go (it reconnects and re-sends).
                    tracing::warn!(session, "a node fell behind; closing its connection");
                    if node_gone(link, state, session, None) {
                        link.closes
                            .try_send(Out::Close(session, "node behind"))
                            .map_err(|_| "too many closes waiting for the link's writer")?;
                    }
                }
            }
            Record::Close { session, .. } => match link.slots.remove(&session) {
                Some(Slot::Open { .. }) => {
                    // The domain ended it: answer with our close; the number is free.
                    state.open.fetch_sub(1, Ordering::Relaxed);
                    link.closes
                        .try_send(Out::Close(session, ""))
                        .map_err(|_| "too many closes waiting for the link's writer")?;
                }
                Some(Slot::Closing) | None => {}
            },
            Record::Open { .. } | Record::Text { .. } => {
                return Err("the domain sent a gateway's record".into());
            }
        }
    }
    Ok(())
}

/// The node of `session` is gone (its socket closed, or it stopped reading): keep the
/// number until the domain's close comes back. True when the caller must send the session's
/// close. `conn` names the connection when the caller is the node's own reader (a number may
/// have moved on).
fn node_gone(link: &mut Link, state: &GwState, session: u32, conn: Option<u64>) -> bool {
    let mine = match link.slots.get(&session) {
        Some(Slot::Open { conn: c, .. }) => conn.is_none_or(|conn| conn == *c),
        _ => false,
    };
    if mine {
        link.slots.insert(session, Slot::Closing);
        state.open.fetch_sub(1, Ordering::Relaxed);
    }
    mine
}

/// Packs waiting records into messages and writes them.
async fn write_link(
    mut sink: futures_util::stream::SplitSink<DomainWs, tungstenite::Message>,
    mut rx: mpsc::Receiver<Out>,
    mut closes: mpsc::Receiver<Out>,
) {
    let put = |out: Out, buf: &mut Vec<u8>| match out {
        Out::Open(session, address) => Record::Open {
            session,
            address: &address,
        }
        .write(buf),
        Out::Frame(session, bytes) => Record::Frame {
            session,
            bytes: &bytes,
        }
        .write(buf),
        Out::Text(session) => Record::Text { session }.write(buf),
        Out::Close(session, reason) => Record::Close { session, reason }.write(buf),
    };
    while let Some(buf) = crate::http::relay::pack(&mut rx, &mut closes, put).await {
        if sink
            .send(tungstenite::Message::Binary(buf.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = sink.close().await;
}

async fn connect(
    ws: WebSocketUpgrade,
    axum::extract::State(state): axum::extract::State<Arc<GwState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
) -> Response {
    let max = state.config.max_frame_bytes;
    let room = state
        .link
        .lock()
        .await
        .as_ref()
        .is_some_and(|l| l.slots.len() < state.config.max_sessions);
    if !room || *state.shutdown.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is full or not linked to its domain; retry later",
        )
            .into_response();
    }
    // A gateway holds nothing per node but its socket, and most frames are heartbeats
    // and acks of a few hundred bytes: a 4 KiB read buffer (tungstenite allocates it whole
    // for each connection; a larger frame is read in more steps). The session is opened
    // once the upgrade is done, so a node that goes before holds nothing.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(4 << 10)
        .write_buffer_size(8 << 10)
        .on_upgrade(move |socket| async move {
            match open(&state, addr).await {
                Some((session, conn, out, from_domain, stop)) => {
                    relay_node(socket, state, session, conn, out, from_domain, stop).await;
                }
                // The link dropped or filled since the check: the node retries.
                None => drop(socket),
            }
        })
}

/// Takes a session number on the current link and sends its `open`.
async fn open(
    state: &Arc<GwState>,
    addr: SocketAddr,
) -> Option<(
    u32,
    u64,
    mpsc::Sender<Out>,
    mpsc::Receiver<Bytes>,
    oneshot::Receiver<()>,
)> {
    if *state.shutdown.borrow() {
        return None;
    }
    let mut guard = state.link.lock().await;
    let link = guard.as_mut()?;
    if link.slots.len() >= state.config.max_sessions {
        return None;
    }
    let mut session = link.next;
    while link.slots.contains_key(&session) {
        session = session.wrapping_add(1);
    }
    link.next = session.wrapping_add(1);
    let conn = state.conns.fetch_add(1, Ordering::Relaxed);
    let (to_node, from_domain) = mpsc::channel(state.config.session_queue);
    let (stop_tx, stop) = oneshot::channel();
    link.out
        .try_send(Out::Open(session, addr.to_string()))
        .ok()?;
    link.slots.insert(
        session,
        Slot::Open {
            conn,
            to_node,
            _stop: stop_tx,
        },
    );
    state.open.fetch_add(1, Ordering::Relaxed);
    Some((session, conn, link.out.clone(), from_domain, stop))
}

/// Moves one node's frames to the link and the domain's to the node.
async fn relay_node(
    socket: WebSocket,
    state: Arc<GwState>,
    session: u32,
    conn: u64,
    out: mpsc::Sender<Out>,
    mut from_domain: mpsc::Receiver<Bytes>,
    mut stop: oneshot::Receiver<()>,
) {
    let (mut sink, mut stream) = socket.split();
    let writer = tokio::spawn(async move {
        while let Some(frame) = from_domain.recv().await {
            if sink.send(Message::Binary(frame)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stop => break,
            f = stream.next() => f,
        };
        let sent = match frame {
            Some(Ok(Message::Binary(b))) => {
                state.up.fetch_add(1, Ordering::Relaxed);
                out.send(Out::Frame(session, b)).await
            }
            Some(Ok(Message::Text(_))) => out.send(Out::Text(session)).await,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        if sent.is_err() {
            break;
        }
    }
    drop(stream);
    // Only if this link is the one the session was opened on. The close goes after the
    // node's last frames, in order, and is waited for outside the lock.
    let close = state.link.lock().await.as_mut().is_some_and(|link| {
        link.out.same_channel(&out) && node_gone(link, &state, session, Some(conn))
    });
    if close {
        let _ = out.send(Out::Close(session, "")).await;
    }
    let _ = writer.await;
}
