//! The dispatcher keeps pending tasks between rounds: new jobs' tasks are dispatched
//! without reading them back from the database, and a task made pending again (a lease
//! that lapsed) is still found. A real in-process domain and the real node library.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Running, counter, join, join_with, key, next_domain, start, sweep};

/// `stardust_dispatch_pending_reads_total` from `/metrics`.
async fn pending_reads(addr: SocketAddr) -> u64 {
    counter(addr, "stardust_dispatch_pending_reads_total").await
}

/// `stardust_dispatch_at_submission_total` from `/metrics`.
async fn at_submission(addr: SocketAddr) -> u64 {
    counter(addr, "stardust_dispatch_at_submission_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_jobs_are_dispatched_without_reading_them_back_and_lapsed_work_is_found() {
    let Running {
        dir,
        domain,
        url,
        client,
        module,
        input,
    } = start(|config| config.lease_ms = 1_000).await;
    let addr = domain.addr();

    // A node that takes a lease and never answers: its lease lapses, and the task, pending
    // again, must still be found by the dispatcher.
    let mut silent = join(addr, &key(2), 1).await;
    let lapsed = client
        .submit(&sweep(&module, &input, 1))
        .await
        .expect("submit");
    let assigned = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match next_domain(&mut silent).await {
                Some(stardust_proto::message::DomainMessage::Assign { tasks }) => break tasks,
                Some(_) => {}
                None => panic!("the silent node's session ended"),
            }
        }
    })
    .await
    .expect("the silent node is given the task");
    assert_eq!(assigned.len(), 1);
    drop(silent);

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut c = stardust_node::Config::new(url.clone(), dir.path().join("node"));
    c.slots = 2;
    c.bench = false;
    let node = tokio::spawn(stardust_node::run(c, key(1), stopped));
    let s = tokio::time::timeout(Duration::from_secs(30), client.wait(lapsed, |_| {}))
        .await
        .expect("the lapsed task is run by the other node")
        .expect("status");
    assert_eq!(s["state"], "completed", "{s}");

    // Single-task jobs one after another: each is dispatched from what its creation told
    // the dispatcher, not from a read (the cache re-reads at most once a second).
    let before = pending_reads(addr).await;
    let started = std::time::Instant::now();
    let jobs = 30;
    for _ in 0..jobs {
        let job = client
            .submit(&sweep(&module, &input, 1))
            .await
            .expect("submit");
        let s = tokio::time::timeout(Duration::from_secs(30), client.wait(job, |_| {}))
            .await
            .expect("the job ends")
            .expect("status");
        assert_eq!(s["state"], "completed", "{s}");
    }
    let reads = pending_reads(addr).await - before;
    let seconds = started.elapsed().as_secs() + 1;
    assert!(
        reads <= 2 * seconds + 2,
        "{reads} reads of pending tasks for {jobs} jobs in {seconds} s"
    );
    assert!(reads < jobs, "{reads} reads for {jobs} jobs");

    // A larger job: more than one round's worth, all of it served.
    common::sweep_completes(&client, &module, &input, 300).await;

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), node).await;
    domain.shutdown().await;
}

/// Assignments `ws` receives until none has come for half a second.
async fn assigned(ws: &mut common::Ws) -> usize {
    let mut n = 0;
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(500), next_domain(ws)).await {
        match m {
            Some(stardust_proto::message::DomainMessage::Assign { tasks }) => n += tasks.len(),
            Some(_) => {}
            None => panic!("the session ended"),
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_leased_at_most_three_quarters_of_the_queue_its_hello_says() {
    // A domain that would lease 100 a slot up front: only the nodes' queues hold it back.
    let Running {
        domain,
        client,
        module,
        input,
        ..
    } = start(|config| config.lease_ahead = 100).await;
    let addr = domain.addr();
    let tier = stardust_proto::task::Tier::Small;
    let mut small = join_with(addr, &key(2), 1, tier, Some(8)).await;
    let mut silent = join_with(addr, &key(3), 1, tier, None).await;
    let mut nothing = join_with(addr, &key(4), 2, tier, Some(0)).await;
    client
        .submit(&sweep(&module, &input, 200))
        .await
        .expect("submit");
    let (a, b, c) = tokio::join!(
        assigned(&mut small),
        assigned(&mut silent),
        assigned(&mut nothing)
    );
    // 8 queued: 6. A hello that does not say: 64 a slot, so 48. A queue of nothing: still
    // one lease a slot.
    assert_eq!((a, b, c), (6, 48, 2));
    domain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_finding_nothing_waiting_is_leased_at_submission_and_never_ahead_of_waiting_work() {
    let Running {
        domain,
        client,
        module,
        input,
        ..
    } = start(|_| {}).await;
    let addr = domain.addr();
    let status = |job: u64| {
        let client = &client;
        async move { client.job(job).await.expect("status") }
    };

    // No node: nothing can be leased at submission; the job waits for the dispatcher, which
    // gives it to the first node that joins.
    let waited = client
        .submit(&sweep(&module, &input, 1))
        .await
        .expect("submit");
    assert_eq!(at_submission(addr).await, 0);
    assert_eq!(status(waited).await["state"], "queued");
    let mut node = join(addr, &key(2), 2).await;
    assert_eq!(assigned(&mut node).await, 1, "the waiting task");
    assert_eq!(at_submission(addr).await, 0);

    // Nothing waits and the node has room: the submission leases its job itself, and the
    // node has it when the submission answers (the dispatcher's rounds do not come into
    // it: the counter says which path served it).
    let leased = client
        .submit(&sweep(&module, &input, 1))
        .await
        .expect("submit");
    assert_eq!(at_submission(addr).await, 1);
    let s = status(leased).await;
    assert_eq!(
        (&s["state"], &s["tasks_running"]),
        (&"running".into(), &1.into()),
        "{s}"
    );
    let first = assigned(&mut node).await;
    assert_eq!(first, 1, "the new job's task");

    // A job larger than the node's room: what it can take is leased at submission, the
    // rest waits...
    let large = client
        .submit(&sweep(&module, &input, 40))
        .await
        .expect("submit");
    assert_eq!(at_submission(addr).await, 2);
    let taken = assigned(&mut node).await;
    assert!((1..40).contains(&taken), "{taken} of 40 leased at once");
    let s = status(large).await;
    assert_eq!(s["tasks_running"], taken, "{s}");
    assert_eq!(s["tasks_pending"], 40, "{s}");
    // ...and a job submitted behind it is not leased ahead of it: it waits its turn.
    let behind = client
        .submit(&sweep(&module, &input, 1))
        .await
        .expect("submit");
    assert_eq!(at_submission(addr).await, 2, "work was waiting");
    assert_eq!(status(behind).await["state"], "queued");
    assert_eq!(assigned(&mut node).await, 0, "the node has no room");

    domain.shutdown().await;
}
