//! The storage conformance suite: every test runs against SQLite and, when
//! `STARDUST_TEST_POSTGRES_URL` names a PostgreSQL server (CI starts one; required when
//! `CI` is set), against a fresh database on it.

use stardust_proto::content::ContentId;
use stardust_proto::identity::{Identity, NodeId};
use stardust_proto::job::JobSpec;
use stardust_proto::task::{Hardware, RunReport, Status, Tier};

use super::*;

const MAX_ATTEMPTS: u32 = 3;
const RETRY: Retry = Retry {
    max_attempts: MAX_ATTEMPTS,
    max_replicas: 4,
};

fn node(i: u8) -> NodeId {
    Identity::from_secret_bytes(&[i; 32]).id()
}

/// A fresh store per backend: SQLite in a temporary directory, and PostgreSQL in a new
/// database when configured.
async fn backends() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = vec![(
        Store::open_sqlite(dir.path()).await.expect("sqlite"),
        Some(dir),
    )];
    match std::env::var("STARDUST_TEST_POSTGRES_URL") {
        Ok(admin) => {
            let name = format!(
                "stardust_test_{}",
                std::process::id() as u64 * 1_000_000 + next_db()
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
            out.push((
                Store::open(&format!("{base}/{name}"))
                    .await
                    .expect("postgres"),
                None,
            ));
        }
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set STARDUST_TEST_POSTGRES_URL"
            );
            eprintln!("PostgreSQL not configured (STARDUST_TEST_POSTGRES_URL): SQLite only");
        }
    }
    out
}

fn next_db() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn spec(redundancy: u8, n: usize) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": "t",
        "module": ContentId::of(b"module").to_string(),
        "input": ContentId::of(b"").to_string(),
        "args": ["{i}"],
        "sweep": {"grid": {"i": (0..n).collect::<Vec<_>>()}},
        "redundancy": redundancy,
    }))
    .expect("spec")
}

async fn job(store: &Store, redundancy: u8, n: usize) -> JobId {
    let s = spec(redundancy, n);
    let trials = s.expand().expect("expand");
    store
        .create_job(node(100), &s, ContentId::of(b"metered"), &trials, 1_000)
        .await
        .expect("create job")
}

fn report(output: &[u8], fuel: u64) -> RunReport {
    RunReport {
        status: Status::Ok,
        trap: None,
        exit_code: Some(0),
        fuel_used: fuel,
        output: ContentId::of(output),
        output_len: output.len() as u64,
        wall_ms: 1,
        detail: None,
    }
}

async fn try_record(
    store: &Store,
    lease: LeaseId,
    node: NodeId,
    task: TaskId,
    report: &RunReport,
    now: i64,
) -> std::result::Result<Recorded, RecordError> {
    store
        .record_result(
            Submitted {
                lease,
                node,
                task,
                report,
                envelope: b"",
            },
            RETRY,
            now,
        )
        .await
}

async fn record(store: &Store, lease: LeaseId, n: NodeId, task: TaskId, r: &RunReport) -> Recorded {
    let submitted = Submitted {
        lease,
        node: n,
        task,
        report: r,
        envelope: b"envelope",
    };
    store
        .record_result(submitted, RETRY, 2_000)
        .await
        .expect("record")
}

#[tokio::test]
async fn migrations_are_idempotent() {
    for (store, dir) in backends().await {
        assert_eq!(store.schema_version().await.expect("version"), 1);
        if let Some(dir) = dir {
            let again = Store::open_sqlite(dir.path()).await.expect("reopen");
            assert_eq!(again.schema_version().await.expect("version"), 1);
        }
    }
}

#[tokio::test]
async fn blobs_and_modules() {
    for (store, _dir) in backends().await {
        let id = ContentId::of(b"bytes");
        assert!(store.put_blob(id, b"bytes", 1).await.expect("put"));
        assert!(
            !store.put_blob(id, b"bytes", 2).await.expect("put again"),
            "second put is a no-op"
        );
        assert_eq!(
            store.blob(id).await.expect("get").as_deref(),
            Some(&b"bytes"[..])
        );
        assert!(store.has_blob(id).await.expect("has"));
        assert_eq!(
            store.blob(ContentId::of(b"other")).await.expect("get"),
            None
        );
        store
            .put_module(id, ContentId::of(b"metered"), node(1), 3)
            .await
            .expect("module");
        store
            .put_module(id, ContentId::of(b"other"), node(2), 4)
            .await
            .expect("module again");
        assert_eq!(
            store.module(id).await.expect("module"),
            Some((ContentId::of(b"metered"), node(1))),
            "first upload wins"
        );
    }
}

#[tokio::test]
async fn a_job_runs_to_verified_with_redundancy_two() {
    for (store, _dir) in backends().await {
        let id = job(&store, 2, 3).await;
        let j = store.job(id).await.expect("job").expect("exists");
        assert_eq!(
            (j.state.as_str(), j.counts.total, j.counts.pending),
            ("queued", 3, 3)
        );
        let pending = store.pending_tasks(10).await.expect("pending");
        assert_eq!(pending.len(), 3);
        assert_eq!(pending[0].spec.args, ["0"]);
        assert_eq!(pending[0].spec.module, ContentId::of(b"metered"));
        for p in &pending {
            let t = p.spec.task;
            let a = store
                .create_lease(t, node(1), 1_000, 10_000)
                .await
                .expect("lease")
                .expect("leased");
            assert_eq!(
                store
                    .create_lease(t, node(1), 1_000, 10_000)
                    .await
                    .expect("lease"),
                None,
                "one replica per node"
            );
            let b = store
                .create_lease(t, node(2), 1_000, 10_000)
                .await
                .expect("lease")
                .expect("leased");
            assert_eq!(
                store
                    .create_lease(t, node(3), 1_000, 10_000)
                    .await
                    .expect("lease"),
                None,
                "enough replicas"
            );
            let r = report(format!("out {t}").as_bytes(), 77);
            assert_eq!(record(&store, a, node(1), t, &r).await, Recorded::Stored);
            assert_eq!(
                record(&store, a, node(1), t, &r).await,
                Recorded::Duplicate,
                "a replay changes nothing"
            );
            assert_eq!(
                record(&store, b, node(2), t, &r).await,
                Recorded::Verified {
                    agree: vec![node(1), node(2)],
                    disagree: vec![]
                }
            );
        }
        let j = store.job(id).await.expect("job").expect("exists");
        assert_eq!((j.state.as_str(), j.counts.verified), ("completed", 3));
        let tasks = store.tasks(id, 0, 10).await.expect("tasks");
        assert!(
            tasks
                .iter()
                .all(|t| t.report.as_ref().is_some_and(|r| r.fuel_used == 77))
        );
        assert!(store.pending_tasks(10).await.expect("pending").is_empty());
    }
}

#[tokio::test]
async fn results_from_the_wrong_node_or_task_are_refused() {
    for (store, _dir) in backends().await {
        job(&store, 1, 2).await;
        let pending = store.pending_tasks(10).await.expect("pending");
        let (t0, t1) = (pending[0].spec.task, pending[1].spec.task);
        let lease = store
            .create_lease(t0, node(1), 0, 10_000)
            .await
            .expect("lease")
            .expect("leased");
        let r = report(b"x", 1);
        assert!(matches!(
            try_record(&store, lease, node(2), t0, &r, 1).await,
            Err(RecordError::NotLeased(_))
        ));
        assert!(matches!(
            try_record(&store, lease, node(1), t1, &r, 1).await,
            Err(RecordError::WrongTask { .. })
        ));
        assert!(matches!(
            try_record(&store, 9_999, node(1), t0, &r, 1).await,
            Err(RecordError::NotLeased(9_999))
        ));
        // A different report for an already recorded lease is refused, not overwritten.
        assert!(matches!(
            record(&store, lease, node(1), t0, &r).await,
            Recorded::Verified { .. }
        ));
        assert!(matches!(
            try_record(&store, lease, node(1), t0, &report(b"y", 1), 1).await,
            Err(RecordError::NotLeased(_))
        ));
    }
}

#[tokio::test]
async fn disagreement_adds_a_replica_and_the_minority_loses() {
    for (store, _dir) in backends().await {
        for i in 1..=3 {
            store
                .upsert_node(node(i), &Hardware::default(), Tier::Small, 1, 0)
                .await
                .expect("node");
        }
        job(&store, 2, 1).await;
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        let a = store
            .create_lease(t, node(1), 0, 10_000)
            .await
            .expect("lease")
            .expect("leased");
        let b = store
            .create_lease(t, node(2), 0, 10_000)
            .await
            .expect("lease")
            .expect("leased");
        assert_eq!(
            record(&store, a, node(1), t, &report(b"right", 5)).await,
            Recorded::Stored
        );
        assert_eq!(
            record(&store, b, node(2), t, &report(b"wrong", 5)).await,
            Recorded::MoreReplicas(1)
        );
        let pending = store.pending_tasks(10).await.expect("pending");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].replicas_on.len(), 2);
        let c = store
            .create_lease(t, node(3), 0, 10_000)
            .await
            .expect("lease")
            .expect("third replica");
        assert_eq!(
            record(&store, c, node(3), t, &report(b"right", 5)).await,
            Recorded::Verified {
                agree: vec![node(1), node(3)],
                disagree: vec![node(2)]
            }
        );
        let nodes = store.nodes().await.expect("nodes");
        let liar = nodes.iter().find(|n| n.id == node(2)).expect("liar");
        assert_eq!((liar.agreed, liar.disagreed), (0, 1));
        let one = store.node(node(2)).await.expect("node").expect("exists");
        assert_eq!((one.agreed, one.disagreed), (0, 1));
        assert_eq!(store.node(node(99)).await.expect("node"), None);
    }
}

#[tokio::test]
async fn expired_leases_retry_then_dead_letter_with_a_reason() {
    for (store, _dir) in backends().await {
        let id = job(&store, 1, 1).await;
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        for attempt in 1..=MAX_ATTEMPTS {
            let now = i64::from(attempt) * 100_000;
            store
                .create_lease(t, node(attempt as u8), now, 1_000)
                .await
                .expect("lease")
                .expect("leased");
            assert!(
                store
                    .expire_leases(now + 500, MAX_ATTEMPTS)
                    .await
                    .expect("expire")
                    .is_empty(),
                "not yet"
            );
            assert_eq!(
                store
                    .expire_leases(now + 1_001, MAX_ATTEMPTS)
                    .await
                    .expect("expire")
                    .len(),
                1
            );
        }
        let tasks = store.tasks(id, 0, 10).await.expect("tasks");
        assert_eq!(tasks[0].state, "failed");
        assert!(
            tasks[0]
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("lease expired") && r.contains("3 failed attempts"))
        );
        let j = store.job(id).await.expect("job").expect("exists");
        assert_eq!((j.state.as_str(), j.counts.failed), ("failed", 1));
    }
}

#[tokio::test]
async fn renewals_and_restart_grace_keep_leases_alive() {
    for (store, _dir) in backends().await {
        job(&store, 1, 1).await;
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        let lease = store
            .create_lease(t, node(1), 0, 1_000)
            .await
            .expect("lease")
            .expect("leased");
        assert_eq!(
            store
                .renew_leases(node(1), &[lease], 5_000)
                .await
                .expect("renew"),
            vec![lease]
        );
        assert_eq!(
            store
                .renew_leases(node(2), &[lease], 9_000)
                .await
                .expect("renew"),
            Vec::<LeaseId>::new(),
            "only the holder renews"
        );
        assert!(
            store
                .expire_leases(4_000, MAX_ATTEMPTS)
                .await
                .expect("expire")
                .is_empty()
        );
        assert_eq!(
            store
                .extend_all_leases(100_000, 1_000)
                .await
                .expect("grace"),
            1
        );
        assert!(
            store
                .expire_leases(100_500, MAX_ATTEMPTS)
                .await
                .expect("expire")
                .is_empty()
        );
        let active = store.active_leases(node(1)).await.expect("active");
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].spec.task, t);
    }
}

#[tokio::test]
async fn a_nondeterministic_failure_is_retried_not_counted() {
    for (store, _dir) in backends().await {
        let id = job(&store, 1, 1).await;
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        let lease = store
            .create_lease(t, node(1), 0, 10_000)
            .await
            .expect("lease")
            .expect("leased");
        let mut r = report(b"", 10);
        r.status = Status::DeadlineExceeded;
        r.exit_code = None;
        assert_eq!(
            record(&store, lease, node(1), t, &r).await,
            Recorded::Stored
        );
        let tasks = store.tasks(id, 0, 10).await.expect("tasks");
        assert_eq!((tasks[0].state.as_str(), tasks[0].attempts), ("pending", 1));
        // Another node may now take it.
        let again = store
            .create_lease(t, node(1), 0, 10_000)
            .await
            .expect("lease");
        assert!(
            again.is_some(),
            "a failed attempt does not hold the node's replica slot"
        );
    }
}

#[tokio::test]
async fn cancel_stops_everything_of_the_job() {
    for (store, _dir) in backends().await {
        let id = job(&store, 1, 3).await;
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        let lease = store
            .create_lease(t, node(1), 0, 10_000)
            .await
            .expect("lease")
            .expect("leased");
        let cancelled = store
            .cancel_job(id, 50)
            .await
            .expect("cancel")
            .expect("exists");
        assert_eq!(cancelled, vec![(lease, node(1))]);
        let j = store.job(id).await.expect("job").expect("exists");
        assert_eq!((j.state.as_str(), j.counts.cancelled), ("cancelled", 3));
        assert!(store.pending_tasks(10).await.expect("pending").is_empty());
        assert!(matches!(
            try_record(&store, lease, node(1), t, &report(b"x", 1), 60).await,
            Err(RecordError::NotLeased(_))
        ));
        assert_eq!(store.cancel_job(9_999, 50).await.expect("cancel"), None);
    }
}

#[tokio::test]
async fn replicas_reported_at_the_same_moment_still_reach_a_decision() {
    for (store, _dir) in backends().await {
        let id = job(&store, 2, 20).await;
        let pending = store.pending_tasks(100).await.expect("pending");
        let mut handles = Vec::new();
        for p in pending {
            let t = p.spec.task;
            let a = store
                .create_lease(t, node(1), 0, 60_000)
                .await
                .expect("lease")
                .expect("leased");
            let b = store
                .create_lease(t, node(2), 0, 60_000)
                .await
                .expect("lease")
                .expect("leased");
            for (lease, n) in [(a, node(1)), (b, node(2))] {
                let store = store.clone();
                handles.push(tokio::spawn(async move {
                    let r = report(format!("out {t}").as_bytes(), 9);
                    try_record(&store, lease, n, t, &r, 5).await
                }));
            }
        }
        for h in handles {
            h.await.expect("join").expect("recorded");
        }
        let j = store.job(id).await.expect("job").expect("exists");
        assert_eq!(
            (j.state.as_str(), j.counts.verified),
            ("completed", 20),
            "{:?}",
            j.counts
        );
    }
}

#[tokio::test]
async fn a_job_past_its_deadline_ends_with_reasons() {
    for (store, _dir) in backends().await {
        let mut s = spec(1, 3);
        s.deadline_s = Some(10);
        let trials = s.expand().expect("expand");
        let id = store
            .create_job(node(100), &s, ContentId::of(b"metered"), &trials, 1_000)
            .await
            .expect("job");
        let pending = store.pending_tasks(10).await.expect("pending");
        let t0 = pending[0].spec.task;
        let lease = store
            .create_lease(t0, node(1), 1_000, 60_000)
            .await
            .expect("lease")
            .expect("leased");
        assert!(matches!(
            record(&store, lease, node(1), t0, &report(b"x", 1)).await,
            Recorded::Verified { .. }
        ));
        let other = store
            .create_lease(pending[1].spec.task, node(1), 1_000, 60_000)
            .await
            .expect("lease")
            .expect("leased");
        assert!(
            store.expire_jobs(10_999).await.expect("expire").is_empty(),
            "not yet"
        );
        assert_eq!(
            store.expire_jobs(11_001).await.expect("expire"),
            vec![(other, node(1))]
        );
        let j = store.job(id).await.expect("job").expect("exists");
        assert_eq!(
            (j.state.as_str(), j.counts.verified, j.counts.failed),
            ("completed", 1, 2)
        );
        let tasks = store.tasks(id, 0, 10).await.expect("tasks");
        assert_eq!(tasks[1].reason.as_deref(), Some("job deadline passed"));
    }
}

#[tokio::test]
async fn sqlite_data_directories_may_have_awkward_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let awkward = dir.path().join("my data #1 ?50%");
    std::fs::create_dir_all(&awkward).expect("mkdir");
    let store = Store::open_sqlite(&awkward).await.expect("opens");
    assert!(
        store
            .put_blob(ContentId::of(b"x"), b"x", 0)
            .await
            .expect("put")
    );
    assert!(
        awkward.join("stardust.db").exists(),
        "the database lives where it was asked to"
    );
}
