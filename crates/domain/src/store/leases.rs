//! Leasing: what waits for a replica, and leases made in batches.
//!
//! A dispatch round leases every replica it matched in one transaction: the tasks, their
//! holders and the nodes are read in three statements, each lease is decided in memory with
//! the same rules as one at a time (in the order asked, each seeing the ones before), and the
//! leases are written with one multi-row insert and a few grouped updates.

use std::collections::{BTreeSet, HashMap};

use super::script::Script;
use super::sql::query;
use stardust_ledger::Account;
use stardust_proto::identity::NodeId;
use stardust_proto::task::{JobId, LeaseId, TaskId, TaskSpec};

use super::{
    Backend, IdTable, Leased, PendingTask, Result, Store, as_json_rows, bound_list, bound_rows,
    id_i64, in_list, json, json_list, json_rows, json_table, may_stand_alone_row, pad, padded,
    parse, terms_of,
};

type Tx = super::db::Tx;

/// Ids per `IN (...)` list.
const IDS_PER_QUERY: usize = super::MAX_BOUND;

/// One replica a dispatcher wants leased.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    /// The task.
    pub task: TaskId,
    /// The node to run it.
    pub node: NodeId,
    /// Uniform in [0, 1): decides adaptive replication's random re-checks.
    pub draw: f64,
}

/// A task as leasing decides on it, kept in step within the transaction.
struct Open {
    state: String,
    replicas: i64,
    job: i64,
    redundancy: i64,
    adaptive: bool,
    /// Nodes holding an active or finished replica, each with whether it may stand alone.
    holders: Vec<(String, bool)>,
    /// Whether `replicas` changed.
    changed: bool,
}

/// Tasks written in the transaction that leases them (a new job's): their state as
/// [`Store::open_tasks`] would read it, without the reads.
#[derive(Debug, Default)]
pub(crate) struct Fresh {
    job: i64,
    tasks: BTreeSet<i64>,
    redundancy: i64,
    adaptive: bool,
}

impl Fresh {
    pub(crate) fn new(
        job: i64,
        tasks: impl Iterator<Item = i64>,
        redundancy: u8,
        adaptive: bool,
    ) -> Self {
        Self {
            job,
            tasks: tasks.collect(),
            redundancy: i64::from(redundancy),
            adaptive,
        }
    }

    /// A fresh task as it was written: pending, its replicas the job's redundancy, no
    /// holder.
    fn open(&self, task: i64) -> Option<Open> {
        self.tasks.contains(&task).then(|| Open {
            state: "pending".into(),
            replicas: self.redundancy,
            job: self.job,
            redundancy: self.redundancy,
            adaptive: self.adaptive,
            holders: Vec::new(),
            changed: false,
        })
    }
}

impl Store {
    /// Up to `limit` tasks that want another replica, highest priority and oldest first.
    ///
    /// Open jobs are listed first (few), then each job's pending tasks are read in index
    /// order (`tasks_pending`: job, position, pending tasks only) up to what is still
    /// wanted: no sort over every pending task, which made each dispatch round O(pending)
    /// and a large job O(n²). The holders of all of them are read in one more statement.
    pub async fn pending_tasks(&self, limit: u32) -> Result<Vec<PendingTask>> {
        // One connection for all of it: taking one from the pool costs several times a
        // statement.
        let mut conn = self.db.acquire().await?;
        // What every task of a job shares is read once, with the job.
        let jobs = query(
            "SELECT id, module, terms, CASE WHEN terms IS NULL THEN spec END AS spec, created_ms,
             redundancy, adaptive, priority
             FROM jobs WHERE state IN ('queued', 'running') ORDER BY priority DESC, id",
        )
        .fetch_all(&mut conn)
        .await?;
        // Per task: id, its position, args, input, seed, replicas, and the nodes holding an
        // active or finished replica (comma-separated; none for a task never leased). A
        // pending task whose replicas are all leased (it stays `pending` while they run) is
        // not wanted.
        type Row = (i64, i64, String, String, String, i64, Option<String>);
        let holders = match self.backend {
            Backend::Sqlite => "group_concat(l.node, ',')",
            Backend::Postgres => "string_agg(l.node, ',')",
        };
        let sql = as_json_rows(
            self.backend,
            &format!(
                "SELECT t.id, t.idx, t.args, t.input, t.seed, t.replicas,
                 (SELECT {holders} FROM leases l WHERE l.task_id = t.id AND l.state IN ('active', 'done')) AS holders
                 FROM tasks t WHERE t.state = 'pending' AND t.job_id = $1
                 AND (SELECT COUNT(*) FROM leases l WHERE l.task_id = t.id AND l.state IN ('active', 'done')) < t.replicas
                 ORDER BY t.idx LIMIT +$2"
            ),
            &["id", "idx", "args", "input", "seed", "replicas", "holders"],
        );
        let mut out: Vec<PendingTask> = Vec::new();
        for j in jobs {
            let wanted = i64::from(limit) - out.len() as i64;
            if wanted <= 0 {
                break;
            }
            let job: i64 = j.try_get("id")?;
            let q = query(sql.as_str()).bind(job).bind(wanted);
            let mut rows: Vec<Row> = json_rows("pending tasks", &q.fetch_one(&mut conn).await?)?;
            if rows.is_empty() {
                continue;
            }
            // In the job's order (the rows' order in the array is not promised).
            rows.sort_unstable_by_key(|r| r.1);
            let terms = terms_of(
                j.try_get::<Option<String>>("terms")?.as_deref(),
                j.try_get::<Option<String>>("spec")?.as_deref(),
            )?;
            let module = parse("job module", &j.try_get::<String>("module")?)?;
            let submitted_ms: i64 = j.try_get("created_ms")?;
            let redundancy = j.try_get::<i64>("redundancy")?.clamp(0, 255) as u8;
            let adaptive = j.try_get::<i64>("adaptive")? != 0;
            let priority: i64 = j.try_get("priority")?;
            for (task, _idx, args, input, seed, replicas, holders) in rows {
                out.push(PendingTask {
                    spec: TaskSpec {
                        task: task as TaskId,
                        job: job as JobId,
                        module,
                        input: parse("task input", &input)?,
                        args: json("task args", &args)?,
                        limits: terms.limits,
                        seed: parse("task seed", &seed)?,
                    },
                    requirements: terms.requirements.clone(),
                    replicas_on: holders
                        .as_deref()
                        .map(|h| h.split(',').map(|n| parse("lease node", n)).collect())
                        .transpose()?
                        .unwrap_or_default(),
                    submitted_ms,
                    redundancy,
                    replicas: replicas.clamp(0, 255) as u8,
                    adaptive,
                    priority,
                });
            }
        }
        Ok(out)
    }

    /// Leases one replica of `task` to `node`, if the task still wants one, the node holds
    /// none of it and its stake covers one more lease. Atomic: concurrent callers never
    /// over-lease.
    ///
    /// The first replica decides the task's replication: its job's full redundancy, or a
    /// single replica when the job allows adaptive replication and the node's streak earns
    /// it (`draw`, uniform in [0, 1), decides the random re-checks).
    pub async fn create_lease(
        &self,
        task: TaskId,
        node: NodeId,
        now: i64,
        lease_ms: i64,
        draw: f64,
    ) -> Result<Leased> {
        let want = Want { task, node, draw };
        Ok(self
            .create_leases(&[want], now, lease_ms)
            .await?
            .pop()
            .map_or(Leased::No, |(l, _)| l))
    }

    /// Leases replicas in one transaction, each as [`Store::create_lease`] would in this
    /// order. Returns, for each, the outcome and how many replicas its task wants after it
    /// (so a dispatcher learns what a first lease decided).
    pub async fn create_leases(
        &self,
        wants: &[Want],
        now: i64,
        lease_ms: i64,
    ) -> Result<Vec<(Leased, u8)>> {
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.db.begin().await?;
        let (outcomes, script) = self
            .lease_in(&mut tx, wants, now, lease_ms, &Fresh::default())
            .await?;
        tx.commit_with(script).await?;
        Ok(outcomes)
    }

    /// [`Store::create_leases`] in `tx`: the outcomes, and the writes left to run before
    /// the commit. The `fresh` tasks, written in `tx`, are not read back.
    pub(super) async fn lease_in(
        &self,
        tx: &mut Tx,
        wants: &[Want],
        now: i64,
        lease_ms: i64,
        fresh: &Fresh,
    ) -> Result<(Vec<(Leased, u8)>, Script)> {
        let mut script = Script::default();
        if wants.is_empty() {
            return Ok((Vec::new(), script));
        }
        let tasks: BTreeSet<i64> = wants.iter().map(|w| id_i64(w.task)).collect();
        let nodes: BTreeSet<String> = wants.iter().map(|w| w.node.to_string()).collect();
        let mut open: HashMap<i64, Open> = tasks
            .iter()
            .filter_map(|t| fresh.open(*t).map(|o| (*t, o)))
            .collect();
        let stored: BTreeSet<i64> = tasks
            .iter()
            .filter(|t| !open.contains_key(t))
            .copied()
            .collect();
        if !stored.is_empty() {
            open.extend(self.open_tasks(tx, &stored).await?);
        }
        // Each node's tier and streak: (may stand alone, streak).
        let mut standing: HashMap<String, (bool, u64)> = HashMap::new();
        let nodes: Vec<&String> = nodes.iter().collect();
        let list = bound_list(self.backend, 1, false, &nodes);
        let q = query(format!(
            "SELECT id, tier, streak FROM nodes WHERE id {}",
            list.sql
        ));
        let q = list.bind(q);
        for r in q.fetch_all(tx).await? {
            let streak = r.try_get::<i64>("streak")?;
            standing.insert(
                r.try_get("id")?,
                (
                    may_stand_alone_row(r.try_get("tier")?, Some(streak)),
                    streak.max(0) as u64,
                ),
            );
        }
        // Each node's active leases and stake, read at its first lease (stake only).
        let mut stakes: HashMap<String, (i64, i128)> = HashMap::new();
        let mut outcomes = Vec::with_capacity(wants.len());
        let mut new: Vec<(i64, String)> = Vec::new();
        for w in wants {
            let node_s = w.node.to_string();
            let Some(t) = open.get_mut(&id_i64(w.task)) else {
                outcomes.push((Leased::No, 0));
                continue;
            };
            let (trusted, streak) = standing.get(&node_s).copied().unwrap_or((true, 0));
            let leased = self
                .decide(tx, t, &node_s, trusted, streak, w.draw, &mut stakes)
                .await?;
            if let Leased::Yes(_) = leased {
                new.push((id_i64(w.task), node_s.clone()));
                t.holders.push((node_s.clone(), trusted));
                if let Some((active, _)) = stakes.get_mut(&node_s) {
                    *active += 1;
                }
            }
            outcomes.push((leased, t.replicas.clamp(0, 255) as u8));
        }
        let mut ids = self
            .queue_leases(tx, &mut script, &new, now, lease_ms)
            .await?
            .into_iter();
        for (leased, _) in &mut outcomes {
            if let Leased::Yes(id) = leased {
                *id = ids
                    .next()
                    .ok_or_else(|| super::corrupt("lease insert", "fewer ids than leases"))?;
            }
        }
        // The writes left, run with the commit.
        self.write_tasks(&mut script, &open);
        let jobs: BTreeSet<i64> = new
            .iter()
            .filter_map(|(task, _)| open.get(task).map(|t| t.job))
            .collect();
        let jobs: Vec<i64> = jobs.into_iter().collect();
        for chunk in jobs.chunks(IDS_PER_QUERY) {
            let mut q = script.push(&format!(
                "UPDATE jobs SET state = 'running' WHERE state = 'queued' AND id IN ({})",
                in_list(1, padded(chunk.len(), IDS_PER_QUERY))
            ));
            for j in pad(chunk, IDS_PER_QUERY) {
                q = q.bind(*j);
            }
        }
        Ok((outcomes, script))
    }

    /// Reads the tasks (locked on PostgreSQL, in id order) with their jobs' terms and their
    /// holders.
    async fn open_tasks(&self, tx: &mut Tx, tasks: &BTreeSet<i64>) -> Result<HashMap<i64, Open>> {
        let ids: Vec<i64> = tasks.iter().copied().collect();
        let lock = if self.backend == Backend::Postgres {
            " ORDER BY t.id FOR UPDATE OF t"
        } else {
            ""
        };
        let list = json_list(self.backend, 1, true);
        let q = query(as_json_rows(
            self.backend,
            &format!(
                "SELECT t.id, t.state, t.replicas, t.job_id, j.redundancy, j.adaptive
                 FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.id IN ({list}){lock}"
            ),
            &[
                "id",
                "state",
                "replicas",
                "job_id",
                "redundancy",
                "adaptive",
            ],
        ))
        .bind(super::to_json(&ids));
        let rows: Vec<(i64, String, i64, i64, i64, i64)> =
            json_rows("open tasks", &q.fetch_one(tx).await?)?;
        let mut open = HashMap::with_capacity(rows.len());
        for (id, state, replicas, job, redundancy, adaptive) in rows {
            open.insert(
                id,
                Open {
                    state,
                    replicas,
                    job,
                    redundancy,
                    adaptive: adaptive != 0,
                    holders: Vec::new(),
                    changed: false,
                },
            );
        }
        let q = query(as_json_rows(
            self.backend,
            &format!(
                "SELECT l.task_id, l.node, n.tier, n.streak FROM leases l LEFT JOIN nodes n ON n.id = l.node
                 WHERE l.task_id IN ({list}) AND l.state IN ('active', 'done')"
            ),
            &["task_id", "node", "tier", "streak"],
        ))
        .bind(super::to_json(&ids));
        let rows: Vec<(i64, String, Option<String>, Option<i64>)> =
            json_rows("task holders", &q.fetch_one(tx).await?)?;
        for (task, node, tier, streak) in rows {
            if let Some(t) = open.get_mut(&task) {
                t.holders.push((node, may_stand_alone_row(tier, streak)));
            }
        }
        Ok(open)
    }

    /// Decides one lease of task `t` to `node` (a node that may stand alone or not, with
    /// this streak), updating `t` when it is granted. The rules of [`Store::create_lease`].
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site; the parts of one decision"
    )]
    async fn decide(
        &self,
        tx: &mut Tx,
        t: &mut Open,
        node: &str,
        trusted: bool,
        streak: u64,
        draw: f64,
        stakes: &mut HashMap<String, (i64, i128)>,
    ) -> Result<Leased> {
        if t.state != "pending" {
            return Ok(Leased::No);
        }
        if self.economy.stake > 0 {
            let (active, held) = match stakes.get(node) {
                Some(s) => *s,
                None => {
                    let active = query(
                        "SELECT COUNT(*) AS n FROM leases WHERE node = $1 AND state = 'active'",
                    )
                    .bind(node)
                    .fetch_one(tx)
                    .await?
                    .try_get::<i64>("n")?;
                    let id: NodeId = parse("lease node", node)?;
                    let held = Self::balance_in(tx, Account::Stake(id)).await?;
                    stakes.insert(node.to_string(), (active, held));
                    (active, held)
                }
            };
            if held < i128::from(self.economy.stake) * i128::from(active + 1) {
                return Ok(Leased::NoStake);
            }
        }
        if t.holders.iter().any(|(n, _)| n == node) {
            return Ok(Leased::No);
        }
        let count = t.holders.len() as i64;
        // Whether some replica is on a node that may stand alone (not an untrusted browser).
        let vouched = t.holders.iter().any(|(_, alone)| *alone);
        let mut replicas = t.replicas;
        if count == 0 {
            // First replica (again, after failed attempts): decide the replication.
            let single = t.adaptive
                && t.redundancy > 1
                && trusted
                && self.economy.adaptive.single(streak, draw);
            replicas = if single {
                1
            } else {
                t.redundancy.max(t.replicas)
            };
            if replicas < 2 && !trusted {
                return Ok(Leased::Untrusted);
            }
        }
        if count >= replicas {
            return Ok(Leased::No);
        }
        if !trusted && !vouched && count + 1 >= replicas {
            // The last replica: an untrusted browser may not complete a set of untrusted
            // browsers.
            return Ok(Leased::Untrusted);
        }
        if replicas != t.replicas {
            t.replicas = replicas;
            t.changed = true;
        }
        // The task stays `pending` while its replicas run: its row is written once more,
        // when it ends. (Counts call a pending task with an active lease running.)
        Ok(Leased::Yes(0))
    }

    /// Takes ids for the leases `new` (task, node) and queues their insert in `script`:
    /// their assignments can leave before the rows are written. The ids, in `new`'s order.
    async fn queue_leases(
        &self,
        tx: &mut Tx,
        script: &mut Script,
        new: &[(i64, String)],
        now: i64,
        lease_ms: i64,
    ) -> Result<Vec<LeaseId>> {
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let ids = self.next_ids(tx, IdTable::Leases, new.len()).await?;
        let rows: Vec<(i64, i64, &str)> = ids
            .iter()
            .zip(new)
            .map(|(id, (task, node))| (*id, *task, node.as_str()))
            .collect();
        let rows = bound_rows(
            self.backend,
            3,
            &[("id", true), ("task_id", true), ("node", false)],
            false,
            &rows,
        );
        let insert = query(format!(
            "INSERT INTO leases (id, task_id, node, state, created_ms, deadline_ms)
             SELECT v.id, v.task_id, v.node, 'active', $1, $2 FROM ({}) AS v",
            rows.sql
        ))
        .bind(now)
        .bind(now.saturating_add(lease_ms));
        script.queue(rows.bind(insert));
        Ok(ids.into_iter().map(|id| id as LeaseId).collect())
    }

    /// Queues the writes of the tasks whose replication changed (a first lease decided
    /// it): one set statement, the rows bound as one JSON value.
    fn write_tasks(&self, script: &mut Script, open: &HashMap<i64, Open>) {
        let changed: Vec<(i64, i64)> = open
            .iter()
            .filter(|(_, t)| t.changed)
            .map(|(id, t)| (*id, t.replicas))
            .collect();
        if changed.is_empty() {
            return;
        }
        let rows = json_table(self.backend, 1, &[("id", true), ("replicas", true)], false);
        script
            .push(&format!(
                "UPDATE tasks SET replicas = v.replicas FROM ({rows}) AS v WHERE tasks.id = v.id"
            ))
            .bind(super::to_json(&changed));
    }
}
