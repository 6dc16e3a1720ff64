//! A bare domain, for `stardust bench floor`: what a single-task round trip costs on this
//! machine when the domain does only what the protocol asks of it.
//!
//! It serves the real client (the SDK's `submit_wait`) and a real node process
//! (`stardust node`), over the HTTP and WebSocket stack the domain uses, on a runtime built
//! as the domain builds its own ([`stardust_domain::runtime`]). Per round trip it checks the
//! request's signature, parses and expands the job's spec, signs and writes the assignment,
//! checks the result frame's signature and its inline output, keeps the frame by one
//! durable commit through the domain's store, and answers; the node's `ack` follows the
//! answer. Nothing else: no job, task or lease rows, no ledger, price, reputation or
//! scheduling. What the domain does beyond this is its implementation's own cost; what this
//! costs, a domain on this machine cannot go below.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use stardust_domain::store::Store;
use stardust_proto::content::ContentId;
use stardust_proto::envelope::{self, Context, DEFAULT_MAX_LEN};
use stardust_proto::identity::{Identity, Verifier, Verifiers};
use stardust_proto::job::JobSpec;
use stardust_proto::message::{
    self, Assignment, DomainMessage, Hello, Nonce, ResultBatch, TaskResult, encode,
};
use stardust_proto::request;
use stardust_proto::task::{LeaseId, TaskSpec};
use tokio::sync::{oneshot, watch};

/// How long a submission waits for its result, and the node for its connection.
const WAIT: Duration = Duration::from_secs(30);

/// Round trips made before the measured ones (the node fetches and compiles the module).
const WARMUP: usize = 20;

/// The round trips' times, µs, in the order they were made; the bare domain's threads run
/// on `cores` as `stardust domain --cores` would place the domain's.
pub fn round_trips(n: usize, cores: stardust_domain::Cores) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let wasm = stardust_meter::instrument(&crate::bench::trivial_module()?)?;
    let module = ContentId::of(&wasm);
    let input = ContentId::of(&[]);
    let blobs = HashMap::from([(module, Bytes::from(wasm)), (input, Bytes::new())]);
    let (stop, stopped) = oneshot::channel::<()>();
    let (started_tx, started) = std::sync::mpsc::sync_channel(1);
    let data = dir.path().join("domain");
    let domain = std::thread::Builder::new()
        .name("stardust-bare".into())
        .spawn(move || -> anyhow::Result<()> {
            let runtime = stardust_domain::runtime(cores, true)?;
            runtime.block_on(serve(&data, blobs, started_tx, stopped))
        })
        .context("starting the bare domain's thread")?;
    let Ok((addr, mut connected)) = started.recv() else {
        return match domain.join() {
            Ok(Err(e)) => Err(e.context("the bare domain did not start")),
            _ => bail!("the bare domain's thread ended before it started"),
        };
    };
    let url = format!("http://{addr}");
    let node = std::process::Command::new(std::env::current_exe()?)
        .env(
            crate::bench::EXIT_WITH_PARENT,
            crate::bench::parent_marker(),
        )
        .args([
            "node",
            "--domain",
            &url,
            "--slots",
            "1",
            "--no-bench",
            "--data",
        ])
        .arg(dir.path().join("node"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start a node process")?;
    let node = crate::bench::Kill(vec![node]);
    // The client: one thread, as `bench throughput`'s.
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let times = client_rt.block_on(async {
        tokio::time::timeout(WAIT, connected.wait_for(|c| *c))
            .await
            .context("the node did not connect to the bare domain")??;
        let client = stardust_sdk::Client::new(&url, stardust_keystore::generate()?)?;
        let spec: JobSpec = serde_json::from_value(json!({
            "module": module.to_string(),
            "input": input.to_string(),
            "args": ["{i}"],
            "limits": crate::bench::trivial_limits(),
            "sweep": {"grid": {"i": [0]}},
        }))?;
        let mut times = Vec::with_capacity(n);
        for i in 0..WARMUP + n {
            let t = Instant::now();
            let answer = client.submit_wait(&spec, WAIT.as_millis() as u64).await?;
            let us = t.elapsed().as_secs_f64() * 1e6;
            if answer["results"][0]["output_text"].as_str().is_none() {
                bail!("the bare domain answered without the task's output: {answer}");
            }
            if i >= WARMUP {
                times.push(us);
            }
        }
        anyhow::Ok(times)
    });
    drop(node);
    let _ = stop.send(());
    match domain.join() {
        Ok(r) => r?,
        Err(_) => bail!("the bare domain's thread panicked"),
    }
    times
}

struct Bare {
    identity: Identity,
    store: Store,
    clients: Verifiers,
    blobs: HashMap<ContentId, Bytes>,
    /// The node's sending half, while it is connected.
    link: tokio::sync::Mutex<Option<SplitSink<WebSocket, Message>>>,
    connected: watch::Sender<bool>,
    /// Why the node's last session ended (told to submissions that find no node or lose
    /// it).
    ended: std::sync::Mutex<Option<String>>,
    /// Submissions waiting for their lease's result.
    waiting: std::sync::Mutex<HashMap<LeaseId, oneshot::Sender<TaskResult>>>,
    next_lease: AtomicU64,
}

type Started = (SocketAddr, watch::Receiver<bool>);

async fn serve(
    data: &Path,
    blobs: HashMap<ContentId, Bytes>,
    started: std::sync::mpsc::SyncSender<Started>,
    stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(data)?;
    let store = Store::open_sqlite(data).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (connected, connected_rx) = watch::channel(false);
    let bare = Arc::new(Bare {
        identity: stardust_keystore::generate()?,
        store,
        clients: Verifiers::new(16),
        blobs,
        link: tokio::sync::Mutex::new(None),
        connected,
        ended: std::sync::Mutex::default(),
        waiting: std::sync::Mutex::default(),
        next_lease: AtomicU64::new(1),
    });
    let app = axum::Router::new()
        .route("/v1/jobs", post(submit))
        .route("/v1/blobs/{id}", get(blob))
        .route("/v1/nodes/connect", get(connect))
        .with_state(bare);
    use axum::serve::ListenerExt as _;
    // As the domain's listener: small frames must not wait for Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    started.send((addr, connected_rx))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = stop.await;
        })
        .await?;
    Ok(())
}

fn refuse(status: StatusCode, why: impl std::fmt::Display) -> Response {
    (status, why.to_string()).into_response()
}

/// `why`, and why the node's last session ended if one did.
fn unserved(bare: &Bare, status: StatusCode, why: &str) -> Response {
    match locked(&bare.ended).as_deref() {
        Some(ended) => refuse(status, format!("{why} ({ended})")),
        None => refuse(status, why),
    }
}

fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn blob(State(bare): State<Arc<Bare>>, UrlPath(id): UrlPath<String>) -> Response {
    match id
        .parse::<ContentId>()
        .ok()
        .and_then(|id| bare.blobs.get(&id))
    {
        Some(bytes) => bytes.clone().into_response(),
        None => refuse(StatusCode::NOT_FOUND, "no such blob"),
    }
}

/// `POST /v1/jobs`: one task, assigned to the node, answered with its result.
async fn submit(
    State(bare): State<Arc<Bare>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    if let Err(e) = request::verify(
        h(request::KEY_HEADER),
        h(request::TIME_HEADER),
        h(request::SIGNATURE_HEADER),
        method.as_str(),
        path,
        &body,
        stardust_domain::now_ms(),
        Some(&bare.clients),
    ) {
        return refuse(StatusCode::UNAUTHORIZED, e);
    }
    let spec: JobSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    let trial = match spec.expand() {
        Ok(mut t) if t.len() == 1 => t.remove(0),
        Ok(t) => {
            let why = format!("the bare domain runs one task per job, not {}", t.len());
            return refuse(StatusCode::BAD_REQUEST, why);
        }
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    let lease = bare.next_lease.fetch_add(1, Ordering::Relaxed);
    let assign = DomainMessage::Assign {
        tasks: vec![Assignment {
            lease,
            spec: TaskSpec {
                task: lease,
                job: lease,
                module: spec.module,
                input: trial.input,
                args: trial.args,
                limits: spec.limits,
                seed: trial.seed,
            },
            lease_ms: WAIT.as_millis() as u64,
        }],
    };
    let (tx, rx) = oneshot::channel();
    locked(&bare.waiting).insert(lease, tx);
    let frame = encode(&bare.identity, &assign);
    let sent = match bare.link.lock().await.as_mut() {
        Some(link) => link.send(Message::Binary(frame.into())).await.is_ok(),
        None => false,
    };
    if !sent {
        locked(&bare.waiting).remove(&lease);
        return unserved(&bare, StatusCode::SERVICE_UNAVAILABLE, "no node connected");
    }
    let result = match tokio::time::timeout(WAIT, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => {
            let why = "the node's session ended before the result";
            return unserved(&bare, StatusCode::BAD_GATEWAY, why);
        }
        Err(_) => {
            locked(&bare.waiting).remove(&lease);
            return unserved(&bare, StatusCode::GATEWAY_TIMEOUT, "no result in time");
        }
    };
    let output = result.output.map(|o| o.0).unwrap_or_default();
    axum::Json(json!({
        "id": lease,
        "state": "completed",
        "tasks": 1,
        "tasks_verified": 1,
        "results": [{
            "index": trial.index,
            "task": result.task,
            "status": result.report.status,
            "fuel_used": result.report.fuel_used,
            "output": result.report.output.to_string(),
            "output_len": result.report.output_len,
            "output_text": String::from_utf8_lossy(&output),
        }],
    }))
    .into_response()
}

async fn connect(State(bare): State<Arc<Bare>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| async move {
        let why = match session(&bare, socket).await {
            Ok(()) => "the node disconnected".to_string(),
            // Expected when the bench stops its node.
            Err(e) => format!("{e:#}"),
        };
        tracing::debug!(why, "the bare domain's node session ended");
        *bare.link.lock().await = None;
        *locked(&bare.ended) = Some(why);
        // Their results cannot come now: the submissions waiting for them are told at once.
        locked(&bare.waiting).clear();
    })
}

/// Challenge, hello, welcome; then results are kept and answered, heartbeats ignored.
async fn session(bare: &Bare, socket: WebSocket) -> anyhow::Result<()> {
    let (mut sink, mut stream) = socket.split();
    let mut next = async || -> anyhow::Result<Option<Bytes>> {
        loop {
            match tokio::time::timeout(WAIT, stream.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => return Ok(Some(b)),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return Ok(None),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(e.into()),
                Err(_) => bail!("the node went silent"),
            }
        }
    };
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let challenge = DomainMessage::Challenge {
        nonce: Nonce(nonce),
        protocol: stardust_proto::PROTOCOL_VERSION,
    };
    sink.send(Message::Binary(encode(&bare.identity, &challenge).into()))
        .await?;
    let Some(hello) = next().await? else {
        return Ok(());
    };
    let (node, hello) = message::decode::<Hello>(&hello, DEFAULT_MAX_LEN)?;
    if hello.nonce != Nonce(nonce) {
        bail!("the node's hello answers another challenge");
    }
    let welcome = DomainMessage::Welcome {
        session: 1,
        heartbeat_ms: 500,
    };
    sink.send(Message::Binary(encode(&bare.identity, &welcome).into()))
        .await?;
    let verifier = Verifier::new(node)?;
    *bare.link.lock().await = Some(sink);
    bare.connected.send_replace(true);
    while let Some(bytes) = next().await? {
        let opened = envelope::open_any_known(&bytes, DEFAULT_MAX_LEN, Some(&verifier))?;
        if opened.signer != node {
            bail!("a frame not signed by the session's node");
        }
        match opened.context {
            Context::Result => {
                let batch = message::parse::<ResultBatch>(&opened)?;
                for r in &batch.results {
                    r.check_inline().map_err(anyhow::Error::msg)?;
                }
                // The signed frame is the results' evidence: kept before anyone is told.
                bare.store
                    .put_blob(ContentId::of(&bytes), &bytes, stardust_domain::now_ms())
                    .await?;
                let leases: Vec<LeaseId> = batch.results.iter().map(|r| r.lease).collect();
                for r in batch.results {
                    if let Some(tx) = locked(&bare.waiting).remove(&r.lease) {
                        let _ = tx.send(r);
                    }
                }
                // As the domain's recorder: the answer goes before the ack is signed.
                tokio::task::yield_now().await;
                let ack = encode(&bare.identity, &DomainMessage::Ack { leases });
                if let Some(link) = bare.link.lock().await.as_mut() {
                    link.send(Message::Binary(ack.into())).await?;
                }
            }
            // Heartbeats: there are no leases to renew here.
            Context::Node => {}
            other => bail!("{other} is not accepted on a node session"),
        }
    }
    Ok(())
}
