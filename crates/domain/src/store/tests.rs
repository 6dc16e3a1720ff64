//! The storage conformance suite: every test runs against SQLite and, when
//! `STARDUST_TEST_POSTGRES_URL` names a PostgreSQL server (CI starts one; required when
//! `CI` is set), against a fresh database on it.

use stardust_proto::content::ContentId;
use stardust_proto::identity::{Identity, NodeId};
use stardust_proto::job::JobSpec;
use stardust_proto::task::{Hardware, RunReport, Status, Tier};

use super::*;
use std::time::Duration;

const MAX_ATTEMPTS: u32 = 3;
const RETRY: Retry = Retry {
    max_attempts: MAX_ATTEMPTS,
    max_replicas: 4,
};

fn node(i: u8) -> NodeId {
    Identity::from_secret_bytes(&[i; 32]).id()
}

fn domain_key() -> Identity {
    Identity::from_secret_bytes(&[250; 32])
}

impl Store {
    /// `create_lease` with a neutral draw, as an `Option`.
    async fn lease(
        &self,
        task: TaskId,
        node: NodeId,
        now: i64,
        lease_ms: i64,
    ) -> Result<Option<LeaseId>> {
        Ok(
            match self.create_lease(task, node, now, lease_ms, 0.5).await? {
                Leased::Yes(l) => Some(l),
                Leased::No | Leased::NoStake | Leased::Untrusted => None,
            },
        )
    }

    /// `create_job` without a price.
    async fn job_free(
        &self,
        owner: NodeId,
        spec: &JobSpec,
        trials: &[Trial],
        now: i64,
    ) -> Result<JobId> {
        let new = NewJob {
            owner,
            spec,
            metered: ContentId::of(b"metered"),
            author: node(99),
            trials,
            price: 0,
        };
        self.create_job(new, now).await.map_err(|e| match e {
            CreateJobError::Store(e) => e,
            e => corrupt("test job", e),
        })
    }
}

/// A fresh store per backend: SQLite in a temporary directory, and PostgreSQL in a new
/// database when configured.
async fn backends() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = vec![(
        Store::open_sqlite(dir.path())
            .await
            .expect("sqlite")
            .with_ledger(domain_key(), Economy::default()),
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
                    .expect("postgres")
                    .with_ledger(domain_key(), Economy::default()),
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
        .job_free(node(100), &s, &trials, 1_000)
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
                output: None,
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
        output: None,
    };
    store
        .record_result(submitted, RETRY, 2_000)
        .await
        .expect("record")
}

#[tokio::test]
async fn migrations_are_idempotent() {
    for (store, dir) in backends().await {
        let latest = schema::MIGRATIONS.last().expect("migrations").version;
        assert_eq!(store.schema_version().await.expect("version"), latest);
        if let Some(dir) = dir {
            let again = Store::open_sqlite(dir.path()).await.expect("reopen");
            assert_eq!(again.schema_version().await.expect("version"), latest);
        }
    }
}

/// A transaction dropped without commit (an early return, or a future cancelled between
/// statements) leaves nothing behind, and the connection goes on working.
#[tokio::test]
async fn a_transaction_dropped_open_is_rolled_back_and_the_connection_stays_usable() {
    async fn insert(tx: &mut super::db::Tx, id: ContentId) {
        query("INSERT INTO blobs (id, bytes, size, created_ms) VALUES ($1, $2, 1, 0)")
            .bind(id.to_string())
            .bind(&b"x"[..])
            .execute(tx)
            .await
            .expect("insert");
    }
    for (store, dir) in backends().await {
        let dropped = ContentId::of(b"dropped");
        {
            let mut tx = store.db.begin().await.expect("begin");
            insert(&mut tx, dropped).await;
        }
        assert!(!store.has_blob(dropped).await.expect("has"), "rolled back");

        // Cancelled while it held the transaction open.
        let cancelled = ContentId::of(b"cancelled");
        let db = store.db.clone();
        let held = tokio::time::timeout(Duration::from_millis(50), async move {
            let mut tx = db.begin().await.expect("begin");
            insert(&mut tx, cancelled).await;
            std::future::pending::<()>().await;
        })
        .await;
        assert!(held.is_err(), "the future was cancelled");
        assert!(
            !store.has_blob(cancelled).await.expect("has"),
            "rolled back"
        );

        // Committed work after both is durable.
        let kept = ContentId::of(b"kept");
        let mut tx = store.db.begin().await.expect("begin");
        insert(&mut tx, kept).await;
        tx.commit().await.expect("commit");
        assert!(
            store
                .put_blob(ContentId::of(b"put"), b"put", 1)
                .await
                .expect("put")
        );
        if let Some(dir) = dir {
            drop(store);
            let again = Store::open_sqlite(dir.path()).await.expect("reopen");
            assert!(again.has_blob(kept).await.expect("has"));
            assert!(again.has_blob(ContentId::of(b"put")).await.expect("has"));
            assert!(!again.has_blob(dropped).await.expect("has"));
            assert!(!again.has_blob(cancelled).await.expect("has"));
        } else {
            assert!(store.has_blob(kept).await.expect("has"));
        }
    }
}

/// SQLite: committed writes reach the database file itself, not only the WAL, while the store
/// stays open and writes nothing more: the checkpointer's own connection copied them (the
/// writer checkpoints only past `WAL_BACKSTOP_PAGES`, far more than this test writes).
#[tokio::test]
async fn the_checkpointer_copies_committed_writes_into_the_database_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_sqlite(dir.path()).await.expect("sqlite");
    let id = ContentId::of(b"checkpointed");
    assert!(store.put_blob(id, b"checkpointed", 12).await.expect("put"));
    // `immutable=1`: reads the database file alone, ignoring the WAL.
    let uri = format!(
        "file:{}?mode=ro&immutable=1",
        dir.path().join("stardust.db").display()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let file = rusqlite::Connection::open_with_flags(
            &uri,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )
        .expect("open the file");
        let found = file
            .query_row(
                "SELECT 1 FROM blobs WHERE id = ?1",
                [id.to_string()],
                |_| Ok(()),
            )
            .is_ok();
        if found {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the committed write never reached the database file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The store goes on working.
    assert!(store.has_blob(id).await.expect("has"));
}

/// SQLite: the writer's connection goes through `stardust-walvfs` (a commit's log frames
/// leave in one write), with the pragmas that let the VFS tell a commit's sync (written, not
/// synced: `synchronous = NORMAL`'s promise) from a checkpoint's (synced).
#[tokio::test]
async fn the_sqlite_writer_writes_each_commit_once_and_syncs_only_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_sqlite(dir.path()).await.expect("sqlite");
    let pragma = |name: &'static str| {
        let store = &store;
        async move {
            query(format!("PRAGMA {name}"))
                .fetch_one(&mut store.db.acquire().await.expect("connection"))
                .await
                .expect("pragma")
                .try_get::<i64>(name)
                .expect("value")
        }
    };
    assert_eq!(
        pragma("synchronous").await,
        2,
        "FULL: a commit syncs the log"
    );
    assert_eq!(
        pragma("checkpoint_fullfsync").await,
        1,
        "a checkpoint's sync is SQLITE_SYNC_FULL, told apart from a commit's"
    );
    let before = stardust_walvfs::WAL_WRITES.load(std::sync::atomic::Ordering::Relaxed);
    let id = ContentId::of(b"gathered");
    assert!(store.put_blob(id, b"gathered", 1).await.expect("put"));
    assert!(
        stardust_walvfs::WAL_WRITES.load(std::sync::atomic::Ordering::Relaxed) > before,
        "the commit went through the VFS"
    );
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
        // What a submission names, in one read: missing inputs in the order asked.
        let (a, b, c) = (
            ContentId::of(b"a"),
            ContentId::of(b"b"),
            ContentId::of(b"c"),
        );
        store.put_blob(b, b"b", 5).await.expect("put b");
        assert_eq!(
            store
                .submission_refs(&[c, id, a, b], id)
                .await
                .expect("refs"),
            (vec![c, a], Some((ContentId::of(b"metered"), node(1))))
        );
        assert_eq!(
            store
                .submission_refs(&[], ContentId::of(b"never uploaded"))
                .await
                .expect("refs"),
            (Vec::new(), None)
        );
        // Inputs missing before are found once uploaded (an absence is never remembered),
        // and what was found stored is known without a read, even on another handle.
        store.put_blob(a, b"a", 6).await.expect("put a");
        store.put_blob(c, b"c", 6).await.expect("put c");
        assert_eq!(
            store
                .submission_refs(&[c, id, a, b], id)
                .await
                .expect("refs"),
            (Vec::new(), Some((ContentId::of(b"metered"), node(1))))
        );
        assert!(
            store
                .known
                .lock()
                .is_ok_and(|k| [a, b, c, id].iter().all(|i| k.blobs.contains(i))
                    && k.modules.contains_key(&id)),
            "stored answers are kept"
        );
        let again = store.clone();
        assert_eq!(
            again.submission_refs(&[a, b], id).await.expect("refs"),
            (Vec::new(), Some((ContentId::of(b"metered"), node(1))))
        );
    }
}

#[tokio::test]
async fn a_large_sweep_is_stored_task_for_task() {
    for (store, _dir) in backends().await {
        // More tasks than one insert statement takes, with arguments that need escaping.
        let s: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "wide",
            "module": ContentId::of(b"module").to_string(),
            "input": ContentId::of(b"").to_string(),
            "args": ["{i}", "a \"quoted\" \\ é ✓ \u{1}"],
            "sweep": {"grid": {"i": (0..2_100).collect::<Vec<_>>()}},
        }))
        .expect("spec");
        let trials = s.expand().expect("expand");
        let id = store
            .job_free(node(100), &s, &trials, 1_000)
            .await
            .expect("create job");
        let rows = store.tasks(id, 0, 3_000).await.expect("tasks");
        assert_eq!(rows.len(), trials.len());
        for (row, trial) in rows.iter().zip(&trials) {
            assert_eq!((row.index, &row.args), (trial.index, &trial.args));
        }
        assert!(
            rows.windows(2).all(|w| w[0].id < w[1].id),
            "ids follow the job's order"
        );
        let pending = store.pending_tasks(3_000).await.expect("pending");
        assert_eq!(pending.len(), trials.len());
        for (p, trial) in pending.iter().zip(&trials) {
            assert_eq!(
                (&p.spec.args, p.spec.seed, p.spec.input),
                (&trial.args, trial.seed, trial.input)
            );
        }
        counts_kept(&store).await;
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
                .lease(t, node(1), 1_000, 10_000)
                .await
                .expect("lease")
                .expect("leased");
            assert_eq!(
                store.lease(t, node(1), 1_000, 10_000).await.expect("lease"),
                None,
                "one replica per node"
            );
            // Half its replicas leased: still wanted.
            assert!(
                store
                    .pending_tasks(10)
                    .await
                    .expect("pending")
                    .iter()
                    .any(|p| p.spec.task == t && p.replicas_on == [node(1)])
            );
            let b = store
                .lease(t, node(2), 1_000, 10_000)
                .await
                .expect("lease")
                .expect("leased");
            assert_eq!(
                store.lease(t, node(3), 1_000, 10_000).await.expect("lease"),
                None,
                "enough replicas"
            );
            // All its replicas leased: not wanted, and counted as running.
            assert!(
                !store
                    .pending_tasks(10)
                    .await
                    .expect("pending")
                    .iter()
                    .any(|p| p.spec.task == t)
            );
            let shown = store.tasks(id, 0, 10).await.expect("tasks");
            assert_eq!(
                shown.iter().find(|r| r.id == t).map(|r| r.state.as_str()),
                Some("running")
            );
            let counts = store.job(id).await.expect("job").expect("exists").counts;
            assert_eq!(
                (counts.running, counts.pending + counts.verified),
                (1, 2),
                "{counts:?}"
            );
            assert!(
                store
                    .task_states()
                    .await
                    .expect("states")
                    .contains(&("running".to_string(), 1))
            );
            let r = report(format!("out {t}").as_bytes(), 77);
            assert_eq!(record(&store, a, node(1), t, &r).await, Recorded::Stored);
            assert_eq!(
                record(&store, a, node(1), t, &r).await,
                Recorded::Duplicate,
                "a replay changes nothing"
            );
            assert!(matches!(
                record(&store, b, node(2), t, &r).await,
                Recorded::Verified { agree, disagree, .. }
                    if agree == vec![node(1), node(2)] && disagree.is_empty()
            ));
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
        counts_kept(&store).await;
    }
}

#[tokio::test]
async fn results_from_the_wrong_node_or_task_are_refused() {
    for (store, _dir) in backends().await {
        job(&store, 1, 2).await;
        let pending = store.pending_tasks(10).await.expect("pending");
        let (t0, t1) = (pending[0].spec.task, pending[1].spec.task);
        let lease = store
            .lease(t0, node(1), 0, 10_000)
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
            .lease(t, node(1), 0, 10_000)
            .await
            .expect("lease")
            .expect("leased");
        let b = store
            .lease(t, node(2), 0, 10_000)
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
            .lease(t, node(3), 0, 10_000)
            .await
            .expect("lease")
            .expect("third replica");
        assert!(matches!(
            record(&store, c, node(3), t, &report(b"right", 5)).await,
            Recorded::Verified { agree, disagree, .. }
                if agree == vec![node(1), node(3)] && disagree == vec![node(2)]
        ));
        let nodes = store.nodes().await.expect("nodes");
        let liar = nodes.iter().find(|n| n.id == node(2)).expect("liar");
        assert_eq!((liar.agreed, liar.disagreed), (0, 1));
        let one = store.node(node(2)).await.expect("node").expect("exists");
        assert_eq!((one.agreed, one.disagreed), (0, 1));
        assert_eq!(store.node(node(99)).await.expect("node"), None);
        counts_kept(&store).await;
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
                .lease(t, node(attempt as u8), now, 1_000)
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
        counts_kept(&store).await;
    }
}

#[tokio::test]
async fn renewals_and_restart_grace_keep_leases_alive() {
    for (store, _dir) in backends().await {
        job(&store, 1, 1).await;
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        let lease = store
            .lease(t, node(1), 0, 1_000)
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
            .lease(t, node(1), 0, 10_000)
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
        let again = store.lease(t, node(1), 0, 10_000).await.expect("lease");
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
            .lease(t, node(1), 0, 10_000)
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
        counts_kept(&store).await;
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
                .lease(t, node(1), 0, 60_000)
                .await
                .expect("lease")
                .expect("leased");
            let b = store
                .lease(t, node(2), 0, 60_000)
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
            .job_free(node(100), &s, &trials, 1_000)
            .await
            .expect("job");
        let pending = store.pending_tasks(10).await.expect("pending");
        let t0 = pending[0].spec.task;
        let lease = store
            .lease(t0, node(1), 1_000, 60_000)
            .await
            .expect("lease")
            .expect("leased");
        assert!(matches!(
            record(&store, lease, node(1), t0, &report(b"x", 1)).await,
            Recorded::Verified { .. }
        ));
        let other = store
            .lease(pending[1].spec.task, node(1), 1_000, 60_000)
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
        counts_kept(&store).await;
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

// ---- ledger ------------------------------------------------------------------------------

/// The store's ledger re-derived by `stardust_ledger::verify`: it must verify and agree with
/// the stored balances.
/// Asserts that the task counts kept on every job are its tasks' states, counted.
async fn counts_kept(store: &Store) {
    let rows = query(
        "SELECT j.id, j.n_open, j.n_verified, j.n_failed, j.n_cancelled,
         (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'pending') AS pending,
         (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'verified') AS verified,
         (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'failed') AS failed,
         (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'cancelled') AS cancelled
         FROM jobs j",
    )
    .fetch_all(&mut store.db.acquire().await.expect("conn"))
    .await
    .expect("counts");
    for r in rows {
        let get = |c: &str| r.try_get::<i64>(c).expect("count");
        assert_eq!(
            (
                get("n_open"),
                get("n_verified"),
                get("n_failed"),
                get("n_cancelled")
            ),
            (
                get("pending"),
                get("verified"),
                get("failed"),
                get("cancelled")
            ),
            "job {}",
            get("id")
        );
    }
}

async fn audited(store: &Store) -> stardust_ledger::Ledger {
    counts_kept(store).await;
    let records = store.ledger_records(0, 1_000_000).await.expect("records");
    let ledger = stardust_ledger::verify(
        domain_key().id(),
        records.iter().map(|r| r.record.as_slice()),
    )
    .expect("the stored chain verifies");
    for (account, balance) in store.balances().await.expect("balances") {
        assert_eq!(ledger.balance(account), balance, "{account}");
    }
    ledger
}

fn with_economy(store: Store, economy: Economy) -> Store {
    store.with_ledger(domain_key(), economy)
}

/// The default economy, with a welcome grant of 100 credits.
fn welcomed(store: Store) -> Store {
    with_economy(
        store,
        Economy {
            welcome: 100 * stardust_ledger::MICRO_PER_CREDIT,
            ..Economy::default()
        },
    )
}

/// A new job of `owner`'s for `open_job`: module "metered", author node 99.
fn new_job<'a>(owner: NodeId, spec: &'a JobSpec, trials: &'a [Trial], price: u64) -> NewJob<'a> {
    NewJob {
        owner,
        spec,
        metered: ContentId::of(b"metered"),
        author: node(99),
        trials,
        price,
    }
}

/// One replica of each task, for `node`.
fn wants_of(tasks: &[PendingTask], node: NodeId) -> Vec<Want> {
    tasks
        .iter()
        .map(|t| Want {
            task: t.spec.task,
            node,
            draw: 0.5,
        })
        .collect()
}

async fn priced_job(
    store: &Store,
    owner: NodeId,
    redundancy: u8,
    n: usize,
    price: u64,
) -> std::result::Result<JobId, CreateJobError> {
    let mut s = spec(redundancy, n);
    s.limits.fuel = 10_000_000_000; // 10 SCU
    let trials = s.expand().expect("expand");
    let new = NewJob {
        owner,
        spec: &s,
        metered: ContentId::of(b"metered"),
        author: node(99),
        trials: &trials,
        price,
    };
    store.create_job(new, 1_000).await
}

async fn join(store: &Store, nodes: &[u8]) {
    for n in nodes {
        store
            .upsert_node(node(*n), &Hardware::default(), Tier::Small, 2, 0)
            .await
            .expect("node");
    }
}

#[tokio::test]
async fn a_verified_task_is_paid_once_and_the_rest_of_the_escrow_refunded() {
    for (store, _dir) in backends().await {
        let store = welcomed(store);
        join(&store, &[1, 2]).await;
        let alice = node(100);
        // 2 tasks × 2 replicas × 10 SCU at 1 credit/SCU: 40 credits held.
        let job = priced_job(&store, alice, 2, 2, 1_000_000)
            .await
            .expect("job");
        assert_eq!(
            store.balance(Account::Escrow(job)).await.expect("escrow"),
            40_000_000
        );
        assert_eq!(
            store
                .balance(Account::Submitter(alice))
                .await
                .expect("alice"),
            60_000_000
        );
        let pending = store.pending_tasks(10).await.expect("pending");
        let t = pending[0].spec.task;
        let a = store
            .lease(t, node(1), 0, 10_000)
            .await
            .expect("lease")
            .expect("a");
        let b = store
            .lease(t, node(2), 0, 10_000)
            .await
            .expect("lease")
            .expect("b");
        // 2.5 SCU used: 2.5 credits per replica, 5 credits for the task.
        let r = report(b"out", 2_500_000_000);
        record(&store, a, node(1), t, &r).await;
        assert!(matches!(
            record(&store, b, node(2), t, &r).await,
            Recorded::Verified { .. }
        ));
        // A replay changes nothing, the ledger included.
        let events = store.ledger_head().await.expect("head").0;
        assert_eq!(record(&store, b, node(2), t, &r).await, Recorded::Duplicate);
        assert_eq!(store.ledger_head().await.expect("head").0, events);
        let ledger = audited(&store).await;
        assert_eq!(ledger.balance(Account::Escrow(job)), 35_000_000);
        // 80 % of 5 credits between two providers, plus the 9× bonus of a new network.
        assert_eq!(
            ledger.balance(Account::Operator(node(1))),
            2_000_000 + 18_000_000
        );
        assert_eq!(
            ledger.balance(Account::Operator(node(2))),
            2_000_000 + 18_000_000
        );
        assert_eq!(ledger.balance(Account::Treasury), 750_000);
        assert_eq!(ledger.balance(Account::Author(node(99))), 250_000);
        // The job ends with its second task cancelled: the rest comes back.
        store.cancel_job(job, 3_000).await.expect("cancel");
        let ledger = audited(&store).await;
        assert_eq!(ledger.balance(Account::Escrow(job)), 0);
        assert_eq!(ledger.balance(Account::Submitter(alice)), 95_000_000);
        assert_eq!(ledger.check_invariants(), Ok(()));
        // The welcome grant is once per key.
        priced_job(&store, alice, 1, 1, 0).await.expect("free job");
        assert_eq!(
            store
                .balance(Account::Submitter(alice))
                .await
                .expect("alice"),
            95_000_000
        );
    }
}

/// A new job's first round, leased in its own transaction from what it just wrote (its tasks
/// are not read back), decides as a round after its commit does, which reads them: with
/// redundancy, a node asking twice, a replica too many, and adaptive replication.
#[tokio::test]
async fn a_round_in_the_jobs_transaction_decides_as_one_after_its_commit() {
    for (store, _dir) in backends().await {
        let store = welcomed(store);
        join(&store, &[1, 2, 3]).await;
        for adaptive in [false, true] {
            let mut s = spec(2, 2);
            s.adaptive = adaptive;
            let trials = s.expand().expect("expand");
            let new = || new_job(node(100), &s, &trials, 0);
            // Each task: node 1, node 1 again, node 2, node 3 (a third replica).
            let round = |tasks: &[PendingTask]| -> Vec<Want> {
                tasks
                    .iter()
                    .flat_map(|t| {
                        [1, 1, 2, 3].map(|n| Want {
                            task: t.spec.task,
                            node: node(n),
                            draw: 0.5,
                        })
                    })
                    .collect()
            };
            let kinds = |outcomes: Vec<(Leased, u8)>| -> Vec<(String, u8)> {
                outcomes
                    .into_iter()
                    .map(|(l, replicas)| match l {
                        Leased::Yes(_) => ("yes".to_owned(), replicas),
                        other => (format!("{other:?}"), replicas),
                    })
                    .collect()
            };
            let mut open = store.open_job(new(), 1_000).await.expect("open");
            let tasks = open.take_tasks();
            let inside = kinds(
                open.create_leases(&store, &round(&tasks), 1_000, 10_000)
                    .await
                    .expect("leases in the job's transaction"),
            );
            open.commit(&store).await.expect("commit");

            let open = store.open_job(new(), 2_000).await.expect("open");
            let tasks = open.tasks().to_vec();
            open.commit(&store).await.expect("commit");
            let after = kinds(
                store
                    .create_leases(&round(&tasks), 2_000, 10_000)
                    .await
                    .expect("leases after the commit"),
            );
            assert_eq!(inside, after, "adaptive: {adaptive}");
            if !adaptive {
                let yes = inside.iter().filter(|(k, _)| k == "yes").count();
                assert_eq!(yes, 4, "two replicas of each task: {inside:?}");
            }
        }
    }
}

/// A job's rows and its first round's leases are written at its commit, under ids taken
/// when they were decided. A second round in the job's transaction sees what the first
/// leased (it is written before the round reads), and the ids never meet those that rows
/// written at once (the dispatcher's rounds, a job of its own) take.
#[tokio::test]
async fn a_jobs_held_back_rows_keep_the_ids_they_were_named_by() {
    for (store, _dir) in backends().await {
        let store = welcomed(store);
        join(&store, &[1, 2, 3]).await;
        let s = spec(2, 3);
        let trials = s.expand().expect("expand");
        let new = || new_job(node(100), &s, &trials, 0);
        let yes = |outcomes: &[(Leased, u8)]| -> Vec<Option<LeaseId>> {
            outcomes
                .iter()
                .map(|(l, _)| match l {
                    Leased::Yes(id) => Some(*id),
                    _ => None,
                })
                .collect()
        };

        // Two rounds in the job's transaction: node 1, then node 1 again (refused: it holds
        // a replica already, which only the first round's rows tell) and node 2.
        let mut open = store.open_job(new(), 1_000).await.expect("open");
        let job = open.id();
        let tasks = open.take_tasks();
        let first = yes(&open
            .create_leases(&store, &wants_of(&tasks, node(1)), 1_000, 10_000)
            .await
            .expect("first round"));
        let mut again = wants_of(&tasks, node(1));
        again.extend(wants_of(&tasks, node(2)));
        let second = yes(&open
            .create_leases(&store, &again, 1_000, 10_000)
            .await
            .expect("second round"));
        assert!(first.iter().all(Option::is_some), "{first:?}");
        assert_eq!(
            second.iter().map(Option::is_some).collect::<Vec<_>>(),
            [false, false, false, true, true, true],
            "node 1 holds a replica of each task already: {second:?}"
        );
        assert_eq!(open.commit(&store).await.expect("commit"), job);

        // Rows written at once in between (a job committed alone, the dispatcher's round on
        // it), then another job with its round held back.
        let other = store.create_job(new(), 2_000).await.expect("job");
        let others = store.pending_tasks(10).await.expect("pending");
        let dispatched = yes(&store
            .create_leases(&wants_of(&others, node(3)), 2_000, 10_000)
            .await
            .expect("dispatcher's round"));
        let mut open = store.open_job(new(), 3_000).await.expect("open");
        let third = open.id();
        let last_tasks = open.take_tasks();
        let last = yes(&open
            .create_leases(&store, &wants_of(&last_tasks, node(2)), 3_000, 10_000)
            .await
            .expect("round"));
        open.commit(&store).await.expect("commit");

        let mut jobs = vec![job, other, third];
        jobs.sort_unstable();
        jobs.dedup();
        assert_eq!(jobs.len(), 3, "job ids: {jobs:?}");
        let mut ids: Vec<LeaseId> = [first, second, dispatched, last]
            .concat()
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(ids.len(), 3 + 3 + 3 + 3);
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 12, "a lease id was given twice");
        // Each lease is the row it was named by: its task, its node.
        let r = report(b"out", 1_000_000);
        for (t, n, lease) in tasks
            .iter()
            .map(|t| (t, node(1)))
            .chain(tasks.iter().map(|t| (t, node(2))))
            .chain(others.iter().map(|t| (t, node(3))))
            .chain(last_tasks.iter().map(|t| (t, node(2))))
            .zip(ids_of(&store).await)
            .map(|((t, n), l)| (t, n, l))
        {
            let holder: String = query("SELECT node FROM leases WHERE id = $1 AND task_id = $2")
                .bind(lease as i64)
                .bind(t.spec.task as i64)
                .fetch_one(&mut store.db.acquire().await.expect("conn"))
                .await
                .expect("the lease's row")
                .try_get("node")
                .expect("node");
            assert_eq!(holder, n.to_string());
            assert!(!matches!(
                record(&store, lease, n, t.spec.task, &r).await,
                Recorded::Duplicate
            ));
        }
        audited(&store).await;
    }
}

/// Every lease's id, in id order.
async fn ids_of(store: &Store) -> Vec<LeaseId> {
    query("SELECT id FROM leases ORDER BY id")
        .fetch_all(&mut store.db.acquire().await.expect("conn"))
        .await
        .expect("leases")
        .iter()
        .map(|r| r.try_get::<i64>("id").expect("id") as LeaseId)
        .collect()
}

#[tokio::test]
async fn a_job_and_its_first_leases_commit_together_or_not_at_all() {
    for (store, _dir) in backends().await {
        let store = welcomed(store);
        join(&store, &[1, 2]).await;
        let alice = node(100);
        let mut s = spec(1, 3);
        s.limits.fuel = 10_000_000_000;
        let trials = s.expand().expect("expand");
        let new = || new_job(alice, &s, &trials, 1_000_000);
        let head = store.ledger_head().await.expect("head");

        // Leased in the job's transaction, then dropped: nothing of either remains, and the
        // escrow never left the submitter (the welcome grant with it).
        let mut open = store.open_job(new(), 1_000).await.expect("open");
        let tasks = open.take_tasks();
        assert_eq!(tasks.len(), 3);
        let wants = wants_of(&tasks, node(1));
        let leased = open
            .create_leases(&store, &wants, 1_000, 10_000)
            .await
            .expect("leases");
        assert!(leased.iter().all(|(l, _)| matches!(l, Leased::Yes(_))));
        // Their assignments may have left before the commit: their ids are not given again.
        let dropped: Vec<LeaseId> = leased
            .iter()
            .filter_map(|(l, _)| match l {
                Leased::Yes(id) => Some(*id),
                _ => None,
            })
            .collect();
        drop(open);
        assert_eq!(store.ledger_head().await.expect("head"), head);
        assert!(store.pending_tasks(10).await.expect("pending").is_empty());
        assert!(
            store.take_created().is_empty(),
            "a job not committed is not told"
        );
        let active: i64 = query("SELECT COUNT(*) AS n FROM leases")
            .fetch_one(&mut store.db.acquire().await.expect("conn"))
            .await
            .expect("leases")
            .try_get("n")
            .expect("n");
        assert_eq!(active, 0);

        // Committed: the job, its escrow and the leases made in its transaction, and the
        // tasks it did not take are told to the dispatcher as a job's creation is.
        let mut open = store.open_job(new(), 2_000).await.expect("open");
        let job = open.id();
        let mut tasks = open.take_tasks();
        let rest = tasks.split_off(2);
        let wants = wants_of(&tasks, node(2));
        let leased = open
            .create_leases(&store, &wants, 2_000, 10_000)
            .await
            .expect("leases");
        let leases: Vec<LeaseId> = leased
            .iter()
            .map(|(l, _)| match l {
                Leased::Yes(id) => *id,
                other => panic!("not leased: {other:?}"),
            })
            .collect();
        assert!(
            leases.iter().all(|l| !dropped.contains(l)),
            "a rolled-back round's lease ids given again: {dropped:?} then {leases:?}"
        );
        assert_eq!(open.commit(&store).await.expect("commit"), job);
        assert!(store.take_created().is_empty(), "taken tasks are not told");
        let row = store.job(job).await.expect("job").expect("exists");
        assert_eq!((row.state.as_str(), row.counts.running), ("running", 2));
        assert_eq!(
            store.balance(Account::Escrow(job)).await.expect("escrow"),
            30_000_000
        );
        // The third task waits for the dispatcher.
        let pending = store.pending_tasks(10).await.expect("pending");
        assert_eq!(
            pending.iter().map(|t| t.spec.task).collect::<Vec<_>>(),
            rest.iter().map(|t| t.spec.task).collect::<Vec<_>>()
        );
        // The leases are real: their results verify the tasks.
        let r = report(b"out", 1_000_000_000);
        for (lease, t) in leases.iter().zip(&tasks) {
            assert!(matches!(
                record(&store, *lease, node(2), t.spec.task, &r).await,
                Recorded::Verified { .. }
            ));
        }
        audited(&store).await;
        // Not taken, a job's tasks are told at its commit.
        let open = store.open_job(new(), 3_000).await.expect("open");
        open.commit(&store).await.expect("commit");
        assert_eq!(store.take_created().len(), 3);
    }
}

#[tokio::test]
async fn a_short_balance_refuses_the_job_and_changes_nothing() {
    for (store, _dir) in backends().await {
        let bob = node(101);
        store
            .grant(Account::Submitter(bob), 39_999_999, 0)
            .await
            .expect("grant");
        let before = store.ledger_head().await.expect("head");
        let err = priced_job(&store, bob, 2, 2, 1_000_000)
            .await
            .expect_err("too poor");
        assert!(
            matches!(
                err,
                CreateJobError::Insufficient {
                    needed: 40_000_000,
                    balance: 39_999_999
                }
            ),
            "{err}"
        );
        assert_eq!(store.ledger_head().await.expect("head"), before);
        assert!(store.pending_tasks(10).await.expect("pending").is_empty());
        store
            .grant(Account::Submitter(bob), 1, 0)
            .await
            .expect("grant");
        priced_job(&store, bob, 2, 2, 1_000_000)
            .await
            .expect("now affordable");
        assert_eq!(
            store.balance(Account::Submitter(bob)).await.expect("bob"),
            0
        );
        audited(&store).await;
    }
}

#[tokio::test]
async fn stake_gates_leases_and_losers_and_spot_check_failures_are_slashed() {
    for (store, _dir) in backends().await {
        let store = with_economy(
            store,
            Economy {
                stake: 1_000_000,
                ..Economy::default()
            },
        );
        join(&store, &[1, 2, 3]).await;
        for n in [1, 2, 3] {
            store
                .grant(Account::Stake(node(n)), 2_000_000, 0)
                .await
                .expect("stake");
        }
        store
            .grant(Account::Submitter(node(100)), 1_000_000_000, 0)
            .await
            .expect("credits");
        priced_job(&store, node(100), 3, 3, 1_000_000)
            .await
            .expect("job");
        let tasks: Vec<TaskId> = store
            .pending_tasks(10)
            .await
            .expect("pending")
            .iter()
            .map(|p| p.spec.task)
            .collect();
        // Two credits of stake cover two leases at a time.
        let mut leases = Vec::new();
        for t in &tasks[..2] {
            for n in [1, 2, 3] {
                leases.push((
                    *t,
                    n,
                    store
                        .lease(*t, node(n), 0, 10_000)
                        .await
                        .expect("lease")
                        .expect("covered"),
                ));
            }
        }
        assert_eq!(
            store
                .create_lease(tasks[2], node(1), 0, 10_000, 0.5)
                .await
                .expect("lease"),
            Leased::NoStake
        );
        // Node 3 lies on both tasks.
        for (t, n, l) in leases {
            let out: &[u8] = if n == 3 { b"lie" } else { b"truth" };
            record(&store, l, node(n), t, &report(out, 1_000)).await;
        }
        assert_eq!(
            store.balance(Account::Stake(node(3))).await.expect("stake"),
            0
        );
        assert_eq!(
            store.balance(Account::Stake(node(1))).await.expect("stake"),
            2_000_000
        );
        // Read together, as the dispatcher reads them: a node with no stake row holds 0.
        assert_eq!(
            store
                .stakes(&[node(1), node(3), node(9)])
                .await
                .expect("stakes"),
            vec![(node(1), 2_000_000), (node(3), 0), (node(9), 0)]
        );
        let liar = store.node(node(3)).await.expect("node").expect("liar");
        let honest = store.node(node(1)).await.expect("node").expect("honest");
        assert!(liar.record.score() < honest.record.score());
        assert_eq!((liar.disagreed, honest.agreed), (2, 2));
        // With no stake left, the liar takes no more work.
        assert_eq!(
            store
                .create_lease(tasks[2], node(3), 0, 10_000, 0.5)
                .await
                .expect("lease"),
            Leased::NoStake
        );

        // A spot check: node 2 gets a verified task it never ran, and answers wrongly.
        join(&store, &[4]).await;
        store
            .grant(Account::Stake(node(4)), 1_500_000, 0)
            .await
            .expect("stake");
        let (lease, spec) = store
            .create_spot_check(node(4), 0, 10_000, 0.0)
            .await
            .expect("spot")
            .expect("a verified task to check");
        assert!(tasks[..2].contains(&spec.task));
        match record(&store, lease, node(4), spec.task, &report(b"guess", 1_000)).await {
            Recorded::SpotCheck {
                passed: false,
                record,
            } => assert_eq!(record.streak, 0),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            store.balance(Account::Stake(node(4))).await.expect("stake"),
            500_000
        );
        let caught = store.node(node(4)).await.expect("node").expect("caught");
        assert_eq!(caught.spot_failed, 1);
        // Node 1 ran every verified task: nothing to check it with.
        assert!(
            store
                .create_spot_check(node(1), 0, 10_000, 0.0)
                .await
                .expect("spot")
                .is_none()
        );
        // Three slashes of one credit, plus 2 µcredits of settlement (1,000 fuel is 1 µSCU,
        // charged for two agreeing replicas, too little to split) per task.
        let ledger = audited(&store).await;
        assert_eq!(ledger.balance(Account::Treasury), 3_000_004);
    }
}

#[tokio::test]
async fn nodes_with_a_streak_get_single_replicas_and_new_ones_never() {
    for (store, _dir) in backends().await {
        join(&store, &[1, 2, 3]).await;
        let job = priced_job(&store, node(100), 2, 14, 0).await.expect("job");
        // Ten tasks agreed by nodes 1 and 2 give both a streak of 10.
        for _ in 0..10 {
            let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
            let a = store
                .create_lease(t, node(1), 0, 10_000, 0.0)
                .await
                .expect("lease");
            let b = store
                .create_lease(t, node(2), 0, 10_000, 0.0)
                .await
                .expect("lease");
            let (Leased::Yes(a), Leased::Yes(b)) = (a, b) else {
                panic!("leases")
            };
            record(&store, a, node(1), t, &report(b"x", 9)).await;
            record(&store, b, node(2), t, &report(b"x", 9)).await;
        }
        assert_eq!(
            store
                .node(node(1))
                .await
                .expect("n")
                .expect("n")
                .record
                .streak,
            10
        );
        // A draw above the re-check probability (1/10): a single replica.
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        let Leased::Yes(a) = store
            .create_lease(t, node(1), 0, 10_000, 0.5)
            .await
            .expect("lease")
        else {
            panic!()
        };
        assert_eq!(
            store
                .create_lease(t, node(2), 0, 10_000, 0.5)
                .await
                .expect("lease"),
            Leased::No
        );
        assert!(matches!(
            record(&store, a, node(1), t, &report(b"x", 9)).await,
            Recorded::Verified { .. }
        ));
        // A draw below it: a re-check with full redundancy.
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        let Leased::Yes(_) = store
            .create_lease(t, node(1), 0, 10_000, 0.01)
            .await
            .expect("lease")
        else {
            panic!()
        };
        assert!(matches!(
            store
                .create_lease(t, node(2), 0, 10_000, 0.5)
                .await
                .expect("lease"),
            Leased::Yes(_)
        ));
        // A new node never runs a task alone.
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        let Leased::Yes(_) = store
            .create_lease(t, node(3), 0, 10_000, 0.99)
            .await
            .expect("lease")
        else {
            panic!()
        };
        assert!(matches!(
            store
                .create_lease(t, node(1), 0, 10_000, 0.99)
                .await
                .expect("lease"),
            Leased::Yes(_)
        ));
        let tasks = store.tasks(job, 0, 20).await.expect("tasks");
        assert_eq!(tasks.iter().filter(|t| t.replicas == 1).count(), 1);
    }
}

#[tokio::test]
async fn heartbeats_count_uptime_and_mint_its_reward() {
    use stardust_ledger::curve::{UPTIME_PER_PERIOD, UPTIME_PERIOD_MS};
    for (store, _dir) in backends().await {
        join(&store, &[1]).await;
        let period = UPTIME_PERIOD_MS as i64;
        let mut now = 0;
        // Heartbeats every 5 s for 1.5 periods.
        while now < period * 3 / 2 {
            now += 5_000;
            store.touch_node(node(1), now).await.expect("touch");
        }
        assert_eq!(
            store.balance(Account::Operator(node(1))).await.expect("b"),
            i128::from(UPTIME_PER_PERIOD)
        );
        // A long silence is not uptime.
        now += 10 * period;
        store.touch_node(node(1), now).await.expect("touch");
        assert_eq!(
            store.balance(Account::Operator(node(1))).await.expect("b"),
            i128::from(UPTIME_PER_PERIOD)
        );
        let n = store.node(node(1)).await.expect("n").expect("n");
        assert_eq!(n.uptime_ms, period * 3 / 2);
        audited(&store).await;
    }
}

#[tokio::test]
async fn a_heartbeat_renews_only_its_own_leases_and_counts_uptime_in_one_go() {
    for (store, _dir) in backends().await {
        join(&store, &[1, 2]).await;
        job(&store, 1, 3).await;
        let pending = store.pending_tasks(10).await.expect("pending");
        let mine = store
            .lease(pending[0].spec.task, node(1), 0, 1_000)
            .await
            .expect("lease")
            .expect("mine");
        let theirs = store
            .lease(pending[1].spec.task, node(2), 0, 1_000)
            .await
            .expect("lease")
            .expect("theirs");
        let renewed = store
            .heartbeat(node(1), &[mine, theirs, 999_999], 60_000, 5_000)
            .await
            .expect("heartbeat");
        assert_eq!(renewed, vec![mine]);
        // Only node 1's lease survives an expiry at t = 30 s.
        let expired = store
            .expire_leases(30_000, MAX_ATTEMPTS)
            .await
            .expect("expire");
        assert_eq!(expired, vec![(theirs, node(2))]);
        let n = store.node(node(1)).await.expect("node").expect("exists");
        assert_eq!((n.last_seen_ms, n.uptime_ms), (5_000, 5_000));
        // Heartbeats batched in one transaction answer each node for itself.
        let third = store
            .lease(pending[2].spec.task, node(2), 6_000, 60_000)
            .await
            .expect("lease")
            .expect("third");
        let renewed = store
            .heartbeats(
                &[
                    (node(1), vec![mine, third]),
                    (node(2), vec![third, mine, theirs]),
                ],
                90_000,
                10_000,
            )
            .await
            .expect("heartbeats");
        assert_eq!(renewed, vec![vec![mine], vec![third]]);
        let n = store.node(node(2)).await.expect("node").expect("exists");
        assert_eq!(n.last_seen_ms, 10_000);
    }
}

#[tokio::test]
async fn untrusted_browsers_never_hold_a_task_alone_nor_only_with_browsers() {
    for (store, _dir) in backends().await {
        join(&store, &[1]).await;
        for b in [7, 8] {
            store
                .upsert_node(node(b), &Hardware::default(), Tier::Browser, 2, 0)
                .await
                .expect("browser");
        }
        let lease = async |t: TaskId, n: u8, draw: f64| {
            store
                .create_lease(t, node(n), 0, 10_000, draw)
                .await
                .expect("lease")
        };
        // Redundancy 1: a new browser may not run it; a native node may.
        priced_job(&store, node(100), 1, 1, 0).await.expect("job");
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        assert_eq!(lease(t, 7, 0.5).await, Leased::Untrusted);
        assert!(matches!(lease(t, 1, 0.5).await, Leased::Yes(_)));
        // Redundancy 2: one browser replica, but a second browser may not complete the pair.
        priced_job(&store, node(100), 2, 11, 0).await.expect("job");
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        let Leased::Yes(a) = lease(t, 7, 0.5).await else {
            panic!("a browser may take the first of two replicas")
        };
        assert_eq!(lease(t, 8, 0.5).await, Leased::Untrusted);
        let Leased::Yes(b) = lease(t, 1, 0.5).await else {
            panic!("a native node completes the pair")
        };
        record(&store, a, node(7), t, &report(b"x", 9)).await;
        record(&store, b, node(1), t, &report(b"x", 9)).await;
        // Nine more agreements give browser 7 a streak of ten: it has earned its reputation.
        for _ in 0..9 {
            let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
            let (Leased::Yes(a), Leased::Yes(b)) = (lease(t, 7, 0.0).await, lease(t, 1, 0.0).await)
            else {
                panic!("leases")
            };
            record(&store, a, node(7), t, &report(b"x", 9)).await;
            record(&store, b, node(1), t, &report(b"x", 9)).await;
        }
        let seven = store.node(node(7)).await.expect("n").expect("n");
        assert_eq!(seven.record.streak, 10);
        let t = store.pending_tasks(1).await.expect("pending")[0].spec.task;
        assert!(matches!(lease(t, 8, 0.0).await, Leased::Yes(_)));
        assert!(
            matches!(lease(t, 7, 0.0).await, Leased::Yes(_)),
            "a trusted browser may pair with a new one"
        );
    }
}

// ---- batches -----------------------------------------------------------------------------

/// Everything a batch could change, in comparable form.
async fn state_of(store: &Store, jobs: &[JobId]) -> Vec<String> {
    let mut out = Vec::new();
    for j in jobs {
        out.push(format!("{:?}", store.job(*j).await.expect("job")));
        out.push(format!(
            "{:?}",
            store.tasks(*j, 0, 100).await.expect("tasks")
        ));
    }
    out.push(format!("{:?}", store.nodes().await.expect("nodes")));
    out.push(format!("{:?}", store.balances().await.expect("balances")));
    // The events; not the records' bytes, which differ in which ones are signed (the last
    // of each transaction) and so in their links.
    for r in store.ledger_records(0, 10_000).await.expect("records") {
        let (mut event, _) = stardust_ledger::open(&r.record).expect("record opens");
        event.prev.clear();
        out.push(format!("{} {} {event:?}", r.seq, r.id));
    }
    out
}

/// How many of the stored ledger records are signed.
async fn signed_records(store: &Store) -> usize {
    let records = store.ledger_records(0, 10_000).await.expect("records");
    records
        .iter()
        .filter(|r| stardust_ledger::open(&r.record).expect("opens").1.is_some())
        .count()
}

/// Two stores (of one backend) in the same state: nodes 1–3 with stake (node 3 enough for
/// two leases), a submitter with credits, a priced job of 4 single-replica tasks and one of
/// 3 tasks × 3 replicas. Returns the jobs and their tasks.
async fn batch_fixture(store: &Store) -> (Vec<JobId>, Vec<TaskId>) {
    join(store, &[1, 2, 3]).await;
    for (n, stake) in [(1, 10_000_000), (2, 10_000_000), (3, 2_000_000)] {
        store
            .grant(Account::Stake(node(n)), stake, 0)
            .await
            .expect("stake");
    }
    store
        .grant(Account::Submitter(node(100)), 1_000_000_000, 0)
        .await
        .expect("credits");
    let single = priced_job(store, node(100), 1, 4, 1_000_000)
        .await
        .expect("job");
    let triple = priced_job(store, node(100), 3, 3, 1_000_000)
        .await
        .expect("job");
    let tasks = store
        .pending_tasks(100)
        .await
        .expect("pending")
        .iter()
        .map(|p| p.spec.task)
        .collect();
    (vec![single, triple], tasks)
}

#[tokio::test]
async fn a_batch_of_leases_and_results_is_what_one_at_a_time_would_be() {
    let economy = Economy {
        stake: 1_000_000,
        ..Economy::default()
    };
    for ((one, _d1), (many, _d2)) in backends().await.into_iter().zip(backends().await) {
        let one = with_economy(one, economy);
        let many = with_economy(many, economy);
        let (jobs, t) = batch_fixture(&one).await;
        assert_eq!(batch_fixture(&many).await, (jobs.clone(), t.clone()));
        // Leases: every kind of outcome, some depending on the ones before them.
        let wants: Vec<(usize, u8)> = vec![
            (0, 1),
            (1, 2),
            (2, 1),
            (3, 2),
            (4, 1),
            (4, 2),
            (4, 3),
            (5, 1),
            (5, 2),
            (5, 3),
            (4, 1), // holds it already
            (0, 3), // single replica, leased
            (6, 3), // node 3's stake covers two leases
            (6, 1),
        ];
        let wants: Vec<Want> = wants
            .into_iter()
            .map(|(i, n)| Want {
                task: t[i],
                node: node(n),
                draw: 0.5,
            })
            .collect();
        let mut sequential = Vec::new();
        for w in &wants {
            sequential.push(
                one.create_lease(w.task, w.node, 10, 60_000, w.draw)
                    .await
                    .expect("lease"),
            );
        }
        let batched: Vec<Leased> = many
            .create_leases(&wants, 10, 60_000)
            .await
            .expect("leases")
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        assert_eq!(batched, sequential);
        assert!(sequential.contains(&Leased::NoStake) && sequential.contains(&Leased::No));
        assert_eq!(state_of(&many, &jobs).await, state_of(&one, &jobs).await);
        let lease = |i: usize| match sequential[i] {
            Leased::Yes(l) => l,
            other => panic!("want {i} was not leased: {other:?}"),
        };
        // Results: verified, refused, failed attempt, a liar slashed, a replay.
        let truth = report(b"truth", 2_000_000_000);
        let lie = report(b"lie", 2_000_000_000);
        let late = RunReport {
            status: Status::DeadlineExceeded,
            ..report(b"", 0)
        };
        let results: Vec<(LeaseId, u8, usize, &RunReport)> = vec![
            (lease(0), 1, 0, &truth),
            (lease(1), 2, 1, &truth),
            (lease(2), 2, 2, &truth), // not node 2's lease
            (lease(2), 1, 2, &truth),
            (lease(3), 2, 3, &late),
            (lease(4), 1, 4, &truth),
            (lease(5), 2, 4, &truth),
            (lease(6), 3, 4, &lie),
            (lease(7), 1, 5, &truth),
            (lease(8), 2, 5, &lie),
            (lease(9), 3, 5, &truth),
            (lease(0), 1, 0, &truth), // a replay
            (lease(13), 1, 6, &truth),
        ];
        let submitted: Vec<Submitted<'_>> = results
            .iter()
            .map(|(lease, n, i, r)| Submitted {
                lease: *lease,
                node: node(*n),
                task: t[*i],
                report: r,
                envelope: b"frame",
                output: Some(b"truth".as_slice()).filter(|_| r.output == truth.output),
            })
            .collect();
        let mut sequential = Vec::new();
        for s in &submitted {
            sequential.push(format!("{:?}", one.record_result(*s, RETRY, 20).await));
        }
        let batched: Vec<String> = many
            .record_results(&submitted, RETRY, 20)
            .await
            .expect("batch")
            .iter()
            .map(|o| format!("{o:?}"))
            .collect();
        assert_eq!(batched, sequential);
        for (i, want) in [
            "Verified",
            "Verified",
            "NotLeased",
            "Verified",
            "Stored",
            "Stored",
            "Stored",
            "Verified",
            "Stored",
            "Stored",
            "Verified",
            "Duplicate",
            "Stored",
        ]
        .iter()
        .enumerate()
        {
            assert!(
                sequential[i].contains(want),
                "result {i}: {}",
                sequential[i]
            );
        }
        assert_eq!(state_of(&many, &jobs).await, state_of(&one, &jobs).await);
        // One signature per transaction: the batch signed one record for its settlements
        // (and one more for the refunds of the jobs it ended), one at a time signed each.
        let (signed_one, signed_many) = (signed_records(&one).await, signed_records(&many).await);
        assert!(
            signed_many + 3 <= signed_one,
            "batched {signed_many} signatures, one at a time {signed_one}"
        );
        // The frame that carried the results is kept once, and each lease names it.
        for store in [&one, &many] {
            assert_eq!(
                store.evidence(lease(0)).await.expect("evidence").as_deref(),
                Some(b"frame".as_slice())
            );
            assert_eq!(store.evidence(999_999).await.expect("evidence"), None);
            let frames: i64 = query("SELECT COUNT(*) AS n FROM frames")
                .fetch_one(&mut store.db.acquire().await.expect("conn"))
                .await
                .expect("count")
                .try_get("n")
                .expect("n");
            assert_eq!(frames, 1, "every result came in one frame: stored once");
        }
        // The inline outputs were stored with the results.
        assert_eq!(
            many.blob(truth.output).await.expect("blob").as_deref(),
            Some(b"truth".as_slice())
        );
        let ledger = audited(&many).await;
        assert_eq!(ledger.check_invariants(), Ok(()));
        assert!(
            ledger.balance(Account::Stake(node(3))) < 2_000_000,
            "the liar was slashed"
        );
    }
}

/// Lists are bound at a few lengths (powers of two, capped), the last value repeated.
#[test]
fn lists_are_padded_to_a_few_lengths_with_their_last_value() {
    let lengths: std::collections::BTreeSet<usize> = (1..=96).map(|n| padded(n, 96)).collect();
    assert_eq!(
        lengths.into_iter().collect::<Vec<_>>(),
        vec![1, 2, 4, 8, 16, 32, 64, 96]
    );
    assert_eq!(padded(0, 96), 0);
    assert_eq!(padded(23, 23), 23);
    assert_eq!(padded(17, 23), 23);
    let items = [1, 2, 3, 4, 5];
    assert_eq!(
        pad(&items, 96).copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 5, 5, 5]
    );
    assert_eq!(pad(&items[..4], 96).count(), 4);
    assert_eq!(pad::<i32>(&[], 96).count(), 0);
}

#[test]
fn placeholder_lists_are_numbered_in_order() {
    assert_eq!(in_list(3, 3), "$3, $4, $5");
    assert_eq!(in_list(1, 0), "");
    assert_eq!(values(2, 3), "($1, $2, $3), ($4, $5, $6)");
    assert_eq!(values(1, 1), "($1)");
}

// ---- scripts -----------------------------------------------------------------------------

/// The blob ids stored, in order.
async fn blob_ids(store: &Store) -> Vec<String> {
    let rows = query("SELECT id FROM blobs ORDER BY id")
        .fetch_all(&mut store.db.acquire().await.expect("conn"))
        .await
        .expect("blobs");
    rows.iter().map(|r| r.try_get("id").expect("id")).collect()
}

#[tokio::test]
async fn a_script_runs_its_writes_in_order_and_commits_or_leaves_nothing() {
    for (store, _dir) in backends().await {
        // Statements in order, one using a value twice, then the commit.
        let mut script = script::Script::default();
        script
            .push("INSERT INTO blobs (id, bytes, size, created_ms) VALUES ($1, $2, $3, $4), ($5, $6, $7, $8)")
            .bind("a").bind(&b"1"[..]).bind(1_i64).bind(5_i64)
            .bind("b").bind(&b"22"[..]).bind(2_i64).bind(5_i64);
        script
            .push("UPDATE blobs SET size = size + $1, created_ms = $1 WHERE id = $2")
            .bind(10_i64)
            .bind("b");
        script
            .push("INSERT INTO blobs (id, bytes, size, created_ms) VALUES ($1, $2, $3, $4)")
            .bind("c")
            .bind(&b"333"[..])
            .bind(3_i64)
            .bind(6_i64);
        script.push("DELETE FROM blobs WHERE id = $1").bind("a");
        let tx = store.db.begin().await.expect("begin");
        tx.commit_with(script).await.expect("commit");
        assert_eq!(blob_ids(&store).await, ["b", "c"], "{:?}", store.backend);
        let b = query("SELECT size, created_ms FROM blobs WHERE id = 'b'")
            .fetch_one(&mut store.db.acquire().await.expect("conn"))
            .await
            .expect("b");
        assert_eq!(b.try_get::<i64>("size").expect("size"), 12);
        assert_eq!(b.try_get::<i64>("created_ms").expect("ms"), 10);

        // A statement that fails halfway (a duplicate id): nothing of the transaction stays,
        // and the connection is usable after.
        let mut script = script::Script::default();
        script.push("DELETE FROM blobs WHERE id = $1").bind("c");
        script
            .push("INSERT INTO blobs (id, bytes, size, created_ms) VALUES ($1, $2, $3, $4)")
            .bind("b")
            .bind(&b"x"[..])
            .bind(1_i64)
            .bind(7_i64);
        script
            .push("INSERT INTO blobs (id, bytes, size, created_ms) VALUES ($1, $2, $3, $4)")
            .bind("d")
            .bind(&b"x"[..])
            .bind(1_i64)
            .bind(7_i64);
        let tx = store.db.begin().await.expect("begin");
        assert!(tx.commit_with(script).await.is_err());
        assert_eq!(blob_ids(&store).await, ["b", "c"], "{:?}", store.backend);

        // Too few values bound: refused before anything runs.
        let mut script = script::Script::default();
        script
            .push("DELETE FROM blobs WHERE id = $1 OR id = $2")
            .bind("c");
        let mut tx = store.db.begin().await.expect("begin");
        let err = script.run(&mut tx).await.expect_err("refused");
        assert!(
            err.to_string().contains("no value for $2 (1 bound)"),
            "{err}"
        );
        drop(tx);
        assert_eq!(blob_ids(&store).await, ["b", "c"], "{:?}", store.backend);
    }
}

#[tokio::test]
async fn tasks_come_with_their_stored_outputs_up_to_the_inline_size() {
    for (store, _dir) in backends().await {
        join(&store, &[1]).await;
        let job = priced_job(&store, node(100), 1, 3, 0).await.expect("job");
        let pending = store.pending_tasks(10).await.expect("pending");
        let outputs: [&[u8]; 2] = [b"short", b"a longer output"];
        for (p, out) in pending.iter().zip(outputs) {
            let t = p.spec.task;
            let l = store
                .lease(t, node(1), 0, 10_000)
                .await
                .expect("lease")
                .expect("leased");
            let submitted = Submitted {
                lease: l,
                node: node(1),
                task: t,
                report: &report(out, 9),
                envelope: b"envelope",
                output: Some(out),
            };
            store
                .record_result(submitted, RETRY, 2_000)
                .await
                .expect("record");
        }
        // The third task is not done: no report, no bytes. The second's output is longer
        // than the inline size asked for.
        let rows = store
            .tasks_with_outputs(job, 0, 10, 10)
            .await
            .expect("tasks");
        let got: Vec<(String, Option<Vec<u8>>)> =
            rows.into_iter().map(|(t, b)| (t.state, b)).collect();
        assert_eq!(
            got,
            [
                ("verified".to_string(), Some(b"short".to_vec())),
                ("verified".to_string(), None),
                ("pending".to_string(), None),
            ],
            "{:?}",
            store.backend
        );
        // The same tasks as `tasks` reads them, paged alike.
        let plain = store.tasks(job, 1, 2).await.expect("tasks");
        let with = store
            .tasks_with_outputs(job, 1, 2, 1 << 16)
            .await
            .expect("tasks");
        assert_eq!(
            format!("{plain:?}"),
            format!("{:?}", with.iter().map(|(t, _)| t).collect::<Vec<_>>())
        );
        assert_eq!(with[0].1.as_deref(), Some(&b"a longer output"[..]));
    }
}

/// What SQLite plans for the statements that run per task or per request: each searches an
/// index, or scans only a partial one (pending or verified tasks) or a bound JSON list, never
/// a whole table or a whole index of every task or lease.
#[tokio::test]
async fn hot_statements_search_indexes_on_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Store::open_sqlite(dir.path()).await.expect("open");
    let mut conn = store.db.acquire().await.expect("conn");
    for sql in [
        BACKLOG_SQLITE,
        "SELECT c.id FROM (SELECT t.id FROM tasks t WHERE t.state = 'verified'
         ORDER BY t.id DESC LIMIT 256) c
         WHERE NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = c.id AND l.node = 'n')
         LIMIT 64",
        "SELECT node, report FROM leases WHERE task_id = 1 AND state = 'done' ORDER BY id",
        "SELECT COUNT(*) AS n FROM leases WHERE task_id = 1 AND state = 'active'",
        "SELECT state, owner, n_open, n_verified, n_verified + n_failed + n_cancelled AS ended
         FROM jobs WHERE id = 1",
        "UPDATE jobs SET n_open = n_open - v.n, n_verified = n_verified + v.n
         FROM (SELECT t.job_id AS job_id, COUNT(*) AS n FROM tasks t
               WHERE t.id IN (SELECT value FROM json_each('[1, 2]')) GROUP BY t.job_id) AS v
         WHERE jobs.id = v.job_id",
        // One row or item, bound as its own values (`bound_rows`, `bound_list`).
        "UPDATE jobs SET n_open = n_open - v.n, n_verified = n_verified + v.n
         FROM (SELECT t.job_id AS job_id, COUNT(*) AS n FROM tasks t
               WHERE t.id = 1 GROUP BY t.job_id) AS v
         WHERE jobs.id = v.job_id",
        "UPDATE leases SET state = 'done', frame = v.frame
         FROM (SELECT 1 AS id, 'f' AS frame) AS v WHERE leases.id = v.id",
        // A round trip's one result (`queue_held`, `read_leases`).
        "UPDATE leases SET state = 'done', frame = 'f', finished_ms = 2 WHERE id = 1",
        "UPDATE tasks SET state = 'verified', output = 'o', fuel = 1, report = 'r',
         finished_ms = 2 WHERE id = 1",
        "UPDATE jobs SET n_open = n_open - 1, n_verified = n_verified + 1
         WHERE id = (SELECT job_id FROM tasks WHERE id = 1)",
        "UPDATE tasks SET state = 'verified', fuel = v.fuel
         FROM (SELECT 1 AS id, 2 AS fuel) AS v WHERE tasks.id = v.id",
        "SELECT l.id, t.job_id FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.id = 1",
        "SELECT t.id, (SELECT group_concat(l.node, ',') FROM leases l WHERE l.task_id = t.id
         AND l.state IN ('active', 'done')) AS holders
         FROM tasks t WHERE t.state = 'pending' AND t.job_id = 1 ORDER BY t.idx LIMIT 5",
        "SELECT l.task_id, l.node FROM leases l LEFT JOIN nodes n ON n.id = l.node
         WHERE l.task_id IN (SELECT value FROM json_each('[1, 2]')) AND l.state IN ('active', 'done')",
        "SELECT l.id, t.job_id FROM leases l JOIN tasks t ON t.id = l.task_id
         WHERE l.id IN (SELECT value FROM json_each('[1, 2]'))",
        "UPDATE leases SET state = 'done', frame = v.frame
         FROM (SELECT (j.value ->> 0) AS id, (j.value ->> 1) AS frame FROM json_each('[[1, \"f\"]]') AS j) AS v
         WHERE leases.id = v.id",
        "UPDATE tasks SET state = 'verified', fuel = v.fuel
         FROM (SELECT (j.value ->> 0) AS id, (j.value ->> 1) AS fuel FROM json_each('[[1, 2]]') AS j) AS v
         WHERE tasks.id = v.id",
        "SELECT id FROM leases WHERE state = 'active' AND deadline_ms < 5 ORDER BY deadline_ms, id LIMIT 1000",
    ] {
        let plan = query(format!("EXPLAIN QUERY PLAN {sql}"))
            .fetch_all(&mut conn)
            .await
            .expect("plan");
        for step in &plan {
            let detail: String = step.try_get("detail").expect("detail");
            if detail.starts_with("SCAN") {
                // A partial index, a bound JSON list, or the statement's own derived rows
                // (`v`: a batch's jobs; `c`: a spot check's window of recent tasks; a
                // constant row: one row bound as its own values).
                assert!(
                    detail.contains("tasks_pending")
                        || detail.contains("tasks_verified")
                        || detail.contains("VIRTUAL TABLE")
                        || detail == "SCAN v"
                        || detail == "SCAN c"
                        || detail == "SCAN CONSTANT ROW",
                    "{sql}\n{detail}"
                );
            }
        }
    }
    drop(conn);
    // The backlog's count is the statement above.
    assert_eq!(store.backlog().await.expect("backlog"), 0);
}

/// A spot check's candidates come from the most recent verified tasks only: a node that ran
/// all of them gets none, even with an older task it never ran (the search once read every
/// verified task the node ran, the whole history of a long-lived domain).
#[tokio::test]
async fn spot_checks_look_at_recent_verified_tasks_only() {
    for (store, _dir) in backends().await {
        join(&store, &[1, 2]).await;
        let n = SPOT_CHECK_WINDOW as usize + 1;
        job(&store, 1, n).await;
        let pending = store.pending_tasks(n as u32).await.expect("pending");
        assert_eq!(pending.len(), n);
        // The oldest task ran on node 2 alone, every later one on node 1.
        for (i, p) in pending.iter().enumerate() {
            let t = p.spec.task;
            let runner = if i == 0 { node(2) } else { node(1) };
            let lease = store
                .lease(t, runner, 1_000, 10_000)
                .await
                .expect("lease")
                .expect("leased");
            record(&store, lease, runner, t, &report(b"out", 1_000)).await;
        }
        assert_eq!(
            store
                .create_spot_check(node(1), 0, 10_000, 0.0)
                .await
                .expect("spot"),
            None,
            "the one task node 1 never ran is older than the window"
        );
        // Node 2 never ran the recent ones: it is checked with one of them.
        let (_, spec) = store
            .create_spot_check(node(2), 0, 10_000, 0.0)
            .await
            .expect("spot")
            .expect("a candidate");
        assert_ne!(spec.task, pending[0].spec.task);
    }
}

/// Another process writing the same SQLite file (`stardust ledger grant` beside a running
/// domain) makes a transaction wait for its write lock, not fail: a transaction that read
/// first and found the file changed at its first write would be refused
/// (SQLITE_BUSY_SNAPSHOT), and nothing retries that.
#[tokio::test]
async fn a_second_writer_on_the_sqlite_file_is_waited_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_sqlite(dir.path())
        .await
        .expect("sqlite")
        .with_ledger(domain_key(), Economy::default());
    let path = dir.path().join("stardust.db");
    for round in 0..3 {
        // The other writer (a thread with a connection of its own, as another process
        // would have) holds the lock, then commits a change while the store waits.
        let (locked, is_locked) = std::sync::mpsc::sync_channel(1);
        let other = {
            let path = path.clone();
            std::thread::spawn(move || {
                let c = rusqlite::Connection::open(&path).expect("connect");
                c.execute_batch("BEGIN IMMEDIATE").expect("begin");
                c.execute(
                    "INSERT INTO blobs (id, bytes, size, created_ms) VALUES (?1, ?2, 1, 0)",
                    (format!("other-{round}"), &b"x"[..]),
                )
                .expect("insert");
                locked.send(()).expect("tell");
                std::thread::sleep(Duration::from_millis(200));
                c.execute_batch("COMMIT").expect("commit");
            })
        };
        is_locked.recv().expect("the other writer locked");
        store
            .grant(Account::Submitter(node(7)), 5, 0)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the grant failed: {e}"));
        other.join().expect("the other writer");
    }
    assert_eq!(
        store
            .balance(Account::Submitter(node(7)))
            .await
            .expect("balance"),
        15
    );
}

/// Cached statements run again with new values are not compiled again: SQLite recompiles a
/// statement whose plan used a bound value (a bare `LIMIT $N` does), which made the hot
/// reads several times slower. (The counter is per test process, as nextest runs them.)
#[tokio::test]
async fn statements_run_with_new_values_are_not_compiled_again_on_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let store = with_economy(
        Store::open_sqlite(dir.path()).await.expect("open"),
        Economy::default(),
    );
    join(&store, &[1]).await;
    let mut jobs = Vec::new();
    for n in 1..=3 {
        jobs.push(job(&store, 1, n).await);
    }
    let before = super::sql::reprepared();
    for (i, job) in jobs.iter().enumerate() {
        let i = i as u32;
        store
            .tasks_with_outputs(*job, i, 64 + i, 1024)
            .await
            .expect("tasks with outputs");
        store.tasks(*job, i, 10 + i).await.expect("tasks");
        store.pending_tasks(5 + i).await.expect("pending");
        store.recent_jobs(3 + i).await.expect("recent");
        store
            .ledger_records(u64::from(i), 100 + i)
            .await
            .expect("ledger");
        let pending = store.pending_tasks(100).await.expect("pending");
        let t = pending[0].spec.task;
        let lease = store
            .lease(t, node(1), 0, 10_000)
            .await
            .expect("lease")
            .expect("leased");
        record(&store, lease, node(1), t, &report(b"out", 1_000)).await;
    }
    assert_eq!(
        super::sql::reprepared() - before,
        0,
        "statements recompiled"
    );

    // The counter sees a recompilation: a bare bound LIMIT, run with two values.
    let mut conn = store.db.acquire().await.expect("conn");
    for limit in [1i64, 2] {
        query("SELECT id FROM tasks ORDER BY id LIMIT $1")
            .bind(limit)
            .fetch_all(&mut conn)
            .await
            .expect("select");
    }
    assert!(super::sql::reprepared() > before, "the counter counts");
}

/// Leases `task` to node 1 and records `r` for it, with `output` inline when given.
async fn lease_and_record(store: &Store, task: TaskId, r: &RunReport, output: Option<&[u8]>) {
    let lease = store
        .lease(task, node(1), 1_000, 10_000)
        .await
        .expect("lease")
        .expect("leased");
    let submitted = Submitted {
        lease,
        node: node(1),
        task,
        report: r,
        envelope: b"envelope",
        output,
    };
    store
        .record_result(submitted, RETRY, 2_000)
        .await
        .expect("record");
}

/// A job of one task that its verification ends is told with that task as the transaction
/// wrote it (`Ended::sole`): the same as reading it back. A larger job, or a result whose
/// output did not come inline, is told without it.
#[tokio::test]
async fn a_one_task_jobs_end_is_told_with_its_task() {
    for (store, _dir) in backends().await {
        let mut ends = store.ended_jobs();
        let output = b"out put".to_vec();
        let r = report(&output, 9);
        let one = job(&store, 1, 1).await;
        let task = store.pending_tasks(10).await.expect("pending")[0].spec.task;
        lease_and_record(&store, task, &r, Some(&output)).await;
        let told = ends.recv().await.expect("told");
        assert_eq!(told.job, one);
        let sole = told.sole.expect("told with its task");
        let read = store
            .tasks_with_outputs(one, 0, 10, 1 << 20)
            .await
            .expect("tasks");
        assert_eq!(read, vec![(sole.task.clone(), Some(sole.output.clone()))]);
        let j = store.job(one).await.expect("job").expect("exists");
        assert_eq!(j.state, "completed");
        assert_eq!(j.finished_ms, Some(sole.finished_ms));
        assert_eq!((j.counts.total, j.counts.verified), (1, 1));

        // Two tasks: the second's end is told without a task.
        let two = job(&store, 1, 2).await;
        let pending = store.pending_tasks(10).await.expect("pending");
        for p in pending.iter().filter(|p| p.spec.job == two) {
            lease_and_record(&store, p.spec.task, &r, Some(&output)).await;
        }
        let told = ends.recv().await.expect("told");
        assert_eq!((told.job, told.sole.is_none()), (two, true));

        // One task whose output was uploaded, not inline: told without it.
        let three = job(&store, 1, 1).await;
        let task = store.pending_tasks(10).await.expect("pending")[0].spec.task;
        lease_and_record(&store, task, &r, None).await;
        let told = ends.recv().await.expect("told");
        assert_eq!((told.job, told.sole.is_none()), (three, true));
    }
}
