//! The Stardust provider node: connects to a domain, takes leased tasks, runs them in the
//! sandbox, signs and sends the results.
//!
//! ```text
//!            ┌──────────── session (one WebSocket at a time, reconnects with backoff) ───────────┐
//!  domain ◀──┤ hello · heartbeat(running, free slots) · results(unacked, resent after reconnect) │
//!            └───▲──────────────────────────────────────────────┬──────────────────────────────┘
//!                │ results                          assignments │
//!          ┌─────┴──────┐                                ┌───────▼──────┐
//!          │  unacked   │◀──── workers (`slots` tasks) ◀──│ queue        │
//!          └────────────┘   fetch blobs · sandbox · upload └──────────────┘
//! ```
//!
//! Nothing is lost: a result stays in `unacked` until the domain acknowledges it, across
//! reconnects; a task the node never finishes comes back to the domain when its lease expires.
//! On shutdown the node drains: it tells the domain, takes no new work, finishes what it
//! holds, waits for the acknowledgements, and exits.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cache;
pub mod policy;
pub mod probe;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use stardust_proto::content::ContentId;
use stardust_proto::identity::{Identity, NodeId, Verifier};
use stardust_proto::message::{
    self, Assignment, DomainMessage, Hello, Inline, MAX_INLINE_OUTPUT, NodeMessage, ResultBatch,
    TaskResult, encode,
};
use stardust_proto::task::{Hardware, LeaseId};
use stardust_sandbox::{Sandbox, Task};
use tokio::sync::{Mutex, Notify, watch};
use tokio_tungstenite::tungstenite::Message;

/// [`Config::cache_bytes`] by default: 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

/// [`Config::cache_bytes`] at least: 16 MiB (a module and its compiled form must fit).
pub const MIN_CACHE_BYTES: u64 = 16 << 20;

/// Node settings. Defaults are listed per field.
#[derive(Debug, Clone)]
pub struct Config {
    /// The domain, `http://HOST:PORT`.
    pub domain: String,
    /// A connection gateway of the domain (`http://HOST:PORT`) to hold the session through,
    /// instead of the domain itself; blobs still come from the domain. Default none.
    pub gateway: Option<String>,
    /// Data directory: the node key, the pinned domain key, cached blobs and compiled
    /// modules.
    pub data_dir: PathBuf,
    /// Tasks run at once. Default: the number of cores.
    pub slots: u32,
    /// CPU limit as a duty cycle in (0, 1]; 1 means none. Default 1.
    pub cpu_limit: f64,
    /// Take work only while other processes' load is at or below `idle_threshold`.
    pub when_idle: bool,
    /// Foreign load above which work pauses. Default 0.25 (BOINC's).
    pub idle_threshold: f64,
    /// Labels offered to tasks' requirements.
    pub labels: Vec<String>,
    /// Run the reference benchmark at start. Default true.
    pub bench: bool,
    /// How long a drain may wait for running tasks and acknowledgements. Default 120 s.
    pub drain_timeout: Duration,
    /// Extra CA certificates (PEM) to trust for an `https` domain.
    pub ca_pem: Option<Vec<u8>>,
    /// Bytes of disk the caches of fetched blobs and compiled modules may use; the least
    /// recently used go first. Default 1 GiB.
    pub cache_bytes: u64,
}

impl Config {
    /// Defaults for `domain` and `data_dir`.
    pub fn new(domain: String, data_dir: PathBuf) -> Self {
        Self {
            domain,
            gateway: None,
            data_dir,
            slots: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            cpu_limit: 1.0,
            when_idle: false,
            idle_threshold: 0.25,
            labels: Vec::new(),
            bench: true,
            drain_timeout: Duration::from_secs(120),
            ca_pem: None,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// Why the node stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The sandbox could not start.
    #[error(transparent)]
    Sandbox(#[from] stardust_sandbox::NewError),
    /// The domain URL is not usable.
    #[error(transparent)]
    Client(#[from] stardust_sdk::Error),
    /// The domain presented another key than the one pinned at first contact.
    #[error("the domain's key changed from {pinned} to {got}; if that is expected, delete {path}")]
    DomainKeyChanged {
        /// The pinned key.
        pinned: NodeId,
        /// The key presented.
        got: NodeId,
        /// The pin file.
        path: PathBuf,
    },
    /// The data directory failed.
    #[error("data directory: {0}")]
    Io(String),
    /// The domain refused this node for good.
    #[error("the domain refused this node: {0}")]
    Refused(String),
}

struct Shared {
    tls: Arc<rustls::ClientConfig>,
    config: Config,
    identity: Identity,
    client: stardust_sdk::Client,
    sandbox: Sandbox,
    hardware: Hardware,
    queue: Mutex<VecDeque<Assignment>>,
    running: Mutex<HashSet<LeaseId>>,
    cancelled: Mutex<HashSet<LeaseId>>,
    unacked: Mutex<BTreeMap<LeaseId, TaskResult>>,
    /// Results sent on this connection and when; resent if not acknowledged in time (the
    /// domain may have dropped the frame under load). Emptied at each connection, so that
    /// everything not yet acknowledged goes again. Locked after `unacked`, never across an
    /// await.
    sent: std::sync::Mutex<HashMap<LeaseId, Instant>>,
    /// The connected session's sending half, while there is one: a slot whose result is the
    /// only one to send writes it itself (see `worker`), instead of waking the session.
    link: std::sync::Mutex<Option<Link>>,
    work: Notify,
    results: Notify,
    paused: AtomicBool,
    /// Since when the owner policy pauses the node.
    paused_since: std::sync::Mutex<Option<Instant>>,
    draining: AtomicBool,
    /// The disk budget of the blob and module caches.
    cache: cache::Budget,
    /// Blobs used lately, in memory (a task's input is often every task's input).
    hot: std::sync::Mutex<cache::Hot>,
}

/// A connected session's sending half, shared by the session and the slots (`worker`).
type Link = Arc<
    Mutex<
        futures_util::stream::SplitSink<
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
            Message,
        >,
    >,
>;

/// A std mutex's guard, poisoned or not (what it guards stays consistent: no code panics
/// while holding one).
fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The session's link offered to the slots while the session lasts.
struct Connected<'a>(&'a Shared);

impl<'a> Connected<'a> {
    fn new(shared: &'a Shared, link: Link) -> Self {
        *locked(&shared.link) = Some(link);
        Self(shared)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        *locked(&self.0.link) = None;
    }
}

impl Shared {
    async fn busy(&self) -> usize {
        self.queue.lock().await.len() + self.running.lock().await.len()
    }

    async fn idle(&self) -> bool {
        self.busy().await == 0 && self.unacked.lock().await.is_empty()
    }
}

/// Runs the node until `shutdown` turns true (then drains) or a fatal error.
pub async fn run(
    config: Config,
    identity: Identity,
    shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    if config.slots == 0 || config.slots > 1024 {
        return Err(NodeError::Config(format!(
            "slots must be 1..=1024, not {}",
            config.slots
        )));
    }
    if !(config.cpu_limit > 0.0 && config.cpu_limit <= 1.0) {
        return Err(NodeError::Config(format!(
            "cpu limit must be in (0, 1], not {}",
            config.cpu_limit
        )));
    }
    if config.cache_bytes < MIN_CACHE_BYTES {
        return Err(NodeError::Config(format!(
            "the cache needs at least {} MiB, not {} bytes ({} MiB)",
            MIN_CACHE_BYTES >> 20,
            config.cache_bytes,
            config.cache_bytes >> 20
        )));
    }
    std::fs::create_dir_all(config.data_dir.join("blobs"))
        .map_err(|e| NodeError::Io(e.to_string()))?;
    let cache = cache::Budget::new(
        vec![
            config.data_dir.join("blobs"),
            config.data_dir.join("modules"),
        ],
        config.cache_bytes,
    );
    tracing::info!(
        used_mib = cache.used() >> 20,
        limit_mib = config.cache_bytes >> 20,
        "caches of blobs and compiled modules"
    );
    let sandbox = Sandbox::new(stardust_sandbox::Config {
        max_instances: config.slots * 2 + 2,
        cache_dir: Some(config.data_dir.join("modules")),
        ..stardust_sandbox::Config::default()
    })?;
    let hardware = probe::probe(&sandbox, config.bench, config.labels.clone());
    let client =
        stardust_sdk::Client::with_ca(&config.domain, identity.clone(), config.ca_pem.as_deref())?;
    let tls = Arc::new(stardust_sdk::tls_config(config.ca_pem.as_deref())?);
    tracing::info!(
        node = %identity.id(),
        cores = hardware.cores,
        micro_scu_per_s = hardware.micro_scu_per_s,
        tier = ?hardware.tier(),
        "node ready"
    );
    let shared = Arc::new(Shared {
        tls,
        config,
        identity,
        client,
        sandbox,
        hardware,
        queue: Mutex::new(VecDeque::new()),
        running: Mutex::new(HashSet::new()),
        cancelled: Mutex::new(HashSet::new()),
        unacked: Mutex::new(BTreeMap::new()),
        sent: std::sync::Mutex::new(HashMap::new()),
        link: std::sync::Mutex::new(None),
        work: Notify::new(),
        results: Notify::new(),
        paused: AtomicBool::new(false),
        paused_since: std::sync::Mutex::new(None),
        draining: AtomicBool::new(false),
        cache,
        hot: std::sync::Mutex::new(cache::Hot::default()),
    });
    let mut workers = Vec::new();
    for slot in 0..shared.config.slots {
        workers.push(tokio::spawn(worker(shared.clone(), slot)));
    }
    if shared.config.when_idle {
        tokio::spawn(idle_watch(shared.clone()));
    }
    let outcome = sessions(shared.clone(), shutdown).await;
    for w in workers {
        w.abort();
    }
    outcome
}

/// Connects, serves one session, reconnects with jittered exponential backoff.
async fn sessions(
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let mut backoff = Duration::from_millis(200);
    let drain_deadline = std::sync::OnceLock::new();
    loop {
        if *shutdown.borrow() {
            shared.draining.store(true, Ordering::Relaxed);
            let deadline =
                *drain_deadline.get_or_init(|| Instant::now() + shared.config.drain_timeout);
            if shared.idle().await || Instant::now() > deadline {
                return Ok(());
            }
        }
        let started = Instant::now();
        match session(&shared, &mut shutdown).await {
            Ok(SessionEnd::Drained) => return Ok(()),
            Ok(SessionEnd::Disconnected) => {}
            Err(e @ (NodeError::DomainKeyChanged { .. } | NodeError::Refused(_))) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "session failed"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        let jitter = {
            let mut b = [0u8; 2];
            let _ = getrandom::fill(&mut b);
            u64::from(u16::from_le_bytes(b)) % (backoff.as_millis() as u64 / 2 + 1)
        };
        let wait = backoff + Duration::from_millis(jitter);
        tracing::info!(
            wait_ms = wait.as_millis() as u64,
            "reconnecting to the domain"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = shutdown_requested(&mut shutdown) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Most queued assignments per slot (said in the hello: a domain leases at most three
/// quarters of it). Deep enough that a node finishing tasks of microseconds always has
/// work queued while its results and the next assignments cross: the domain then writes
/// them in fewer, larger transactions.
const MAX_QUEUED_PER_SLOT: u32 = 256;

/// The node's queue bound for `slots` slots.
fn queue_bound(slots: u32) -> u32 {
    slots.saturating_mul(MAX_QUEUED_PER_SLOT)
}

/// Results in one frame at most.
const MAX_RESULTS_PER_FRAME: usize = 256;

/// Results a frame waits for while the node still has work running or queued...
const GATHER_RESULTS: usize = 8;

/// ...for this long at most after the first of them was ready.
const GATHER_FOR: Duration = Duration::from_millis(1);

/// Inline output bytes in one result frame at most.
const MAX_INLINE_PER_FRAME: usize = 4 * 1024 * 1024;

/// How long a sent result may wait for its acknowledgement before it is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(10);

/// Resolves when shutdown is first requested. Never resolves once it was (the caller checks
/// the flag), nor when the sender is gone without asking: a dropped sender must not turn a
/// `select!` into a busy loop.
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    if *rx.borrow() || rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

enum SessionEnd {
    Drained,
    Disconnected,
}

fn ws_url(domain: &str) -> String {
    let domain = domain.trim_end_matches('/');
    match domain.strip_prefix("https://") {
        Some(rest) => format!("wss://{rest}/v1/nodes/connect"),
        None => format!(
            "ws://{}/v1/nodes/connect",
            domain.trim_start_matches("http://")
        ),
    }
}

fn pin_domain(shared: &Shared, domain: NodeId) -> Result<(), NodeError> {
    let path = shared.config.data_dir.join("domain.pub");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let pinned: NodeId = text
                .trim()
                .parse()
                .map_err(|_| NodeError::Io(format!("{}: not a node id", path.display())))?;
            if pinned != domain {
                return Err(NodeError::DomainKeyChanged {
                    pinned,
                    got: domain,
                    path,
                });
            }
            Ok(())
        }
        Err(_) => {
            std::fs::write(&path, format!("{domain}\n")).map_err(|e| NodeError::Io(e.to_string()))
        }
    }
}

async fn session(
    shared: &Arc<Shared>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<SessionEnd, NodeError> {
    let io = |e: tokio_tungstenite::tungstenite::Error| NodeError::Io(format!("websocket: {e}"));
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_tls_with_config(
            ws_url(
                shared
                    .config
                    .gateway
                    .as_deref()
                    .unwrap_or(&shared.config.domain),
            ),
            None,
            true,
            Some(tokio_tungstenite::Connector::Rustls(shared.tls.clone())),
        ),
    )
    .await
    .map_err(|_| NodeError::Io("connecting timed out".into()))?
    .map_err(io)?;
    let (mut sink, mut stream) = ws.split();
    let max = stardust_proto::envelope::DEFAULT_MAX_LEN;
    let next_domain_message = async |stream: &mut futures_util::stream::SplitStream<_>| -> Result<(NodeId, DomainMessage), NodeError> {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), StreamExt::next(stream)).await {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    return message::decode::<DomainMessage>(&b, max).map_err(|e| NodeError::Io(format!("bad frame from the domain: {e}")));
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return Err(NodeError::Io("the domain closed the connection".into())),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Err(NodeError::Io(format!("websocket: {e}"))),
                Err(_) => return Err(NodeError::Io("the domain went silent".into())),
            }
        }
    };
    let (domain, first) = next_domain_message(&mut stream).await?;
    let DomainMessage::Challenge { nonce, .. } = first else {
        return Err(NodeError::Io(
            "the domain did not open with a challenge".into(),
        ));
    };
    pin_domain(shared, domain)?;
    let hello = Hello {
        nonce,
        agent: format!("stardust-node/{}", env!("CARGO_PKG_VERSION")),
        slots: shared.config.slots,
        hardware: shared.hardware.clone(),
        tier: shared.hardware.tier(),
        queue: Some(queue_bound(shared.config.slots)),
    };
    sink.send(Message::Binary(encode(&shared.identity, &hello).into()))
        .await
        .map_err(io)?;
    let (signer, welcome) = next_domain_message(&mut stream).await?;
    let heartbeat_ms = match welcome {
        DomainMessage::Welcome { heartbeat_ms, .. } if signer == domain => {
            heartbeat_ms.clamp(100, 60_000)
        }
        DomainMessage::Reject { code, message } => {
            return Err(NodeError::Refused(format!("{code}: {message}")));
        }
        other => return Err(NodeError::Io(format!("expected welcome, got {other:?}"))),
    };
    tracing::info!(domain = %domain.short(), "connected");
    // The domain's key, decoded once for every frame of the session.
    let verifier = Verifier::new(domain).ok();
    // Everything not yet acknowledged goes again.
    locked(&shared.sent).clear();
    let sink: Link = Arc::new(Mutex::new(sink));
    let _connected = Connected::new(shared, sink.clone());
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_ms));
    let mut seq = 0u64;
    let mut told_draining = false;
    // Since when results wait to be sent.
    let mut gathering: Option<Instant> = None;
    let mut drain_started: Option<Instant> = None;
    loop {
        if *shutdown.borrow() {
            shared.draining.store(true, Ordering::Relaxed);
        }
        if shared.draining.load(Ordering::Relaxed) {
            if !told_draining {
                sink.lock()
                    .await
                    .send(Message::Binary(
                        encode(&shared.identity, &NodeMessage::Draining).into(),
                    ))
                    .await
                    .map_err(io)?;
                told_draining = true;
            }
            let started = *drain_started.get_or_insert_with(Instant::now);
            if shared.idle().await {
                let _ = sink.lock().await.close().await;
                return Ok(SessionEnd::Drained);
            }
            if started.elapsed() > shared.config.drain_timeout {
                // What is left comes back to the domain when its leases expire.
                tracing::warn!("drain timed out; leaving unfinished work to lease expiry");
                let _ = sink.lock().await.close().await;
                return Ok(SessionEnd::Drained);
            }
        }
        // Send results not yet sent on this connection.
        let batch: Vec<TaskResult> = {
            let unacked = shared.unacked.lock().await;
            let mut sent = locked(&shared.sent);
            sent.retain(|lease, at| unacked.contains_key(lease) && at.elapsed() < RESEND_AFTER);
            // Bounded in count and in inline bytes (a frame stays far below the domain's
            // 16 MiB limit).
            let mut inline = 0usize;
            unacked
                .values()
                .filter(|r| !sent.contains_key(&r.lease))
                .take(MAX_RESULTS_PER_FRAME)
                .take_while(|r| {
                    inline += r.output.as_ref().map_or(0, |o| o.0.len());
                    inline <= MAX_INLINE_PER_FRAME
                })
                .cloned()
                .collect()
        };
        if !batch.is_empty() {
            // Under load (tasks still running or queued), a frame waits a moment for more
            // results: fewer, fuller frames, each one signature to make and one to check.
            let waited = *gathering.get_or_insert_with(Instant::now);
            if batch.len() < GATHER_RESULTS
                && waited.elapsed() < GATHER_FOR
                && shared.busy().await > 0
            {
                tokio::select! {
                    () = shared.results.notified() => {}
                    () = tokio::time::sleep(GATHER_FOR.saturating_sub(waited.elapsed())) => {}
                }
                continue;
            }
            gathering = None;
            let now = Instant::now();
            locked(&shared.sent).extend(batch.iter().map(|r| (r.lease, now)));
            let frame = encode(&shared.identity, &ResultBatch { results: batch });
            sink.lock()
                .await
                .send(Message::Binary(frame.into()))
                .await
                .map_err(io)?;
            continue;
        }
        tokio::select! {
            biased;
            () = shutdown_requested(shutdown) => {}
            () = shared.results.notified() => {}
            _ = heartbeat.tick() => {
                seq += 1;
                let paused_for = shared.paused_since.lock().ok().and_then(|s| s.map(|t| t.elapsed()));
                if policy::release_queued(paused_for) {
                    let mut queue = shared.queue.lock().await;
                    if !queue.is_empty() {
                        // Not renewed from now on: the leases lapse and the tasks go elsewhere.
                        tracing::info!(leases = queue.len(), "paused for long: releasing queued work");
                        queue.clear();
                    }
                }
                // One consistent picture (the locks in the workers' order): finished but
                // unacknowledged leases are listed too, since they stay this node's until
                // the domain records them.
                let (running, busy) = {
                    let queue = shared.queue.lock().await;
                    let now_running = shared.running.lock().await;
                    let unacked = shared.unacked.lock().await;
                    let mut list: Vec<LeaseId> = now_running.iter().copied().collect();
                    list.extend(queue.iter().map(|a| a.lease));
                    let busy = list.len() as u32;
                    list.extend(unacked.keys().copied());
                    (list, busy)
                };
                let free_slots = if shared.paused.load(Ordering::Relaxed) || shared.draining.load(Ordering::Relaxed) {
                    0
                } else {
                    shared.config.slots.saturating_sub(busy)
                };
                let hb = NodeMessage::Heartbeat { seq, running, free_slots };
                sink.lock().await.send(Message::Binary(encode(&shared.identity, &hb).into())).await.map_err(io)?;
            }
            frame = StreamExt::next(&mut stream) => {
                let bytes = match frame {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Close(_))) | None => return Ok(SessionEnd::Disconnected),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(io(e)),
                };
                let (signer, msg) = match message::decode_known::<DomainMessage>(&bytes, max, verifier.as_ref()) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring a bad frame from the domain");
                        continue;
                    }
                };
                if signer != domain {
                    tracing::warn!("ignoring a frame not signed by the domain");
                    continue;
                }
                handle(shared, msg).await;
            }
        }
    }
}

async fn handle(shared: &Shared, msg: DomainMessage) {
    match msg {
        DomainMessage::Assign { tasks } => {
            let known: HashSet<LeaseId> = {
                let mut k: HashSet<LeaseId> = shared.running.lock().await.iter().copied().collect();
                k.extend(shared.queue.lock().await.iter().map(|a| a.lease));
                k.extend(shared.unacked.lock().await.keys().copied());
                k
            };
            let mut queue = shared.queue.lock().await;
            // Bounded by what the hello said: a domain leases at most three quarters of it;
            // anything beyond is refused here and comes back to the domain when its lease
            // expires.
            let cap = queue_bound(shared.config.slots) as usize;
            for a in tasks {
                if known.contains(&a.lease) {
                    continue;
                }
                if queue.len() >= cap {
                    tracing::warn!(
                        lease = a.lease,
                        "assignment queue full; ignoring an assignment"
                    );
                    continue;
                }
                queue.push_back(a);
            }
            drop(queue);
            shared.work.notify_waiters();
        }
        DomainMessage::Cancel { leases } => {
            shared
                .queue
                .lock()
                .await
                .retain(|a| !leases.contains(&a.lease));
            let mut unacked = shared.unacked.lock().await;
            for l in &leases {
                unacked.remove(l);
            }
            shared.cancelled.lock().await.extend(leases);
        }
        DomainMessage::Ack { leases } => {
            let mut unacked = shared.unacked.lock().await;
            for l in &leases {
                unacked.remove(l);
            }
        }
        DomainMessage::Reject { code, message } => {
            tracing::warn!(code, message, "the domain refused a message")
        }
        DomainMessage::Drain => tracing::info!("the domain is draining; will reconnect"),
        other => tracing::debug!(?other, "ignoring"),
    }
}

/// One slot: takes assignments from the queue and runs them.
async fn worker(shared: Arc<Shared>, slot: u32) {
    loop {
        // Register for the wake-up before looking at the queue, so an assignment that arrives
        // in between is not missed.
        let notified = shared.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // A lease moves queue → running → unacked with the locks of both sides held (always
        // in that order), so a heartbeat, which holds all three, lists it at every moment: a
        // lease missing from one heartbeat counts as free at the domain, which would lease
        // this node more than it queues.
        let next = {
            let paused = shared.paused.load(Ordering::Relaxed);
            let mut queue = shared.queue.lock().await;
            let next = if paused { None } else { queue.pop_front() };
            if let Some(a) = &next {
                shared.running.lock().await.insert(a.lease);
            }
            next
        };
        let Some(assignment) = next else {
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        };
        let lease = assignment.lease;
        if shared.cancelled.lock().await.contains(&lease) {
            shared.running.lock().await.remove(&lease);
            continue;
        }
        let started = Instant::now();
        let result = execute(&shared, &assignment).await;
        let now = {
            let mut running = shared.running.lock().await;
            let mut now = None;
            if let Some(result) = result
                && !shared.cancelled.lock().await.contains(&lease)
            {
                let mut unacked = shared.unacked.lock().await;
                // The only result to send, and no other task to wait for: the session would
                // send it alone at once, so this slot does, without waking the session.
                let alone = running.len() == 1
                    && !shared.draining.load(Ordering::Relaxed)
                    && shared.queue.try_lock().is_ok_and(|q| q.is_empty())
                    && {
                        let sent = locked(&shared.sent);
                        unacked.keys().all(|l| sent.contains_key(l))
                    };
                let link = alone
                    .then(|| locked(&shared.link).clone())
                    .flatten()
                    .and_then(|l| l.try_lock_owned().ok());
                if let Some(link) = link {
                    locked(&shared.sent).insert(lease, Instant::now());
                    now = Some((link, result.clone()));
                } else {
                    shared.results.notify_one();
                }
                unacked.insert(lease, result);
            }
            running.remove(&lease);
            now
        };
        if let Some((mut link, result)) = now {
            let frame = encode(
                &shared.identity,
                &ResultBatch {
                    results: vec![result],
                },
            );
            if link.send(Message::Binary(frame.into())).await.is_err() {
                // The session ends and the next one sends it again; meanwhile, not sent.
                locked(&shared.sent).remove(&lease);
                shared.results.notify_one();
            }
        }
        let rest = policy::rest_after(started.elapsed(), shared.config.cpu_limit);
        if !rest.is_zero() {
            tracing::debug!(
                slot,
                rest_ms = rest.as_millis() as u64,
                "resting (cpu limit)"
            );
            tokio::time::sleep(rest).await;
        }
    }
}

/// Fetches a blob through the caches (memory, then disk), retrying while the domain is
/// unreachable.
async fn fetch(shared: &Shared, id: ContentId, lease: LeaseId) -> Option<Arc<[u8]>> {
    if let Some(bytes) = shared.hot.lock().ok().and_then(|mut h| h.get(&id)) {
        return Some(bytes);
    }
    let bytes = fetch_cold(shared, id, lease).await?;
    let bytes: Arc<[u8]> = Arc::from(bytes);
    if let Ok(mut h) = shared.hot.lock() {
        h.put(id, bytes.clone());
    }
    Some(bytes)
}

/// Fetches a blob through the disk cache, retrying while the domain is unreachable.
async fn fetch_cold(shared: &Shared, id: ContentId, lease: LeaseId) -> Option<Vec<u8>> {
    let path = shared.config.data_dir.join("blobs").join(id.to_hex());
    if let Ok(bytes) = tokio::fs::read(&path).await
        && id.matches(&bytes)
    {
        cache::Budget::touch(&path);
        return Some(bytes);
    }
    let mut wait = Duration::from_millis(200);
    loop {
        match shared.client.get_blob(id).await {
            Ok(bytes) => {
                let tmp = path.with_extension("tmp");
                if tokio::fs::write(&tmp, &bytes).await.is_ok()
                    && tokio::fs::rename(&tmp, &path).await.is_ok()
                {
                    shared.cache.added(bytes.len() as u64);
                }
                return Some(bytes);
            }
            Err(stardust_sdk::Error::Api { status: 404, .. }) => {
                tracing::warn!(%id, lease, "the domain does not have a blob this task needs");
                return None;
            }
            Err(e) => {
                if shared.cancelled.lock().await.contains(&lease) {
                    return None;
                }
                tracing::debug!(error = %e, "fetching a blob failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs one assignment; `None` when it cannot produce a result (cancelled, blobs missing).
async fn execute(shared: &Arc<Shared>, a: &Assignment) -> Option<TaskResult> {
    // A module loaded already is run by its id: its bytes are neither read nor hashed again.
    let module = match shared.sandbox.loaded(&a.spec.module) {
        Some(prepared) => Ok(prepared),
        None => Err(fetch(shared, a.spec.module, a.lease).await?),
    };
    let input = fetch(shared, a.spec.input, a.lease).await?;
    let run = {
        let shared = shared.clone();
        let spec = a.spec.clone();
        move || {
            let task = Task {
                input,
                args: &spec.args,
                seed: spec.seed,
                limits: spec.limits,
            };
            match &module {
                Ok(prepared) => shared.sandbox.run(prepared, &task),
                Err(bytes) => shared.sandbox.run_bytes(bytes, &task),
            }
        }
    };
    // On a multi-threaded runtime the task runs on this very thread, which hands its other
    // work to another thread first: no trip to a blocking thread and back on the task's
    // path (two wake-ups, each ~30 µs when they cross cores on a VM). A single-threaded
    // runtime cannot spare its thread. A panic ends this run only, as it would on a
    // blocking thread.
    let out = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).ok()
        })?,
        _ => tokio::task::spawn_blocking(run).await.ok()?,
    };
    // A small output travels inside the signed result; a larger one goes up first (the
    // domain refuses a result whose bytes it does not have).
    let inline = out.output.len() <= MAX_INLINE_OUTPUT;
    if !inline {
        upload(shared, &out.output, a.lease).await?;
    }
    tracing::debug!(lease = a.lease, status = %out.report.status, fuel = out.report.fuel_used, "task done");
    Some(TaskResult {
        lease: a.lease,
        task: a.spec.task,
        report: out.report,
        output: inline.then_some(Inline(out.output)),
    })
}

/// Uploads an output, retrying while the domain is unreachable; `None` if the lease was
/// cancelled meanwhile.
async fn upload(shared: &Shared, output: &[u8], lease: LeaseId) -> Option<()> {
    let mut wait = Duration::from_millis(200);
    loop {
        match shared.client.put_blob(output.to_vec()).await {
            Ok(_) => return Some(()),
            Err(e) => {
                if shared.cancelled.lock().await.contains(&lease) {
                    return None;
                }
                tracing::debug!(error = %e, "uploading an output failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Samples the machine's load and pauses work while others use it.
async fn idle_watch(shared: Arc<Shared>) {
    let mut gate = policy::IdleGate::new(shared.config.idle_threshold);
    loop {
        if let Some(s) = policy::sample() {
            let paused = gate.update(s);
            if paused != shared.paused.swap(paused, Ordering::Relaxed) {
                if let Ok(mut since) = shared.paused_since.lock() {
                    *since = paused.then(Instant::now);
                }
                tracing::info!(
                    paused,
                    "owner policy: {}",
                    if paused {
                        "machine busy, pausing"
                    } else {
                        "machine idle, resuming"
                    }
                );
                shared.work.notify_waiters();
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
