//! Connection gateways (docs/protocol.md §5d): a real node runs a job through a real
//! gateway; the relay link's contract, record by record; who may link.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use stardust_domain::gateway::{Gateway, GatewayConfig};
use stardust_proto::identity::Identity;
use stardust_proto::message::{self, DomainMessage, GatewayHello, NodeMessage, encode};
use stardust_proto::relay::{self, Record};
use tokio_tungstenite::tungstenite::Message;

use common::{Running, Ws, counter, key, next_domain, start};

/// Waits until `check` holds, up to 20 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !check().await {
        assert!(t.elapsed() < Duration::from_secs(20), "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the domain at `addr` has `n` node sessions open.
async fn connected(addr: SocketAddr, n: u64) {
    eventually(&format!("{n} nodes connected"), async || {
        counter(addr, "stardust_nodes_connected").await == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_gateway_runs_a_job_and_goes_when_the_gateway_does() {
    let gateway_key = key(30);
    let Running {
        dir,
        domain,
        url,
        client,
        module,
        input,
    } = start(|c| c.gateways = vec![key(30).id()]).await;
    let mut gc = GatewayConfig::new(url.clone());
    gc.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let gateway = Gateway::start(gc, gateway_key).await.expect("gateway");
    eventually("the gateway links", async || gateway.linked().await).await;
    // The domain counts the link once its handshake is sent: the gateway may see it first.
    eventually("the domain counts the link", async || {
        counter(domain.addr(), "stardust_gateways_connected").await == 1
    })
    .await;

    let node = common::node(
        &url,
        dir.path(),
        2,
        Some(format!("http://{}", gateway.addr())),
    );
    eventually("the node's session is relayed", async || {
        gateway.sessions() == 1
    })
    .await;
    // The gateway counts the session at its open, the domain once the node's hello is in.
    connected(domain.addr(), 1).await;

    let job = common::sweep_completes(&client, &module, &input, 12).await;
    let results = client.results(job).await.expect("results");
    let results = results["results"].as_array().expect("results list");
    assert_eq!(results.len(), 12);
    // The node's own key did the work: the domain knows the node, not the gateway.
    let nodes = client.nodes().await.expect("nodes");
    let listed: Vec<&str> = nodes["nodes"]
        .as_array()
        .expect("nodes list")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(listed, vec![key(1).id().to_string()], "{nodes}");
    // The gateway's own metrics: one node relayed, the link up once, frames both ways (the
    // hello and the results up; the challenge, welcome, assignments and acks down).
    let gw = gateway.addr();
    assert_eq!(counter(gw, "stardust_gateway_sessions").await, 1);
    assert_eq!(counter(gw, "stardust_gateway_linked").await, 1);
    assert_eq!(counter(gw, "stardust_gateway_links_total").await, 1);
    assert!(
        counter(
            gw,
            r#"stardust_gateway_frames_total{direction="to_domain"}"#
        )
        .await
            >= 2
    );
    assert!(counter(gw, r#"stardust_gateway_frames_total{direction="to_node"}"#).await >= 4);

    // The gateway goes: the domain drops its sessions.
    gateway.shutdown().await;
    eventually("the relayed session ends with its link", async || {
        counter(domain.addr(), "stardust_nodes_connected").await == 0
            && counter(domain.addr(), "stardust_gateways_connected").await == 0
    })
    .await;
    node.stop().await;
    domain.shutdown().await;
}

/// Opens `/v1/relay`; returns the link and its challenge's nonce.
async fn challenged(addr: SocketAddr) -> (Ws, stardust_proto::message::Nonce) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/relay"))
        .await
        .expect("connect");
    let Some(DomainMessage::Challenge { nonce, .. }) = next_domain(&mut ws).await else {
        panic!("no challenge on the link")
    };
    (ws, nonce)
}

/// Opens `/v1/relay` and answers the challenge as `gateway`; returns the link and the first
/// answer (welcome or reject).
async fn link(addr: SocketAddr, gateway: &Identity) -> (Ws, Option<DomainMessage>) {
    let (mut ws, nonce) = challenged(addr).await;
    let hello = GatewayHello {
        nonce,
        agent: "test-gateway".into(),
    };
    ws.send(Message::Binary(encode(gateway, &hello).into()))
        .await
        .expect("hello");
    let answer = next_domain(&mut ws).await;
    (ws, answer)
}

async fn send(ws: &mut Ws, records: &[Record<'_>]) {
    let mut out = Vec::new();
    for r in records {
        r.write(&mut out);
    }
    ws.send(Message::Binary(out.into())).await.expect("send");
}

/// The next record the domain sends, as (session, frame or None for a close).
async fn next_record(
    ws: &mut Ws,
    pending: &mut Vec<(u32, Option<Vec<u8>>)>,
) -> (u32, Option<Vec<u8>>) {
    loop {
        if !pending.is_empty() {
            return pending.remove(0);
        }
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a record within 10 s")
            .expect("link open")
            .expect("link ok");
        let Message::Binary(b) = m else { continue };
        for r in relay::records(&b, 1 << 24) {
            match r.expect("well-formed record") {
                Record::Frame { session, bytes } => pending.push((session, Some(bytes.to_vec()))),
                Record::Close { session, .. } => pending.push((session, None)),
                other => panic!("the domain sent {other:?}"),
            }
        }
    }
}

fn domain_message(frame: &[u8]) -> DomainMessage {
    message::decode::<DomainMessage>(frame, 1 << 24)
        .expect("domain frame")
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_link_carries_sessions_record_by_record() {
    let Running { domain, .. } = start(|c| c.gateways = vec![key(30).id()]).await;
    let addr = domain.addr();

    let (mut ws, welcome) = link(addr, &key(30)).await;
    assert!(
        matches!(welcome, Some(DomainMessage::Welcome { .. })),
        "{welcome:?}"
    );
    let mut pending = Vec::new();

    // Two sessions on one link, each answering its own challenge.
    send(
        &mut ws,
        &[
            Record::Open {
                session: 1,
                address: "127.0.0.9:5001",
            },
            Record::Open {
                session: 2,
                address: "127.0.0.9:5002",
            },
        ],
    )
    .await;
    let mut nonces = std::collections::HashMap::new();
    for _ in 0..2 {
        let (s, frame) = next_record(&mut ws, &mut pending).await;
        let DomainMessage::Challenge { nonce, .. } = domain_message(&frame.expect("a frame"))
        else {
            panic!("session {s} did not open with a challenge")
        };
        nonces.insert(s, nonce);
    }
    assert_eq!(nonces.len(), 2);
    let hello = |nonce| common::hello(nonce, 1);
    // Session 2 answers with session 1's nonce: a replay, refused, and the session closed.
    let h1 = encode(&key(41), &hello(nonces[&1]));
    let h2 = encode(&key(42), &hello(nonces[&1]));
    send(
        &mut ws,
        &[
            Record::Frame {
                session: 1,
                bytes: &h1,
            },
            Record::Frame {
                session: 2,
                bytes: &h2,
            },
        ],
    )
    .await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let (s, frame) = next_record(&mut ws, &mut pending).await;
        seen.push((s, frame.map(|f| domain_message(&f))));
    }
    assert!(
        seen.iter()
            .any(|(s, m)| *s == 1 && matches!(m, Some(DomainMessage::Welcome { .. }))),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|(s, m)| *s == 2
            && matches!(m, Some(DomainMessage::Reject { code, .. }) if code == "replay")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|(s, m)| *s == 2 && m.is_none()),
        "session 2 is closed: {seen:?}"
    );
    connected(addr, 1).await;

    // A relayed session is a session: a bad frame and a text frame get their rejects.
    send(
        &mut ws,
        &[
            Record::Frame {
                session: 1,
                bytes: b"garbage",
            },
            Record::Text { session: 1 },
        ],
    )
    .await;
    for code in ["malformed_envelope", "text_frame"] {
        let (s, frame) = next_record(&mut ws, &mut pending).await;
        assert_eq!(s, 1);
        assert!(
            matches!(domain_message(&frame.expect("a frame")), DomainMessage::Reject { code: c, .. } if c == code),
            "expected {code}"
        );
    }
    // Its heartbeats are accepted (no reject) and a frame for a session never opened is
    // dropped without harm.
    let beat = encode(
        &key(41),
        &NodeMessage::Heartbeat {
            seq: 1,
            running: vec![],
            free_slots: 1,
        },
    );
    send(
        &mut ws,
        &[
            Record::Frame {
                session: 1,
                bytes: &beat,
            },
            Record::Frame {
                session: 77,
                bytes: &beat,
            },
        ],
    )
    .await;

    // The gateway closes session 1: the domain ends it and answers with its own close; the
    // number is then free for a new node.
    send(
        &mut ws,
        &[Record::Close {
            session: 1,
            reason: "node left",
        }],
    )
    .await;
    let (s, frame) = next_record(&mut ws, &mut pending).await;
    assert_eq!(
        (s, frame.is_none()),
        (1, true),
        "the domain's close for session 1"
    );
    connected(addr, 0).await;
    send(
        &mut ws,
        &[Record::Open {
            session: 1,
            address: "127.0.0.9:5003",
        }],
    )
    .await;
    let (s, frame) = next_record(&mut ws, &mut pending).await;
    assert_eq!(s, 1);
    assert!(matches!(
        domain_message(&frame.expect("a frame")),
        DomainMessage::Challenge { .. }
    ));

    // A session opened twice is a broken gateway: the domain drops the link, and with it the
    // session.
    send(
        &mut ws,
        &[Record::Open {
            session: 1,
            address: "127.0.0.9:5004",
        }],
    )
    .await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the link stays open after a broken record");
    eventually("the link is gone", async || {
        counter(addr, "stardust_gateways_connected").await == 0
    })
    .await;
    domain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_gateways_may_link() {
    // A domain that lists none refuses the endpoint.
    let Running { domain, .. } = start(|_| {}).await;
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/relay", domain.addr())).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    domain.shutdown().await;

    let Running { domain, .. } = start(|c| c.gateways = vec![key(30).id()]).await;
    let (_, answer) = link(domain.addr(), &key(31)).await;
    assert!(
        matches!(&answer, Some(DomainMessage::Reject { code, .. }) if code == "unknown_gateway"),
        "{answer:?}"
    );
    // A node key's hello on the link is the wrong context.
    let (mut ws, nonce) = challenged(domain.addr()).await;
    let node_hello = common::hello(nonce, 1);
    ws.send(Message::Binary(encode(&key(30), &node_hello).into()))
        .await
        .expect("send");
    let answer = next_domain(&mut ws).await;
    assert!(
        matches!(&answer, Some(DomainMessage::Reject { code, .. }) if code == "wrong_context"),
        "{answer:?}"
    );
    assert_eq!(
        counter(domain.addr(), "stardust_gateways_connected").await,
        0
    );
    domain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_relinks_after_its_domain_restarts_and_its_node_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |listen: SocketAddr| {
        let mut c = stardust_domain::Config::new(dir.path().join("domain"));
        c.listen = listen;
        c.welcome_grant = 1_000 * stardust_ledger::MICRO_PER_CREDIT;
        c.gateways = vec![key(30).id()];
        c
    };
    let first =
        stardust_domain::Domain::start(config(SocketAddr::from(([127, 0, 0, 1], 0))), key(200))
            .await
            .expect("domain");
    let addr = first.addr();
    let url = format!("http://{addr}");
    let client = stardust_sdk::Client::new(&url, key(100)).expect("client");
    let module = common::upload_hello(&client).await.to_string();
    let input = client
        .put_blob(b"x".to_vec())
        .await
        .expect("input")
        .to_string();
    let mut gc = GatewayConfig::new(url.clone());
    gc.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let gateway = Gateway::start(gc, key(30)).await.expect("gateway");
    let node = common::node(
        &url,
        dir.path(),
        2,
        Some(format!("http://{}", gateway.addr())),
    );
    common::sweep_completes(&client, &module, &input, 4).await;

    // The domain stops and comes back on the same address and database.
    first.shutdown().await;
    eventually("the gateway notices", async || !gateway.linked().await).await;
    let second = stardust_domain::Domain::start(config(addr), key(200))
        .await
        .expect("the domain again");
    eventually("the gateway links again", async || gateway.linked().await).await;
    connected(addr, 1).await;
    assert_eq!(gateway.sessions(), 1);
    common::sweep_completes(&client, &module, &input, 6).await;

    node.stop().await;
    gateway.shutdown().await;
    second.shutdown().await;
}
