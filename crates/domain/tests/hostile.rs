//! Bad input and abuse against a real in-process domain over loopback: every refusal is a
//! clear, typed error, counted, and disturbs nothing else.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::SinkExt;
use stardust_domain::{Config, Domain, Rate};
use stardust_proto::content::ContentId;
use stardust_proto::envelope::{self, Context};
use stardust_proto::identity::Identity;
use stardust_proto::message::{
    DomainMessage, Hello, Inline, NodeMessage, Nonce, ResultBatch, TaskResult, encode,
};
use stardust_proto::request;
use stardust_proto::task::{Hardware, RunReport, Status, Tier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{Ws, join, key, next_domain, upload_hello};

async fn domain(tweak: impl FnOnce(&mut Config)) -> (Domain, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(dir.path().to_path_buf());
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.max_request_bytes = 1 << 20;
    config.max_frame_bytes = 256 << 10;
    config.welcome_grant = 1_000_000_000_000;
    tweak(&mut config);
    let d = Domain::start(config, key(200))
        .await
        .expect("domain starts");
    (d, dir)
}

fn now_ms() -> i64 {
    stardust_domain::now_ms()
}

/// A raw HTTP/1.1 request, optionally from a given loopback address. Returns status and body.
async fn raw(
    addr: SocketAddr,
    from: Option<IpAddr>,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(ip) = from {
        socket
            .bind(SocketAddr::new(ip, 0))
            .expect("bind source address");
    }
    let mut stream = socket.connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let _ = stream.write_all(body).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn signed(id: &Identity, method: &str, path: &str, body: &[u8]) -> Vec<(String, String)> {
    let [k, t, s] = request::sign(id, method, path, now_ms(), body);
    vec![
        (request::KEY_HEADER.into(), k),
        (request::TIME_HEADER.into(), t),
        (request::SIGNATURE_HEADER.into(), s),
    ]
}

#[tokio::test]
async fn rest_refusals_are_typed_and_counted() {
    let (d, _dir) = domain(|_| {}).await;
    let addr = d.addr();
    let a = key(1);

    let (s, body) = raw(addr, None, "GET", "/v1/jobs/1", &[], b"").await;
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("\"code\":\"unauthorized\""), "{body}");

    // Headers of key 1, signature of key 2.
    let mut forged = signed(&a, "GET", "/v1/jobs/1", b"");
    forged[2].1 = signed(&key(2), "GET", "/v1/jobs/1", b"")[2].1.clone();
    assert_eq!(
        raw(addr, None, "GET", "/v1/jobs/1", &forged, b"").await.0,
        401
    );

    // The same signed POST twice: the second is a replay. (A repeated GET is harmless.)
    let once = signed(&a, "POST", "/v1/jobs/1/cancel", b"");
    let first = raw(addr, None, "POST", "/v1/jobs/1/cancel", &once, b"")
        .await
        .0;
    assert_eq!(first, 404, "valid, but no such job");
    let (s, body) = raw(addr, None, "POST", "/v1/jobs/1/cancel", &once, b"").await;
    assert_eq!(s, 401);
    assert!(body.contains("\"code\":\"replay\""), "{body}");
    let get = signed(&a, "GET", "/v1/jobs/1", b"");
    assert_eq!(raw(addr, None, "GET", "/v1/jobs/1", &get, b"").await.0, 404);
    let again = raw(addr, None, "GET", "/v1/jobs/1", &get, b"").await.0;
    assert_eq!(again, 404, "a repeated GET is served");

    // Bytes that do not match their id.
    let claimed = ContentId::of(b"something else");
    let path = format!("/v1/blobs/{claimed}");
    let (s, body) = raw(
        addr,
        None,
        "PUT",
        &path,
        &signed(&a, "PUT", &path, b"bytes"),
        b"bytes",
    )
    .await;
    assert_eq!(s, 422);
    assert!(body.contains("hash_mismatch"), "{body}");

    // A body large enough to be hashed off the domain's worker thread: the same checks.
    let large = vec![5u8; 200 << 10];
    let put = async |path: &str, signed_over: &[u8]| {
        raw(
            addr,
            None,
            "PUT",
            path,
            &signed(&a, "PUT", path, signed_over),
            &large,
        )
        .await
    };
    let (s, body) = put(&path, &large).await;
    assert_eq!(s, 422, "{body}");
    assert!(body.contains("hash_mismatch"), "{body}");
    let id = ContentId::of(&large);
    let right = format!("/v1/blobs/{id}");
    let mut other = large.clone();
    other[100_000] ^= 1;
    let (s, body) = put(&right, &other).await;
    assert_eq!(s, 401, "signed for other bytes: {body}");
    let (s, body) = put(&right, &large).await;
    assert_eq!(s, 201, "{body}");
    assert!(body.contains(&id.to_string()), "{body}");

    // Too large a body.
    let big = vec![7u8; 2 << 20];
    let id = ContentId::of(&big);
    let path = format!("/v1/blobs/{id}");
    assert_eq!(
        raw(
            addr,
            None,
            "PUT",
            &path,
            &signed(&a, "PUT", &path, &big),
            &big
        )
        .await
        .0,
        413
    );

    // Job specs: malformed, invalid, naming blobs that were never uploaded.
    let client = stardust_sdk::Client::new(&format!("http://{addr}"), a.clone()).expect("client");
    let path = "/v1/jobs";
    let (s, body) = raw(
        addr,
        None,
        "POST",
        path,
        &signed(&a, "POST", path, b"{not json"),
        b"{not json",
    )
    .await;
    assert_eq!(s, 400);
    assert!(body.contains("bad_job_spec"), "{body}");
    let spec = |redundancy: u8| -> stardust_proto::job::JobSpec {
        serde_json::from_value(serde_json::json!({
            "module": ContentId::of(b"never uploaded").to_string(),
            "input": ContentId::of(b"").to_string(),
            "redundancy": redundancy,
        }))
        .expect("spec")
    };
    let err = client.submit(&spec(0)).await.expect_err("redundancy 0");
    assert!(
        matches!(err, stardust_sdk::Error::Api { status: 422, ref code, .. } if code == "invalid_job"),
        "{err}"
    );
    client.put_blob(Vec::new()).await.expect("empty input");
    let err = client.submit(&spec(1)).await.expect_err("no module");
    assert!(
        matches!(err, stardust_sdk::Error::Api { ref code, .. } if code == "missing_blob"),
        "{err}"
    );
    let garbage = client.put_blob(b"not wasm".to_vec()).await.expect("upload");
    let mut s3 = spec(1);
    s3.module = garbage;
    let err = client.submit(&s3).await.expect_err("not wasm");
    assert!(
        matches!(err, stardust_sdk::Error::Api { ref code, .. } if code == "invalid_module"),
        "{err}"
    );

    // Someone else's job is invisible.
    let module = upload_hello(&client).await;
    let mut ok = spec(1);
    ok.module = module;
    let job = client.submit(&ok).await.expect("submits");
    let other = stardust_sdk::Client::new(&format!("http://{addr}"), key(3)).expect("client");
    assert!(matches!(
        other.job(job).await,
        Err(stardust_sdk::Error::Api { status: 404, .. })
    ));
    assert!(matches!(
        other.results(job).await,
        Err(stardust_sdk::Error::Api { status: 404, .. })
    ));
    assert!(client.job(job).await.is_ok(), "the owner sees it");

    let health = client.health().await.expect("health");
    for reason in [
        "bad_request_signature",
        "replayed_request",
        "blob_hash_mismatch",
    ] {
        assert!(
            health["rejected"][reason].as_u64().unwrap_or(0) >= 1,
            "{reason} counted: {health}"
        );
    }
    d.shutdown().await;
}

/// Reads until a reject arrives; returns its code.
async fn next_reject(ws: &mut Ws) -> String {
    loop {
        match next_domain(ws).await {
            Some(DomainMessage::Reject { code, .. }) => return code,
            Some(_) => continue,
            None => panic!("session closed while waiting for a reject"),
        }
    }
}

#[tokio::test]
async fn node_session_refusals_leave_the_session_working() {
    let (d, _dir) = domain(|_| {}).await;
    let addr = d.addr();

    // A hello that answers another challenge is a replay.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/nodes/connect"))
        .await
        .expect("connect");
    let _ = next_domain(&mut ws).await;
    let hello = Hello {
        nonce: Nonce([9; 32]),
        agent: "x".into(),
        slots: 1,
        hardware: Hardware::default(),
        tier: Tier::Small,
        queue: None,
    };
    ws.send(Message::Binary(encode(&key(5), &hello).into()))
        .await
        .expect("send");
    assert!(
        matches!(next_domain(&mut ws).await, Some(DomainMessage::Reject { code, .. }) if code == "replay")
    );

    let node = key(6);
    let mut ws = join(addr, &node, 1).await;
    // Bad signature.
    let mut frame = encode(&node, &NodeMessage::Draining);
    let last = frame.len() - 1;
    frame[last] ^= 1;
    ws.send(Message::Binary(frame.into())).await.expect("send");
    assert_eq!(next_reject(&mut ws).await, "bad_signature");
    // Signed by another key.
    ws.send(Message::Binary(
        encode(
            &key(7),
            &NodeMessage::Heartbeat {
                seq: 1,
                running: vec![],
                free_slots: 1,
            },
        )
        .into(),
    ))
    .await
    .expect("send");
    assert_eq!(next_reject(&mut ws).await, "wrong_signer");
    // Garbage and text frames.
    ws.send(Message::Binary(b"garbage".to_vec().into()))
        .await
        .expect("send");
    assert_eq!(next_reject(&mut ws).await, "malformed_envelope");
    ws.send(Message::Text("hi".into())).await.expect("send");
    assert_eq!(next_reject(&mut ws).await, "text_frame");
    // A context that has no place on a session.
    ws.send(Message::Binary(
        envelope::seal(&node, Context::Ledger, b"{}").into(),
    ))
    .await
    .expect("send");
    assert_eq!(next_reject(&mut ws).await, "wrong_context");
    // A malformed body under a valid signature.
    ws.send(Message::Binary(
        envelope::seal(&node, Context::Node, b"{\"type\":\"heartbeat\"}").into(),
    ))
    .await
    .expect("send");
    assert_eq!(next_reject(&mut ws).await, "malformed_body");
    // A result for a lease this node does not hold: refused, and acknowledged so the node
    // forgets it.
    let client =
        stardust_sdk::Client::new(&format!("http://{addr}"), node.clone()).expect("client");
    let output = client.put_blob(b"out".to_vec()).await.expect("output");
    let report = RunReport {
        status: Status::Ok,
        trap: None,
        exit_code: Some(0),
        fuel_used: 1,
        output,
        output_len: 3,
        wall_ms: 1,
        detail: None,
    };
    let batch = ResultBatch {
        results: vec![TaskResult {
            lease: 424_242,
            task: 1,
            report,
            output: None,
        }],
    };
    ws.send(Message::Binary(encode(&node, &batch).into()))
        .await
        .expect("send");
    let mut got_ack = false;
    let mut got_reject = false;
    while !(got_ack && got_reject) {
        match next_domain(&mut ws).await {
            Some(DomainMessage::Ack { leases }) => got_ack = leases == [424_242],
            Some(DomainMessage::Reject { code, .. }) => got_reject = code == "not_leased",
            Some(_) => {}
            None => panic!("session closed"),
        }
    }
    // Inline output bytes that are not what the report names: refused before anything is
    // looked up, and acknowledged.
    let batch = ResultBatch {
        results: vec![TaskResult {
            lease: 434_343,
            task: 1,
            report: batch.results[0].report.clone(),
            output: Some(Inline(b"not out".to_vec())),
        }],
    };
    ws.send(Message::Binary(encode(&node, &batch).into()))
        .await
        .expect("send");
    let (mut got_ack, mut got_reject) = (false, false);
    while !(got_ack && got_reject) {
        match next_domain(&mut ws).await {
            Some(DomainMessage::Ack { leases }) => got_ack = leases == [434_343],
            Some(DomainMessage::Reject { code, message }) => {
                got_reject =
                    code == "not_leased" && message.contains("inline output does not match")
            }
            Some(_) => {}
            None => panic!("session closed"),
        }
    }
    // Still alive: a heartbeat is accepted silently, and the node is listed online.
    ws.send(Message::Binary(
        encode(
            &node,
            &NodeMessage::Heartbeat {
                seq: 2,
                running: vec![],
                free_slots: 1,
            },
        )
        .into(),
    ))
    .await
    .expect("send");
    let nodes = client.nodes().await.expect("nodes");
    let me = nodes["nodes"]
        .as_array()
        .expect("list")
        .iter()
        .find(|n| n["id"] == node.id().to_string())
        .cloned()
        .expect("listed");
    assert_eq!(me["state"], "online");

    // An oversized frame closes that session only.
    let mut other = join(addr, &key(8), 1).await;
    let huge = envelope::seal(&key(8), Context::Node, &vec![b' '; 512 << 10]);
    let _ = other.send(Message::Binary(huge.into())).await;
    assert!(
        next_domain(&mut other).await.is_none(),
        "the oversized sender is disconnected"
    );
    let health = client.health().await.expect("health");
    for reason in [
        "replayed_hello",
        "bad_signature",
        "wrong_signer",
        "text_frame",
        "not_leased",
    ] {
        assert!(
            health["rejected"][reason].as_u64().unwrap_or(0) >= 1,
            "{reason} counted: {health}"
        );
    }
    d.shutdown().await;
}

#[tokio::test]
async fn a_flooding_key_does_not_starve_another() {
    let (d, _dir) = domain(|c| {
        c.rate_per_key = Rate {
            per_s: 5.0,
            burst: 20.0,
        }
    })
    .await;
    let url = format!("http://{}", d.addr());
    let flooder = stardust_sdk::Client::new(&url, key(10)).expect("client");
    let polite = stardust_sdk::Client::new(&url, key(11)).expect("client");
    let mut limited = 0;
    let mut polite_ok = 0;
    // Bounded: 200 requests from the flooder, one polite request every 20.
    for i in 0..200 {
        if matches!(
            flooder.job(1).await,
            Err(stardust_sdk::Error::Api { status: 429, .. })
        ) {
            limited += 1;
        }
        if i % 20 == 0
            && matches!(
                polite.job(1).await,
                Err(stardust_sdk::Error::Api { status: 404, .. })
            )
        {
            polite_ok += 1;
        }
    }
    assert!(limited >= 100, "the flood was limited ({limited} of 200)");
    assert_eq!(
        polite_ok, 10,
        "every polite request got through to the handler"
    );
    d.shutdown().await;
}

#[tokio::test]
async fn a_flooding_address_does_not_starve_another() {
    let (d, _dir) = domain(|c| {
        c.rate_per_addr = Rate {
            per_s: 5.0,
            burst: 20.0,
        }
    })
    .await;
    let addr = d.addr();
    let mut limited = 0;
    for _ in 0..100 {
        if raw(
            addr,
            Some([127, 0, 0, 1].into()),
            "GET",
            "/v1/health",
            &[],
            b"",
        )
        .await
        .0 == 429
        {
            limited += 1;
        }
    }
    assert!(limited >= 50, "the flood was limited ({limited} of 100)");
    let (s, body) = raw(
        addr,
        Some([127, 0, 0, 2].into()),
        "GET",
        "/v1/health",
        &[],
        b"",
    )
    .await;
    assert_eq!(s, 200, "another address is served: {body}");
    d.shutdown().await;
}
