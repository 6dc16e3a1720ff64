//! The running domain: shared state, its long-lived workers, and startup.
//!
//! ```text
//!  REST handlers ──submit──▶ Store ◀──record──┐
//!        │   (idle: the job's    ▲              │
//!        │    first round)       │              │
//!        └──wake──▶ dispatcher ──┘──assign──▶ node sessions (bounded outbox each)
//!                   expiry ────expire──▶ Store, cancel ──▶ node sessions
//! ```
//!
//! The dispatcher is [`crate::dispatch`]. Each long-lived task owns its loop and stops when
//! the shutdown signal fires (`select! { biased; shutdown first }`).

use std::collections::{HashMap, HashSet, VecDeque};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stardust_proto::identity::{Identity, NodeId, Verifiers};
use stardust_proto::message::{DomainMessage, encode};
use stardust_proto::task::{Hardware, LeaseId, Tier};
use stardust_scheduler::matching::{NodeState, NodeView};
use tokio::sync::{Mutex, Notify, mpsc, watch};

use crate::config::{Config, Cores};
use crate::ratelimit::Limiter;
use crate::store::{Economy, Retry, Store, StoreError};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A connected node, as the dispatcher sees it.
#[derive(Debug)]
pub(crate) struct Session {
    pub id: u64,
    pub node: NodeId,
    pub hardware: Hardware,
    pub tier: Tier,
    /// The node's reputation record, loaded at hello and updated as its results are
    /// judged (see `stardust_scheduler::reputation`).
    pub record: stardust_scheduler::reputation::Record,
    /// Leases its stake covers, refreshed each dispatch round (`None`: no stake needed).
    pub stake_slots: Option<u32>,
    /// Round trip measured at the handshake (challenge sent → hello received), ms.
    pub latency_ms: u32,
    pub slots: u32,
    /// Assignments the node queues at most beside those running (its hello's
    /// `queue_bound`): it ignores any beyond.
    pub queue: u32,
    /// Leases the node may hold at least: `slots × lease_ahead`, so a slot never waits a
    /// round trip for its next task. More while it finishes tasks quickly ([`Pace`]).
    pub capacity: u32,
    /// How fast it has been finishing tasks.
    pub pace: Pace,
    /// The node's owner policy has paused it (it reported no free slot with fewer leases
    /// than slots).
    pub paused: bool,
    pub draining: bool,
    /// Leases this domain believes the node runs: added on assignment, removed on result,
    /// expiry or cancel, and reconciled with each heartbeat.
    pub running: HashMap<LeaseId, i64>,
    pub outbox: crate::outbox::Outbox,
}

impl Session {
    /// The node as matching sees it.
    pub fn view(&self) -> NodeView {
        NodeView {
            id: self.node,
            hardware: self.hardware.clone(),
            tier: self.tier,
            state: if self.draining {
                NodeState::Draining
            } else if self.paused {
                NodeState::Paused
            } else {
                NodeState::Online
            },
            slots: self.capacity().min(self.stake_slots.unwrap_or(u32::MAX)),
            running: self.running.len() as u32,
            reputation: self.record.score(),
            latency_ms: self.latency_ms,
            streak: self.record.streak,
        }
    }

    /// Slots the dispatcher may fill now.
    pub fn free(&self) -> u32 {
        if self.paused || self.draining {
            0
        } else {
            self.capacity()
                .min(self.stake_slots.unwrap_or(u32::MAX))
                .saturating_sub(self.running.len() as u32)
        }
    }

    /// Leases the node may hold now: enough for [`LEASE_DEPTH_MS`] of its recent pace, at
    /// least `slots × lease_ahead`, at most [`MAX_LEASE_AHEAD`] per slot (fewer for browsers,
    /// whose library queues fewer) and three quarters of the queue the node said it keeps
    /// (room for leases counted as finished a moment early), never less than one a slot.
    /// Tasks of a millisecond need a deep queue to keep a node busy across the round trips
    /// of results and assignments, and a deep queue lets results arrive, and be written,
    /// in larger batches; long tasks keep the shallow one, so work is not parked on one
    /// node while others idle.
    pub fn capacity(&self) -> u32 {
        let per_slot = if self.tier == Tier::Browser {
            MAX_LEASE_AHEAD_BROWSER
        } else {
            MAX_LEASE_AHEAD
        };
        let deep = (self.pace.per_s * LEASE_DEPTH_MS as f64 / 1000.0).ceil() as u32;
        let most = self
            .slots
            .saturating_mul(per_slot)
            .min(self.queue / 4 * 3 + self.queue % 4 * 3 / 4)
            .max(self.slots);
        self.capacity.max(deep).min(most)
    }
}

/// Work leased ahead to a node that finishes tasks quickly, in milliseconds of its pace.
pub(crate) const LEASE_DEPTH_MS: u64 = 250;

/// Clients' keys kept decoded at most (~200 bytes each).
const MAX_CLIENT_KEYS: usize = 1024;

/// Leases per slot at most, when the node's queue allows (the reference node queues up to
/// 256 a slot, and a node that does not say queues 64: see [`Session::capacity`]).
pub(crate) const MAX_LEASE_AHEAD: u32 = 192;

/// Leases per slot at most for a browser node (its library queues up to 8).
pub(crate) const MAX_LEASE_AHEAD_BROWSER: u32 = 6;

/// A node's recent rate of finished tasks, measured over windows of at least a quarter second.
#[derive(Debug, Clone, Default)]
pub(crate) struct Pace {
    since_ms: i64,
    count: u32,
    /// Tasks per second over the last closed window.
    pub per_s: f64,
}

impl Pace {
    /// Counts `n` tasks finished at `now` (0 on a heartbeat: an idle node's pace decays).
    pub fn record(&mut self, n: usize, now: i64) {
        if self.since_ms == 0 {
            self.since_ms = now;
        }
        self.count = self.count.saturating_add(n as u32);
        let span = now - self.since_ms;
        if span >= 250 {
            self.per_s = f64::from(self.count) * 1000.0 / span as f64;
            self.since_ms = now;
            self.count = 0;
        }
    }
}

/// A node's state as the API shows it: `offline` without a session, else `draining`,
/// `paused` or `online`.
pub(crate) fn node_state(live: Option<&Session>) -> &'static str {
    match live {
        None => "offline",
        Some(s) if s.draining => "draining",
        Some(s) if s.paused => "paused",
        Some(_) => "online",
    }
}

/// Signatures of recent REST requests, to refuse replays; bounded.
#[derive(Debug, Default)]
pub(crate) struct ReplayGuard {
    seen: HashSet<String>,
    order: VecDeque<(i64, String)>,
}

impl ReplayGuard {
    const CAP: usize = 100_000;

    /// Records `sig`; false when it was seen within the skew window.
    pub fn fresh(&mut self, sig: &str, now: i64) -> bool {
        let horizon = now - 2 * stardust_proto::request::MAX_SKEW_MS;
        while let Some((t, _)) = self.order.front() {
            if *t >= horizon && self.order.len() < Self::CAP {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        if !self.seen.insert(sig.to_string()) {
            return false;
        }
        self.order.push_back((now, sig.to_string()));
        true
    }
}

/// Counters of refused input, by reason (exported as metrics later).
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    counts: std::sync::Mutex<HashMap<&'static str, u64>>,
}

impl Rejections {
    pub fn count(&self, reason: &'static str) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(reason).or_default() += 1;
        }
    }

    pub fn snapshot(&self) -> HashMap<&'static str, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// State shared by handlers, sessions and workers.
pub(crate) struct Shared {
    pub store: Store,
    pub identity: Identity,
    pub config: Config,
    pub sessions: Mutex<HashMap<NodeId, Session>>,
    pub wake: Notify,
    pub replay: Mutex<ReplayGuard>,
    /// Clients' decoded keys, for their requests' signatures.
    pub clients: Verifiers,
    pub rejections: Rejections,
    pub next_session: AtomicU64,
    pub shutdown: watch::Receiver<bool>,
    pub per_key: Limiter<NodeId>,
    pub per_addr: Limiter<std::net::IpAddr>,
    /// Draws for adaptive replication and spot checks.
    pub rng: std::sync::Mutex<stardust_proto::rand::SplitMix64>,
    pub metrics: crate::metrics::Metrics,
    /// Throughput and queue depth, one sample per second, the last [`SAMPLES`].
    pub samples: std::sync::Mutex<VecDeque<Sample>>,
    /// The dashboard's last snapshots, shared by its viewers for a second.
    pub snapshots: crate::http::Snapshots,
    /// Open dashboard event streams (bounded by [`MAX_STREAMS`]).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Heartbeats waiting to be written, batched by [`heartbeat_loop`].
    pub beats: mpsc::Sender<Beat>,
    /// Result frames waiting to be recorded, batched by [`crate::recorder`].
    pub filed: mpsc::Sender<crate::recorder::Filed>,
    /// Status requests held open (`wait_ms`), per client key.
    pub waiters: crate::http::Waiters,
    /// Pending tasks between dispatch rounds; held by the round running.
    pub pending: Arc<Mutex<crate::dispatch::PendingCache>>,
    /// Held for writing by a submission whose assignments left before its commit, until
    /// that commit ends; the recorder reads results under it, so a result never meets its
    /// lease uncommitted (on PostgreSQL another connection would not see it yet).
    pub committing: Arc<tokio::sync::RwLock<()>>,
}

/// One node's heartbeat on its way to the store, with where to answer.
pub(crate) struct Beat {
    pub node: NodeId,
    pub leases: Vec<LeaseId>,
    /// The leases renewed, or `Err` when the store failed (logged by the writer).
    pub reply: tokio::sync::oneshot::Sender<Result<Vec<LeaseId>, ()>>,
}

/// Heartbeats written in one transaction at most.
const MAX_BEATS_PER_TRANSACTION: usize = 512;

/// Writes heartbeats: everything that arrived while the previous batch was being written
/// goes in one transaction, so the writer keeps up with many nodes (one transaction per
/// heartbeat cost 0.44 cores at 5,000 nodes) while a lone heartbeat waits for nothing.
async fn heartbeat_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Beat>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            b = rx.recv() => match b { Some(b) => b, None => return },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BEATS_PER_TRANSACTION {
            match rx.try_recv() {
                Ok(b) => batch.push(b),
                Err(_) => break,
            }
        }
        let list: Vec<(NodeId, Vec<LeaseId>)> = batch
            .iter_mut()
            .map(|b| (b.node, std::mem::take(&mut b.leases)))
            .collect();
        let now = now_ms();
        match shared
            .store
            .heartbeats(&list, now + shared.config.lease_ms, now)
            .await
        {
            Ok(renewed) => {
                for (b, r) in batch.into_iter().zip(renewed) {
                    let _ = b.reply.send(Ok(r));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, beats = batch.len(), "recording heartbeats failed");
                for b in batch {
                    let _ = b.reply.send(Err(()));
                }
            }
        }
    }
}

/// Samples kept for the dashboard's charts (five minutes).
pub(crate) const SAMPLES: usize = 300;

/// Dashboard event streams open at once.
pub(crate) const MAX_STREAMS: usize = 64;

/// One second of the domain's life, for the dashboard.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Sample {
    pub t_ms: i64,
    /// Tasks verified in the second before `t_ms`.
    pub tasks_per_s: f64,
    /// Tasks waiting for a replica.
    pub queue: u64,
    pub nodes: usize,
}

/// The age past which a sample's queue is not taken for the backlog (two sampling periods).
const BACKLOG_FRESH_MS: i64 = 2_000;

/// The queue of the latest sample, if taken within [`BACKLOG_FRESH_MS`] of `now`.
fn sampled_backlog(samples: &VecDeque<Sample>, now: i64) -> Option<u64> {
    samples
        .back()
        .filter(|s| (0..=BACKLOG_FRESH_MS).contains(&(now - s.t_ms)))
        .map(|s| s.queue)
}

impl Shared {
    /// A uniform draw in [0, 1).
    pub fn draw(&self) -> f64 {
        self.rng.lock().map_or(0.5, |mut r| r.next_f64())
    }

    /// Tasks waiting for a replica, as the price takes it: the sampler's count of the last
    /// second, or a count now when there is none (the first second). Counting reads every
    /// pending task's index entry (3 ms at 100,000 waiting), too much for every submission.
    pub async fn backlog(&self) -> Result<u64, crate::store::StoreError> {
        let sampled = self
            .samples
            .lock()
            .ok()
            .and_then(|s| sampled_backlog(&s, now_ms()));
        match sampled {
            Some(n) => Ok(n),
            None => self.store.backlog().await,
        }
    }

    pub fn retry(&self) -> Retry {
        Retry {
            max_attempts: self.config.max_attempts,
            max_replicas: self.config.max_replicas,
        }
    }

    /// Tells the nodes holding these leases to stop them, frees their slots, and wakes the
    /// dispatcher.
    pub async fn cancel_leases(&self, leases: Vec<(LeaseId, NodeId)>) {
        let mut by_node: HashMap<NodeId, Vec<LeaseId>> = HashMap::new();
        for (lease, node) in leases {
            by_node.entry(node).or_default().push(lease);
        }
        for (node, leases) in by_node {
            if let Some(s) = self.sessions.lock().await.get_mut(&node) {
                for l in &leases {
                    s.running.remove(l);
                }
            }
            self.send(node, &DomainMessage::Cancel { leases }).await;
        }
        self.wake.notify_one();
    }

    /// Sends a signed message to a node's session, if connected; drops the session when its
    /// outbox is full (a node that does not read is not worth blocking for).
    pub async fn send(&self, node: NodeId, message: &DomainMessage) {
        let frame = encode(&self.identity, message);
        let mut sessions = self.sessions.lock().await;
        if let Some(s) = sessions.get(&node)
            && s.outbox.try_send(frame).is_err()
        {
            tracing::warn!(node = %node.short(), "node outbox full or closed; dropping the session");
            sessions.remove(&node);
        }
    }
}

/// Why the domain could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Storage failed to open or migrate.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The domain key could not be read or created.
    #[error("domain key: {0}")]
    Key(String),
    /// The TLS certificate or key is not usable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The core named in [`Config::cores`] is not one this process may run on.
    #[error("cores: {0}")]
    Cores(String),
    /// The domain's thread or runtime could not start.
    #[error("cannot start the domain's runtime: {0}")]
    Runtime(std::io::Error),
    /// The listen address could not be bound (why: the error's source).
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running domain. It runs on a runtime of its own, on threads of its own, pinned to a
/// core as [`Config::cores`] says (see [`crate::cores`]). Dropped, it stops.
pub struct Domain {
    addr: SocketAddr,
    id: NodeId,
    stop: watch::Sender<bool>,
    /// Closed when the domain's runtime has ended.
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Worker threads of a domain pinned to one core: two; the core time-slices between them.
/// One worker serialises every step of every session: a storm of connections took half as
/// long again (5,000 nodes: 3.8 s against 2.5; 100,000 through gateways: 409 s, heartbeats
/// up to 120 s late meanwhile), and the round trip was no faster once its assignment and
/// answer no longer waited on other tasks (docs/benchmarks.md, session 18). Work that
/// holds a thread for long (a large upload hashed, a module metered) runs on the runtime's
/// blocking threads ([`off_worker`]), so it holds neither worker.
const PINNED_WORKERS: usize = 2;

/// Blocking threads of the domain's runtime at most ([`off_worker`]; more wait their turn).
const MAX_BLOCKING_THREADS: usize = 8;

/// Bytes hashed on the calling task at most; more are hashed on a blocking thread (BLAKE3
/// takes ~0.1 ms for 64 KiB here: no worker stalls for longer).
pub(crate) const HASH_INLINE_BYTES: usize = 64 << 10;

/// Runs `f` on a blocking thread of the runtime: CPU work long enough to stall the tasks of
/// a worker thread.
pub(crate) async fn off_worker<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(f).await
}

/// What [`serve`] hands back: the bound address, the stop switch, the tasks to wait for.
type Serving = (
    SocketAddr,
    watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// The domain's runtime, built on the calling thread as [`Domain::start`] builds it: with
/// SQLite (`sqlite`) and [`Cores::Auto`], the thread and every thread it starts from now on
/// are pinned to one core, which runs two workers ([`PINNED_WORKERS`]). For what must run as
/// a domain runs (`stardust bench floor`'s bare domain); call it on a thread of its own.
pub fn runtime(cores: Cores, sqlite: bool) -> Result<tokio::runtime::Runtime, StartError> {
    let core = cores
        .pick(sqlite, &crate::cores::allowed())
        .map_err(StartError::Cores)?;
    runtime_on(core).map_err(StartError::Runtime)
}

/// [`runtime`] on `core` (none: unpinned); a core that cannot be pinned is warned about and
/// left unpinned.
fn runtime_on(core: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let pinned = core.filter(|&c| match crate::cores::pin(c) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(core = c, error = %e, "cannot pin the domain to a core; it runs where the system puts it");
            false
        }
    });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.max_blocking_threads(MAX_BLOCKING_THREADS);
    if pinned.is_some() {
        builder.worker_threads(PINNED_WORKERS);
    }
    let runtime = builder
        .thread_name("stardust-domain")
        .enable_all()
        .build()?;
    if let Some(core) = pinned {
        tracing::info!(core, "the domain runs on one core");
    }
    Ok(runtime)
}

impl Domain {
    /// Opens storage, binds the listener and starts serving, on a thread and runtime of
    /// the domain's own.
    pub async fn start(config: Config, identity: Identity) -> Result<Self, StartError> {
        let sqlite = config.database_url.is_none();
        let core = config
            .cores
            .pick(sqlite, &crate::cores::allowed())
            .map_err(StartError::Cores)?;
        let id = identity.id();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("stardust-domain".into())
            .spawn(move || {
                let runtime = match runtime_on(core) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = started_tx.send(Err(StartError::Runtime(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match serve(config, identity).await {
                        Ok((addr, stop, tasks)) => {
                            let _ = started_tx.send(Ok((addr, stop)));
                            for t in tasks {
                                let _ = t.await;
                            }
                        }
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                        }
                    }
                });
                // Here, off any runtime: dropping one inside another is refused.
                drop(runtime);
                drop(ended_tx);
            })
            .map_err(StartError::Runtime)?;
        let (addr, stop) = started.await.map_err(|_| {
            StartError::Runtime(std::io::Error::other(
                "the domain's thread ended before it started serving",
            ))
        })??;
        Ok(Self {
            addr,
            id,
            stop,
            ended: Some(ended),
        })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The domain's public key.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Asks every task to stop and waits for them and the domain's runtime to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(ended) = self.ended.take() {
            let _ = ended.await;
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Opens storage, binds the listener and starts the domain's tasks on the current runtime.
async fn serve(config: Config, identity: Identity) -> Result<Serving, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| StartError::Key(e.to_string()))?;
    let store = match &config.database_url {
        Some(url) => Store::open(url).await?,
        None => Store::open_sqlite(&config.data_dir).await?,
    }
    .with_ledger(
        identity.clone(),
        Economy {
            stake: config.stake,
            welcome: config.welcome_grant,
            adaptive: config.adaptive,
        },
    );
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| StartError::Key(format!("no randomness: {e}")))?;
    // Nodes could not heartbeat while the domain was down.
    let extended = store.extend_all_leases(now_ms(), config.lease_ms).await?;
    if extended > 0 {
        tracing::info!(
            leases = extended,
            "gave active leases a fresh deadline after the restart"
        );
    }
    let tls = match &config.tls {
        Some((cert, key)) => Some(crate::tls::server_config(cert, key).map_err(StartError::Tls)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let (stop, shutdown) = watch::channel(false);
    let id = identity.id();
    let (beats, beats_rx) = mpsc::channel(4 * MAX_BEATS_PER_TRANSACTION);
    let (filed, filed_rx) = mpsc::channel(crate::recorder::MAX_FRAMES_WAITING);
    let shared = Arc::new(Shared {
        store,
        identity,
        sessions: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        replay: Mutex::new(ReplayGuard::default()),
        clients: Verifiers::new(MAX_CLIENT_KEYS),
        rejections: Rejections::default(),
        next_session: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        per_key: Limiter::new(config.rate_per_key, 100_000),
        per_addr: Limiter::new(config.rate_per_addr, 100_000),
        rng: std::sync::Mutex::new(stardust_proto::rand::SplitMix64::new(u64::from_le_bytes(
            seed,
        ))),
        metrics: crate::metrics::Metrics::default(),
        samples: std::sync::Mutex::new(VecDeque::with_capacity(SAMPLES)),
        snapshots: Default::default(),
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        beats,
        filed,
        config,
        waiters: crate::http::Waiters::default(),
        pending: Arc::default(),
        committing: Arc::default(),
    });
    let router = crate::http::router(shared.clone());
    let mut server_stop = shutdown.clone();
    let stopped = async move {
        let _ = server_stop.wait_for(|s| *s).await;
    };
    let server = match tls {
        None => tokio::spawn(async move {
            use axum::serve::ListenerExt;
            // Small frames (assignments, acks) must not wait for Nagle's algorithm.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, service)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }),
        Some(tls) => {
            use axum::serve::ListenerExt;
            let listener = crate::tls::TlsListener::new(listener, tls)
                .map_err(|source| StartError::Listen { addr, source })?
                .tap_io(|_| {});
            tokio::spawn(async move {
                let service = router.into_make_service_with_connect_info::<SocketAddr>();
                if let Err(e) = axum::serve(listener, service)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    tracing::error!(error = %e, "HTTPS server failed");
                }
            })
        }
    };
    let dispatcher = tokio::spawn(crate::dispatch::run(shared.clone()));
    let expiry = tokio::spawn(expiry_loop(shared.clone()));
    let sampler = tokio::spawn(sample_loop(shared.clone()));
    let heartbeats = tokio::spawn(heartbeat_loop(shared.clone(), beats_rx));
    let recorder = tokio::spawn(crate::recorder::run(shared.clone(), filed_rx));
    tracing::info!(%addr, domain = %id, "domain listening");
    Ok((
        addr,
        stop,
        vec![server, dispatcher, expiry, sampler, heartbeats, recorder],
    ))
}

/// Records throughput and queue depth once a second for the dashboard.
async fn sample_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut last = shared.metrics.verified.load(Ordering::Relaxed);
    let mut last_t = now_ms();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let queue = match shared.store.backlog().await {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(error = %e, "sampling the queue failed");
                continue;
            }
        };
        let now = now_ms();
        let verified = shared.metrics.verified.load(Ordering::Relaxed);
        let dt = ((now - last_t) as f64 / 1000.0).max(0.001);
        let sample = Sample {
            t_ms: now,
            tasks_per_s: (verified - last) as f64 / dt,
            queue,
            nodes: shared.sessions.lock().await.len(),
        };
        (last, last_t) = (verified, now);
        if let Ok(mut s) = shared.samples.lock() {
            if s.len() >= SAMPLES {
                s.pop_front();
            }
            s.push_back(sample);
        }
    }
}

/// Expires overdue leases and tells their nodes to stop them.
async fn expiry_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let deadline_cancelled = match shared.store.expire_jobs(now_ms()).await {
            Ok(leases) => leases,
            Err(e) => {
                tracing::error!(error = %e, "job deadline expiry failed");
                Vec::new()
            }
        };
        let leases = shared
            .store
            .expire_leases(now_ms(), shared.config.max_attempts)
            .await
            .map(|mut l| {
                l.extend(deadline_cancelled);
                l
            });
        match leases {
            Ok(expired) if !expired.is_empty() => {
                tracing::info!(count = expired.len(), "leases expired");
                shared.cancel_leases(expired).await;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "lease expiry failed"),
        }
    }
}

pub(crate) fn next_session(shared: &Shared) -> u64 {
    shared.next_session.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_comes_from_a_recent_sample_only() {
        let sample = |t_ms, queue| Sample {
            t_ms,
            tasks_per_s: 0.0,
            queue,
            nodes: 0,
        };
        let mut samples = VecDeque::new();
        assert_eq!(sampled_backlog(&samples, 10_000), None, "no sample yet");
        samples.push_back(sample(8_000, 5));
        samples.push_back(sample(9_000, 7));
        assert_eq!(sampled_backlog(&samples, 9_000), Some(7), "the latest");
        assert_eq!(sampled_backlog(&samples, 11_000), Some(7));
        assert_eq!(
            sampled_backlog(&samples, 11_001),
            None,
            "too old: counted again"
        );
        // A clock that stepped back: the sample is not trusted.
        assert_eq!(sampled_backlog(&samples, 8_999), None);
    }

    fn session(tier: Tier, slots: u32) -> Session {
        let (outbox, _) = crate::outbox::Outbox::detached(1);
        Session {
            id: 1,
            node: stardust_proto::identity::Identity::from_secret_bytes(&[1; 32]).id(),
            hardware: Hardware::default(),
            tier,
            record: Default::default(),
            stake_slots: None,
            latency_ms: 0,
            slots,
            queue: slots * 64,
            capacity: slots * 2,
            pace: Pace::default(),
            paused: false,
            draining: false,
            running: HashMap::new(),
            outbox,
        }
    }

    #[test]
    fn a_fast_node_is_leased_deeper_a_slow_or_idle_one_is_not() {
        let mut s = session(Tier::Standard, 2);
        assert_eq!(
            s.capacity(),
            4,
            "slots × lease_ahead before any pace is known"
        );
        // 1,000 tasks/s: 250 ms of work is 250 leases, capped at three quarters of the
        // node's queue (64 a slot: a node whose hello does not say).
        s.pace.record(0, 1_000);
        s.pace.record(300, 1_300);
        assert_eq!(s.pace.per_s, 1_000.0);
        assert_eq!(s.capacity(), 96);
        // A node that queues 256 a slot takes the 250...
        let deep = Session {
            queue: 512,
            ..session(Tier::Standard, 2)
        };
        let mut deep = deep;
        deep.pace = s.pace.clone();
        assert_eq!(deep.capacity(), 250);
        // ...up to 192 a slot.
        deep.pace.record(2_000, 1_600);
        assert_eq!(deep.capacity(), 384);
        // A node that queues almost nothing still gets a lease a slot, and no more than
        // three quarters of a larger queue.
        deep.queue = 0;
        assert_eq!(deep.capacity(), 2);
        deep.queue = 7;
        assert_eq!(deep.capacity(), 5);
        // 40 tasks/s: 10 leases.
        s.pace.record(12, 1_600);
        assert_eq!(s.capacity(), 10);
        // Long tasks (2/s) keep the floor.
        s.pace.record(1, 2_100);
        assert_eq!(s.capacity(), 4);
        // Idle heartbeats decay the pace.
        s.pace.record(300, 2_200);
        s.pace.record(0, 2_400);
        assert!(s.capacity() > 4);
        s.pace.record(0, 3_000);
        assert_eq!(s.capacity(), 4);
        // A window shorter than a quarter second changes nothing yet.
        s.pace.record(1_000, 3_100);
        assert_eq!(s.capacity(), 4);
        // Browsers are capped lower: their library queues fewer.
        let mut b = session(Tier::Browser, 2);
        b.pace.record(0, 5_000);
        b.pace.record(10_000, 6_000);
        assert_eq!(b.capacity(), 12);
        assert_eq!(b.free(), 12);
    }
}
