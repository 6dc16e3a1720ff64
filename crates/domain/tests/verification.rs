//! Untrusted nodes cannot cheat: a real in-process domain, three honest nodes (the real
//! node library, real sandboxes) and one liar speaking the real protocol with real keys
//! and signatures, returning wrong outputs for everything it is given. A job with
//! redundancy 3 must end with every accepted result correct, the liar slashed, its
//! reputation below every honest node's, and the ledger verifying.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use stardust_domain::store::Store;
use stardust_domain::{Config, Domain};
use stardust_ledger::{Account, MICRO_PER_CREDIT};
use stardust_proto::content::ContentId;
use stardust_proto::identity::Identity;
use stardust_proto::message::{self, DomainMessage, ResultBatch, TaskResult, encode};
use stardust_proto::task::{RunReport, Status};
use tokio_tungstenite::tungstenite::Message;

use common::{join, key, upload_hello};

const TASKS: usize = 30;

/// Answers every assignment with made-up output (uploaded first, as the protocol asks)
/// and plausible fuel, signed with its own key. Runs until the socket closes.
async fn liar(addr: SocketAddr, me: Identity) {
    let client = stardust_sdk::Client::new(&format!("http://{addr}"), me.clone()).expect("client");
    let mut ws = join(addr, &me, 4).await;
    let mut lies = 0u64;
    while let Some(Ok(frame)) = ws.next().await {
        let Message::Binary(bytes) = frame else {
            continue;
        };
        let Ok((_, DomainMessage::Assign { tasks })) =
            message::decode::<DomainMessage>(&bytes, 1 << 20)
        else {
            continue;
        };
        let mut results = Vec::new();
        for a in tasks {
            lies += 1;
            let output = format!("forty-two {lies}").into_bytes();
            let report = RunReport {
                status: Status::Ok,
                trap: None,
                exit_code: Some(0),
                fuel_used: 123_456,
                output: ContentId::of(&output),
                output_len: output.len() as u64,
                wall_ms: 1,
                detail: None,
            };
            client.put_blob(output).await.expect("upload the lie");
            results.push(TaskResult {
                lease: a.lease,
                task: a.spec.task,
                report,
                output: None,
            });
        }
        let frame = encode(&me, &ResultBatch { results });
        if ws.send(Message::Binary(frame.into())).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_node_is_outvoted_slashed_and_ranked_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let domain_key = key(200);
    let mut config = Config::new(dir.path().join("domain"));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.heartbeat_ms = 500;
    config.stake = MICRO_PER_CREDIT;
    config.welcome_grant = 1_000_000 * MICRO_PER_CREDIT;
    let domain = Domain::start(config, domain_key.clone())
        .await
        .expect("domain");
    let addr = domain.addr();

    // Stake for everyone: the honest nodes plenty, the liar enough for four leases.
    let honest: Vec<Identity> = (1..=3).map(key).collect();
    let liar_key = key(66);
    {
        let store = Store::open_sqlite(&dir.path().join("domain"))
            .await
            .expect("store")
            .with_ledger(domain_key.clone(), Default::default());
        for h in &honest {
            store
                .grant(Account::Stake(h.id()), 100 * MICRO_PER_CREDIT, 0)
                .await
                .expect("stake");
        }
        store
            .grant(Account::Stake(liar_key.id()), 4 * MICRO_PER_CREDIT, 0)
            .await
            .expect("stake");
    }

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut nodes = Vec::new();
    for (i, h) in honest.iter().enumerate() {
        let mut c = stardust_node::Config::new(
            format!("http://{addr}"),
            dir.path().join(format!("node{i}")),
        );
        c.slots = 1;
        c.bench = false;
        nodes.push(tokio::spawn(stardust_node::run(
            c,
            h.clone(),
            stopped.clone(),
        )));
    }
    let liar_task = tokio::spawn(liar(addr, liar_key.clone()));

    // Wait until all four are connected, so the liar gets its share of replicas.
    let client = stardust_sdk::Client::new(&format!("http://{addr}"), key(100)).expect("client");
    let start = Instant::now();
    loop {
        let n = client.nodes().await.expect("nodes");
        let online = n["nodes"]
            .as_array()
            .expect("list")
            .iter()
            .filter(|n| n["state"] == "online")
            .count();
        if online == 4 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nodes did not connect: {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let module = upload_hello(&client).await;
    let input = client.put_blob(b"x".to_vec()).await.expect("input");
    let spec: stardust_proto::job::JobSpec = serde_json::from_value(serde_json::json!({
        "name": "liar",
        "module": module.to_string(),
        "input": input.to_string(),
        "args": ["{i}"],
        "redundancy": 3,
        "adaptive": false,
        "limits": {"fuel": 1_000_000_000u64, "memory_bytes": 64u64 << 20, "wall_ms": 10_000, "output_bytes": 4096},
        "sweep": {"grid": {"i": (0..TASKS).collect::<Vec<_>>()}},
    }))
    .expect("spec");
    let job = client.submit(&spec).await.expect("submit");
    let status = tokio::time::timeout(Duration::from_secs(120), client.wait(job, |_| {}))
        .await
        .expect("the job ends")
        .expect("status");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["tasks_verified"], TASKS, "{status}");

    // Every accepted result is the true one.
    let results = client.results(job).await.expect("results");
    for r in results["results"].as_array().expect("results") {
        let i = r["index"].as_u64().expect("index");
        assert_eq!(
            r["output_text"].as_str(),
            Some(format!("hello from task with 1 args: {i}\nX").as_str()),
            "{r}"
        );
    }

    // The liar lost quorums, was slashed, and ranks below every honest node.
    let nodes_now = client.nodes().await.expect("nodes");
    let list = nodes_now["nodes"].as_array().expect("list");
    let find = |id: &Identity| {
        list.iter()
            .find(|n| n["id"] == id.id().to_string())
            .unwrap_or_else(|| panic!("node {} listed", id.id()))
    };
    let l = find(&liar_key);
    assert!(l["disagreed"].as_u64().unwrap_or(0) >= 1, "{l}");
    assert_eq!(l["agreed"], 0, "{l}");
    assert!(
        l["stake"].as_i64().expect("stake") < 4 * MICRO_PER_CREDIT as i64,
        "slashed: {l}"
    );
    let liar_rep = l["reputation"].as_f64().expect("reputation");
    for h in &honest {
        let n = find(h);
        assert_eq!(n["disagreed"], 0, "{n}");
        assert!(
            n["credits"].as_i64().unwrap_or(0) > 0,
            "honest work is paid: {n}"
        );
        assert!(
            n["reputation"].as_f64().expect("reputation") > liar_rep,
            "honest {} above the liar {liar_rep}",
            n["reputation"]
        );
    }
    assert!(
        l["credits"].as_i64().unwrap_or(0) == 0,
        "lies earn nothing: {l}"
    );

    let _ = stop.send(true);
    for n in nodes {
        let _ = tokio::time::timeout(Duration::from_secs(30), n).await;
    }
    liar_task.abort();
    domain.shutdown().await;

    // The ledger verifies, with the slashes in it.
    let store = Store::open_sqlite(&dir.path().join("domain"))
        .await
        .expect("store");
    let records = store.ledger_records(0, 1_000_000).await.expect("records");
    let ledger =
        stardust_ledger::verify(domain_key.id(), records.iter().map(|r| r.record.as_slice()))
            .expect("the ledger verifies");
    assert!(ledger.balance(Account::Treasury) >= i128::from(MICRO_PER_CREDIT));
    assert!(records.iter().any(|r| r.id.starts_with("slash:")));
}
