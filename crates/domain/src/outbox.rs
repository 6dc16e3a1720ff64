//! A session's outbox: the frames the domain sends one node, in the order they were given.
//!
//! Frames are queued (bounded) and a writer task of the session writes them to its link
//! ([`Queue::write`]). A frame that is on a request's path (a new job's assignment) may be
//! written at once instead ([`Outbox::write_now`]): when the link is idle and nothing is
//! queued, the sender takes the link and writes the frame itself, which saves waking the
//! writer task (40–100 µs before the frame left: the woken writer often ran on the domain's
//! other worker thread, which waited for the core they share). Only a node's own WebSocket
//! is written so: a relayed session's link is its gateway's, shared with other nodes'
//! frames, and a submission does not wait on it.
//!
//! Order: a frame counts as queued from before it enters the queue until the writer has
//! written it, and the writer writes holding the link. A sender that holds the link and sees
//! nothing queued therefore writes after every frame given before it; a frame given
//! meanwhile waits for the link.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::http::session::FrameTx;

/// A write of one frame to a link, under the link's lock; false when the link is gone.
pub(crate) type Write = Pin<Box<dyn Future<Output = bool> + Send>>;

/// A session's link, shared by its writer task and senders writing at once; once closed,
/// nothing more is written to it (a relay may give the session's number to another node).
pub(crate) struct Link<S> {
    sink: S,
    closed: bool,
}

impl<S: FrameTx> Link<S> {
    pub fn new(sink: S) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            sink,
            closed: false,
        }))
    }

    /// Writes one frame; false when the link is gone or closed.
    pub async fn send(&mut self, frame: Vec<u8>) -> bool {
        !self.closed && self.sink.send(frame).await
    }

    /// Ends the link towards the node; later writes fail.
    pub async fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.sink.close().await;
        }
    }
}

/// No link (tests).
#[cfg(test)]
pub(crate) struct NoLink;

#[cfg(test)]
impl FrameTx for NoLink {
    async fn send(&mut self, _: Vec<u8>) -> bool {
        false
    }

    async fn close(&mut self) {}
}

/// A link taken for one write at once.
trait Taken: Send {
    fn write(self: Box<Self>, frame: Vec<u8>) -> Write;
}

impl<S: FrameTx> Taken for OwnedMutexGuard<Link<S>> {
    fn write(mut self: Box<Self>, frame: Vec<u8>) -> Write {
        Box::pin(async move { self.send(frame).await })
    }
}

/// A link that may be taken without waiting.
trait Direct: Send + Sync {
    fn take(self: Arc<Self>) -> Option<Box<dyn Taken>>;
}

impl<S: FrameTx> Direct for Mutex<Link<S>> {
    fn take(self: Arc<Self>) -> Option<Box<dyn Taken>> {
        self.try_lock_owned()
            .ok()
            .map(|g| Box::new(g) as Box<dyn Taken>)
    }
}

/// The sending side, cloned to whatever sends the node frames.
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Vec<u8>>,
    /// Frames given to the queue and not yet written (or dropped unwritten).
    queued: Arc<AtomicUsize>,
    direct: Option<Arc<dyn Direct>>,
}

/// The writer task's side.
pub(crate) struct Queue {
    rx: mpsc::Receiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

impl Outbox {
    /// An outbox of `capacity` queued frames; frames may be written at once to `link` when
    /// it is given.
    pub fn new<S: FrameTx>(capacity: usize, link: Option<Arc<Mutex<Link<S>>>>) -> (Self, Queue) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let direct = link.map(|l| l as Arc<dyn Direct>);
        (
            Self {
                tx,
                queued: queued.clone(),
                direct,
            },
            Queue { rx, queued },
        )
    }

    /// An outbox without a link: every frame is queued (tests read the queue).
    #[cfg(test)]
    pub fn detached(capacity: usize) -> (Self, Queue) {
        Self::new::<NoLink>(capacity, None)
    }

    /// Queues a frame; an error when the queue is full or its writer gone.
    pub fn try_send(&self, frame: Vec<u8>) -> Result<(), TrySendError<Vec<u8>>> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.try_send(frame);
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// Whether both go to the same session.
    pub fn same_channel(&self, other: &Self) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// The frame's write, to await, when the link is idle and nothing is queued before it;
    /// the frame back otherwise (queue it). Until the write is awaited or dropped, the link
    /// is held: frames given meanwhile are written after it.
    pub fn write_now(&self, frame: Vec<u8>) -> Result<Write, Vec<u8>> {
        let Some(direct) = &self.direct else {
            return Err(frame);
        };
        if self.queued.load(Ordering::Acquire) != 0 || self.tx.is_closed() {
            return Err(frame);
        }
        let Some(taken) = direct.clone().take() else {
            return Err(frame);
        };
        // Held now: the writer writes nothing meanwhile, so what is counted is still to come.
        if self.queued.load(Ordering::Acquire) != 0 {
            return Err(frame);
        }
        Ok(taken.write(frame))
    }
}

impl Queue {
    /// Writes the queued frames to `link` in order, until every [`Outbox`] is gone or the
    /// link fails.
    pub async fn write<S: FrameTx>(mut self, link: Arc<Mutex<Link<S>>>) {
        while let Some(frame) = self.rx.recv().await {
            let mut held = link.lock().await;
            let ok = held.send(frame).await;
            // Still held: a sender writing at once sees this frame as written only now.
            self.queued.fetch_sub(1, Ordering::AcqRel);
            drop(held);
            if !ok {
                break;
            }
        }
    }

    /// The next queued frame (tests read what a session was sent).
    #[cfg(test)]
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let frame = self.rx.recv().await;
        if frame.is_some() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link that records what was written, and can be made to wait.
    #[derive(Clone, Default)]
    struct Recorder {
        written: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl FrameTx for Recorder {
        async fn send(&mut self, frame: Vec<u8>) -> bool {
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("open").forget();
            }
            self.written.lock().expect("lock").push(frame);
            true
        }

        async fn close(&mut self) {}
    }

    fn written(r: &Recorder) -> Vec<u8> {
        r.written
            .lock()
            .expect("lock")
            .iter()
            .map(|f| f[0])
            .collect()
    }

    #[tokio::test]
    async fn an_idle_link_is_written_at_once_and_order_is_kept() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let rec = Recorder {
            gate: Some(gate.clone()),
            ..Default::default()
        };
        let link = Link::new(rec.clone());
        let (outbox, queue) = Outbox::new(8, Some(link.clone()));
        let writer = tokio::spawn(queue.write(link.clone()));

        // Idle: written by the sender itself.
        gate.add_permits(1);
        let w = outbox.write_now(vec![1]).expect("idle");
        assert!(w.await);
        assert_eq!(written(&rec), [1]);

        // A queued frame not yet written (its write waits at the gate): a frame after it is
        // not written at once, since it would overtake.
        outbox.try_send(vec![2]).expect("room");
        tokio::task::yield_now().await;
        let back = outbox.write_now(vec![3]).map(|_| ()).expect_err("busy");
        assert_eq!(back, [3]);
        outbox.try_send(back).expect("room");
        gate.add_permits(2);
        // Both written by the writer, in order; then idle again.
        while written(&rec).len() < 3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(written(&rec), [1, 2, 3]);
        tokio::task::yield_now().await;
        gate.add_permits(1);
        assert!(outbox.write_now(vec![4]).expect("idle again").await);

        // While a frame is being written at once, what is queued waits for the link.
        let w = outbox.write_now(vec![5]).expect("idle");
        outbox.try_send(vec![6]).expect("room");
        assert!(outbox.write_now(vec![7]).is_err(), "the link is held");
        gate.add_permits(2);
        assert!(w.await);
        while written(&rec).len() < 6 {
            tokio::task::yield_now().await;
        }
        assert_eq!(written(&rec), [1, 2, 3, 4, 5, 6]);

        // Closed: nothing more is written, at once or queued.
        link.lock().await.close().await;
        gate.add_permits(8);
        assert!(!outbox.write_now(vec![8]).expect("idle").await);
        drop(outbox);
        writer.await.expect("writer");
        assert_eq!(written(&rec), [1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn without_a_link_every_frame_is_queued() {
        let (outbox, mut queue) = Outbox::detached(2);
        assert_eq!(
            outbox.write_now(vec![1]).map(|_| ()).expect_err("no link"),
            [1]
        );
        outbox.try_send(vec![1]).expect("room");
        outbox.try_send(vec![2]).expect("room");
        assert!(matches!(
            outbox.try_send(vec![3]),
            Err(TrySendError::Full(_))
        ));
        assert_eq!(queue.recv().await, Some(vec![1]));
        assert_eq!(queue.recv().await, Some(vec![2]));
        drop(queue);
        assert!(matches!(
            outbox.try_send(vec![4]),
            Err(TrySendError::Closed(_))
        ));
    }
}
