//! A domain pinned to a core runs there with every thread it starts, SQLite's checkpointer
//! included, and leaves its caller's threads alone.
#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;

use stardust_domain::{Cores, StartError};

/// `0-2,5` → [0, 1, 2, 5].
fn parse_list(list: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().expect("core"), b.parse().expect("core"));
                out.extend(a..=b);
            }
            None => out.push(part.parse().expect("core")),
        }
    }
    out
}

/// The cores a thread may run on, from its /proc status.
fn allowed(status: &str) -> Vec<usize> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc status");
    parse_list(line)
}

/// This process's threads: name → the cores each thread of that name may run on.
fn threads() -> BTreeMap<String, Vec<Vec<usize>>> {
    let mut out: BTreeMap<String, Vec<Vec<usize>>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = entry.expect("task entry").path();
        // A thread may end while we look.
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        out.entry(name.trim().to_string())
            .or_default()
            .push(allowed(&status));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_domain_and_its_checkpointer_run_on_its_core_only() {
    let mine = allowed(
        &std::fs::read_to_string("/proc/thread-self/status").expect("/proc/thread-self/status"),
    );
    if mine.len() < 2 {
        eprintln!(
            "skipped: this process may run on one core only ({mine:?}); pinning changes nothing"
        );
        return;
    }
    let core = mine[0];
    let running = common::start(|c| c.cores = Cores::One(core)).await;
    // A job through the store: SQLite is busy, not merely opened.
    let job = running
        .client
        .submit(&common::sweep(&running.module, &running.input, 3))
        .await
        .expect("submit");
    assert!(job > 0);

    let threads = threads();
    let domain = threads
        .get("stardust-domain")
        .expect("the domain's runtime threads");
    let checkpointer = threads
        .get("stardust-wal")
        .expect("SQLite's checkpointer thread");
    for mask in domain.iter().chain(checkpointer) {
        assert_eq!(
            mask,
            &vec![core],
            "a domain thread not on core {core}: {threads:?}"
        );
    }
    // The caller's threads are left as they were.
    let now = allowed(
        &std::fs::read_to_string("/proc/thread-self/status").expect("/proc/thread-self/status"),
    );
    assert_eq!(now, mine);
    running.domain.shutdown().await;
}

#[tokio::test]
async fn a_core_the_process_may_not_use_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = stardust_domain::Config::new(dir.path().join("domain"));
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.cores = Cores::One(100_000);
    match stardust_domain::Domain::start(config, common::key(200)).await {
        Err(StartError::Cores(why)) => assert!(why.contains("core 100000"), "{why}"),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a domain started on core 100000"),
    }
}
