//! The domain's rules for browser nodes, on a real in-process domain with a node speaking
//! the real protocol as a browser: a new browser is never given a task's only replica, and
//! `why` says so.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use stardust_domain::{Config, Domain};
use stardust_ledger::MICRO_PER_CREDIT;
use stardust_proto::message::{self, DomainMessage};
use stardust_proto::task::Tier;
use tokio_tungstenite::tungstenite::Message;

use common::{join_as, key, upload_hello};

/// The number of tasks in the next assignment, if one comes `within`.
async fn assigned(ws: &mut common::Ws, within: Duration) -> Option<usize> {
    let next = async {
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Binary(b) = frame
                && let Ok((_, DomainMessage::Assign { tasks })) =
                    message::decode::<DomainMessage>(&b, 1 << 20)
            {
                return Some(tasks.len());
            }
        }
        None
    };
    tokio::time::timeout(within, next).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_browser_never_runs_a_task_alone_and_why_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(dir.path().join("domain"));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.welcome_grant = 1_000 * MICRO_PER_CREDIT;
    let domain = Domain::start(config, key(200)).await.expect("domain");
    let addr = domain.addr();
    let mut browser = join_as(addr, &key(7), 2, Tier::Browser).await;

    let client = stardust_sdk::Client::new(&format!("http://{addr}"), key(100)).expect("client");
    let module = upload_hello(&client).await;
    let input = client.put_blob(b"x".to_vec()).await.expect("input");
    let spec = |redundancy: u8| -> stardust_proto::job::JobSpec {
        serde_json::from_value(serde_json::json!({
            "name": "solo",
            "module": module.to_string(),
            "input": input.to_string(),
            "args": ["{i}"],
            "redundancy": redundancy,
            "limits": {"fuel": 1_000_000_000u64, "memory_bytes": 64u64 << 20, "wall_ms": 10_000, "output_bytes": 4096},
            "sweep": {"grid": {"i": [1, 2]}},
        }))
        .expect("spec")
    };
    let solo = client.submit(&spec(1)).await.expect("submit");

    // Several dispatch rounds pass (one every 250 ms at most): nothing is assigned.
    assert_eq!(
        assigned(&mut browser, Duration::from_millis(1500)).await,
        None,
        "a new browser was given a task's only replica"
    );
    let why = client.why(solo).await.expect("why");
    let text = why.to_string();
    assert!(
        text.contains("browsers without the record to run a task alone"),
        "{text}"
    );
    let status = client.job(solo).await.expect("status");
    assert_eq!(status["tasks_pending"], 2, "{status}");

    // With redundancy 2 it may take one replica of each task.
    let pair = client.submit(&spec(2)).await.expect("submit");
    let n = assigned(&mut browser, Duration::from_secs(5))
        .await
        .expect("an assignment for the redundancy-2 job");
    assert!(n >= 1, "{n}");
    let status = client.job(pair).await.expect("status");
    assert_eq!(status["state"], "running", "{status}");
    domain.shutdown().await;
}
