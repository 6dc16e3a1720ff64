//! The recorder: writes node results to the store in batches and answers the nodes.
//!
//! Node sessions check a result frame's outputs and file it here without waiting; the
//! recorder takes every frame that arrived while it was writing the previous batch and
//! records them in one transaction ([`crate::store::Store::record_results`]), then answers
//! each frame: `ack` for what is durable or refused, `reject` saying why for what was refused.
//! A result alone costs a transaction of some forty statements (each a round trip to the
//! database); a batch shares its ledger writes, reputations and job checks.
//!
//! When a batch of several frames fails, each frame is tried alone, so one bad frame holds up
//! no other. A frame that still fails gets `reject internal` and no `ack`: its node keeps the
//! results and sends them again (protocol §5).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use stardust_proto::identity::NodeId;
use stardust_proto::message::{DomainMessage, TaskResult, encode};
use stardust_proto::task::LeaseId;
use tokio::sync::mpsc;

use crate::service::{Shared, now_ms};
use crate::store::{RecordError, Recorded, Submitted};

/// Frames waiting for the recorder at most; a session filing one more waits (backpressure on
/// that node's reads).
pub(crate) const MAX_FRAMES_WAITING: usize = 256;

/// Results recorded in one transaction at most (a frame is never split).
const MAX_RESULTS_PER_TRANSACTION: usize = 1024;

/// Inline output bytes in one transaction at most (a frame is never split: one frame may
/// bring up to its own limit beyond it).
const MAX_INLINE_PER_TRANSACTION: usize = 16 << 20;

/// The inline output bytes a frame carries.
fn inline_bytes(frame: &Filed) -> usize {
    frame
        .results
        .iter()
        .map(|r| r.output.as_ref().map_or(0, |o| o.0.len()))
        .sum()
}

/// One node's result frame, its outputs checked (inline bytes match their reports, uploaded
/// ones exist).
pub(crate) struct Filed {
    pub node: NodeId,
    /// The signed frame, kept with each result as evidence.
    pub envelope: Vec<u8>,
    /// Results to record.
    pub results: Vec<TaskResult>,
    /// Results refused before recording, with why.
    pub refused: Vec<(LeaseId, String)>,
    /// Where the node's answers go.
    pub outbox: crate::outbox::Outbox,
}

/// What recording one result came to.
type Outcome = Result<Recorded, RecordError>;

/// Records filed frames until the domain shuts down.
pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Filed>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            f = rx.recv() => match f { Some(f) => f, None => return },
        };
        let mut count = first.results.len();
        let mut bytes = inline_bytes(&first);
        let mut batch = vec![first];
        while count < MAX_RESULTS_PER_TRANSACTION && bytes < MAX_INLINE_PER_TRANSACTION {
            match rx.try_recv() {
                Ok(f) => {
                    count += f.results.len();
                    bytes += inline_bytes(&f);
                    batch.push(f);
                }
                Err(_) => break,
            }
        }
        let several = batch.len() > 1;
        let Err(batch) = record(&shared, batch).await else {
            continue;
        };
        if !several {
            fail(&shared, batch);
            continue;
        }
        for frame in batch {
            if let Err(failed) = record(&shared, vec![frame]).await {
                fail(&shared, failed);
            }
        }
    }
}

/// Records frames in one transaction and answers each; gives them back when the store fails.
async fn record(shared: &Shared, frames: Vec<Filed>) -> Result<(), Vec<Filed>> {
    let submitted: Vec<Submitted<'_>> = frames
        .iter()
        .flat_map(|f| {
            f.results.iter().map(|r| Submitted {
                lease: r.lease,
                node: f.node,
                task: r.task,
                report: &r.report,
                envelope: &f.envelope,
                output: r.output.as_ref().map(|o| o.0.as_slice()),
            })
        })
        .collect();
    // A submission's leases may reach their node before its commit: wait for it.
    let committed = shared.committing.read().await;
    let outcomes = shared
        .store
        .record_results(&submitted, shared.retry(), now_ms())
        .await;
    drop(committed);
    drop(submitted);
    match outcomes {
        Ok(outcomes) => {
            // Requests waiting for these jobs' ends were woken by the commit: they answer
            // their clients first, the nodes' acknowledgements (each a signature) after.
            tokio::task::yield_now().await;
            let mut outcomes = outcomes.into_iter();
            let mut acks = Acks::new();
            for f in frames {
                let mine: Vec<Outcome> = outcomes.by_ref().take(f.results.len()).collect();
                answer(shared, f, mine, &mut acks).await;
            }
            send_acks(shared, acks);
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, frames = frames.len(), "recording results failed");
            Err(frames)
        }
    }
}

/// Tells the nodes of frames that could not be recorded; their results stay unacknowledged.
fn fail(shared: &Shared, frames: Vec<Filed>) {
    for f in frames {
        shared.rejections.count("internal");
        let _ = f.outbox.try_send(encode(
            &shared.identity,
            &DomainMessage::Reject {
                code: "internal".into(),
                message: "internal error; send the results again later".into(),
            },
        ));
    }
}

/// The leases to acknowledge on each session (by its outbox): one `ack` frame per session
/// for a whole batch (each frame is a signature to make and one to check).
pub(crate) type Acks = Vec<(crate::outbox::Outbox, Vec<LeaseId>)>;

/// Sends each node one `ack` for the leases gathered in `acks`.
pub(crate) fn send_acks(shared: &Shared, acks: Acks) {
    let mut any = false;
    for (outbox, leases) in acks {
        if leases.is_empty() {
            continue;
        }
        any = true;
        let _ = outbox.try_send(encode(&shared.identity, &DomainMessage::Ack { leases }));
    }
    if any {
        shared.wake.notify_one();
    }
}

/// Answers one frame: updates the node's session, metrics and judged records, adds to
/// `acks` every result recorded or refused, and sends `reject` for the refused ones.
pub(crate) async fn answer(shared: &Shared, frame: Filed, outcomes: Vec<Outcome>, acks: &mut Acks) {
    let now = now_ms();
    let Filed {
        node,
        results,
        mut refused,
        outbox,
        ..
    } = frame;
    let mut done = Vec::with_capacity(results.len());
    let mut judged = Vec::new();
    let m = &shared.metrics;
    for (r, outcome) in results.iter().zip(outcomes) {
        let lease = r.lease;
        match outcome {
            Ok(outcome) => {
                tracing::debug!(node = %node.short(), lease, ?outcome, "result recorded");
                match &outcome {
                    Recorded::Verified {
                        records,
                        agree,
                        disagree,
                        submitted_ms,
                    } => {
                        judged.extend(records.iter().copied());
                        m.verified.fetch_add(1, Ordering::Relaxed);
                        m.end_to_end_latency
                            .observe((now - submitted_ms) as f64 / 1000.0);
                        m.verification
                            .add(&[("outcome", "agree")], agree.len() as u64);
                        m.verification
                            .add(&[("outcome", "disagree")], disagree.len() as u64);
                    }
                    Recorded::SpotCheck { record, passed } => {
                        if !passed {
                            tracing::warn!(node = %node.short(), lease, "spot check failed");
                        }
                        let outcome = if *passed {
                            "spot_check_passed"
                        } else {
                            "spot_check_failed"
                        };
                        m.verification.inc(&[("outcome", outcome)]);
                        judged.push((node, *record));
                    }
                    _ => {}
                }
                done.push(lease);
            }
            Err(RecordError::Store(e)) => {
                // Not acknowledged: the node keeps the result and sends it again.
                tracing::error!(error = %e, "recording a result failed");
            }
            Err(e) => refused.push((lease, e.to_string())),
        }
    }
    {
        let mut sessions = shared.sessions.lock().await;
        if let Some(s) = sessions.get_mut(&node) {
            for l in done.iter().chain(refused.iter().map(|(l, _)| l)) {
                s.running.remove(l);
            }
            s.pace.record(done.len(), now);
        }
        for (n, record) in judged {
            if let Some(s) = sessions.get_mut(&n) {
                s.record = record;
            }
        }
    }
    let mut acked = done;
    acked.extend(refused.iter().map(|(l, _)| *l));
    if !acked.is_empty() {
        match acks.iter_mut().find(|(o, _)| o.same_channel(&outbox)) {
            Some((_, leases)) => leases.extend(acked),
            None => acks.push((outbox.clone(), acked)),
        }
    }
    if !refused.is_empty() {
        let detail = refused
            .iter()
            .map(|(l, why)| format!("lease {l}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        tracing::debug!(node = %node.short(), detail, "refused results");
        shared.rejections.count("not_leased");
        let _ = outbox.try_send(encode(
            &shared.identity,
            &DomainMessage::Reject {
                code: "not_leased".into(),
                message: detail,
            },
        ));
    }
}
