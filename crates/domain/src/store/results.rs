//! Recording results, in batches: every result of a batch (one frame or several) in one
//! transaction.
//!
//! Each result is checked and applied in order against the state the earlier ones left, so
//! recording a batch means exactly what recording its results one by one would. What the
//! results share is written once, when the batch closes: the ledger (one chain for the batch:
//! records in multi-row inserts, each balance once), the judged nodes' reputations (one
//! update per node), the outputs that came inline, and the ends of the jobs touched. A result
//! thus costs a handful of statements instead of some forty (each a round trip to the
//! database on PostgreSQL).
//!
//! Lock order, as everywhere in the store: task rows (all of the batch's, in id order, up
//! front), then job rows (in id order, up front), then the ledger head.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use stardust_ledger::{Account, Amount, Reason};
use stardust_proto::content::ContentId;
use stardust_proto::identity::NodeId;
use stardust_proto::task::{JobId, LeaseId, RunReport, TaskId};
use stardust_scheduler::pricing;
use stardust_scheduler::quorum::{self, Decision};
use stardust_scheduler::reputation::{Outcome, Record};

use super::ledger::{Chain, Post};
use super::script::Script;
use super::sql::query;
use super::{
    Backend, Ended, RecordError, Recorded, Result, Retry, SoleTask, Store, Submitted, TaskEnd,
    TaskRow, as_json_rows, bound_list, bound_rows, corrupt, id_i64, in_list, json, json_rows, pad,
    padded, parse, terms, to_json, values,
};

type Tx = super::db::Tx;

/// Outputs per INSERT statement when a batch closes (at most 64 KiB each).
const OUTPUTS_PER_INSERT: usize = super::rows_per_statement(4);

/// Judged nodes per reputation update when a batch closes (8 parameters each).
const JUDGED_PER_UPDATE: usize = super::rows_per_statement(8);

/// Result frames per INSERT statement when a batch closes.
const FRAMES_PER_INSERT: usize = super::rows_per_statement(3);

/// What a batch's results share until it closes.
struct Batch<'a> {
    /// Writes queued until the next read that needs them, or the commit.
    script: Script,
    /// The ledger chain, opened (its head locked) at the batch's first movement.
    chain: Option<Chain>,
    /// Judged nodes: the record as it stands now, and the counters to add.
    judged: BTreeMap<NodeId, Judged>,
    /// Jobs with results in the batch: ended at close when none of their tasks is open.
    jobs: BTreeSet<i64>,
    /// Settlement terms of the jobs paid so far.
    terms: HashMap<i64, Payer>,
    /// Inline outputs of the recorded results, each once.
    outputs: HashMap<ContentId, &'a [u8]>,
    /// The signed frames that carried the results, kept as evidence: each once, however
    /// many results it carried (the leases name it).
    frames: HashMap<ContentId, &'a [u8]>,
    /// The batch's leases with their tasks, read in one statement when it began; a result
    /// whose task an earlier result of the batch touched reads its own again.
    leases: HashMap<i64, LeaseRow>,
    /// Tasks the batch's results touched so far.
    touched: HashSet<i64>,
    /// Single-replica results verified: their lease and task updates, written as set
    /// statements ([`Store::flush`]) before anything reads those rows.
    done: Vec<(i64, String)>,
    verified: Vec<(i64, String, i64, String)>,
    /// A batch of one result that verified a single-replica task, with its output inline:
    /// that task, its job, as [`SoleTask`] tells it should the job end here.
    sole: Option<(i64, SoleTask)>,
}

impl Batch<'_> {
    fn new() -> Self {
        Self {
            script: Script::default(),
            chain: None,
            judged: BTreeMap::new(),
            jobs: BTreeSet::new(),
            terms: HashMap::new(),
            outputs: HashMap::new(),
            frames: HashMap::new(),
            leases: HashMap::new(),
            touched: HashSet::new(),
            done: Vec::new(),
            verified: Vec::new(),
            sole: None,
        }
    }
}

/// A lease with what recording its result needs of its task.
struct LeaseRow {
    task_id: i64,
    node: String,
    state: String,
    report: Option<String>,
    kind: String,
    replicas: i64,
    attempts: i64,
    job_id: i64,
    /// More of its task, read for a batch of one result ([`Store::read_leases`]).
    task: Option<TaskCols>,
}

/// A task's columns that answering its job's submission needs ([`SoleTask`]).
struct TaskCols {
    idx: i64,
    args: String,
    reason: Option<String>,
}

/// A lease with its task's columns, as [`Store::read_leases`] reads them. A single
/// replica's lease keeps no report of its own: a done one's is its task's.
const LEASE_ROW: &str = "SELECT l.id, l.task_id, l.node, l.state,
     COALESCE(l.report, CASE WHEN l.state = 'done' THEN t.report END) AS report,
     l.kind, t.replicas, t.attempts, t.job_id
     FROM leases l JOIN tasks t ON t.id = l.task_id";

/// [`LEASE_ROW`] with the task's columns a sole task's answer needs ([`TaskCols`]).
const LEASE_ROW_AND_TASK: &str = "SELECT l.id, l.task_id, l.node, l.state,
     COALESCE(l.report, CASE WHEN l.state = 'done' THEN t.report END) AS report,
     l.kind, t.replicas, t.attempts, t.job_id, t.idx, t.args, t.reason
     FROM leases l JOIN tasks t ON t.id = l.task_id";

/// [`LEASE_ROW`]'s columns, in order, for [`as_json_rows`].
const LEASE_COLS: [&str; 9] = [
    "id", "task_id", "node", "state", "report", "kind", "replicas", "attempts", "job_id",
];

/// A row of [`LEASE_COLS`] as [`json_rows`] parses it.
type LeaseCols = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    String,
    i64,
    i64,
    i64,
);

/// What recording a result needs that no database read decides, worked out before the
/// batch's transaction begins.
struct Prepared {
    /// The frame that carried it, and its id as stored.
    frame: ContentId,
    frame_id: String,
    /// The report as stored (JSON).
    report: String,
    /// The sender, as leases name it.
    node: String,
}

impl Prepared {
    /// One per result, in order; a frame's id computed once for the results it carried
    /// (they arrive together).
    fn all(results: &[Submitted<'_>]) -> Vec<Self> {
        let mut out: Vec<Self> = Vec::with_capacity(results.len());
        let mut last: Option<(&[u8], ContentId, String)> = None;
        for r in results {
            let (frame, frame_id) = match &last {
                Some((bytes, id, s)) if std::ptr::eq(*bytes, r.envelope) => (*id, s.clone()),
                _ => {
                    let id = ContentId::of(r.envelope);
                    let s = id.to_string();
                    last = Some((r.envelope, id, s.clone()));
                    (id, s)
                }
            };
            out.push(Self {
                frame,
                frame_id,
                report: to_json(r.report),
                node: r.node.to_string(),
            });
        }
        out
    }
}

#[derive(Clone, Copy)]
struct Judged {
    record: Record,
    /// Agreed, disagreed, spot checks passed, spot checks failed.
    counts: [i64; 4],
}

/// A job as its settlements need it.
#[derive(Clone, Copy)]
struct Payer {
    fuel_limit: u64,
    price: u64,
    redundancy: usize,
    author: Account,
    created_ms: i64,
}

impl Store {
    /// Records `node`'s result for `lease`, exactly once, and decides the task by quorum
    /// when enough results are in. `envelope` is the signed frame that carried the result
    /// (evidence: kept once per frame, named by the lease).
    pub async fn record_result(
        &self,
        result: Submitted<'_>,
        retry: Retry,
        now: i64,
    ) -> std::result::Result<Recorded, RecordError> {
        match self.record_results(&[result], retry, now).await?.pop() {
            Some(outcome) => outcome,
            None => Err(corrupt("result batch", "no outcome for a result").into()),
        }
    }

    /// Records a batch of results in one transaction, in order; one outcome per result.
    /// Each outcome is what [`Store::record_result`] would have returned for it at that
    /// point. `Err` (the database failed) means nothing of the batch was recorded.
    pub async fn record_results(
        &self,
        results: &[Submitted<'_>],
        retry: Retry,
        now: i64,
    ) -> Result<Vec<std::result::Result<Recorded, RecordError>>> {
        // What needs no database is worked out before the connection is taken: while a
        // transaction holds SQLite's one connection, every other writer waits.
        let prepared = Prepared::all(results);
        let mut tx = self.db.begin().await?;
        self.lock_batch(&mut tx, results).await?;
        let mut batch = Batch::new();
        let ids: BTreeSet<i64> = results.iter().map(|r| id_i64(r.lease)).collect();
        let ids: Vec<i64> = ids.into_iter().collect();
        batch.leases = self.read_leases(&mut tx, &ids).await?;
        let mut out = Vec::with_capacity(results.len());
        for (r, pre) in results.iter().zip(prepared) {
            match self
                .record_one(&mut tx, &mut batch, *r, pre, retry, now)
                .await
            {
                Err(RecordError::Store(e)) => return Err(e),
                outcome => out.push(outcome),
            }
        }
        let (ended, sole, script) = self.close_batch(&mut tx, batch, now).await?;
        tx.commit_with(script).await?;
        // A failed attempt or a task wanting more replicas may be pending again.
        if out.iter().any(|o| {
            matches!(
                o,
                Ok(Recorded::Stored | Recorded::MoreReplicas(_) | Recorded::Failed(_))
            )
        }) {
            self.tell_pending_changed();
        }
        match sole {
            Some((job, sole)) => {
                self.tell_ended(ended.into_iter().filter(|j| *j != job));
                let _ = self.ended.send(Ended {
                    job: job as JobId,
                    sole: Some(std::sync::Arc::new(sole)),
                });
            }
            None => self.tell_ended(ended),
        }
        Ok(out)
    }

    /// The leases `ids` (those that exist) with their tasks' columns, in one statement.
    async fn read_leases(&self, tx: &mut Tx, ids: &[i64]) -> Result<HashMap<i64, LeaseRow>> {
        let mut leases = HashMap::with_capacity(ids.len());
        if let [id] = ids {
            // One lease (a round trip's result): its row as it is, without the aggregate.
            if let Some(r) = query(format!("{LEASE_ROW_AND_TASK} WHERE l.id = $1"))
                .bind(*id)
                .fetch_optional(tx)
                .await?
            {
                let lease = LeaseRow {
                    task_id: r.try_get("task_id")?,
                    node: r.try_get("node")?,
                    state: r.try_get("state")?,
                    report: r.try_get("report")?,
                    kind: r.try_get("kind")?,
                    replicas: r.try_get("replicas")?,
                    attempts: r.try_get("attempts")?,
                    job_id: r.try_get("job_id")?,
                    task: Some(TaskCols {
                        idx: r.try_get("idx")?,
                        args: r.try_get("args")?,
                        reason: r.try_get("reason")?,
                    }),
                };
                leases.insert(*id, lease);
            }
            return Ok(leases);
        }
        {
            let list = bound_list(self.backend, 1, true, ids);
            let q = query(as_json_rows(
                self.backend,
                &format!("{LEASE_ROW} WHERE l.id {}", list.sql),
                &LEASE_COLS,
            ));
            let q = list.bind(q);
            let row = q.fetch_one(tx).await?;
            for (id, task_id, node, state, report, kind, replicas, attempts, job_id) in
                json_rows::<LeaseCols>("lease rows", &row)?
            {
                let lease = LeaseRow {
                    task_id,
                    node,
                    state,
                    report,
                    kind,
                    replicas,
                    attempts,
                    job_id,
                    task: None,
                };
                leases.insert(id, lease);
            }
        }
        Ok(leases)
    }

    /// PostgreSQL: locks the batch's task rows, then their jobs' rows, each in id order, so
    /// two transactions never wait on each other in a cycle. (SQLite's one writer
    /// connection serializes every transaction already.)
    async fn lock_batch(&self, tx: &mut Tx, results: &[Submitted<'_>]) -> Result<()> {
        if self.backend != Backend::Postgres || results.is_empty() {
            return Ok(());
        }
        let tasks: BTreeSet<i64> = results.iter().map(|r| id_i64(r.task)).collect();
        let list = in_list(1, tasks.len());
        let mut q = query(format!(
            "SELECT id, job_id FROM tasks WHERE id IN ({list}) ORDER BY id FOR UPDATE"
        ));
        for t in &tasks {
            q = q.bind(*t);
        }
        let rows = q.fetch_all(tx).await?;
        let jobs = rows
            .iter()
            .map(|r| r.try_get::<i64>("job_id"))
            .collect::<std::result::Result<BTreeSet<i64>, _>>()?;
        if jobs.is_empty() {
            return Ok(());
        }
        let list = in_list(1, jobs.len());
        let mut q = query(format!(
            "SELECT id FROM jobs WHERE id IN ({list}) ORDER BY id FOR UPDATE"
        ));
        for j in &jobs {
            q = q.bind(*j);
        }
        q.execute(tx).await?;
        Ok(())
    }

    /// Records one result of a batch.
    async fn record_one<'a>(
        &self,
        tx: &mut Tx,
        batch: &mut Batch<'a>,
        result: Submitted<'a>,
        pre: Prepared,
        retry: Retry,
        now: i64,
    ) -> std::result::Result<Recorded, RecordError> {
        let Submitted {
            lease,
            node,
            task,
            report,
            envelope,
            output,
        } = result;
        // The row read when the batch began, unless an earlier result of the batch touched
        // its task: then the writes held so far go first and it is read again.
        let early = batch
            .leases
            .remove(&id_i64(lease))
            .filter(|r| !batch.touched.contains(&r.task_id));
        let row = match early {
            Some(row) => Some(row),
            None => {
                self.flush(tx, batch, now).await?;
                self.read_leases(tx, &[id_i64(lease)])
                    .await?
                    .remove(&id_i64(lease))
            }
        };
        let Some(mut row) = row else {
            return Err(RecordError::NotLeased(lease));
        };
        if row.node != pre.node {
            return Err(RecordError::NotLeased(lease));
        }
        let lease_task = row.task_id as TaskId;
        if lease_task != task {
            return Err(RecordError::WrongTask {
                lease,
                expected: lease_task,
                got: task,
            });
        }
        batch.touched.insert(row.task_id);
        let state = row.state.as_str();
        if state == "done" {
            return if row.report.as_deref() == Some(pre.report.as_str()) {
                Ok(Recorded::Duplicate)
            } else {
                Err(RecordError::NotLeased(lease))
            };
        }
        if state != "active" {
            return Err(RecordError::NotLeased(lease));
        }
        if let Some(bytes) = output {
            batch.outputs.entry(report.output).or_insert(bytes);
        }
        batch.frames.entry(pre.frame).or_insert(envelope);
        let frame = pre.frame_id;
        if row.kind == "spot" {
            return self
                .record_spot_check(
                    tx,
                    batch,
                    lease,
                    node,
                    task,
                    report,
                    &pre.report,
                    &frame,
                    now,
                )
                .await;
        }
        let job = row.job_id;
        let replicas = row.replicas.clamp(0, 255) as u8;
        let attempts = row.attempts.clamp(0, i64::from(u32::MAX)) as u32;
        batch.jobs.insert(job);

        if !report.status.is_deterministic() {
            // Not a vote: the attempt failed; lease the replica again, or give up.
            Self::finish_lease(tx, lease, "failed", &pre.report, &frame, now).await?;
            let reason = format!("attempt failed: {}", report.status);
            return Ok(Self::failed_attempt(
                tx,
                task,
                attempts + 1,
                retry.max_attempts,
                &reason,
                now,
            )
            .await?);
        }
        // A single replica's report is also its task's accepted report: serialized once.
        let mut single_report = None;
        if replicas <= 1 {
            // Nothing reads this lease again in the batch (its task is touched). Its report
            // is kept once, on its task (it is the task's accepted report); the lease names
            // the frame that carried it.
            single_report = Some(pre.report);
            batch.done.push((id_i64(lease), frame));
        } else {
            Self::finish_lease(tx, lease, "done", &pre.report, &frame, now).await?;
        }
        let mut votes = Vec::new();
        let mut reports = Vec::new();
        if replicas <= 1 {
            // The task's only replica: this is its one vote (a task of one replica is
            // decided by its first result, so no earlier one is done).
            votes.push((node, report.fingerprint()));
            reports.push(report.clone());
        } else {
            let done = query(
                "SELECT node, report FROM leases WHERE task_id = $1 AND state = 'done' ORDER BY id",
            )
            .bind(id_i64(task))
            .fetch_all(tx)
            .await?;
            for d in &done {
                let n: NodeId = parse("lease node", &d.try_get::<String>("node")?)?;
                let r: RunReport = json(
                    "lease report",
                    &d.try_get::<Option<String>>("report")?.unwrap_or_default(),
                )?;
                votes.push((n, r.fingerprint()));
                reports.push(r);
            }
        }
        let policy = quorum::Policy {
            redundancy: replicas,
            max_replicas: retry.max_replicas.max(replicas),
        };
        Ok(match quorum::decide(policy, &votes) {
            Decision::Accepted {
                value,
                agree,
                disagree,
            } => {
                let accepted = reports
                    .into_iter()
                    .find(|r| r.fingerprint() == value)
                    .ok_or_else(|| corrupt("quorum", "accepted value has no report"))?;
                if replicas <= 1 {
                    batch.verified.push((
                        id_i64(task),
                        accepted.output.to_string(),
                        id_i64(accepted.fuel_used),
                        single_report.take().unwrap_or_else(|| to_json(&accepted)),
                    ));
                    // A batch of one result (its task's columns were read with its lease),
                    // its output inline: what its job's end tells, should it end here.
                    if let (Some(cols), Some(bytes)) = (row.task.take(), output) {
                        let sole = SoleTask {
                            task: TaskRow {
                                id: task,
                                index: u32::try_from(cols.idx).unwrap_or(u32::MAX),
                                args: json("task args", &cols.args)?,
                                state: "verified".into(),
                                replicas: u32::from(replicas),
                                attempts,
                                reason: cols.reason,
                                report: Some(accepted.clone()),
                                finished_ms: Some(now),
                            },
                            output: bytes.to_vec(),
                            finished_ms: now,
                        };
                        batch.sole = Some((job, sole));
                    }
                } else {
                    query(
                        "UPDATE tasks SET state = 'verified', output = $1, fuel = $2, report = $3, finished_ms = $4 WHERE id = $5",
                    )
                    .bind(accepted.output.to_string())
                    .bind(id_i64(accepted.fuel_used))
                    .bind(to_json(&accepted))
                    .bind(now)
                    .bind(id_i64(task))
                    .execute(tx)
                    .await?;
                    Self::count_ended(tx, TaskEnd::Verified, id_i64(task)).await?;
                }
                if replicas > 1 {
                    // Replicas still running are no longer needed. (A task of one replica
                    // has none: the lease just recorded was its only active one.)
                    query("UPDATE leases SET state = 'cancelled', finished_ms = $1 WHERE task_id = $2 AND state = 'active'")
                        .bind(now)
                        .bind(id_i64(task))
                        .execute(tx)
                        .await?;
                }
                let mut records = Vec::with_capacity(agree.len() + disagree.len());
                for n in &agree {
                    records.push((*n, Self::judge(tx, batch, *n, Outcome::Agreed).await?));
                }
                for n in &disagree {
                    records.push((*n, Self::judge(tx, batch, *n, Outcome::Disagreed).await?));
                }
                let submitted_ms = self
                    .settle(tx, batch, job, task, &accepted, &agree, &disagree, now)
                    .await?;
                Recorded::Verified {
                    agree,
                    disagree,
                    records,
                    submitted_ms,
                }
            }
            Decision::NeedMore(k) => {
                // The task stays pending (a row written before leases stopped marking tasks
                // `running` may still say so): the dispatcher leases it while fewer nodes hold
                // it than `wanted`.
                let wanted = (votes.len() as i64 + i64::from(k)).max(i64::from(replicas));
                query("UPDATE tasks SET replicas = $1, state = 'pending' WHERE id = $2")
                    .bind(wanted)
                    .bind(id_i64(task))
                    .execute(tx)
                    .await?;
                if wanted > i64::from(replicas) {
                    Recorded::MoreReplicas(k)
                } else {
                    Recorded::Stored
                }
            }
            Decision::Failed => {
                let reason = "replicas disagree".to_string();
                query("UPDATE tasks SET state = 'failed', reason = $1, finished_ms = $2 WHERE id = $3")
                    .bind(&reason)
                    .bind(now)
                    .bind(id_i64(task))
                    .execute(tx)
                    .await?;
                Self::count_ended(tx, TaskEnd::Failed, id_i64(task)).await?;
                Recorded::Failed(reason)
            }
        })
    }

    /// Ends a lease with its result: `state` (`done` or `failed`), the report (JSON), and the
    /// frame that carried it.
    async fn finish_lease(
        tx: &mut Tx,
        lease: LeaseId,
        state: &str,
        report: &str,
        frame: &str,
        now: i64,
    ) -> Result<()> {
        query(
            "UPDATE leases SET state = $1, report = $2, frame = $3, finished_ms = $4 WHERE id = $5",
        )
        .bind(state)
        .bind(report)
        .bind(frame)
        .bind(now)
        .bind(id_i64(lease))
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Writes the held single-replica updates and anything else queued, before a read.
    async fn flush(&self, tx: &mut Tx, batch: &mut Batch<'_>, now: i64) -> Result<()> {
        self.queue_held(batch, now);
        batch.script.run(tx).await?;
        Ok(())
    }

    /// Queues the held single-replica updates (leases done, tasks verified) as two set
    /// statements, their rows bound as one JSON value each ([`json_table`]).
    fn queue_held(&self, batch: &mut Batch<'_>, now: i64) {
        if let [(lease, frame)] = batch.done.as_slice() {
            // One row (a round trip's result): a plain update by id, which SQLite runs
            // without materializing a joined row source first.
            batch
                .script
                .push(
                    "UPDATE leases SET state = 'done', frame = $1, finished_ms = $2 WHERE id = $3",
                )
                .bind(frame.as_str())
                .bind(now)
                .bind(*lease);
            batch.done.clear();
        }
        if let [(task, output, fuel, report)] = batch.verified.as_slice() {
            batch
                .script
                .push(
                    "UPDATE tasks SET state = 'verified', output = $1, fuel = $2, report = $3,
                     finished_ms = $4 WHERE id = $5",
                )
                .bind(output.as_str())
                .bind(*fuel)
                .bind(report.as_str())
                .bind(now)
                .bind(*task);
            // Counted on its job (moved from pending: its lease was active).
            batch
                .script
                .push(
                    "UPDATE jobs SET n_open = n_open - 1, n_verified = n_verified + 1
                     WHERE id = (SELECT job_id FROM tasks WHERE id = $1)",
                )
                .bind(*task);
            batch.verified.clear();
        }
        if !batch.done.is_empty() {
            let rows = bound_rows(
                self.backend,
                2,
                &[("id", true), ("frame", false)],
                false,
                &batch.done,
            );
            let q = batch
                .script
                .push(&format!(
                    "UPDATE leases SET state = 'done', frame = v.frame, finished_ms = $1
                     FROM ({}) AS v WHERE leases.id = v.id",
                    rows.sql
                ))
                .bind(now);
            rows.bind_queued(q);
            batch.done.clear();
        }
        if !batch.verified.is_empty() {
            let rows = bound_rows(
                self.backend,
                2,
                &[
                    ("id", true),
                    ("output", false),
                    ("fuel", true),
                    ("report", false),
                ],
                false,
                &batch.verified,
            );
            let q = batch
                .script
                .push(&format!(
                    "UPDATE tasks SET state = 'verified', output = v.output, fuel = v.fuel,
                     report = v.report, finished_ms = $1
                     FROM ({}) AS v WHERE tasks.id = v.id",
                    rows.sql
                ))
                .bind(now);
            rows.bind_queued(q);
            // Counted on their jobs (each moved from pending: its lease was active).
            let ids: Vec<i64> = batch.verified.iter().map(|v| v.0).collect();
            let ids = bound_list(self.backend, 1, true, &ids);
            let q = batch.script.push(&format!(
                "UPDATE jobs SET n_open = n_open - v.n, n_verified = n_verified + v.n
                 FROM (SELECT t.job_id AS job_id, COUNT(*) AS n FROM tasks t
                       WHERE t.id {} GROUP BY t.job_id) AS v
                 WHERE jobs.id = v.job_id",
                ids.sql
            ));
            ids.bind_queued(q);
            batch.verified.clear();
        }
    }

    /// Queues what the batch's results share: inline outputs, reputations (in node id
    /// order), the ends of the jobs left with nothing open (with their refunds), then the
    /// ledger. Returns the jobs it ended and the writes still to run, to commit with.
    async fn close_batch(
        &self,
        tx: &mut Tx,
        mut batch: Batch<'_>,
        now: i64,
    ) -> Result<(Vec<i64>, Option<(i64, SoleTask)>, Script)> {
        self.queue_held(&mut batch, now);
        let frames: Vec<(ContentId, &[u8])> = batch.frames.drain().collect();
        for rows in frames.chunks(FRAMES_PER_INSERT) {
            let mut q = batch.script.push(&format!(
                "INSERT INTO frames (id, bytes, created_ms) VALUES {} ON CONFLICT (id) DO NOTHING",
                values(padded(rows.len(), FRAMES_PER_INSERT), 3)
            ));
            for (id, bytes) in pad(rows, FRAMES_PER_INSERT) {
                q = q.bind(id.to_string()).bind(*bytes).bind(now);
            }
        }
        let outputs: Vec<(ContentId, &[u8])> = batch.outputs.drain().collect();
        for rows in outputs.chunks(OUTPUTS_PER_INSERT) {
            let mut q = batch.script.push(&format!(
                "INSERT INTO blobs (id, bytes, size, created_ms) VALUES {} ON CONFLICT (id) DO NOTHING",
                values(padded(rows.len(), OUTPUTS_PER_INSERT), 4)
            ));
            for (id, bytes) in pad(rows, OUTPUTS_PER_INSERT) {
                q = q
                    .bind(id.to_string())
                    .bind(*bytes)
                    .bind(bytes.len() as i64)
                    .bind(now);
            }
        }
        // One set statement for the judged nodes (in node id order).
        let judged: Vec<(NodeId, Judged)> = std::mem::take(&mut batch.judged).into_iter().collect();
        for rows in judged.chunks(JUDGED_PER_UPDATE) {
            let mut q = batch.script.push(&format!(
                "WITH v (id, good, bad, streak, agreed, disagreed, passed, failed) AS (VALUES {})
                 UPDATE nodes SET rep_good = v.good, rep_bad = v.bad, streak = v.streak,
                 agreed = nodes.agreed + v.agreed, disagreed = nodes.disagreed + v.disagreed,
                 spot_passed = nodes.spot_passed + v.passed, spot_failed = nodes.spot_failed + v.failed
                 FROM v WHERE nodes.id = v.id",
                values(padded(rows.len(), JUDGED_PER_UPDATE), 8)
            ));
            for (node, j) in pad(rows, JUDGED_PER_UPDATE) {
                q = q
                    .bind(node.to_string())
                    .bind(j.record.good)
                    .bind(j.record.bad)
                    .bind(id_i64(j.record.streak))
                    .bind(j.counts[0])
                    .bind(j.counts[1])
                    .bind(j.counts[2])
                    .bind(j.counts[3]);
            }
        }
        let jobs = std::mem::take(&mut batch.jobs);
        let mut ended = Vec::new();
        let mut sole = None;
        if !jobs.is_empty() {
            // Whether a job is done reads its tasks' states: the writes so far go first.
            batch.script.run(tx).await?;
            for job in jobs {
                let Some(tasks) = self.end_job_if_done(tx, &mut batch, job, now).await? else {
                    continue;
                };
                ended.push(job);
                // Its one task, verified here: the job's end is told with it.
                if tasks == 1
                    && let Some((j, task)) = batch.sole.take()
                {
                    if j == job {
                        sole = Some((j, task));
                    } else {
                        batch.sole = Some((j, task));
                    }
                }
            }
        }
        let mut script = batch.script;
        if let Some(chain) = batch.chain {
            self.write_chain(&mut script, chain)?;
        }
        Ok((ended, sole, script))
    }

    /// Ends `job` when none of its tasks is pending or running — completed when one was
    /// verified, failed otherwise — and refunds what is left of its escrow to its submitter
    /// through the batch's chain; returns its number of tasks when it ended it. Queued: the
    /// job's update.
    async fn end_job_if_done(
        &self,
        tx: &mut Tx,
        batch: &mut Batch<'_>,
        job: i64,
        now: i64,
    ) -> Result<Option<i64>> {
        // (On PostgreSQL the job's row is locked already: `lock_batch`.)
        let Some((state, owner, tasks)) = Self::job_ending(tx, job).await? else {
            return Ok(None);
        };
        batch
            .script
            .push("UPDATE jobs SET state = $1, finished_ms = $2 WHERE id = $3")
            .bind(state)
            .bind(now)
            .bind(job);
        let escrow = Account::Escrow(job as JobId);
        let chain = self.batch_chain(tx, batch, escrow).await?;
        let left = Self::balance_now(tx, chain, escrow).await?;
        if left > 0 {
            let post = Post {
                id: format!("refund:{job}"),
                from: escrow,
                to: Account::Submitter(owner),
                amount: u64::try_from(left).unwrap_or(u64::MAX),
                reason: Reason::Refund { job: job as JobId },
            };
            // The job ends once, in this transaction (its row locked, or SQLite's one
            // writer): its refund's id is new.
            self.post_valid(tx, chain, post, now, true).await?;
        }
        Ok(Some(tasks))
    }

    /// Updates a node's reputation record with `outcome` (written when the batch closes);
    /// returns the new record.
    async fn judge(
        tx: &mut Tx,
        batch: &mut Batch<'_>,
        node: NodeId,
        outcome: Outcome,
    ) -> Result<Record> {
        let judged = match batch.judged.get_mut(&node) {
            Some(j) => j,
            None => {
                let row = query("SELECT rep_good, rep_bad, streak FROM nodes WHERE id = $1")
                    .bind(node.to_string())
                    .fetch_optional(tx)
                    .await?;
                let record = match row {
                    Some(r) => Record {
                        good: r.try_get("rep_good")?,
                        bad: r.try_get("rep_bad")?,
                        streak: r.try_get::<i64>("streak")? as u64,
                    },
                    None => Record::default(),
                };
                batch.judged.entry(node).or_insert(Judged {
                    record,
                    counts: [0; 4],
                })
            }
        };
        judged.record = judged.record.update(outcome);
        judged.counts[match outcome {
            Outcome::Agreed => 0,
            Outcome::Disagreed => 1,
            Outcome::SpotPassed => 2,
            Outcome::SpotFailed => 3,
        }] += 1;
        Ok(judged.record)
    }

    /// The batch's chain, opened (head locked) on first use, with the stored balance of
    /// `paying` (the account its first use posts from) and the mint's read at once.
    async fn batch_chain<'b>(
        &self,
        tx: &mut Tx,
        batch: &'b mut Batch<'_>,
        paying: Account,
    ) -> Result<&'b mut Chain> {
        if batch.chain.is_none() {
            batch.chain = Some(self.chain_with(tx, &[paying, Account::Mint], &[]).await?);
        }
        batch
            .chain
            .as_mut()
            .ok_or_else(|| corrupt("ledger chain", "not open"))
    }

    /// Pays a verified task from its job's escrow — 80 % to the agreeing providers, 15 %
    /// treasury, 5 % module author, plus the minted contribution bonus — and slashes the
    /// losers' stake to the treasury. Charged: the accepted fuel (at most the limit) at the
    /// job's price, once per agreeing replica up to the job's redundancy. Returns when the
    /// job was submitted.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site; the parts of a decision"
    )]
    async fn settle(
        &self,
        tx: &mut Tx,
        batch: &mut Batch<'_>,
        job: i64,
        task: TaskId,
        accepted: &RunReport,
        agree: &[NodeId],
        disagree: &[NodeId],
        now: i64,
    ) -> Result<i64> {
        let payer = match batch.terms.get(&job) {
            Some(p) => *p,
            None => {
                let j = query(
                    "SELECT terms, CASE WHEN terms IS NULL THEN spec END AS spec, price, redundancy, author, created_ms
                     FROM jobs WHERE id = $1",
                )
                .bind(job)
                .fetch_one(tx)
                .await?;
                let author: Option<String> = j.try_get("author")?;
                let payer = Payer {
                    fuel_limit: terms(&j)?.limits.fuel,
                    price: j.try_get::<i64>("price")? as u64,
                    redundancy: j.try_get::<i64>("redundancy")? as usize,
                    author: match author {
                        Some(a) => Account::Author(parse("job author", &a)?),
                        None => Account::Treasury,
                    },
                    created_ms: j.try_get("created_ms")?,
                };
                batch.terms.insert(job, payer);
                payer
            }
        };
        let fuel = accepted.fuel_used.min(payer.fuel_limit);
        let paid = agree.len().min(payer.redundancy.max(1)) as u64;
        let charge = pricing::replica_charge(fuel, payer.price).saturating_mul(paid);
        let escrow = Account::Escrow(job as JobId);
        let chain = self.batch_chain(tx, batch, escrow).await?;
        let held = Self::balance_now(tx, chain, escrow).await?.max(0);
        let charge = charge.min(u64::try_from(held).unwrap_or(u64::MAX));
        let split = stardust_ledger::split(charge, agree.len());
        let settle = |to: Account, amount: Amount, tag: String| Post {
            id: format!("settle:{task}:{tag}"),
            from: escrow,
            to,
            amount,
            reason: Reason::Settle { task },
        };
        let mut posts = Vec::with_capacity(2 * agree.len() + 2);
        for (n, share) in agree.iter().zip(&split.providers) {
            posts.push(settle(Account::Operator(*n), *share, n.to_string()));
        }
        posts.push(settle(Account::Treasury, split.treasury, "treasury".into()));
        posts.push(settle(payer.author, split.author, "author".into()));
        for (n, share) in agree.iter().zip(&split.providers) {
            posts.push(Post {
                id: format!("bonus:{task}:{n}"),
                from: Account::Mint,
                to: Account::Operator(*n),
                amount: stardust_ledger::curve::bonus(*share, u128::from(chain.compute_micro_scu)),
                reason: Reason::Bonus { task },
            });
        }
        // The task was verified just now, under its lock: these ids are new.
        for post in posts {
            self.post_valid(tx, chain, post, now, true).await?;
        }
        for n in disagree {
            self.slash(tx, chain, *n, task, format!("slash:{task}:{n}"), now)
                .await?;
        }
        chain.compute_micro_scu = chain.compute_micro_scu.saturating_add(
            stardust_proto::scu::micro_scu(fuel).saturating_mul(agree.len() as u64),
        );
        Ok(payer.created_ms)
    }

    /// Moves up to one lease's worth of `node`'s stake to the treasury.
    async fn slash(
        &self,
        tx: &mut Tx,
        chain: &mut Chain,
        node: NodeId,
        task: TaskId,
        id: String,
        now: i64,
    ) -> Result<()> {
        let stake = Account::Stake(node);
        let held = Self::balance_now(tx, chain, stake).await?.max(0) as u64;
        let amount = self.economy.stake.min(held);
        self.post_valid(
            tx,
            chain,
            Post {
                id,
                from: stake,
                to: Account::Treasury,
                amount,
                reason: Reason::Slash { task },
            },
            now,
            false,
        )
        .await
    }

    /// Judges the answer to a spot check against the task's accepted report.
    #[allow(
        clippy::too_many_arguments,
        reason = "the parts of one submitted result"
    )]
    async fn record_spot_check(
        &self,
        tx: &mut Tx,
        batch: &mut Batch<'_>,
        lease: LeaseId,
        node: NodeId,
        task: TaskId,
        report: &RunReport,
        report_json: &str,
        frame: &str,
        now: i64,
    ) -> std::result::Result<Recorded, RecordError> {
        let known: Option<String> = query("SELECT report FROM tasks WHERE id = $1")
            .bind(id_i64(task))
            .fetch_one(tx)
            .await?
            .try_get("report")?;
        let known: RunReport = json("task report", &known.unwrap_or_default())?;
        let (state, outcome) = if !report.status.is_deterministic() {
            ("failed", None)
        } else if report.fingerprint() == known.fingerprint() {
            ("done", Some(Outcome::SpotPassed))
        } else {
            ("done", Some(Outcome::SpotFailed))
        };
        Self::finish_lease(tx, lease, state, report_json, frame, now).await?;
        let Some(outcome) = outcome else {
            return Ok(Recorded::Stored);
        };
        let record = Self::judge(tx, batch, node, outcome).await?;
        if outcome == Outcome::SpotFailed {
            let chain = self.batch_chain(tx, batch, Account::Stake(node)).await?;
            self.slash(tx, chain, node, task, format!("slash:spot:{lease}"), now)
                .await?;
        }
        Ok(Recorded::SpotCheck {
            passed: outcome == Outcome::SpotPassed,
            record,
        })
    }
}
