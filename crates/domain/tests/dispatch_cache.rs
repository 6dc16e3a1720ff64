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

    let node = common::node(&url, dir.path(), 2, None);
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

    node.stop().await;
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

/// A node that answers each assignment the moment it arrives, with inline output; returns
/// after `jobs` one-task jobs, each submitted once the last was answered, asserting that
/// every result was acknowledged (recorded) and none refused.
async fn answer_at_once(r: &Running, jobs: usize) {
    use futures_util::SinkExt;
    use stardust_proto::content::ContentId;
    use stardust_proto::message::{DomainMessage, Inline, ResultBatch, TaskResult, encode};
    use stardust_proto::task::{RunReport, Status};
    use tokio_tungstenite::tungstenite::Message;

    let node = key(3);
    let mut ws = join(r.domain.addr(), &node, 2).await;
    for n in 0..jobs {
        let client = r.client.clone();
        let spec = sweep(&r.module, &r.input, 1);
        let submitted = tokio::spawn(async move { client.submit(&spec).await });
        let lease = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match next_domain(&mut ws).await {
                    Some(DomainMessage::Assign { tasks }) => break tasks,
                    Some(_) => {}
                    None => panic!("the session ended"),
                }
            }
        })
        .await
        .expect("an assignment");
        let results = lease
            .iter()
            .map(|a| {
                let output = format!("job {n}").into_bytes();
                TaskResult {
                    lease: a.lease,
                    task: a.spec.task,
                    report: RunReport {
                        status: Status::Ok,
                        trap: None,
                        exit_code: Some(0),
                        fuel_used: 1_000,
                        output: ContentId::of(&output),
                        output_len: output.len() as u64,
                        wall_ms: 0,
                        detail: None,
                    },
                    output: Some(Inline(output)),
                }
            })
            .collect();
        ws.send(Message::Binary(
            encode(&node, &ResultBatch { results }).into(),
        ))
        .await
        .expect("send results");
        let acked = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match next_domain(&mut ws).await {
                    Some(DomainMessage::Ack { leases }) => break leases,
                    Some(DomainMessage::Reject { code, message }) => {
                        panic!("job {n}: the result was refused: {code}: {message}")
                    }
                    Some(_) => {}
                    None => panic!("the session ended"),
                }
            }
        })
        .await
        .expect("an acknowledgement");
        assert_eq!(
            acked,
            lease.iter().map(|a| a.lease).collect::<Vec<_>>(),
            "job {n}"
        );
        let job = submitted.await.expect("join").expect("submit");
        let status = r.client.job(job).await.expect("status");
        assert_eq!(status["state"], "completed", "job {n}: {status}");
    }
    // A job whose submission meets the dispatcher mid-round (its 250 ms tick) is leased by
    // the dispatcher instead: most, not all, take the path under test.
    let early = at_submission(r.domain.addr()).await;
    assert!(
        early >= (jobs as u64).div_ceil(2),
        "{early} of {jobs} jobs leased at their submission"
    );
}

/// A submission's assignments leave before its commit; a node that answers at once must
/// find its result recorded, never refused for a lease not yet committed. On SQLite the
/// one connection orders them anyway; on PostgreSQL the recorder's connection would not
/// see the lease before the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_sent_before_their_leases_commit_are_recorded_on_sqlite() {
    let r = start(|_| {}).await;
    answer_at_once(&r, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_sent_before_their_leases_commit_are_recorded_on_postgres() {
    let Some(url) = common::postgres_database("results before commit").await else {
        return;
    };
    let r = start(|c| c.database_url = Some(url.clone())).await;
    // Every commit that made a lease takes 50 ms more (a deferred trigger runs at COMMIT):
    // a result recorded before its lease's commit ends would find no lease.
    let pool = sqlx::AnyPool::connect(&url).await.expect("connect");
    for statement in [
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS          $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON leases          DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    ] {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .expect("slow commits");
    }
    answer_at_once(&r, 10).await;
}

/// A submission whose commit fails after its assignments left: the client gets an error,
/// the node is told to drop the lease, nothing of the job exists and no credit moved; the
/// next submission runs. PostgreSQL, whose commit a deferred trigger can make fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_cancels_the_leases_it_sent_ahead() {
    use stardust_proto::message::DomainMessage;

    let Some(url) = common::postgres_database("a failed commit").await else {
        return;
    };
    let r = start(|c| c.database_url = Some(url.clone())).await;
    let pool = sqlx::AnyPool::connect(&url).await.expect("connect");
    for statement in [
        "CREATE FUNCTION failing_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'the disk is full'; END $$",
        "CREATE CONSTRAINT TRIGGER failing_commit AFTER INSERT ON leases \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION failing_commit()",
    ] {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .expect("failing commits");
    }
    let before = r.client.account().await.expect("account");
    let mut ws = join(r.domain.addr(), &key(4), 2).await;
    let refused = r.client.submit(&sweep(&r.module, &r.input, 1)).await;
    assert!(refused.is_err(), "the submission failed: {refused:?}");
    let (assigned, cancelled) = tokio::time::timeout(Duration::from_secs(10), async {
        let mut assigned = Vec::new();
        loop {
            match next_domain(&mut ws).await {
                Some(DomainMessage::Assign { tasks }) => {
                    assigned.extend(tasks.iter().map(|a| a.lease));
                }
                Some(DomainMessage::Cancel { leases }) => break (assigned, leases),
                Some(_) => {}
                None => panic!("the session ended"),
            }
        }
    })
    .await
    .expect("the lease sent ahead is cancelled");
    assert_eq!(assigned.len(), 1, "the lease left before the commit");
    assert_eq!(cancelled, assigned);
    let after = r.client.account().await.expect("account");
    assert_eq!(after["balance"], before["balance"], "no credit moved");
    let ledger = r.client.ledger().await.expect("ledger");
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .expect("count jobs");
    assert_eq!(stored, 0, "no job exists: {ledger}");

    sqlx::query("DROP TRIGGER failing_commit ON leases")
        .execute(&pool)
        .await
        .expect("drop the trigger");
    drop(ws);
    answer_at_once(&r, 1).await;
}
