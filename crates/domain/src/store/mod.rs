//! Durable state of a domain: SQLite (embedded default, WAL) or PostgreSQL, one code path
//! through [`sql`] (SQLite in process through rusqlite, PostgreSQL through sqlx's `Any`
//! driver), one migration chain with per-backend SQL ([`schema`]).
//!
//! Every state transition is one transaction, so a `kill -9` at any moment leaves either the
//! state before or the state after it: no task lost, no result recorded twice.
//!
//! Task states: `pending` (needs more replicas leased), `running` (enough replicas leased,
//! waiting for results), `verified`, `failed` (dead letter, with a reason), `cancelled`.
//! Lease states: `active`, `done` (result recorded), `expired`, `failed` (attempt did not
//! produce a vote), `cancelled`.

mod db;
mod leases;
mod ledger;
mod results;
pub mod schema;
mod script;
mod sql;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::any::AnyPoolOptions;

use self::db::Db;
use self::sql::{Row, query};
use stardust_ledger::{Account, Amount, Reason};
use stardust_proto::content::ContentId;
use stardust_proto::identity::{Identity, NodeId};
use stardust_proto::job::{JobSpec, Trial};
use stardust_proto::task::{
    Hardware, JobId, LeaseId, Limits, Requirements, RunReport, TaskId, TaskSpec, Tier,
};
use stardust_scheduler::pricing;
use stardust_scheduler::reputation::{Adaptive, Record};

pub use self::leases::Want;
use self::ledger::Post;
pub use self::ledger::StoredRecord;

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, embedded.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A storage failure. Database errors are logged by callers and never shown to clients.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// PostgreSQL refused or failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// SQLite refused or failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A query that must return a row returned none.
    #[error("no row for {0:?}")]
    NoRow(String),
    /// A column missing from a row, or holding what its reader does not take.
    #[error("column {column}: {reason}")]
    Column {
        /// The column.
        column: String,
        /// What was wrong.
        reason: String,
    },
    /// Values that do not fit a statement's placeholders (a bug).
    #[error("binding a statement: {0}")]
    Bind(String),
    /// A thread the store needs could not start.
    #[error("starting a thread: {0}")]
    Thread(String),
    /// A URL that names neither SQLite nor PostgreSQL.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    /// Stored data that does not parse (a bug or manual tampering).
    #[error("corrupt stored {what}: {reason}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A ledger write without the domain key to sign it.
    #[error("this store was opened without the domain key; it cannot write the ledger")]
    NoSigner,
    /// The domain stopped while a write was in flight; it may or may not have committed.
    #[error("the domain stopped during the write")]
    Stopped,
    /// The database holds a newer schema than this binary knows.
    #[error("database schema version {found} is newer than this binary's {known}")]
    SchemaTooNew {
        /// Stored version.
        found: i64,
        /// Latest known version.
        known: i64,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

fn corrupt(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        reason: e.to_string(),
    }
}

/// Task counts of a job, by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// All tasks.
    pub total: u64,
    /// Waiting for replicas to be leased.
    pub pending: u64,
    /// Replicas leased, waiting for results.
    pub running: u64,
    /// Accepted by quorum.
    pub verified: u64,
    /// Dead-lettered.
    pub failed: u64,
    /// Cancelled.
    pub cancelled: u64,
}

/// Pending tasks with an active lease (a task stays `pending` while its replicas run), as
/// `n`; a condition on `t` (the task) may follow.
/// How a task ended, for the counts kept on its job (`jobs.n_open` and the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskEnd {
    Verified,
    Failed,
    Cancelled,
}

impl TaskEnd {
    /// The state stored on the task.
    fn as_str(self) -> &'static str {
        match self {
            Self::Verified => "verified",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The job's column that counts tasks ended so.
    fn column(self) -> &'static str {
        match self {
            Self::Verified => "n_verified",
            Self::Failed => "n_failed",
            Self::Cancelled => "n_cancelled",
        }
    }
}

/// A task's state as shown (`t` is the task): a pending one with an active lease is
/// `running`.
const TASK_STATE: &str = "CASE WHEN t.state = 'pending' AND EXISTS
     (SELECT 1 FROM leases l WHERE l.task_id = t.id AND l.state = 'active') THEN 'running' ELSE t.state END";

const LEASED: &str =
    "SELECT COUNT(DISTINCT l.task_id) AS n FROM leases l JOIN tasks t ON t.id = l.task_id
     WHERE l.state = 'active' AND t.state = 'pending'";

impl Counts {
    /// The counts kept on a job row (`n_open`, `n_verified`, `n_failed`, `n_cancelled`) and
    /// its `leased` tasks.
    fn of(r: &Row) -> Result<Self> {
        let n = |c: &str| -> Result<u64> { Ok(r.try_get::<i64>(c)?.max(0) as u64) };
        let mut counts = Self {
            pending: n("n_open")?,
            verified: n("n_verified")?,
            failed: n("n_failed")?,
            cancelled: n("n_cancelled")?,
            ..Self::default()
        };
        counts.total = counts.pending + counts.verified + counts.failed + counts.cancelled;
        counts.leased(n("leased")?);
        Ok(counts)
    }

    /// Moves `n` pending tasks with an active lease to `running`.
    fn leased(&mut self, n: u64) {
        let n = n.min(self.pending);
        self.pending -= n;
        self.running += n;
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Id.
    pub id: JobId,
    /// Owner key.
    pub owner: NodeId,
    /// Name.
    pub name: String,
    /// The submitted spec.
    pub spec: JobSpec,
    /// The metered module the tasks run.
    pub module: ContentId,
    /// `queued`, `running`, `completed`, `failed` or `cancelled`.
    pub state: String,
    /// Submission time.
    pub created_ms: i64,
    /// When it ended.
    pub finished_ms: Option<i64>,
    /// Task counts.
    pub counts: Counts,
}

/// A job's end, told once the transaction that ended it committed ([`Store::ended_jobs`]).
#[derive(Debug, Clone)]
pub struct Ended {
    /// The job.
    pub job: JobId,
    /// For a job of one task that its task's verification ended: that task as the
    /// transaction wrote it, so that a submission waiting for the job answers without
    /// reading it back. The job is `completed`, with one task, verified.
    pub sole: Option<std::sync::Arc<SoleTask>>,
}

/// The one task of a job that its verification ended ([`Ended::sole`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SoleTask {
    /// The task, as [`Store::tasks_with_outputs`] would read it.
    pub task: TaskRow,
    /// Its output, which came inside the result.
    pub output: Vec<u8>,
    /// When the job ended (its task's `finished_ms`).
    pub finished_ms: i64,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TaskRow {
    /// Id.
    pub id: TaskId,
    /// Position in its job.
    pub index: u32,
    /// Arguments.
    pub args: Vec<String>,
    /// State.
    pub state: String,
    /// Replicas wanted now (grows on disagreement).
    pub replicas: u32,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Why it failed or waits.
    pub reason: Option<String>,
    /// The accepted report.
    pub report: Option<RunReport>,
    /// When it was verified, failed or cancelled (Unix ms).
    pub finished_ms: Option<i64>,
}

/// A task that wants another replica, with what matching needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingTask {
    /// What the node will run (module = metered id).
    pub spec: TaskSpec,
    /// What the node must offer.
    pub requirements: Requirements,
    /// Nodes holding an active or finished replica.
    pub replicas_on: Vec<NodeId>,
    /// When its job was submitted (Unix ms).
    pub submitted_ms: i64,
    /// Its job's redundancy (adaptive replication may still run it as one replica).
    pub redundancy: u8,
    /// Replicas the task wants as decided so far (its first lease decides: the job's
    /// redundancy, or one under adaptive replication).
    pub replicas: u8,
    /// Whether its job allows adaptive replication.
    pub adaptive: bool,
    /// Its job's priority (0 low, 1 normal, 2 high): pending tasks are served highest
    /// first, then oldest job first, then in index order.
    pub priority: i64,
}

/// A job written in a transaction not yet committed ([`Store::open_job`]).
pub struct OpenJob {
    tx: db::Tx,
    job: JobId,
    /// Its tasks as [`Store::pending_tasks`] reads them (none for a job of more than
    /// [`MAX_CREATED`] tasks), told to the dispatcher at the commit unless taken.
    created: Vec<PendingTask>,
    tell: bool,
    /// The job's ledger posts (welcome, escrow), written and signed at the commit.
    ledger: Option<ledger::Chain>,
    /// Its tasks (listed ones) as a lease round would read them: pending, no holder, the
    /// job's redundancy and adaptive replication. Written in this transaction, so known
    /// without reading them back.
    fresh: leases::Fresh,
    /// The job's rows, its tasks' and its first round's leases, with their ids taken
    /// ([`Store::next_ids`]): written at the commit, or before a later round reads them.
    pending: script::Script,
    /// Lease rounds run in the transaction.
    rounds: u32,
}

impl OpenJob {
    /// The job's id.
    pub fn id(&self) -> JobId {
        self.job
    }

    /// Its tasks as pending tasks; empty for a job too large to list (the dispatcher reads
    /// those).
    pub fn tasks(&self) -> &[PendingTask] {
        &self.created
    }

    /// Takes its tasks: the commit then tells the dispatcher nothing of them (the caller
    /// leases them, or hands them on).
    pub fn take_tasks(&mut self) -> Vec<PendingTask> {
        std::mem::take(&mut self.created)
    }

    /// Leases replicas, as [`Store::create_leases`] does, in the job's transaction.
    pub async fn create_leases(
        &mut self,
        store: &Store,
        wants: &[Want],
        now: i64,
        lease_ms: i64,
    ) -> Result<Vec<(Leased, u8)>> {
        // Fresh for the first round only: what it leases, a later one reads, once what the
        // transaction holds back is written.
        let fresh = std::mem::take(&mut self.fresh);
        if self.rounds > 0 {
            self.pending.run(&mut self.tx).await?;
        }
        self.rounds += 1;
        let (outcomes, script) = store
            .lease_in(&mut self.tx, wants, now, lease_ms, &fresh)
            .await?;
        self.pending.append(script);
        Ok(outcomes)
    }

    /// Commits the job and whatever joined its transaction; tells the dispatcher of its
    /// tasks (those not taken).
    pub async fn commit(self, store: &Store) -> Result<JobId> {
        let mut script = self.pending;
        if let Some(chain) = self.ledger {
            store.write_chain(&mut script, chain)?;
        }
        self.tx.commit_with(script).await?;
        if !self.tell {
            store.tell_pending_changed();
        } else if !self.created.is_empty() {
            store.tell_created(self.created);
        }
        Ok(self.job)
    }
}

/// A table whose ids [`Store::next_ids`] takes.
#[derive(Debug, Clone, Copy)]
pub(super) enum IdTable {
    Jobs,
    Tasks,
    Leases,
}

impl IdTable {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Self::Jobs => "jobs",
            Self::Tasks => "tasks",
            Self::Leases => "leases",
        }
    }
}

/// A lease held by a node, as needed to resume it after a reconnect.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveLease {
    /// The lease.
    pub lease: LeaseId,
    /// What it runs.
    pub spec: TaskSpec,
    /// Its deadline.
    pub deadline_ms: i64,
}

/// What recording a result did.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// Stored; the task is still waiting for other replicas.
    Stored,
    /// Stored, and the task was decided: verified, paid, the losers slashed.
    Verified {
        /// Nodes in the majority.
        agree: Vec<NodeId>,
        /// The losers.
        disagree: Vec<NodeId>,
        /// The judged nodes' records after the decision.
        records: Vec<(NodeId, Record)>,
        /// When the task's job was submitted (Unix ms).
        submitted_ms: i64,
    },
    /// A spot check (a known-answer task) was answered.
    SpotCheck {
        /// Whether the answer matched.
        passed: bool,
        /// The node's record after it.
        record: Record,
    },
    /// Stored; replicas disagree, more were requested.
    MoreReplicas(u8),
    /// Stored; the task failed (replicas never agreed, or too many failed attempts).
    Failed(String),
    /// The same result was already recorded (a replay after a reconnect): nothing changed.
    Duplicate,
}

/// Why a result was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// No such lease, or not this node's, or no longer active.
    #[error("lease {0} is not an active lease of this node")]
    NotLeased(LeaseId),
    /// The result names another task than the lease.
    #[error("lease {lease} is for task {expected}, not {got}")]
    WrongTask {
        /// The lease.
        lease: LeaseId,
        /// Its task.
        expected: TaskId,
        /// The task the result names.
        got: TaskId,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A result as a node submitted it.
#[derive(Debug, Clone, Copy)]
pub struct Submitted<'a> {
    /// The lease it answers.
    pub lease: LeaseId,
    /// The node that sent it (the signer).
    pub node: NodeId,
    /// The task it names.
    pub task: TaskId,
    /// The report.
    pub report: &'a RunReport,
    /// The signed frame that carried the result, as received, kept as evidence (once per
    /// frame: [`Store::evidence`]).
    pub envelope: &'a [u8],
    /// The output bytes when they came inside the result (checked against the report by
    /// the caller); stored with it.
    pub output: Option<&'a [u8]>,
}

/// Retry and replication bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Failed attempts (expired leases, non-deterministic failures) before a task is
    /// dead-lettered.
    pub max_attempts: u32,
    /// Most replicas of one task, extra ones on disagreement included.
    pub max_replicas: u8,
}

/// A node as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    /// Key.
    pub id: NodeId,
    /// Hardware report.
    pub hardware: Hardware,
    /// Tier.
    pub tier: Tier,
    /// Slots.
    pub slots: u32,
    /// Last heartbeat or hello.
    pub last_seen_ms: i64,
    /// Quorums it agreed with.
    pub agreed: u64,
    /// Quorums it lost.
    pub disagreed: u64,
    /// Its reputation record.
    pub record: Record,
    /// Spot checks passed.
    pub spot_passed: u64,
    /// Spot checks failed.
    pub spot_failed: u64,
    /// Time online counted from heartbeats, ms.
    pub uptime_ms: i64,
}

/// The economic rules the store applies as it changes state.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Economy {
    /// Stake (micro-credits) a node must hold per lease; a loser of a quorum or a failed
    /// spot check loses that much to the treasury. 0: no stake needed, nothing slashed.
    pub stake: Amount,
    /// Granted once to each new submitter key at its first submission (minted).
    pub welcome: Amount,
    /// Adaptive replication settings.
    pub adaptive: Adaptive,
}

/// A job to create.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    /// The submitter.
    pub owner: NodeId,
    /// The spec.
    pub spec: &'a JobSpec,
    /// The metered module.
    pub metered: ContentId,
    /// The module's author (paid 5 % of each verified task).
    pub author: NodeId,
    /// The expanded tasks.
    pub trials: &'a [Trial],
    /// Price per SCU, micro-credits, fixed for the job's life.
    pub price: u64,
}

/// Why a job was not created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateJobError {
    /// The submitter cannot cover the job's maximum.
    #[error("the job needs up to {needed} µcredits in escrow; the balance is {balance}")]
    Insufficient {
        /// The maximum.
        needed: Amount,
        /// The submitter's balance.
        balance: i128,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What leasing a replica did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leased {
    /// A new lease.
    Yes(LeaseId),
    /// The task wants no replica from this node now.
    No,
    /// The node's stake does not cover another lease.
    NoStake,
    /// The node is a browser without the reputation to be this task's only replica, or the
    /// only replica beside other untrusted browsers; another node may take it.
    Untrusted,
}

/// [`stardust_scheduler::reputation::may_stand_alone`] for a node row's tier and streak (a node without a row
/// is treated as native).
fn may_stand_alone_row(tier: Option<String>, streak: Option<i64>) -> bool {
    // The column holds the tier as JSON (`"browser"`); anything unreadable counts as native.
    let tier = tier
        .and_then(|t| serde_json::from_str::<Tier>(&t).ok())
        .unwrap_or(Tier::Standard);
    stardust_scheduler::reputation::may_stand_alone(tier, streak.unwrap_or(0).max(0) as u64)
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    backend: Backend,
    signer: Option<Arc<Identity>>,
    economy: Economy,
    /// Jobs that ended, told after their transaction committed ([`Store::ended_jobs`]).
    ended: tokio::sync::broadcast::Sender<Ended>,
    /// What a dispatcher keeping pending tasks in memory must hear ([`Store::pending_epoch`],
    /// [`Store::take_created`]).
    news: Arc<PendingNews>,
    /// What [`Store::submission_refs`] found stored, kept for the next submissions.
    known: Arc<std::sync::Mutex<KnownRefs>>,
    /// SQLite: the last id [`Store::next_ids`] handed out per [`IdTable`], so that the ids
    /// of a transaction that rolled back (its assignments may have left) are not handed out
    /// again while this process runs.
    taken: Arc<std::sync::Mutex<[i64; 3]>>,
}

/// Answers of [`Store::submission_refs`] that hold for good: blobs and metered modules are
/// content-addressed and never deleted, so a stored one stays stored (an absent one is never
/// kept: it may be uploaded next). Each set is emptied when it would pass [`KNOWN_REFS`].
#[derive(Debug, Default)]
struct KnownRefs {
    blobs: HashSet<ContentId>,
    modules: HashMap<ContentId, (ContentId, NodeId)>,
}

/// Entries [`KnownRefs`] keeps in each set at most.
const KNOWN_REFS: usize = 4096;

/// Changes to the set of pending tasks, told after the transaction that made them commits.
#[derive(Debug, Default)]
struct PendingNews {
    /// Bumped when tasks became pending other than by a job's creation (a failed attempt, a
    /// lapsed lease, more replicas wanted) or stopped being pending (a job cancelled or past
    /// its deadline).
    epoch: AtomicU64,
    /// The tasks of jobs created since the dispatcher last took them, in creation order.
    created: std::sync::Mutex<Vec<PendingTask>>,
}

/// New jobs' tasks held for the dispatcher at most; past this they are dropped and the epoch
/// bumped (the dispatcher reads them from the database instead).
const MAX_CREATED: usize = 4096;

/// Verified tasks a spot check's candidates are looked for among, the most recent first:
/// the search is bounded however long the domain's history.
pub const SPOT_CHECK_WINDOW: i64 = 256;

/// A job's tasks per insert statement (bound as one JSON array).
const TASKS_PER_INSERT: usize = 2048;

/// Ended jobs told to subscribers and not yet read by the slowest of them at most (a
/// subscriber that falls further behind is told it lagged, and reads the jobs it waits for).
const ENDED_JOBS_BACKLOG: usize = 4096;

/// [`Store::backlog`] on SQLite: its planner, without statistics, would rather scan a
/// covering index of every task than the partial index of pending ones, so it is told.
const BACKLOG_SQLITE: &str =
    "SELECT COUNT(*) AS n FROM tasks INDEXED BY tasks_pending WHERE state = 'pending'";

/// Values bound to one statement at most: a bound on a statement's text and its parameters.
/// (Behind sqlx's SQLite driver, which found each parameter by its name, binding n values
/// cost n², and at 1,024 values 17 % of the SQLite thread's time.)
const MAX_BOUND: usize = 96;

/// Rows of `cols` bound values one statement carries: as many as [`MAX_BOUND`] allows.
const fn rows_per_statement(cols: usize) -> usize {
    let rows = MAX_BOUND / cols;
    if rows == 0 { 1 } else { rows }
}

/// The length a list of `n` values (or rows), at most `max`, is bound as: the next power of
/// two, at most `max`. A connection keeps a bounded number of prepared statements (sqlx's
/// PostgreSQL connections 100, SQLite's [`sql::STATEMENT_CACHE`]); a text per list length
/// (hundreds of them) would have most statements prepared anew. Repeating the last
/// value ([`pad`]) changes nothing in an `IN` list, a set statement's `VALUES` or an insert
/// that ignores conflicts.
const fn padded(n: usize, max: usize) -> usize {
    if n <= 1 {
        n
    } else if n.next_power_of_two() < max {
        n.next_power_of_two()
    } else {
        max
    }
}

/// `items` (at most `max`), then the last again up to [`padded`] in all.
fn pad<T>(items: &[T], max: usize) -> impl Iterator<Item = &T> {
    let extra = padded(items.len(), max).saturating_sub(items.len());
    items
        .iter()
        .chain(items.last().into_iter().cycle().take(extra))
}

/// `$first, $first+1, …` for `n` bound values.
fn in_list(first: usize, n: usize) -> String {
    let mut out = String::with_capacity(n * 6);
    push_list(&mut out, first, n);
    out
}

fn push_list(out: &mut String, first: usize, n: usize) {
    use std::fmt::Write as _;
    for i in first..first + n {
        if i > first {
            out.push_str(", ");
        }
        // Writing to a String cannot fail.
        let _ = write!(out, "${i}");
    }
}

/// A column of [`json_table`]: its name and whether it is an integer (else text).
type JsonCol<'a> = (&'a str, bool);

/// Rows bound as one parameter, `$param`: a JSON array of arrays, taken apart by the
/// database into a table with `cols` (in their order) — in the array's order when
/// `ordered` (for inserts whose ids should follow it). The writes' mirror of
/// [`as_json_rows`]: a list of any length is one statement text with one value, where
/// binding values one by one cost more than the database's work on them behind sqlx.
fn json_table(backend: Backend, param: usize, cols: &[JsonCol<'_>], ordered: bool) -> String {
    let mut out = String::from("SELECT ");
    for (i, (name, int)) in cols.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let cast = if *int && backend == Backend::Postgres {
            "::bigint"
        } else {
            ""
        };
        out.push_str(&format!("(j.value ->> {i}){cast} AS {name}"));
    }
    match (backend, ordered) {
        (Backend::Sqlite, false) => out.push_str(&format!(" FROM json_each(${param}) AS j")),
        (Backend::Sqlite, true) => {
            out.push_str(&format!(" FROM json_each(${param}) AS j ORDER BY j.key"));
        }
        (Backend::Postgres, false) => {
            out.push_str(&format!(
                " FROM json_array_elements(${param}::json) AS j(value)"
            ));
        }
        (Backend::Postgres, true) => out.push_str(&format!(
            " FROM json_array_elements(${param}::json) WITH ORDINALITY AS j(value, n) ORDER BY j.n"
        )),
    }
    out
}

/// A hot write's rows or a hot read's list, bound as the statement's last values: see
/// [`bound_rows`] and [`bound_list`].
struct Bound {
    /// The rows' derived table, or the list's comparison (`= $N` or `IN (...)`).
    sql: String,
    values: Vec<sql::Value>,
}

impl Bound {
    /// Binds the values, in order, after those bound already.
    fn bind(self, mut q: sql::Query<'static>) -> sql::Query<'static> {
        for v in self.values {
            q = q.bind(v);
        }
        q
    }

    /// Binds the values on a queued statement.
    fn bind_queued(self, mut q: script::Bind<'_>) {
        for v in self.values {
            q = q.bind(v);
        }
    }
}

/// A JSON value as SQLite's `->>` reads it out of an array: integers as integers, other
/// numbers as reals, strings as text, booleans as 1 or 0, arrays and objects as their JSON.
fn sqlite_value(v: serde_json::Value) -> sql::Value {
    use serde_json::Value as J;
    match v {
        J::Null => sql::Value::Null(sql::Kind::Text),
        J::Bool(b) => sql::Value::Int(i64::from(b)),
        J::Number(n) => match n.as_i64() {
            Some(i) => sql::Value::Int(i),
            None => sql::Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => sql::Value::Text(s),
        other => sql::Value::Text(other.to_string()),
    }
}

/// The rows of a hot write as a derived table bound from `$param` on ([`json_table`]'s
/// columns). On SQLite one row is bound as its own values (`SELECT $3 AS id, $4 AS frame`):
/// taking a JSON array apart costs a one-row statement several microseconds, most of it,
/// and a task's round trip writes one row at a time. The rows must be the statement's last
/// values.
fn bound_rows<T: serde::Serialize>(
    backend: Backend,
    param: usize,
    cols: &[JsonCol<'_>],
    ordered: bool,
    rows: &[T],
) -> Bound {
    if backend == Backend::Sqlite
        && let [row] = rows
        && let Ok(serde_json::Value::Array(values)) = serde_json::to_value(row)
        && values.len() == cols.len()
    {
        let sql = cols
            .iter()
            .enumerate()
            .map(|(i, (name, _))| format!("${} AS {name}", param + i))
            .collect::<Vec<_>>()
            .join(", ");
        return Bound {
            sql: format!("SELECT {sql}"),
            values: values.into_iter().map(sqlite_value).collect(),
        };
    }
    Bound {
        sql: json_table(backend, param, cols, ordered),
        values: vec![sql::Value::Text(to_json(&rows))],
    }
}

/// A hot read's list, bound at `$param` (the statement's last value): `IN (...)` over a
/// JSON list ([`json_list`]), or on SQLite `= $param` for one item (SQLite builds a
/// temporary index for an `IN` subquery at each run).
fn bound_list<T: serde::Serialize>(
    backend: Backend,
    param: usize,
    int: bool,
    items: &[T],
) -> Bound {
    if backend == Backend::Sqlite
        && let [item] = items
        && let Ok(value) = serde_json::to_value(item)
    {
        return Bound {
            sql: format!("= ${param}"),
            values: vec![sqlite_value(value)],
        };
    }
    Bound {
        sql: format!("IN ({})", json_list(backend, param, int)),
        values: vec![sql::Value::Text(to_json(&items))],
    }
}

/// A list bound as one parameter, `$param` (a JSON array of integers, or of strings when
/// not `int`), as a subquery for `IN (…)`: one statement text for a list of any length.
fn json_list(backend: Backend, param: usize, int: bool) -> String {
    match (backend, int) {
        (Backend::Sqlite, _) => format!("SELECT value FROM json_each(${param})"),
        (Backend::Postgres, true) => {
            format!("SELECT value::bigint FROM json_array_elements_text(${param}::json)")
        }
        (Backend::Postgres, false) => {
            format!("SELECT value FROM json_array_elements_text(${param}::json)")
        }
    }
}

/// The `VALUES` rows of a multi-row insert: `($1, …, $cols), ($cols+1, …)`, `rows` of them.
fn values(rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * (cols * 6 + 4));
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        push_list(&mut out, r * cols + 1, cols);
        out.push(')');
    }
    out
}

/// A SQLite connection from a `sqlite://PATH[?PARAMS]` (or `sqlite:PATH`) URL: the path may
/// be percent-escaped; `mode` is `ro`, `rw` (the default: the file must exist) or `rwc`
/// (created if missing); other parameters are SQLite's own URI parameters (`immutable=1`).
fn sqlite_connect(url: &str, vfs: Option<&str>) -> Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    let mut params: Vec<&str> = params.split('&').filter(|p| !p.is_empty()).collect();
    if !params.iter().any(|p| p.starts_with("mode=")) {
        params.push("mode=rw");
    }
    let uri = format!("file:{path}?{}", params.join("&"));
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match vfs {
        Some(vfs) => rusqlite::Connection::open_with_flags_and_vfs(uri, flags, vfs)?,
        None => rusqlite::Connection::open_with_flags(uri, flags)?,
    };
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(sql::STATEMENT_CACHE);
    Ok(conn)
}

fn id_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn parse<T: std::str::FromStr>(what: &'static str, s: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| corrupt(what, e))
}

fn json<T: serde::de::DeserializeOwned>(what: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| corrupt(what, e))
}

/// `select` read as one value: its rows as a JSON array of arrays of the columns `cols`
/// (names `select` gives them), built by the database; [`json_rows`] parses it.
///
/// sqlx hands each row of a result over on its own and copies it into a generic row: behind
/// its SQLite driver ~4.7 µs a row, against ~1.5 µs for the same 48-row reads aggregated by
/// SQLite and parsed here (measured when SQLite ran behind sqlx; rusqlite reads a row in
/// far less, not measured against this since). Reads of many rows on the hot path use this. Columns must be numbers, text or NULL (SQLite's JSON holds no BLOB). Row order is
/// not promised: callers that need one sort what they get.
fn as_json_rows(backend: Backend, select: &str, cols: &[&str]) -> String {
    let cols = cols
        .iter()
        .map(|c| format!("r.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    match backend {
        Backend::Sqlite => {
            format!("SELECT json_group_array(json_array({cols})) AS j FROM ({select}) AS r")
        }
        Backend::Postgres => format!(
            "SELECT COALESCE(json_agg(json_build_array({cols})), '[]'::json)::text AS j FROM ({select}) AS r"
        ),
    }
}

/// The rows of an [`as_json_rows`] query, each parsed as `T` (a tuple of its columns).
fn json_rows<T: serde::de::DeserializeOwned>(what: &'static str, row: &Row) -> Result<Vec<T>> {
    json(what, &row.try_get::<String>("j")?)
}

/// A scalar subquery: which of the ids bound as `$param` (a JSON list of strings) `table`
/// holds in its `id` column, read back by [`present_ids`].
fn present_sql(backend: Backend, table: &str, param: usize) -> String {
    as_json_rows(
        backend,
        &format!(
            "SELECT id FROM {table} WHERE id IN ({})",
            json_list(backend, param, false)
        ),
        &["id"],
    )
}

/// The ids a [`present_sql`] column `col` of `row` holds.
fn present_ids(
    what: &'static str,
    row: &Row,
    col: &str,
) -> Result<std::collections::HashSet<String>> {
    Ok(json::<Vec<(String,)>>(what, &row.try_get::<String>(col)?)?
        .into_iter()
        .map(|(id,)| id)
        .collect())
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Plain data: serialization cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

impl Store {
    /// Opens (creating if needed) the SQLite database `DIR/stardust.db`.
    pub async fn open_sqlite(dir: &Path) -> Result<Self> {
        let path = dir.join("stardust.db");
        // The path travels inside a URL: escape what URLs give a meaning to.
        let mut escaped = String::new();
        for c in path.to_string_lossy().chars() {
            match c {
                '%' | '?' | '#' | ' ' => escaped.push_str(&format!("%{:02X}", c as u32)),
                c => escaped.push(c),
            }
        }
        Self::open(&format!("sqlite://{escaped}?mode=rwc")).await
    }

    /// Opens a database by URL (`sqlite://PATH?mode=rwc` or `postgres://...`) and brings its
    /// schema up to date.
    pub async fn open(url: &str) -> Result<Self> {
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.chars().take(40).collect()));
        };
        let db = match backend {
            // One connection, held directly (`db.rs`): SQLite has one writer anyway, and
            // this avoids SQLITE_BUSY.
            Backend::Sqlite => {
                // Commits write their log frames in one call (`stardust-walvfs`).
                stardust_walvfs::register().map_err(|rc| {
                    rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rc),
                        Some(format!(
                            "registering the {} VFS failed",
                            stardust_walvfs::NAME
                        )),
                    )
                })?;
                let conn = sqlite_connect(url, Some(stardust_walvfs::NAME))?;
                let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
                // In WAL mode a commit's sync of the log only writes it (`stardust-walvfs`): the
                // durability of `synchronous = NORMAL`. Without WAL (a file system without
                // shared memory) FULL would sync every commit: NORMAL then.
                let synchronous = if mode.eq_ignore_ascii_case("wal") {
                    "PRAGMA synchronous = FULL"
                } else {
                    "PRAGMA synchronous = NORMAL"
                };
                let backstop = format!("PRAGMA wal_autocheckpoint = {}", db::WAL_BACKSTOP_PAGES);
                for pragma in [
                    synchronous,
                    // Checkpoints sync with SQLITE_SYNC_FULL, told apart from commits.
                    "PRAGMA checkpoint_fullfsync = ON",
                    "PRAGMA foreign_keys = ON",
                    // Statement journals (multi-row writes) in memory, not temporary files.
                    "PRAGMA temp_store = MEMORY",
                    // A small page cache (SQLite's default, 2 MiB) and reads through a
                    // memory map instead. A large cache made every commit slower as the
                    // database grew: when a b-tree split swaps pages, SQLite parks one
                    // under the lock page's number (page 262,145 with 4 KiB pages), and at
                    // the commit the page cache, seeing a key past the end of the
                    // database, scans every page it holds (`pcache1TruncateUnsafe`: 8-13 %
                    // of the SQLite thread with 64 MiB cached). Pages the cache lacks are
                    // read from the map, not copied in by a system call.
                    "PRAGMA cache_size = -2000",
                    "PRAGMA mmap_size = 268435456",
                    // The checkpointer's connection checkpoints (`db.rs`).
                    backstop.as_str(),
                ] {
                    // Some pragmas answer with a row; it is not wanted.
                    conn.query_row(pragma, [], |_| Ok(()))
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(()),
                            e => Err(e),
                        })?;
                }
                let checkpointer = sqlite_connect(url, None)?;
                checkpointer.execute_batch("PRAGMA synchronous = NORMAL")?;
                Db::One(db::One::new(conn, checkpointer)?)
            }
            Backend::Postgres => Db::Pool({
                sqlx::any::install_default_drivers();
                AnyPoolOptions::new()
                    .max_connections(8)
                    .connect(url)
                    .await?
            }),
        };
        let store = Self {
            db,
            backend,
            signer: None,
            economy: Economy::default(),
            ended: tokio::sync::broadcast::channel(ENDED_JOBS_BACKLOG).0,
            news: Arc::default(),
            known: Arc::default(),
            taken: Arc::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Jobs that end from now on (completed, failed or cancelled), each told once after the
    /// transaction that ended it committed: what waits for a job re-reads it then, instead of
    /// polling.
    pub fn ended_jobs(&self) -> tokio::sync::broadcast::Receiver<Ended> {
        self.ended.subscribe()
    }

    /// Tells subscribers these jobs ended (their transaction committed).
    /// Changes whenever tasks became pending, other than by a job's creation, or stopped
    /// being pending other than by being leased; read it before reading pending tasks, and
    /// read them again once it changed.
    pub fn pending_epoch(&self) -> u64 {
        self.news.epoch.load(Ordering::Acquire)
    }

    /// The tasks of the jobs created since the last call, in creation order, each as
    /// [`Store::pending_tasks`] would read it.
    pub fn take_created(&self) -> Vec<PendingTask> {
        self.news
            .created
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }

    /// After a commit that changed which tasks are pending.
    fn tell_pending_changed(&self) {
        self.news.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// After a job's creation committed.
    fn tell_created(&self, tasks: Vec<PendingTask>) {
        let overflow = match self.news.created.lock() {
            Ok(mut created) if created.len() + tasks.len() <= MAX_CREATED => {
                created.extend(tasks);
                false
            }
            Ok(mut created) => {
                created.clear();
                true
            }
            Err(_) => true,
        };
        if overflow {
            self.tell_pending_changed();
        }
    }

    fn tell_ended(&self, jobs: impl IntoIterator<Item = i64>) {
        for job in jobs {
            // No subscriber is fine: nobody waits.
            let _ = self.ended.send(Ended {
                job: job as JobId,
                sole: None,
            });
        }
    }

    /// Signs ledger events with `key` (the domain's) and applies `economy`. A store without
    /// a key reads but refuses to write the ledger.
    pub fn with_ledger(mut self, key: Identity, economy: Economy) -> Self {
        self.signer = Some(Arc::new(key));
        self.economy = economy;
        self
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The schema version after migrations.
    pub async fn schema_version(&self) -> Result<i64> {
        let row = query("SELECT MAX(version) AS v FROM schema_version")
            .fetch_one(&mut self.db.acquire().await?)
            .await?;
        Ok(row.try_get::<Option<i64>>("v")?.unwrap_or(0))
    }

    async fn migrate(&self) -> Result<()> {
        query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, name TEXT NOT NULL)")
            .execute(&mut self.db.acquire().await?)
            .await?;
        let current = self.schema_version().await?;
        let known = schema::MIGRATIONS.last().map_or(0, |m| m.version);
        if current > known {
            return Err(StoreError::SchemaTooNew {
                found: current,
                known,
            });
        }
        for m in schema::MIGRATIONS.iter().filter(|m| m.version > current) {
            let mut tx = self.db.begin().await?;
            let sql = match self.backend {
                Backend::Sqlite => m.sqlite,
                Backend::Postgres => m.postgres,
            };
            for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                query(stmt).execute(&mut tx).await?;
            }
            query("INSERT INTO schema_version (version, name) VALUES ($1, $2)")
                .bind(m.version)
                .bind(m.name)
                .execute(&mut tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version = m.version, name = m.name, "database migrated");
        }
        Ok(())
    }

    // ---- blobs and modules -------------------------------------------------------------

    /// Stores `bytes` under their content id (the caller has checked `id`). Returns whether
    /// the blob is new.
    pub async fn put_blob(&self, id: ContentId, bytes: &[u8], now: i64) -> Result<bool> {
        let done = query(
            "INSERT INTO blobs (id, bytes, size, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(bytes)
        .bind(bytes.len() as i64)
        .bind(now)
        .execute(&mut self.db.acquire().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The bytes of a blob.
    pub async fn blob(&self, id: ContentId) -> Result<Option<Vec<u8>>> {
        let row = query("SELECT bytes FROM blobs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut self.db.acquire().await?)
            .await?;
        row.map(|r| r.try_get::<Vec<u8>>("bytes")).transpose()
    }

    /// Whether a blob is stored.
    pub async fn has_blob(&self, id: ContentId) -> Result<bool> {
        let row = query("SELECT 1 AS one FROM blobs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut self.db.acquire().await?)
            .await?;
        Ok(row.is_some())
    }

    /// Records that `original` meters to `metered`, uploaded by `author` (first upload wins).
    pub async fn put_module(
        &self,
        original: ContentId,
        metered: ContentId,
        author: NodeId,
        now: i64,
    ) -> Result<()> {
        query("INSERT INTO modules (id, metered, author, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING")
            .bind(original.to_string())
            .bind(metered.to_string())
            .bind(author.to_string())
            .bind(now)
            .execute(&mut self.db.acquire().await?)
            .await?;
        Ok(())
    }

    /// The metered id and author of an uploaded module.
    pub async fn module(&self, original: ContentId) -> Result<Option<(ContentId, NodeId)>> {
        Ok(self.submission_refs(&[], original).await?.1)
    }

    /// What a submission names, in one statement: which of `inputs` are not stored (in the
    /// order given), and `module`'s metered id and author if it was uploaded and metered
    /// before.
    pub async fn submission_refs(
        &self,
        inputs: &[ContentId],
        module: ContentId,
    ) -> Result<(Vec<ContentId>, Option<(ContentId, NodeId)>)> {
        // A submission naming what earlier ones found stored reads nothing.
        if let Ok(known) = self.known.lock()
            && let Some(metered) = known.modules.get(&module)
            && inputs.iter().all(|i| known.blobs.contains(i))
        {
            return Ok((Vec::new(), Some(*metered)));
        }
        let found = self.submission_refs_stored(inputs, module).await?;
        if let Ok(mut known) = self.known.lock() {
            let (missing, metered) = &found;
            if known.blobs.len() + inputs.len() > KNOWN_REFS {
                known.blobs.clear();
            }
            known
                .blobs
                .extend(inputs.iter().filter(|i| !missing.contains(i)).copied());
            if let Some(metered) = metered {
                if known.modules.len() >= KNOWN_REFS {
                    known.modules.clear();
                }
                known.modules.insert(module, *metered);
            }
        }
        Ok(found)
    }

    /// [`Store::submission_refs`] as stored.
    async fn submission_refs_stored(
        &self,
        inputs: &[ContentId],
        module: ContentId,
    ) -> Result<(Vec<ContentId>, Option<(ContentId, NodeId)>)> {
        let present = present_sql(self.backend, "blobs", 1);
        let ids: Vec<String> = inputs.iter().map(ContentId::to_string).collect();
        let row = query(format!(
            "SELECT ({present}) AS present, m.metered, m.author
             FROM (SELECT 1 AS one) AS o LEFT JOIN modules m ON m.id = $2"
        ))
        .bind(to_json(&ids))
        .bind(module.to_string())
        .fetch_one(&mut self.db.acquire().await?)
        .await?;
        let present = present_ids("stored inputs", &row, "present")?;
        let missing = inputs
            .iter()
            .zip(&ids)
            .filter(|(_, id)| !present.contains(*id))
            .map(|(input, _)| *input)
            .collect();
        let metered = match (
            row.try_get::<Option<String>>("metered")?,
            row.try_get::<Option<String>>("author")?,
        ) {
            (Some(metered), Some(author)) => {
                Some((parse("module", &metered)?, parse("module author", &author)?))
            }
            _ => None,
        };
        Ok((missing, metered))
    }

    // ---- jobs and tasks ----------------------------------------------------------------

    /// Creates a job and its tasks, atomically, with its maximum held in escrow (after the
    /// submitter's welcome grant, the first time). Refused when the balance is short.
    pub async fn create_job(
        &self,
        new: NewJob<'_>,
        now: i64,
    ) -> std::result::Result<JobId, CreateJobError> {
        Ok(self.open_job(new, now).await?.commit(self).await?)
    }

    /// [`Store::create_job`] up to its commit: the job, its tasks and its escrow written in
    /// a transaction still open, so that its first leases can join it
    /// ([`OpenJob::create_leases`]) and one commit makes them all durable. Dropped without
    /// [`OpenJob::commit`], nothing of it was.
    pub async fn open_job(
        &self,
        new: NewJob<'_>,
        now: i64,
    ) -> std::result::Result<OpenJob, CreateJobError> {
        let NewJob {
            owner,
            spec,
            metered,
            author,
            trials,
            price,
        } = new;
        let mut tx = self.db.begin().await?;
        // The job's and its tasks' rows are written at the commit (or before a later read
        // of them): their ids are taken now, so that a first lease round can name them and
        // its assignments leave before any of the rows is written.
        let mut pending = script::Script::default();
        let job = self.next_ids(&mut tx, IdTable::Jobs, 1).await?[0];
        let priority = match spec.priority {
            stardust_proto::job::Priority::Low => 0i64,
            stardust_proto::job::Priority::Normal => 1,
            stardust_proto::job::Priority::High => 2,
        };
        let deadline = spec
            .deadline_s
            .map(|s| now.saturating_add(id_i64(s).saturating_mul(1000)));
        let insert_job = query(
            "INSERT INTO jobs (owner, name, spec, module, state, priority, redundancy, created_ms, deadline_ms, price, author, adaptive, terms, n_open, id)
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(owner.to_string())
        .bind(spec.name.as_str())
        .bind(to_json(spec))
        .bind(metered.to_string())
        .bind(priority)
        .bind(i64::from(spec.redundancy))
        .bind(now)
        .bind(deadline)
        .bind(id_i64(price))
        .bind(author.to_string())
        .bind(i64::from(spec.adaptive))
        .bind(to_json(&Terms {
            limits: spec.limits,
            requirements: spec.requirements.clone(),
        }))
        .bind(trials.len() as i64)
        .bind(job);
        pending.queue(insert_job);
        // Many rows a statement (a statement is a round trip to the database: a sweep of
        // 20,000 tasks was 20,000 inserts), bound as one JSON array of rows that the database
        // takes apart (binding values one by one cost more than inserting them).
        // The dispatcher is told a small job's tasks (it reads a large one's), so their ids
        // are taken now; a large job's rows take theirs as they are written.
        let tell = trials.len() <= MAX_CREATED;
        let mut ids: HashMap<u32, i64> = HashMap::new();
        if tell {
            let taken = self.next_ids(&mut tx, IdTable::Tasks, trials.len()).await?;
            ids.extend(trials.iter().map(|t| t.index).zip(taken));
        }
        for rows in trials.chunks(TASKS_PER_INSERT) {
            // Each row: its position, its args (their JSON as a string, stored as given),
            // input, seed, and its id when taken.
            let rows: Vec<(u32, String, String, String, Option<i64>)> = rows
                .iter()
                .map(|t| {
                    (
                        t.index,
                        to_json(&t.args),
                        t.input.to_string(),
                        t.seed.to_string(),
                        ids.get(&t.index).copied(),
                    )
                })
                .collect();
            let cols: &[JsonCol<'_>] = &[
                ("idx", true),
                ("args", false),
                ("input", false),
                ("seed", false),
                ("id", true),
            ];
            let (cols, id) = if tell {
                (cols, ("id, ", "r.id, "))
            } else {
                (&cols[..4], ("", ""))
            };
            let rows = bound_rows(self.backend, 3, cols, true, &rows);
            let q = query(format!(
                "INSERT INTO tasks ({}job_id, idx, args, input, seed, state, replicas, attempts)
                 SELECT {}$1, r.idx, r.args, r.input, r.seed, 'pending', $2, 0 FROM ({}) AS r",
                id.0, id.1, rows.sql
            ))
            .bind(job)
            .bind(i64::from(spec.redundancy));
            pending.queue(rows.bind(q));
        }
        let maximum = pricing::job_maximum(
            trials.len() as u64,
            spec.redundancy,
            spec.limits.fuel,
            price,
        );
        let welcome = self.economy.welcome;
        // The ledger's writes, and its record's signature, at the commit: a submission's
        // first leases leave before it, and neither is theirs to wait for (the leases read
        // stake balances only, which the job's posts do not touch).
        let mut ledger = None;
        if maximum > 0 || welcome > 0 {
            if self.signer.is_none() {
                return Err(StoreError::NoSigner.into());
            }
            let submitter = Account::Submitter(owner);
            let welcome_id = format!("welcome:{owner}");
            // What the posts below check, read with the head.
            let asked: &[&str] = if welcome > 0 { &[&welcome_id] } else { &[] };
            let mut chain = self
                .chain_with(&mut tx, &[submitter, Account::Mint], asked)
                .await?;
            if welcome > 0 {
                self.post_valid(
                    &mut tx,
                    &mut chain,
                    Post {
                        id: welcome_id,
                        from: Account::Mint,
                        to: submitter,
                        amount: welcome,
                        reason: Reason::Welcome,
                    },
                    now,
                    false,
                )
                .await?;
            }
            if maximum > 0 {
                let escrow = Post {
                    id: format!("escrow:{job}"),
                    from: submitter,
                    to: Account::Escrow(job as JobId),
                    amount: maximum,
                    reason: Reason::Escrow { job: job as JobId },
                };
                // The job's id is new (never reused): so is its escrow's.
                if self
                    .post(&mut tx, &mut chain, escrow, now, true)
                    .await?
                    .is_err()
                {
                    let balance = Self::balance_now(&mut tx, &mut chain, submitter).await?;
                    tx.rollback().await?;
                    return Err(CreateJobError::Insufficient {
                        needed: maximum,
                        balance,
                    });
                }
            }
            ledger = Some(chain);
        }
        let mut created = Vec::with_capacity(if tell { trials.len() } else { 0 });
        for t in trials.iter().filter(|_| tell) {
            let id = ids
                .get(&t.index)
                .ok_or_else(|| corrupt("task insert", "a task without its id"))?;
            created.push(PendingTask {
                spec: TaskSpec {
                    task: *id as TaskId,
                    job: job as JobId,
                    module: metered,
                    input: t.input,
                    args: t.args.clone(),
                    limits: spec.limits,
                    seed: t.seed,
                },
                requirements: spec.requirements.clone(),
                replicas_on: Vec::new(),
                submitted_ms: now,
                redundancy: spec.redundancy,
                replicas: spec.redundancy,
                adaptive: spec.adaptive,
                priority,
            });
        }
        let fresh = leases::Fresh::new(
            job,
            created.iter().map(|t| id_i64(t.spec.task)),
            spec.redundancy,
            spec.adaptive,
        );
        Ok(OpenJob {
            tx,
            job: job as JobId,
            created,
            tell,
            ledger,
            fresh,
            pending,
            rounds: 0,
        })
    }

    /// `n` ids for rows of `table` that this transaction writes later, with these ids: the
    /// writes can then wait in a [`script::Script`] while what names the rows (a lease's
    /// assignment) leaves. On SQLite, the ids after the table's AUTOINCREMENT sequence and
    /// after any this process handed out before (a rolled-back transaction's ids, whose
    /// assignments may have reached a node, are not given twice): the transaction's write
    /// lock keeps them its own, and inserting the rows moves the sequence past them. On
    /// PostgreSQL, from the table's sequence (never given twice).
    pub(super) async fn next_ids(
        &self,
        tx: &mut db::Tx,
        table: IdTable,
        n: usize,
    ) -> Result<Vec<i64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let name = table.name();
        match self.backend {
            Backend::Sqlite => {
                let last: i64 = query(format!(
                    "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '{name}'), 0),
                     COALESCE((SELECT MAX(id) FROM {name}), 0)) AS last"
                ))
                .fetch_one(tx)
                .await?
                .try_get("last")?;
                let last = {
                    let mut taken = self
                        .taken
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let last = last.max(taken[table.index()]);
                    taken[table.index()] = last + n as i64;
                    last
                };
                Ok((1..=n as i64).map(|i| last + i).collect())
            }
            Backend::Postgres => query(format!(
                "SELECT nextval(pg_get_serial_sequence('{name}', 'id')) AS id FROM generate_series(1, $1) ORDER BY 1"
            ))
            .bind(n as i64)
            .fetch_all(tx)
            .await?
            .iter()
            .map(|r| r.try_get("id"))
            .collect(),
        }
    }

    /// A job with its task counts.
    pub async fn job(&self, id: JobId) -> Result<Option<JobRow>> {
        // The job with its task counts (kept on the job) in one statement; its leased tasks
        // are open ones, so a job with none open (ended) is not searched for them.
        let Some(r) = query(format!(
            "SELECT id, owner, name, spec, module, state, created_ms, finished_ms,
             n_open, n_verified, n_failed, n_cancelled,
             CASE WHEN n_open > 0 THEN ({LEASED} AND t.job_id = $1) ELSE 0 END AS leased
             FROM jobs WHERE id = $2"
        ))
        .bind(id_i64(id))
        .bind(id_i64(id))
        .fetch_optional(&mut self.db.acquire().await?)
        .await?
        else {
            return Ok(None);
        };
        let counts = Counts::of(&r)?;
        Ok(Some(JobRow {
            id,
            owner: parse("job owner", &r.try_get::<String>("owner")?)?,
            name: r.try_get("name")?,
            spec: json("job spec", &r.try_get::<String>("spec")?)?,
            module: parse("job module", &r.try_get::<String>("module")?)?,
            state: r.try_get("state")?,
            created_ms: r.try_get("created_ms")?,
            finished_ms: r.try_get("finished_ms")?,
            counts,
        }))
    }

    /// The signed frame that carried `lease`'s result, as received (leases recorded before
    /// frames were kept apart carry their own copy); `None` before a result is recorded.
    pub async fn evidence(&self, lease: LeaseId) -> Result<Option<Vec<u8>>> {
        let row = query(
            "SELECT COALESCE(f.bytes, l.envelope) AS bytes
             FROM leases l LEFT JOIN frames f ON f.id = l.frame WHERE l.id = $1",
        )
        .bind(id_i64(lease))
        .fetch_optional(&mut self.db.acquire().await?)
        .await?;
        Ok(row.map(|r| r.try_get("bytes")).transpose()?.flatten())
    }

    /// Tasks waiting for a replica, across all jobs (the pricing backlog).
    pub async fn backlog(&self) -> Result<u64> {
        let sql = match self.backend {
            Backend::Sqlite => BACKLOG_SQLITE,
            Backend::Postgres => "SELECT COUNT(*) AS n FROM tasks WHERE state = 'pending'",
        };
        Ok(query(sql)
            .fetch_one(&mut self.db.acquire().await?)
            .await?
            .try_get::<i64>("n")? as u64)
    }

    /// The most recent jobs, newest first, with their counts.
    pub async fn recent_jobs(&self, limit: u32) -> Result<Vec<JobRow>> {
        let ids = query("SELECT id FROM jobs ORDER BY id DESC LIMIT +$1")
            .bind(i64::from(limit))
            .fetch_all(&mut self.db.acquire().await?)
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for r in ids {
            if let Some(j) = self.job(r.try_get::<i64>("id")? as JobId).await? {
                out.push(j);
            }
        }
        Ok(out)
    }

    /// Tasks of every job, by state (a pending task with an active lease counts as running).
    pub async fn task_states(&self) -> Result<Vec<(String, u64)>> {
        // Summed over the jobs' kept counts: no scan of every task.
        let r = query(format!(
            "SELECT CAST(COALESCE(SUM(n_open), 0) AS BIGINT) AS n_open,
             CAST(COALESCE(SUM(n_verified), 0) AS BIGINT) AS n_verified,
             CAST(COALESCE(SUM(n_failed), 0) AS BIGINT) AS n_failed,
             CAST(COALESCE(SUM(n_cancelled), 0) AS BIGINT) AS n_cancelled,
             ({LEASED}) AS leased FROM jobs"
        ))
        .fetch_one(&mut self.db.acquire().await?)
        .await?;
        let counts = Counts::of(&r)?;
        Ok([
            ("cancelled", counts.cancelled),
            ("failed", counts.failed),
            ("pending", counts.pending),
            ("running", counts.running),
            ("verified", counts.verified),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| (s.to_string(), n))
        .collect())
    }

    /// Tasks of a job, in order, at most `limit` from `offset`.
    pub async fn tasks(&self, job: JobId, offset: u32, limit: u32) -> Result<Vec<TaskRow>> {
        let rows = query(format!(
            "SELECT t.id, t.idx, t.args, {TASK_STATE} AS state, t.replicas, t.attempts, t.reason, t.report, t.finished_ms
             FROM tasks t WHERE t.job_id = $1 ORDER BY t.idx LIMIT +$2 OFFSET +$3"
        ))
        .bind(id_i64(job))
        .bind(i64::from(limit))
        .bind(i64::from(offset))
        .fetch_all(&mut self.db.acquire().await?)
        .await?;
        rows.iter().map(task_row).collect()
    }

    /// A job's tasks as [`Store::tasks`] reads them, each with its output's bytes when they
    /// are stored here and at most `inline` long: one statement, not one more per output.
    pub async fn tasks_with_outputs(
        &self,
        job: JobId,
        offset: u32,
        limit: u32,
        inline: usize,
    ) -> Result<Vec<(TaskRow, Option<Vec<u8>>)>> {
        let rows = query(format!(
            "SELECT t.id, t.idx, t.args, {TASK_STATE} AS state, t.replicas, t.attempts, t.reason, t.report, t.finished_ms, b.bytes
             FROM tasks t LEFT JOIN blobs b ON b.id = t.output AND b.size <= $1
             WHERE t.job_id = $2 ORDER BY t.idx LIMIT +$3 OFFSET +$4"
        ))
        .bind(i64::try_from(inline).unwrap_or(i64::MAX))
        .bind(id_i64(job))
        .bind(i64::from(limit))
        .bind(i64::from(offset))
        .fetch_all(&mut self.db.acquire().await?)
        .await?;
        rows.iter()
            .map(|r| Ok((task_row(r)?, r.try_get::<Option<Vec<u8>>>("bytes")?)))
            .collect()
    }

    /// Cancels a job: its unfinished tasks and their active leases. Returns the cancelled
    /// leases (to tell their nodes), or `None` when the job does not exist.
    pub async fn cancel_job(&self, job: JobId, now: i64) -> Result<Option<Vec<(LeaseId, NodeId)>>> {
        let mut tx = self.db.begin().await?;
        let exists = query("SELECT state FROM jobs WHERE id = $1")
            .bind(id_i64(job))
            .fetch_optional(&mut tx)
            .await?;
        let Some(exists) = exists else {
            return Ok(None);
        };
        let state: String = exists.try_get("state")?;
        if matches!(state.as_str(), "completed" | "failed" | "cancelled") {
            return Ok(Some(Vec::new()));
        }
        let leases =
            Self::close_open_work(&mut tx, id_i64(job), TaskEnd::Cancelled, None, now).await?;
        query("UPDATE jobs SET state = 'cancelled', finished_ms = $1 WHERE id = $2")
            .bind(now)
            .bind(id_i64(job))
            .execute(&mut tx)
            .await?;
        self.refund(&mut tx, id_i64(job), now).await?;
        tx.commit().await?;
        self.tell_ended([id_i64(job)]);
        Ok(Some(leases))
    }

    // ---- scheduling --------------------------------------------------------------------

    /// Locks a task's row until the transaction ends, so concurrent transitions of one task
    /// (two replicas' results arriving together) run one after the other. PostgreSQL only:
    /// SQLite's single writer connection already serializes every transaction.
    async fn lock_task(&self, tx: &mut db::Tx, task: TaskId) -> Result<()> {
        if self.backend == Backend::Postgres {
            query("SELECT id FROM tasks WHERE id = $1 FOR UPDATE")
                .bind(id_i64(task))
                .execute(tx)
                .await?;
        }
        Ok(())
    }

    /// Leases a spot check to `node`: a verified task it never ran, whose answer is known,
    /// indistinguishable from a fresh task. `draw` (uniform in [0, 1)) picks among the 64
    /// most recent candidates within the last [`SPOT_CHECK_WINDOW`] verified tasks. Returns
    /// the lease and what to run, or `None` when there is no candidate.
    pub async fn create_spot_check(
        &self,
        node: NodeId,
        now: i64,
        lease_ms: i64,
        draw: f64,
    ) -> Result<Option<(LeaseId, TaskSpec)>> {
        // Among the most recent verified tasks only: the search looked at every verified task
        // the node ran until it found one it did not, so a node that ran most of a long
        // history made each spot check read all of it (8,000 rows, 1.7 ms, in a latency run).
        let rows = query(
            "SELECT c.id FROM (SELECT t.id FROM tasks t WHERE t.state = 'verified'
             ORDER BY t.id DESC LIMIT $2) c
             WHERE NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = c.id AND l.node = $1)
             LIMIT 64",
        )
        .bind(node.to_string())
        .bind(SPOT_CHECK_WINDOW)
        .fetch_all(&mut self.db.acquire().await?)
        .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let pick = ((draw.clamp(0.0, 1.0) * rows.len() as f64) as usize).min(rows.len() - 1);
        let task = rows[pick].try_get::<i64>("id")? as TaskId;
        let Some(spec) = self.task_spec(task).await? else {
            return Ok(None);
        };
        // Its id as every lease's is taken (`next_ids`), never one a rolled-back round sent.
        let mut tx = self.db.begin().await?;
        let lease = self.next_ids(&mut tx, IdTable::Leases, 1).await?[0];
        query(
            "INSERT INTO leases (id, task_id, node, state, created_ms, deadline_ms, kind) VALUES ($1, $2, $3, 'active', $4, $5, 'spot')",
        )
        .bind(lease)
        .bind(id_i64(task))
        .bind(node.to_string())
        .bind(now)
        .bind(now.saturating_add(lease_ms))
        .execute(&mut tx)
        .await?;
        tx.commit().await?;
        Ok(Some((lease as LeaseId, spec)))
    }

    /// Extends the deadlines of `node`'s active leases among `leases` to `deadline_ms`.
    /// Returns the leases renewed (the others are no longer this node's to run).
    pub async fn renew_leases(
        &self,
        node: NodeId,
        leases: &[LeaseId],
        deadline_ms: i64,
    ) -> Result<Vec<LeaseId>> {
        let mut tx = self.db.begin().await?;
        let renewed = Self::renew_in(&mut tx, node, leases, deadline_ms).await?;
        tx.commit().await?;
        Ok(renewed)
    }

    /// A heartbeat in one transaction: renews `node`'s active leases among `leases` to
    /// `deadline_ms` (returning those renewed) and marks the node seen at `now`, counting
    /// uptime and minting its reward ([`Store::touch_node`]).
    pub async fn heartbeat(
        &self,
        node: NodeId,
        leases: &[LeaseId],
        deadline_ms: i64,
        now: i64,
    ) -> Result<Vec<LeaseId>> {
        let mut renewed = self
            .heartbeats(&[(node, leases.to_vec())], deadline_ms, now)
            .await?;
        Ok(renewed.pop().unwrap_or_default())
    }

    /// Several nodes' heartbeats in one transaction (the domain batches those that arrive
    /// together): for each, [`Store::heartbeat`]'s renewal and uptime. Returns each node's
    /// renewed leases, in order.
    pub async fn heartbeats(
        &self,
        beats: &[(NodeId, Vec<LeaseId>)],
        deadline_ms: i64,
        now: i64,
    ) -> Result<Vec<Vec<LeaseId>>> {
        let mut tx = self.db.begin().await?;
        let mut out = Vec::with_capacity(beats.len());
        for (node, leases) in beats {
            out.push(Self::renew_in(&mut tx, *node, leases, deadline_ms).await?);
            self.touch_in(&mut tx, *node, now).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn renew_in(
        tx: &mut db::Tx,
        node: NodeId,
        leases: &[LeaseId],
        deadline_ms: i64,
    ) -> Result<Vec<LeaseId>> {
        // One statement per chunk of leases (a node lists a few; a hostile list is chunked).
        const CHUNK: usize = MAX_BOUND - 2;
        let mut renewed = Vec::with_capacity(leases.len());
        let node = node.to_string();
        for chunk in leases.chunks(CHUNK) {
            let sql = format!(
                "UPDATE leases SET deadline_ms = $1 WHERE node = $2 AND state = 'active' AND id IN ({}) RETURNING id",
                in_list(3, padded(chunk.len(), CHUNK))
            );
            // Safe: the dynamic part is only generated placeholders.
            let mut q = query(sql).bind(deadline_ms).bind(&node);
            for lease in pad(chunk, CHUNK) {
                q = q.bind(id_i64(*lease));
            }
            for row in q.fetch_all(tx).await? {
                renewed.push(row.try_get::<i64>("id")? as LeaseId);
            }
        }
        renewed.sort_unstable();
        Ok(renewed)
    }

    /// Gives every active lease `grace_ms` from `now`: called when the domain starts, since
    /// nodes could not heartbeat while it was down.
    pub async fn extend_all_leases(&self, now: i64, grace_ms: i64) -> Result<u64> {
        Ok(
            query("UPDATE leases SET deadline_ms = $1 WHERE state = 'active' AND deadline_ms < $1")
                .bind(now.saturating_add(grace_ms))
                .execute(&mut self.db.acquire().await?)
                .await?
                .rows_affected(),
        )
    }

    /// The active leases of `node` (to resend after a reconnect).
    pub async fn active_leases(&self, node: NodeId) -> Result<Vec<ActiveLease>> {
        let rows = query("SELECT id, task_id, deadline_ms FROM leases WHERE node = $1 AND state = 'active' ORDER BY id")
            .bind(node.to_string())
            .fetch_all(&mut self.db.acquire().await?)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let task: i64 = r.try_get("task_id")?;
            if let Some(spec) = self.task_spec(task as TaskId).await? {
                out.push(ActiveLease {
                    lease: r.try_get::<i64>("id")? as LeaseId,
                    spec,
                    deadline_ms: r.try_get("deadline_ms")?,
                });
            }
        }
        Ok(out)
    }

    /// The spec a node runs for `task`.
    pub async fn task_spec(&self, task: TaskId) -> Result<Option<TaskSpec>> {
        let row = query(
            "SELECT t.id, t.job_id, t.args, t.input, t.seed, j.module, j.terms, CASE WHEN j.terms IS NULL THEN j.spec END AS spec
             FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.id = $1",
        )
        .bind(id_i64(task))
        .fetch_optional(&mut self.db.acquire().await?)
        .await?;
        row.map(|r| {
            let terms = terms(&r)?;
            Ok(TaskSpec {
                task,
                job: r.try_get::<i64>("job_id")? as JobId,
                module: parse("job module", &r.try_get::<String>("module")?)?,
                input: parse("task input", &r.try_get::<String>("input")?)?,
                args: json("task args", &r.try_get::<String>("args")?)?,
                limits: terms.limits,
                seed: parse("task seed", &r.try_get::<String>("seed")?)?,
            })
        })
        .transpose()
    }

    async fn failed_attempt(
        tx: &mut db::Tx,
        task: TaskId,
        attempts: u32,
        max_attempts: u32,
        reason: &str,
        now: i64,
    ) -> Result<Recorded> {
        if attempts >= max_attempts {
            let reason = format!("{reason}; gave up after {attempts} failed attempts");
            query("UPDATE tasks SET state = 'failed', attempts = $1, reason = $2, finished_ms = $3 WHERE id = $4")
                .bind(i64::from(attempts))
                .bind(&reason)
                .bind(now)
                .bind(id_i64(task))
                .execute(tx)
                .await?;
            Self::count_ended(tx, TaskEnd::Failed, id_i64(task)).await?;
            query("UPDATE leases SET state = 'cancelled', finished_ms = $1 WHERE task_id = $2 AND state = 'active'")
                .bind(now)
                .bind(id_i64(task))
                .execute(tx)
                .await?;
            Ok(Recorded::Failed(reason))
        } else {
            query("UPDATE tasks SET state = 'pending', attempts = $1, reason = $2 WHERE id = $3 AND state = 'pending'")
                .bind(i64::from(attempts))
                .bind(reason)
                .bind(id_i64(task))
                .execute(tx)
                .await?;
            Ok(Recorded::Stored)
        }
    }

    /// Ends the job when none of its tasks is open; true when it did (tell it after the
    /// commit: [`Store::tell_ended`]). On PostgreSQL the job row is locked
    /// first (always after the task row, so no lock cycle): two transactions finishing the
    /// last two tasks then run one after the other, and the second sees the first's commit.
    async fn finish_job_if_done(&self, tx: &mut db::Tx, job: i64, now: i64) -> Result<bool> {
        if self.backend == Backend::Postgres {
            query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(job)
                .execute(tx)
                .await?;
        }
        let Some((state, _, _)) = Self::job_ending(tx, job).await? else {
            return Ok(false);
        };
        let ended = query("UPDATE jobs SET state = $1, finished_ms = $2 WHERE id = $3 AND state IN ('queued', 'running')")
            .bind(state)
            .bind(now)
            .bind(job)
            .execute(tx)
            .await?
            .rows_affected();
        if ended == 1 {
            self.refund(tx, job, now).await?;
        }
        Ok(ended == 1)
    }

    /// Whether `job` ends now: still queued or running, with no task pending or running.
    /// Then how it ends (`completed` when a task was verified, else `failed`) and its owner.
    pub(crate) async fn job_ending(
        tx: &mut db::Tx,
        job: i64,
    ) -> Result<Option<(&'static str, NodeId, i64)>> {
        // The counts kept on the job (written in the transactions that end its tasks).
        let row = query(
            "SELECT state, owner, n_open, n_verified, n_verified + n_failed + n_cancelled AS ended
             FROM jobs WHERE id = $1",
        )
        .bind(job)
        .fetch_one(tx)
        .await?;
        let state: String = row.try_get("state")?;
        if !matches!(state.as_str(), "queued" | "running") || row.try_get::<i64>("n_open")? > 0 {
            return Ok(None);
        }
        let end = if row.try_get::<i64>("n_verified")? > 0 {
            "completed"
        } else {
            "failed"
        };
        Ok(Some((
            end,
            parse("job owner", &row.try_get::<String>("owner")?)?,
            row.try_get::<i64>("ended")?,
        )))
    }

    /// Counts one task (`task`, just moved from pending to `end`) on its job.
    pub(crate) async fn count_ended(tx: &mut db::Tx, end: TaskEnd, task: i64) -> Result<()> {
        let column = end.column();
        query(format!(
            "UPDATE jobs SET n_open = n_open - 1, {column} = {column} + 1
             WHERE id = (SELECT job_id FROM tasks WHERE id = $1)"
        ))
        .bind(task)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Returns what is left of an ended job's escrow to its submitter.
    async fn refund(&self, tx: &mut db::Tx, job: i64, now: i64) -> Result<()> {
        let escrow = Account::Escrow(job as JobId);
        let mut chain = self.chain(tx).await?;
        let left = Self::balance_in(tx, escrow).await?;
        if left > 0 {
            let owner: String = query("SELECT owner FROM jobs WHERE id = $1")
                .bind(job)
                .fetch_one(tx)
                .await?
                .try_get("owner")?;
            let post = Post {
                id: format!("refund:{job}"),
                from: escrow,
                to: Account::Submitter(parse("job owner", &owner)?),
                amount: left as u64,
                reason: Reason::Refund { job: job as JobId },
            };
            self.post_valid(tx, &mut chain, post, now, false).await?;
        }
        self.close_chain(tx, chain).await
    }

    /// Expires active leases whose deadline passed: each is a failed attempt of its task,
    /// which goes back to `pending` or, past `max_attempts`, to `failed`. Returns the expired
    /// leases.
    pub async fn expire_leases(
        &self,
        now: i64,
        max_attempts: u32,
    ) -> Result<Vec<(LeaseId, NodeId)>> {
        let rows = query("SELECT id, task_id, node, kind FROM leases WHERE state = 'active' AND deadline_ms < $1 ORDER BY deadline_ms, id LIMIT 1000")
            .bind(now)
            .fetch_all(&mut self.db.acquire().await?)
            .await?;
        let mut expired = Vec::with_capacity(rows.len());
        for r in rows {
            let lease: i64 = r.try_get("id")?;
            let task: i64 = r.try_get("task_id")?;
            let node: NodeId = parse("lease node", &r.try_get::<String>("node")?)?;
            let spot = r.try_get::<String>("kind")? == "spot";
            let mut tx = self.db.begin().await?;
            self.lock_task(&mut tx, task as TaskId).await?;
            let changed = query("UPDATE leases SET state = 'expired', finished_ms = $1 WHERE id = $2 AND state = 'active'")
                .bind(now)
                .bind(lease)
                .execute(&mut tx)
                .await?
                .rows_affected();
            if changed == 1 && spot {
                // A spot check's task is already decided: nothing to retry.
                expired.push((lease as LeaseId, node));
            } else if changed == 1 {
                let t = query("SELECT attempts, job_id FROM tasks WHERE id = $1")
                    .bind(task)
                    .fetch_one(&mut tx)
                    .await?;
                let attempts = t.try_get::<i64>("attempts")? as u32 + 1;
                let job: i64 = t.try_get("job_id")?;
                Self::failed_attempt(
                    &mut tx,
                    task as TaskId,
                    attempts,
                    max_attempts,
                    "lease expired",
                    now,
                )
                .await?;
                let ended = self.finish_job_if_done(&mut tx, job, now).await?;
                expired.push((lease as LeaseId, node));
                tx.commit().await?;
                // Its task may be pending again.
                self.tell_pending_changed();
                self.tell_ended(ended.then_some(job));
                continue;
            }
            tx.commit().await?;
        }
        Ok(expired)
    }

    /// Closes a job's open work inside `tx`: its active leases are cancelled (and returned,
    /// to tell the nodes), its pending tasks move to `state` with `reason` (and are counted
    /// so on the job).
    async fn close_open_work(
        tx: &mut db::Tx,
        job: i64,
        state: TaskEnd,
        reason: Option<&str>,
        now: i64,
    ) -> Result<Vec<(LeaseId, NodeId)>> {
        let rows = query(
            "SELECT l.id, l.node FROM leases l JOIN tasks t ON t.id = l.task_id WHERE t.job_id = $1 AND l.state = 'active'",
        )
        .bind(job)
        .fetch_all(tx)
        .await?;
        let leases = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64>("id")? as LeaseId,
                    parse("lease node", &r.try_get::<String>("node")?)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        query(
            "UPDATE leases SET state = 'cancelled', finished_ms = $1
             WHERE state = 'active' AND task_id IN (SELECT id FROM tasks WHERE job_id = $2)",
        )
        .bind(now)
        .bind(job)
        .execute(tx)
        .await?;
        let ended = query(
            "UPDATE tasks SET state = $1, reason = COALESCE($2, reason), finished_ms = $3
             WHERE job_id = $4 AND state = 'pending'",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(now)
        .bind(job)
        .execute(tx)
        .await?
        .rows_affected();
        let column = state.column();
        query(format!(
            "UPDATE jobs SET n_open = n_open - $1, {column} = {column} + $2 WHERE id = $3"
        ))
        .bind(ended as i64)
        .bind(ended as i64)
        .bind(job)
        .execute(tx)
        .await?;
        Ok(leases)
    }

    /// Ends jobs whose deadline passed: their unfinished tasks are dead-lettered with the
    /// reason "job deadline passed" and their active leases cancelled (returned, to tell the
    /// nodes).
    pub async fn expire_jobs(&self, now: i64) -> Result<Vec<(LeaseId, NodeId)>> {
        let jobs = query(
            "SELECT id FROM jobs WHERE deadline_ms IS NOT NULL AND deadline_ms < $1 AND state IN ('queued', 'running') LIMIT 100",
        )
        .bind(now)
        .fetch_all(&mut self.db.acquire().await?)
        .await?;
        let mut cancelled = Vec::new();
        for j in jobs {
            let job: i64 = j.try_get("id")?;
            let mut tx = self.db.begin().await?;
            cancelled.extend(
                Self::close_open_work(
                    &mut tx,
                    job,
                    TaskEnd::Failed,
                    Some("job deadline passed"),
                    now,
                )
                .await?,
            );
            let ended = self.finish_job_if_done(&mut tx, job, now).await?;
            tx.commit().await?;
            self.tell_ended(ended.then_some(job));
        }
        Ok(cancelled)
    }

    // ---- nodes ---------------------------------------------------------------------------

    /// Records a node's hello.
    pub async fn upsert_node(
        &self,
        id: NodeId,
        hardware: &Hardware,
        tier: Tier,
        slots: u32,
        now: i64,
    ) -> Result<()> {
        query(
            "INSERT INTO nodes (id, hardware, tier, slots, first_seen_ms, last_seen_ms) VALUES ($1, $2, $3, $4, $5, $5)
             ON CONFLICT (id) DO UPDATE SET hardware = excluded.hardware, tier = excluded.tier, slots = excluded.slots,
             last_seen_ms = excluded.last_seen_ms",
        )
        .bind(id.to_string())
        .bind(to_json(hardware))
        .bind(to_json(&tier))
        .bind(i64::from(slots))
        .bind(now)
        .execute(&mut self.db.acquire().await?)
        .await?;
        Ok(())
    }

    /// Marks a node seen (heartbeat), counts the time since its last sign of life as
    /// uptime (gaps over [`UPTIME_MAX_GAP_MS`] count as offline), and mints the uptime
    /// reward for each whole period online.
    pub async fn touch_node(&self, id: NodeId, now: i64) -> Result<()> {
        let mut tx = self.db.begin().await?;
        self.touch_in(&mut tx, id, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn touch_in(&self, tx: &mut db::Tx, id: NodeId, now: i64) -> Result<()> {
        use stardust_ledger::curve::{UPTIME_PER_PERIOD, UPTIME_PERIOD_MS};
        // One statement: SET expressions see the row as it was, so the gap is measured
        // from the previous sign of life.
        let Some(r) = query(
            "UPDATE nodes SET uptime_ms = uptime_ms + CASE WHEN $1 - last_seen_ms BETWEEN 0 AND $2 THEN $1 - last_seen_ms ELSE 0 END,
             last_seen_ms = $1 WHERE id = $3 RETURNING uptime_ms, uptime_paid",
        )
        .bind(now)
        .bind(UPTIME_MAX_GAP_MS)
        .bind(id.to_string())
        .fetch_optional(tx)
        .await?
        else {
            return Ok(());
        };
        let paid = r.try_get::<i64>("uptime_paid")?;
        let uptime = r.try_get::<i64>("uptime_ms")?;
        let periods = uptime / UPTIME_PERIOD_MS as i64;
        if periods > paid {
            query("UPDATE nodes SET uptime_paid = $1 WHERE id = $2")
                .bind(periods)
                .bind(id.to_string())
                .execute(tx)
                .await?;
        }
        if periods > paid && self.signer.is_some() {
            let mut chain = self.chain(tx).await?;
            let post = Post {
                id: format!("uptime:{id}:{periods}"),
                from: Account::Mint,
                to: Account::Operator(id),
                amount: (periods - paid) as u64 * UPTIME_PER_PERIOD,
                reason: Reason::Uptime,
            };
            self.post_valid(tx, &mut chain, post, now, false).await?;
            self.close_chain(tx, chain).await?;
        }
        Ok(())
    }

    /// One node.
    pub async fn node(&self, id: NodeId) -> Result<Option<NodeRow>> {
        let row = query(format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&mut self.db.acquire().await?)
            .await?;
        row.as_ref().map(node_row).transpose()
    }

    /// Every known node.
    pub async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = query(format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"))
            .fetch_all(&mut self.db.acquire().await?)
            .await?;
        rows.iter().map(node_row).collect()
    }
}

/// Longest silence between heartbeats that still counts as online.
pub const UPTIME_MAX_GAP_MS: i64 = 60_000;

const NODE_COLUMNS: &str = "id, hardware, tier, slots, last_seen_ms, agreed, disagreed, rep_good, rep_bad, streak, spot_passed, spot_failed, uptime_ms";

/// What every task of a job runs under, kept apart from the spec (whose sweep can be
/// large) so dispatch and settlement need not parse the whole spec per task.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Terms {
    limits: Limits,
    requirements: Requirements,
}

/// A job row's terms: its `terms` column, or its spec for jobs stored before it existed.
/// (Queries select the spec only where `terms` is NULL: a large sweep's spec is hundreds of
/// kilobytes, and copying it for every task was the dispatcher's largest cost.)
fn terms(r: &Row) -> Result<Terms> {
    match r.try_get::<Option<String>>("terms")? {
        Some(t) => terms_of(Some(&t), None),
        None => terms_of(None, Some(&r.try_get::<String>("spec")?)),
    }
}

/// [`terms`] from the two columns' values.
fn terms_of(terms: Option<&str>, spec: Option<&str>) -> Result<Terms> {
    match terms {
        Some(t) => json("job terms", t),
        None => {
            let spec: JobSpec = json("job spec", spec.unwrap_or_default())?;
            Ok(Terms {
                limits: spec.limits,
                requirements: spec.requirements,
            })
        }
    }
}

fn node_row(r: &Row) -> Result<NodeRow> {
    Ok(NodeRow {
        id: parse("node id", &r.try_get::<String>("id")?)?,
        hardware: json("node hardware", &r.try_get::<String>("hardware")?)?,
        tier: json("node tier", &r.try_get::<String>("tier")?)?,
        slots: r.try_get::<i64>("slots")? as u32,
        last_seen_ms: r.try_get("last_seen_ms")?,
        agreed: r.try_get::<i64>("agreed")? as u64,
        disagreed: r.try_get::<i64>("disagreed")? as u64,
        record: Record {
            good: r.try_get("rep_good")?,
            bad: r.try_get("rep_bad")?,
            streak: r.try_get::<i64>("streak")? as u64,
        },
        spot_passed: r.try_get::<i64>("spot_passed")? as u64,
        spot_failed: r.try_get::<i64>("spot_failed")? as u64,
        uptime_ms: r.try_get("uptime_ms")?,
    })
}

fn task_row(r: &Row) -> Result<TaskRow> {
    let report: Option<String> = r.try_get("report")?;
    Ok(TaskRow {
        id: r.try_get::<i64>("id")? as TaskId,
        index: r.try_get::<i64>("idx")? as u32,
        args: json("task args", &r.try_get::<String>("args")?)?,
        state: r.try_get("state")?,
        replicas: r.try_get::<i64>("replicas")? as u32,
        attempts: r.try_get::<i64>("attempts")? as u32,
        reason: r.try_get("reason")?,
        report: report.map(|s| json("task report", &s)).transpose()?,
        finished_ms: r.try_get("finished_ms")?,
    })
}

#[cfg(test)]
mod tests;
