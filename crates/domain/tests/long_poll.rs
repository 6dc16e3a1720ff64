//! `GET /v1/jobs/{id}?wait_ms=N`: a status request held until the job ends (or N ms pass),
//! against a real in-process domain and, for the run, the real node library.

mod common;

use std::time::{Duration, Instant};

use common::{Running, key, start};

fn spec(module: &str, input: &str) -> stardust_proto::job::JobSpec {
    serde_json::from_value(serde_json::json!({
        "module": module,
        "input": input,
        "args": ["{i}"],
        "limits": {"fuel": 1_000_000_000u64, "memory_bytes": 64u64 << 20, "wall_ms": 10_000, "output_bytes": 4096},
        "sweep": {"grid": {"i": [1, 2]}},
    }))
    .expect("spec")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_request_waits_for_its_own_job_to_end_and_no_longer() {
    let Running {
        dir,
        domain,
        url,
        client,
        module,
        input,
    } = start(|_| {}).await;

    // No node yet: the jobs stay queued.
    let a = client
        .submit(&spec(&module, &input))
        .await
        .expect("submit a");
    let b = client
        .submit(&spec(&module, &input))
        .await
        .expect("submit b");

    // Bounded: a wait beyond the limit is refused, saying so.
    match client.job_wait(a, 60_001).await {
        Err(stardust_sdk::Error::Api {
            status,
            code,
            message,
        }) => {
            assert_eq!((status, code.as_str()), (400, "invalid_wait"), "{message}");
            assert!(message.contains("60000"), "{message}");
        }
        other => panic!("wait_ms 60001 must be refused: {other:?}"),
    }

    // A job that does not end: answered when the wait is over, with its state then.
    let held = Instant::now();
    let s = client.job_wait(a, 150).await.expect("status");
    assert_eq!(s["state"], "queued", "{s}");
    assert!(
        held.elapsed() >= Duration::from_millis(150),
        "answered before the wait was over"
    );

    // Cancelling a job answers the requests held for it, and not those for another job.
    let hold = |job: u64| {
        let client = client.clone();
        tokio::spawn(async move { client.job_wait(job, 60_000).await })
    };
    let (waiter, waiter_b) = (hold(a), hold(b));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cancelled = client.cancel(b).await.expect("cancel b");
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let s = tokio::time::timeout(Duration::from_secs(10), waiter_b)
        .await
        .expect("the held request for b is answered when b is cancelled")
        .expect("join")
        .expect("status");
    assert_eq!(s["state"], "cancelled", "{s}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the end of job b answered a wait for job a"
    );

    // A node comes and runs job a: the held request is answered with its end.
    let node = common::node(&url, dir.path(), 2, None);
    let s = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the held request is answered when the job ends")
        .expect("join")
        .expect("status");
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(s["tasks_verified"], 2, "{s}");

    // A job already ended is answered at once, whatever the wait.
    let s = tokio::time::timeout(Duration::from_secs(5), client.job_wait(b, 60_000))
        .await
        .expect("an ended job is answered at once")
        .expect("status");
    assert_eq!(s["state"], "cancelled", "{s}");

    // The SDK's wait ends with the job.
    let c = client
        .submit(&spec(&module, &input))
        .await
        .expect("submit c");
    let s = tokio::time::timeout(Duration::from_secs(30), client.wait(c, |_| {}))
        .await
        .expect("wait ends")
        .expect("status");
    assert_eq!(s["state"], "completed", "{s}");

    // Only the owner's key may wait on a job.
    let other = stardust_sdk::Client::new(&url, key(101)).expect("client");
    match other.job_wait(a, 1000).await {
        Err(stardust_sdk::Error::Api { status, .. }) => assert_eq!(status, 404),
        other => panic!("another key's wait must be refused: {other:?}"),
    }

    node.stop().await;
    domain.shutdown().await;
}

/// `POST /v1/jobs?wait_ms=N`: submission and the long poll in one request, answered with
/// the job's results when it ends in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_may_wait_for_its_job_and_answer_with_its_results() {
    let Running {
        dir,
        domain,
        url,
        client,
        module,
        input,
    } = start(|_| {}).await;

    // A wait beyond the limit refuses the submission: no job is made.
    let before = client.submit(&spec(&module, &input)).await.expect("submit");
    match client.submit_wait(&spec(&module, &input), 60_001).await {
        Err(stardust_sdk::Error::Api { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (400, "invalid_wait"));
        }
        other => panic!("wait_ms 60001 must be refused: {other:?}"),
    }
    let next = client.submit(&spec(&module, &input)).await.expect("submit");
    assert_eq!(next, before + 1, "the refused submission made a job");

    // No node: answered when the wait is over, with the job as it is then and no results.
    let held = Instant::now();
    let a = client
        .submit_wait(&spec(&module, &input), 150)
        .await
        .expect("submit and wait");
    assert!(held.elapsed() >= Duration::from_millis(150), "{a}");
    assert_eq!(a["job"]["state"], "queued", "{a}");
    assert_eq!(a["job"]["job_id"], a["job_id"], "{a}");
    assert!(a.get("results").is_none(), "{a}");

    // With a node: answered when the job ends, with each task's verified output.
    let node = common::node(&url, dir.path(), 2, None);
    let done = tokio::time::timeout(
        Duration::from_secs(30),
        client.submit_wait(&spec(&module, &input), 30_000),
    )
    .await
    .expect("answered when the job ends")
    .expect("submit and wait");
    assert_eq!(done["job"]["state"], "completed", "{done}");
    assert_eq!(done["job"]["tasks_verified"], 2, "{done}");
    let results = done["results"].as_array().expect("results");
    let mut texts: Vec<&str> = results
        .iter()
        .map(|r| r["output_text"].as_str().expect("inline output"))
        .collect();
    texts.sort_unstable();
    assert_eq!(
        texts,
        [
            "hello from task with 1 args: 1\nX",
            "hello from task with 1 args: 2\nX"
        ],
        "{done}"
    );
    // The same as asking for them afterwards.
    let job = done["job_id"].as_u64().expect("job id");
    assert_eq!(
        client.results(job).await.expect("results")["results"],
        done["results"]
    );

    node.stop().await;
    domain.shutdown().await;
}

/// A key may hold a bounded number of status requests open; past it, a clear refusal, and
/// each one answered frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_status_requests_are_bounded_per_key() {
    const PER_KEY: usize = 64;
    let Running {
        domain,
        url,
        client,
        module,
        input,
        ..
    } = start(|config| {
        let unlimited = stardust_domain::Rate {
            per_s: 1e9,
            burst: 1e9,
        };
        config.rate_per_key = unlimited;
        config.rate_per_addr = unlimited;
    })
    .await;
    // No node: the job stays queued and every wait is held.
    let a = client.submit(&spec(&module, &input)).await.expect("submit");
    let held: Vec<_> = (0..PER_KEY)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.job_wait(a, 60_000).await })
        })
        .collect();
    // Let them arrive.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "a held request was answered early"
    );
    // Until all are held, a short probe may still get in (and is answered when its wait
    // is over): probe until refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refusal = loop {
        match client.job_wait(a, 100).await {
            Err(stardust_sdk::Error::Api {
                status,
                code,
                message,
            }) => break (status, code, message),
            Ok(s) => assert_eq!(s["state"], "queued", "{s}"),
            Err(e) => panic!("{e}"),
        }
        assert!(
            Instant::now() < deadline,
            "{PER_KEY} held requests never made a further one refused"
        );
    };
    assert_eq!(
        (refusal.0, refusal.1.as_str()),
        (429, "too_many_waits"),
        "{}",
        refusal.2
    );
    assert!(refusal.2.contains("64"), "{}", refusal.2);
    // Another key is not held back by this one's waits.
    let other = stardust_sdk::Client::new(&url, key(101)).expect("client");
    let b = other.submit(&spec(&module, &input)).await.expect("submit");
    let s = other.job_wait(b, 100).await.expect("another key waits");
    assert_eq!(s["state"], "queued", "{s}");
    // A wait without wait_ms is never refused.
    let s = client.job(a).await.expect("status");
    assert_eq!(s["state"], "queued", "{s}");
    // Cancelling answers the held requests; their places are free again.
    client.cancel(a).await.expect("cancel");
    for h in held {
        let s = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("answered")
            .expect("join")
            .expect("status");
        assert_eq!(s["state"], "cancelled", "{s}");
    }
    let c = client.submit(&spec(&module, &input)).await.expect("submit");
    let s = client.job_wait(c, 100).await.expect("a wait is held again");
    assert_eq!(s["state"], "queued", "{s}");
    domain.shutdown().await;
}

/// A one-slot node with nothing else to do sends each result the moment its task ends (the
/// slot writes the frame itself): every one-task submission is answered with its output
/// within a wait far shorter than the node's resend interval (10 s), one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_submissions_are_answered_one_after_another() {
    let Running {
        dir,
        domain,
        url,
        client,
        module,
        input,
    } = start(|_| {}).await;
    let node = common::node(&url, dir.path(), 1, None);
    let mut one = spec(&module, &input);
    one.sweep =
        Some(serde_json::from_value(serde_json::json!({"grid": {"i": [7]}})).expect("sweep"));
    // The first waits for the node to connect; the others find it idle.
    let first = client.submit_wait(&one, 30_000).await.expect("first");
    assert_eq!(first["job"]["state"], "completed", "{first}");
    for n in 0..5 {
        let done = client
            .submit_wait(&one, 5_000)
            .await
            .expect("submit and wait");
        assert_eq!(done["job"]["state"], "completed", "round {n}: {done}");
        assert_eq!(
            done["results"][0]["output_text"], "hello from task with 1 args: 7\nX",
            "round {n}: {done}"
        );
        // Answered from what recording the result wrote (without reading it back): the same
        // as reading the job and its results afterwards.
        let job = done["job_id"].as_u64().expect("job id");
        assert_eq!(
            client.job(job).await.expect("job"),
            done["job"],
            "round {n}"
        );
        assert_eq!(
            client.results(job).await.expect("results")["results"],
            done["results"],
            "round {n}"
        );
    }
    node.stop().await;
    domain.shutdown().await;
}
