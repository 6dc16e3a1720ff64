//! The dispatcher: matches pending tasks to connected nodes and leases them, in rounds.
//!
//! A round takes tasks from the [`PendingCache`], matches every replica they want against
//! the sessions' free slots, leases them all in one transaction, then tells each node its
//! assignments in one frame. Rounds run in [`run`]'s loop, woken when work or room appears;
//! and a submission that finds nothing waiting and a node free runs its job's round itself,
//! inside the job's own transaction ([`create_job`]): one commit makes the job and its first
//! leases durable, and its tasks leave for a node before that commit (before any of the
//! job's rows is written: their ids are taken first), without waiting for the loop (their
//! results are recorded only after it).
//!
//! Lock order: the pending cache, then `Shared::committing`, then the store's connection,
//! then the sessions (never held while the store works).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use stardust_proto::identity::NodeId;
use stardust_proto::message::{Assignment, DomainMessage, encode};
use stardust_proto::task::{JobId, LeaseId, TaskId};
use stardust_scheduler::matching::{self, Need, NodeView};
use tokio::sync::OwnedMutexGuard;

use crate::service::{Session, Shared, now_ms};
use crate::store::{CreateJobError, Leased, NewJob, OpenJob, PendingTask, StoreError, Want};

/// Leases pending tasks to connected nodes with free slots, in batches.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let mut cache = shared.pending.lock().await;
        if let Err(e) = dispatch_round(&shared, &mut cache).await {
            cache.forget();
            drop(cache);
            tracing::error!(error = %e, "dispatch round failed");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Creates a job. When no other task waits for a node (the pending cache holds every
/// pending task, and none) and a node has room, the job's first round runs in the job's
/// transaction: its leases commit with it, and its tasks are sent before the commit is
/// written (cancelled if it fails). Otherwise (the
/// dispatcher busy with a round, work waiting, no room, a job too large to list) the job is
/// committed alone and the dispatcher woken, as the dispatcher would serve it anyway.
///
/// Once the job is committed this never fails: what goes wrong after (a spot check's read)
/// is logged, and the dispatcher serves what was left.
pub(crate) async fn create_job(
    shared: &Arc<Shared>,
    new: NewJob<'_>,
    now: i64,
) -> Result<JobId, CreateJobError> {
    let store = &shared.store;
    let Ok(cache) = shared.pending.clone().try_lock_owned() else {
        return queued(shared, new, now).await;
    };
    // Forgets what it holds if this ends early (an error, or the request dropped): the job's
    // tasks may be in it while the job is not committed.
    let mut cache = Guarded { cache, armed: true };
    if shared.config.stake > 0 {
        refresh_stake(shared).await?;
    }
    let Some(limit) = round_limit(shared).await else {
        drop(cache);
        return queued(shared, new, now).await;
    };
    if !cache.idle(shared).await? {
        cache.armed = false;
        drop(cache);
        return queued(shared, new, now).await;
    }
    // Before the transaction (lock order: the cache, this, the store): results wait for the
    // commit of leases sent ahead of it.
    let committing = shared.committing.clone().write_owned().await;
    let mut open = store.open_job(new, now).await?;
    if open.tasks().is_empty() {
        // Too large to list: the dispatcher reads it.
        cache.armed = false;
        drop(cache);
        drop(committing);
        let job = open.commit(store).await?;
        shared.wake.notify_one();
        return Ok(job);
    }
    // In the cache while its transaction is open: the cache is forgotten if that fails.
    cache.add(open.take_tasks());
    let tasks = cache.take_held(limit);
    let mut round = Round::new(shared, tasks, now).await;
    round.lease(shared, Lessor::Job(&mut open)).await?;
    // The assignments leave before the commit: the node checks and runs them while the commit
    // is written. Their results are recorded only after it (`committing`); if it fails, the
    // nodes are told to drop them. From here the rest runs as a task of its own, so that a
    // request dropped now (its client gone) neither abandons the commit nor leaves sent
    // leases untold.
    let sent_ahead = round.assign(shared).await;
    let shared = shared.clone();
    let ended = tokio::spawn(async move {
        let committed = open.commit(&shared.store).await;
        drop(committing);
        match committed {
            Ok(job) => {
                sent(shared, round, cache, job).await;
                Ok(job)
            }
            Err(e) => {
                // Never durable: no result for them can be recorded.
                shared.cancel_leases(sent_ahead).await;
                Err(e)
            }
        }
    })
    .await;
    match ended {
        Ok(job) => Ok(job?),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(StoreError::Stopped.into()),
    }
}

/// A submission's round, once committed: its leases told to their sessions and nodes.
async fn sent(shared: Arc<Shared>, round: Round, mut cache: Guarded, job: JobId) {
    if !round.leased.is_empty() {
        shared
            .metrics
            .leased_at_submission
            .fetch_add(1, Ordering::Relaxed);
    }
    if let Err(e) = round.finish(&shared, &mut cache).await {
        cache.forget();
        tracing::error!(error = %e, job, "a new job's dispatch failed after it was committed; the dispatcher serves it");
    }
    cache.armed = false;
    // Tasks left waiting (more than the room, or a round to read again): the dispatcher's.
    let left = !(cache.complete && cache.tasks.is_empty());
    drop(cache);
    if left {
        shared.wake.notify_one();
    }
}

/// Creates a job for the dispatcher to serve.
async fn queued(shared: &Shared, new: NewJob<'_>, now: i64) -> Result<JobId, CreateJobError> {
    let job = shared.store.create_job(new, now).await?;
    shared.wake.notify_one();
    Ok(job)
}

/// The pending cache, forgotten on drop while armed.
struct Guarded {
    cache: OwnedMutexGuard<PendingCache>,
    armed: bool,
}

impl std::ops::Deref for Guarded {
    type Target = PendingCache;
    fn deref(&self) -> &PendingCache {
        &self.cache
    }
}

impl std::ops::DerefMut for Guarded {
    fn deref_mut(&mut self) -> &mut PendingCache {
        &mut self.cache
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.armed {
            self.cache.forget();
        }
    }
}

/// Tasks a round takes at most, or `None` when no node has room.
async fn round_limit(shared: &Shared) -> Option<usize> {
    let free: u32 = {
        let sessions = shared.sessions.lock().await;
        sessions.values().map(Session::free).sum()
    };
    (free > 0).then(|| {
        shared
            .config
            .dispatch_batch
            .min(free.saturating_mul(2).max(16)) as usize
    })
}

/// Pending tasks read at most at once into [`PendingCache`].
const CACHE_READ: u32 = 1024;

/// How long [`PendingCache`] trusts what it holds: past this it reads again, whatever it
/// was told (a safety net; the store tells it every change it knows of).
const CACHE_TRUST: Duration = Duration::from_secs(1);

/// Pending tasks kept between dispatch rounds, in the order [`Store::pending_tasks`] reads
/// them (highest priority, oldest job, lowest index first), so that a round reads the
/// database only when it must: when empty and not known to be complete, when the store's
/// pending epoch moved (tasks made pending again, see [`Store::pending_epoch`]), when a new
/// job outranks what it holds, after a round left a task it served still wanting replicas,
/// or after [`CACHE_TRUST`]. New jobs' tasks are added as the store created them
/// ([`Store::take_created`]) while the cache holds every pending task (its last read found
/// fewer than it asked for). A task the cache holds that is no longer pending is refused by
/// the lease's own checks, which makes the next round read again.
///
/// [`Store::pending_tasks`]: crate::store::Store::pending_tasks
/// [`Store::pending_epoch`]: crate::store::Store::pending_epoch
/// [`Store::take_created`]: crate::store::Store::take_created
#[derive(Default)]
pub(crate) struct PendingCache {
    tasks: VecDeque<PendingTask>,
    /// The last read found every pending task.
    complete: bool,
    /// The store's pending epoch before the last read.
    epoch: u64,
    read_at: Option<Instant>,
}

impl PendingCache {
    /// Up to `limit` tasks from the front of what it holds, reading nothing.
    fn take_held(&mut self, limit: usize) -> Vec<PendingTask> {
        let n = limit.min(self.tasks.len());
        self.tasks.drain(..n).collect()
    }

    /// Whether no task waits: it holds every pending task (reading the database first if it
    /// must), and there is none.
    async fn idle(&mut self, shared: &Shared) -> Result<bool, StoreError> {
        self.refresh(shared).await?;
        Ok(self.complete && self.tasks.is_empty())
    }

    /// Adds the jobs created since the last call, or reads the database if it must.
    async fn refresh(&mut self, shared: &Shared) -> Result<(), StoreError> {
        let store = &shared.store;
        let epoch = store.pending_epoch();
        let created = store.take_created();
        let mut read = epoch != self.epoch
            || self.read_at.is_none_or(|t| t.elapsed() > CACHE_TRUST)
            || (self.tasks.is_empty() && !self.complete);
        if !read && !created.is_empty() {
            let lowest = self.tasks.iter().map(|t| t.priority).min();
            if self.complete {
                self.add(created);
            } else if created
                .iter()
                .any(|t| lowest.is_none_or(|l| t.priority > l))
            {
                // A new job outranks tasks the database holds beyond what was read.
                read = true;
            }
            // Otherwise they come after everything the database holds: read in turn.
        }
        if read {
            // Jobs created from here on are told again; those before are in the read.
            let _ = store.take_created();
            let tasks = store.pending_tasks(CACHE_READ).await?;
            shared.metrics.pending_reads.fetch_add(1, Ordering::Relaxed);
            self.complete = tasks.len() < CACHE_READ as usize;
            self.tasks = tasks.into();
            self.epoch = epoch;
            self.read_at = Some(Instant::now());
        }
        Ok(())
    }

    /// Adds new jobs' tasks in their place (after every task of their priority or higher),
    /// leaving out any already held (a job created while the cache read).
    fn add(&mut self, created: Vec<PendingTask>) {
        let held: HashSet<TaskId> = self.tasks.iter().map(|t| t.spec.task).collect();
        let reorder = created
            .iter()
            .any(|c| self.tasks.iter().any(|t| t.priority < c.priority));
        self.tasks
            .extend(created.into_iter().filter(|t| !held.contains(&t.spec.task)));
        if reorder {
            // Stable: jobs keep their order within a priority.
            self.tasks
                .make_contiguous()
                .sort_by_key(|t| std::cmp::Reverse(t.priority));
        }
    }

    /// Puts back, in front and in order, tasks a round took and did not serve.
    fn put_back(&mut self, tasks: Vec<PendingTask>) {
        for t in tasks.into_iter().rev() {
            self.tasks.push_front(t);
        }
    }

    /// Drops what it holds: the next round reads.
    fn forget(&mut self) {
        self.tasks.clear();
        self.complete = false;
        self.read_at = None;
    }
}

async fn dispatch_round(shared: &Shared, cache: &mut PendingCache) -> Result<(), StoreError> {
    // Nothing waiting: done, before anything that looks at every session (each node's hello
    // wakes a round; 18,000 nodes arriving made 18,000 rounds over a growing crowd).
    if cache.idle(shared).await? {
        return Ok(());
    }
    if shared.config.stake > 0 {
        refresh_stake(shared).await?;
    }
    let Some(limit) = round_limit(shared).await else {
        return Ok(());
    };
    let pending = cache.take_held(limit);
    if pending.is_empty() {
        return Ok(());
    }
    let mut round = Round::new(shared, pending, now_ms()).await;
    round.lease(shared, Lessor::Own).await?;
    round.finish(shared, cache).await
}

/// Where a round writes its leases.
enum Lessor<'a> {
    /// A transaction of their own.
    Own,
    /// A new job's transaction, committed by the caller.
    Job(&'a mut OpenJob),
}

/// One dispatch round: tasks matched and leased ([`Round::lease`]), then, once the leases
/// are durable, told to the sessions and sent to the nodes ([`Round::finish`]).
struct Round {
    now: i64,
    /// Candidate nodes with their load, kept in step with what the round proposes. The
    /// sessions are not locked while the store works (results being answered need them);
    /// capacity freed meanwhile waits for the next round.
    views: Vec<NodeView>,
    index: HashMap<NodeId, usize>,
    open: Vec<Wanting>,
    /// Leases made, with their nodes: added to the sessions once durable (or when sent
    /// ahead of their commit, [`Round::assign`]).
    leased: Vec<(NodeId, LeaseId)>,
    /// Whether `leased` were sent and given to their sessions already.
    assigned: bool,
    /// Nodes whose stake covered no more leases.
    capped: HashSet<NodeId>,
    /// Nodes owed a spot check: room was left after the replicas proposed for them.
    spots: Vec<NodeId>,
    batches: HashMap<NodeId, Vec<Assignment>>,
}

impl Round {
    async fn new(shared: &Shared, pending: Vec<PendingTask>, now: i64) -> Self {
        let views: Vec<NodeView> = {
            let sessions = shared.sessions.lock().await;
            sessions.values().map(Session::view).collect()
        };
        let index = views.iter().enumerate().map(|(i, v)| (v.id, i)).collect();
        Self {
            now,
            views,
            index,
            open: pending.into_iter().map(Wanting::new).collect(),
            leased: Vec::new(),
            assigned: false,
            capped: HashSet::new(),
            spots: Vec::new(),
            batches: HashMap::new(),
        }
    }

    /// Matches every replica still wanted and leases them all in one statement batch, in
    /// passes while a pass learns something (a refused node, a task's replication decided).
    async fn lease(&mut self, shared: &Shared, mut lessor: Lessor<'_>) -> Result<(), StoreError> {
        let now = self.now;
        let lease_ms = shared.config.lease_ms;
        for _ in 0..MAX_PASSES {
            let mut wants = Vec::new();
            let mut of = Vec::new();
            for (i, w) in self.open.iter_mut().enumerate() {
                while !w.done && w.held + w.proposed < w.wanted {
                    let need = Need {
                        requirements: &w.task.requirements,
                        limits: &w.task.spec.limits,
                        replicas_on: &w.excluded,
                        sole: w.task.redundancy <= 1,
                    };
                    let Ok(node) = matching::pick(&need, &self.views) else {
                        w.done = true;
                        break;
                    };
                    let node = node.id;
                    self.views[self.index[&node]].running += 1;
                    w.excluded.push(node);
                    w.proposed += 1;
                    w.touched = true;
                    wants.push(Want {
                        task: w.task.spec.task,
                        node,
                        draw: shared.draw(),
                    });
                    of.push(i);
                }
            }
            if wants.is_empty() {
                break;
            }
            let outcomes = match &mut lessor {
                Lessor::Own => shared.store.create_leases(&wants, now, lease_ms).await?,
                Lessor::Job(job) => {
                    job.create_leases(&shared.store, &wants, now, lease_ms)
                        .await?
                }
            };
            let mut again = false;
            let mut capped = Vec::new();
            for ((want, i), (leased, replicas)) in wants.iter().zip(of).zip(outcomes) {
                let w = &mut self.open[i];
                w.proposed -= 1;
                let node = want.node;
                let view = self.index[&node];
                match leased {
                    Leased::Yes(lease) => {
                        self.leased.push((node, lease));
                        w.held += 1;
                        // The first lease decided the task's replication.
                        let replicas = usize::from(replicas);
                        again |= w.wanted != replicas && replicas > w.held;
                        w.wanted = replicas;
                        shared
                            .metrics
                            .dispatch_latency
                            .observe((now - w.task.submitted_ms) as f64 / 1000.0);
                        self.batches.entry(node).or_default().push(Assignment {
                            lease,
                            spec: w.task.spec.clone(),
                            lease_ms: lease_ms as u64,
                        });
                        if shared.draw() < shared.config.spot_rate {
                            self.spots.push(node);
                        }
                    }
                    Leased::NoStake => {
                        // The stake changed since the round began: no more for this node now.
                        self.views[view].running -= 1;
                        capped.push(view);
                        self.capped.insert(node);
                        again = true;
                    }
                    Leased::Untrusted => {
                        // A browser without the reputation for this replica: try other nodes.
                        self.views[view].running -= 1;
                        again = true;
                    }
                    Leased::No => {
                        self.views[view].running -= 1;
                        w.done = true;
                    }
                }
            }
            // A node out of stake holds what it has now.
            for view in capped {
                self.views[view].slots = self.views[view].running;
            }
            if !again {
                break;
            }
        }
        Ok(())
    }

    /// With the leases durable: gives them to their sessions, puts back what the round did
    /// not serve, adds the spot checks owed, and sends each node its assignments.
    async fn finish(mut self, shared: &Shared, cache: &mut PendingCache) -> Result<(), StoreError> {
        let now = self.now;
        {
            let mut sessions = shared.sessions.lock().await;
            // A node gone since the round began: its leases lapse and the tasks come back.
            // Leases sent ahead are the sessions' already (and may have ended since).
            if !self.assigned {
                self.give_leased(&mut sessions);
            }
            for node in &self.capped {
                if let Some(s) = sessions.get_mut(node) {
                    s.stake_slots = Some(s.running.len() as u32);
                }
            }
        }
        // Tasks not proposed go back to the cache as they were; a task proposed and still
        // wanting replicas has changed (holders, replication): the next round reads again.
        let mut untouched = Vec::new();
        let mut changed = false;
        for w in self.open {
            if !w.touched {
                untouched.push(w.task);
            } else if w.held < w.wanted {
                changed = true;
            }
        }
        if changed {
            cache.forget();
        } else {
            cache.put_back(untouched);
        }
        let mut result = Ok(());
        for node in std::mem::take(&mut self.spots) {
            // Only in room left after every replica proposed this round.
            let view = self.index[&node];
            if self.views[view].running >= self.views[view].slots {
                continue;
            }
            let spot = match shared
                .store
                .create_spot_check(node, now, shared.config.lease_ms, shared.draw())
                .await
            {
                Ok(Some(spot)) => spot,
                Ok(None) => continue,
                Err(e) => {
                    // What was leased is still sent.
                    result = Err(e);
                    break;
                }
            };
            let (lease, spec) = spot;
            self.views[view].running += 1;
            if let Some(s) = shared.sessions.lock().await.get_mut(&node) {
                s.running.insert(lease, now);
                self.batches.entry(node).or_default().push(Assignment {
                    lease,
                    spec,
                    lease_ms: shared.config.lease_ms as u64,
                });
            }
        }
        let mut sessions = shared.sessions.lock().await;
        send_batches(
            shared,
            &mut sessions,
            std::mem::take(&mut self.batches),
            false,
        );
        result
    }

    /// Sends the leases made so far to their nodes before they are durable, and gives them
    /// to their sessions; returns them, to be cancelled should the commit fail.
    /// [`Round::finish`] then sends only what it adds (spot checks).
    async fn assign(&mut self, shared: &Shared) -> Vec<(LeaseId, NodeId)> {
        let mut sessions = shared.sessions.lock().await;
        self.give_leased(&mut sessions);
        let writes = send_batches(
            shared,
            &mut sessions,
            std::mem::take(&mut self.batches),
            true,
        );
        drop(sessions);
        for (node, write) in writes {
            if tokio::time::timeout(DIRECT_WRITE_TIMEOUT, write)
                .await
                .is_err()
            {
                tracing::warn!(node = %node.short(), "node not reading; its leases will expire");
                shared.sessions.lock().await.remove(&node);
            }
        }
        self.assigned = true;
        self.leased
            .iter()
            .map(|&(node, lease)| (lease, node))
            .collect()
    }

    /// Counts the round's leases as running on their sessions.
    fn give_leased(&self, sessions: &mut HashMap<NodeId, Session>) {
        for (node, lease) in &self.leased {
            if let Some(s) = sessions.get_mut(node) {
                s.running.insert(*lease, self.now);
            }
        }
    }
}

/// How long a frame written at once may take (an idle link takes microseconds; one that
/// does not take it holds up the submission that sends it).
const DIRECT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

/// Sends each node its assignments in one frame; a session whose outbox is full is dropped
/// (its leases expire). With `now`, a frame to an idle session is not queued but returned as
/// its write, to await once `sessions` is let go ([`Outbox::write_now`]): on a request's path
/// it leaves without waking the session's writer task.
///
/// [`Outbox::write_now`]: crate::outbox::Outbox::write_now
fn send_batches(
    shared: &Shared,
    sessions: &mut HashMap<NodeId, Session>,
    batches: HashMap<NodeId, Vec<Assignment>>,
    now: bool,
) -> Vec<(NodeId, crate::outbox::Write)> {
    let mut writes = Vec::new();
    for (node, tasks) in batches {
        let Some(s) = sessions.get(&node) else {
            continue;
        };
        let frame = encode(&shared.identity, &DomainMessage::Assign { tasks });
        let frame = if now {
            match s.outbox.write_now(frame) {
                Ok(write) => {
                    writes.push((node, write));
                    continue;
                }
                Err(frame) => frame,
            }
        } else {
            frame
        };
        if s.outbox.try_send(frame).is_err() {
            tracing::warn!(node = %node.short(), "node outbox full; its leases will expire");
            sessions.remove(&node);
        }
    }
    writes
}

/// Matching and leasing passes in one dispatch round at most: a pass after the first only
/// serves what the previous one learned (a refused node, a task's replication decided).
const MAX_PASSES: usize = 4;

/// A pending task during a dispatch round.
struct Wanting {
    task: PendingTask,
    /// Nodes that hold, were proposed, or refused a replica of it.
    excluded: Vec<NodeId>,
    /// Replicas held (before the round and leased in it).
    held: usize,
    /// Replicas proposed in the current pass.
    proposed: usize,
    /// Replicas it wants; before its first lease under adaptive replication, one (that
    /// lease decides).
    wanted: usize,
    /// Nothing more for it this round.
    done: bool,
    /// Proposed to a node this round.
    touched: bool,
}

impl Wanting {
    fn new(task: PendingTask) -> Self {
        let held = task.replicas_on.len();
        let wanted = if held > 0 {
            usize::from(task.replicas)
        } else if task.adaptive && task.redundancy > 1 {
            1
        } else {
            usize::from(task.redundancy.max(task.replicas))
        };
        Wanting {
            excluded: task.replicas_on.clone(),
            held,
            proposed: 0,
            wanted,
            done: false,
            touched: false,
            task,
        }
    }
}

/// Sets each session's lease cap from its node's stake.
async fn refresh_stake(shared: &Shared) -> Result<(), StoreError> {
    let nodes: Vec<NodeId> = shared.sessions.lock().await.keys().copied().collect();
    let stakes = shared.store.stakes(&nodes).await?;
    let per = i128::from(shared.config.stake);
    let mut sessions = shared.sessions.lock().await;
    for (node, held) in stakes {
        if let Some(s) = sessions.get_mut(&node) {
            s.stake_slots = Some(u32::try_from((held / per).max(0)).unwrap_or(u32::MAX));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(task: TaskId, priority: i64) -> PendingTask {
        PendingTask {
            spec: stardust_proto::task::TaskSpec {
                task,
                job: task / 100,
                module: stardust_proto::content::ContentId::of(b"m"),
                input: stardust_proto::content::ContentId::of(b"i"),
                args: Vec::new(),
                limits: stardust_proto::task::Limits::default(),
                seed: 0,
            },
            requirements: Default::default(),
            replicas_on: Vec::new(),
            submitted_ms: 0,
            redundancy: 1,
            replicas: 1,
            adaptive: false,
            priority,
        }
    }

    fn order(cache: &PendingCache) -> Vec<TaskId> {
        cache.tasks.iter().map(|t| t.spec.task).collect()
    }

    #[test]
    fn the_pending_cache_keeps_the_database_order_as_jobs_are_added_and_tasks_put_back() {
        let mut cache = PendingCache {
            tasks: [pending(101, 1), pending(102, 1), pending(201, 0)].into(),
            ..PendingCache::default()
        };
        // A normal job after the normal one and before the low one; one of its tasks was
        // already read (created while the cache read): not twice.
        cache.add(vec![pending(102, 1), pending(301, 1), pending(302, 1)]);
        assert_eq!(order(&cache), vec![101, 102, 301, 302, 201]);
        // A high job goes first; a low one last.
        cache.add(vec![pending(401, 2)]);
        cache.add(vec![pending(501, 0)]);
        assert_eq!(order(&cache), vec![401, 101, 102, 301, 302, 201, 501]);
        // What a round took and did not serve goes back in front, in order (the first of
        // the three taken was served).
        let mut unserved: Vec<PendingTask> = cache.tasks.drain(..3).collect();
        let served = unserved.remove(0);
        assert_eq!(served.spec.task, 401);
        cache.put_back(unserved);
        assert_eq!(order(&cache), vec![101, 102, 301, 302, 201, 501]);
        cache.forget();
        assert!(cache.tasks.is_empty() && !cache.complete && cache.read_at.is_none());
    }
}
