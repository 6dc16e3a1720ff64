//! Helpers shared by the in-process domain tests: keys and a raw node session.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use stardust_proto::identity::Identity;
use stardust_proto::message::{self, DomainMessage, Hello, encode};
use stardust_proto::task::{Hardware, Tier};
use tokio_tungstenite::tungstenite::Message;

/// The counter or gauge `name` (without labels) from `/metrics`.
pub async fn counter(addr: SocketAddr, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("response");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics: {body}"))
}

/// A fixed key per number.
pub fn key(i: u8) -> Identity {
    Identity::from_secret_bytes(&[i; 32])
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn next_domain(ws: &mut Ws) -> Option<DomainMessage> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??
        {
            Ok(Message::Binary(b)) => {
                return message::decode::<DomainMessage>(&b, 1 << 20)
                    .ok()
                    .map(|(_, m)| m);
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// A hello answering `nonce`: 4 cores, 8 GiB, tier small, no queue bound.
pub fn hello(nonce: stardust_proto::message::Nonce, slots: u32) -> Hello {
    Hello {
        nonce,
        agent: "test".into(),
        slots,
        hardware: Hardware {
            cores: 4,
            memory_bytes: 8 << 30,
            ..Hardware::default()
        },
        tier: Tier::Small,
        queue: None,
    }
}

/// Submits a sweep of `n` trials and waits (up to a minute) for it to complete with every
/// task verified; returns the job's id.
pub async fn sweep_completes(
    client: &stardust_sdk::Client,
    module: &str,
    input: &str,
    n: u32,
) -> u64 {
    let job = client
        .submit(&sweep(module, input, n))
        .await
        .expect("submit");
    let status = tokio::time::timeout(Duration::from_secs(60), client.wait(job, |_| {}))
        .await
        .expect("the job ends within a minute")
        .expect("status");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["tasks_verified"], n, "{status}");
    job
}

/// Opens a node session; returns the socket after the welcome.
pub async fn join(addr: SocketAddr, node: &Identity, slots: u32) -> Ws {
    join_as(addr, node, slots, Tier::Small).await
}

/// [`join`] declaring `tier`.
pub async fn join_as(addr: SocketAddr, node: &Identity, slots: u32, tier: Tier) -> Ws {
    join_with(addr, node, slots, tier, None).await
}

/// [`join`] declaring `tier` and the queue bound `queue` (`None`: the hello does not say).
pub async fn join_with(
    addr: SocketAddr,
    node: &Identity,
    slots: u32,
    tier: Tier,
    queue: Option<u32>,
) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/nodes/connect"))
        .await
        .expect("connect");
    let Some(DomainMessage::Challenge { nonce, .. }) = next_domain(&mut ws).await else {
        panic!("no challenge")
    };
    let hello = Hello {
        tier,
        queue,
        ..hello(nonce, slots)
    };
    ws.send(Message::Binary(encode(node, &hello).into()))
        .await
        .expect("hello");
    assert!(matches!(
        next_domain(&mut ws).await,
        Some(DomainMessage::Welcome { .. })
    ));
    ws
}

/// Uploads `test-programs/hello.wasm` through `client`; returns its content id.
pub async fn upload_hello(client: &stardust_sdk::Client) -> stardust_proto::content::ContentId {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../test-programs/hello.wasm"
    ))
    .expect("test-programs/hello.wasm");
    client.put_blob(bytes).await.expect("upload hello.wasm")
}

/// An in-process domain on loopback and a client with credits that uploaded
/// `test-programs/hello.wasm` and a one-byte input.
pub struct Running {
    pub dir: tempfile::TempDir,
    pub domain: stardust_domain::Domain,
    pub url: String,
    pub client: stardust_sdk::Client,
    /// The uploaded module's content id.
    pub module: String,
    /// The uploaded input's content id.
    pub input: String,
}

/// Starts [`Running`]: key 200 for the domain, key 100 for the client (1,000 credits of
/// welcome grant); `adjust` changes the domain's settings first.
pub async fn start(adjust: impl FnOnce(&mut stardust_domain::Config)) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = stardust_domain::Config::new(dir.path().join("domain"));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.welcome_grant = 1_000 * stardust_ledger::MICRO_PER_CREDIT;
    adjust(&mut config);
    let domain = stardust_domain::Domain::start(config, key(200))
        .await
        .expect("domain");
    let url = format!("http://{}", domain.addr());
    let client = stardust_sdk::Client::new(&url, key(100)).expect("client");
    let module = upload_hello(&client).await.to_string();
    let input = client
        .put_blob(b"x".to_vec())
        .await
        .expect("input")
        .to_string();
    Running {
        dir,
        domain,
        url,
        client,
        module,
        input,
    }
}

/// A job of `n` trials of `module` on `input`, its one argument the trial's index.
pub fn sweep(module: &str, input: &str, n: u32) -> stardust_proto::job::JobSpec {
    serde_json::from_value(serde_json::json!({
        "module": module,
        "input": input,
        "args": ["{i}"],
        "limits": {"fuel": 1_000_000_000u64, "memory_bytes": 64u64 << 20, "wall_ms": 10_000, "output_bytes": 4096},
        "sweep": {"grid": {"i": (0..n).collect::<Vec<_>>()}},
    }))
    .expect("spec")
}

/// A fresh PostgreSQL database's URL under `STARDUST_TEST_POSTGRES_URL`'s server; `None`
/// (with a printed reason) where that is unset, which CI never allows.
pub async fn postgres_database(what: &str) -> Option<String> {
    let Ok(admin) = std::env::var("STARDUST_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set STARDUST_TEST_POSTGRES_URL"
        );
        eprintln!("SKIPPED on PostgreSQL ({what}): STARDUST_TEST_POSTGRES_URL is not set");
        return None;
    };
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "stardust_test_domain_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&admin)
        .await
        .expect("connect to the PostgreSQL admin URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .expect("create database");
    let (base, _) = admin.rsplit_once('/').expect("URL with a database");
    Some(format!("{base}/{name}"))
}

/// A node run by the real node library (key 1, its data under `dir/node`), connected to the
/// domain at `url` or, with `gateway`, through that gateway; [`Node::stop`] drains it.
pub struct Node {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), stardust_node::NodeError>>,
}

/// Starts a [`Node`] of `slots` slots (its reference benchmark skipped).
pub fn node(url: &str, dir: &std::path::Path, slots: u32, gateway: Option<String>) -> Node {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut c = stardust_node::Config::new(url.to_string(), dir.join("node"));
    c.gateway = gateway;
    c.slots = slots;
    c.bench = false;
    let task = tokio::spawn(stardust_node::run(c, key(1), stopped));
    Node { stop, task }
}

impl Node {
    /// Asks the node to stop and waits for it, 10 s at most.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}
