//! Where the store's statements run: PostgreSQL's connection pool, or SQLite's one
//! connection, held directly.
//!
//! SQLite has one writer, so the store keeps one connection, behind a mutex. Its statements
//! run on the thread that holds it ([`super::sql`]).
//!
//! [`Tx`] is a transaction over either: it rolls back when dropped without [`Tx::commit`]
//! (an error returned early, or a future cancelled mid-way).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::StoreError;
use super::script::Script;
use super::sql::{Exec, On, query};

/// The store's connections.
#[derive(Clone)]
pub(crate) enum Db {
    /// PostgreSQL: several connections.
    Pool(AnyPool),
    /// SQLite: its one connection.
    One(Arc<One>),
}

/// SQLite's connection.
pub(crate) struct One {
    conn: Arc<Mutex<rusqlite::Connection>>,
    /// A transaction was dropped open (an error or a cancelled future): roll it back before
    /// the connection's next use.
    abandoned: AtomicBool,
    /// Told after each commit: wakes the checkpointer, which ends when this is dropped.
    wrote: mpsc::SyncSender<()>,
}

/// How long the checkpointer lets writes gather before it copies them into the database
/// file.
const CHECKPOINT_AFTER: Duration = Duration::from_millis(100);

/// WAL pages after which the writer checkpoints by itself, should the checkpointer fall
/// behind (SQLite's default is 1,000; the checkpointer keeps the WAL far below this).
pub(crate) const WAL_BACKSTOP_PAGES: u32 = 20_000;

impl One {
    /// The store's connection, and a second one to the same file that checkpoints the WAL
    /// off the writer's path, on a thread of its own: a checkpoint copies the WAL's pages
    /// into the database file and syncs it, tens of milliseconds that the writer's commits
    /// (and everything waiting on the connection) used to wait for every 1,000 pages.
    pub fn new(
        conn: rusqlite::Connection,
        checkpointer: rusqlite::Connection,
    ) -> Result<Arc<Self>, StoreError> {
        let (wrote, told) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("stardust-wal".into())
            .spawn(move || checkpoints(&told, &checkpointer))
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok(Arc::new(Self {
            conn: Arc::new(Mutex::new(conn)),
            abandoned: AtomicBool::new(false),
            wrote,
        }))
    }

    fn wrote(&self) {
        // Full: a checkpoint is due already.
        let _ = self.wrote.try_send(());
    }
}

/// Checkpoints (PASSIVE: never blocks the writer) once writes have gathered for
/// [`CHECKPOINT_AFTER`]; ends when the store's connection is dropped.
fn checkpoints(told: &mpsc::Receiver<()>, conn: &rusqlite::Connection) {
    while told.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_AFTER);
        while told.try_recv().is_ok() {}
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "checkpointing the WAL failed; the writer checkpoints it later");
        }
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pool(p) => f.debug_tuple("Pool").field(p).finish(),
            Self::One(_) => f.write_str("One"),
        }
    }
}

/// A connection taken for one operation; back when dropped.
pub(crate) enum Conn {
    Pooled(PoolConnection<Any>),
    One(OwnedMutexGuard<rusqlite::Connection>, Arc<One>),
}

impl Exec for Conn {
    fn on(&mut self) -> On<'_> {
        match self {
            Self::Pooled(c) => On::Postgres(c),
            Self::One(c, _) => On::Sqlite(c),
        }
    }
}

/// A transaction: statements run on `&mut tx`. Dropped without [`Tx::commit`] or
/// [`Tx::rollback`], it rolls back: SQLite's before the connection's next use, a pooled
/// connection by closing it (the server rolls back).
pub(crate) struct Tx {
    conn: Conn,
    open: bool,
}

impl Exec for Tx {
    fn on(&mut self) -> On<'_> {
        self.conn.on()
    }
}

impl Tx {
    /// Commits.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        query("COMMIT").execute(&mut self.conn).await?;
        self.open = false;
        if let Conn::One(_, one) = &self.conn {
            one.wrote();
        }
        Ok(())
    }

    /// Runs `script`'s writes and commits.
    pub async fn commit_with(mut self, mut script: Script) -> Result<(), StoreError> {
        script.run(&mut self).await?;
        self.commit().await
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> Result<(), StoreError> {
        query("ROLLBACK").execute(&mut self.conn).await?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if self.open {
            match &mut self.conn {
                Conn::Pooled(c) => c.close_on_drop(),
                Conn::One(_, one) => one.abandoned.store(true, Ordering::Release),
            }
        }
    }
}

impl Db {
    /// A connection for one operation (waits for SQLite's while another holds it).
    pub async fn acquire(&self) -> Result<Conn, StoreError> {
        match self {
            Self::Pool(p) => Ok(Conn::Pooled(p.acquire().await?)),
            Self::One(one) => {
                let conn = one.conn.clone().lock_owned().await;
                // Its `BEGIN` or `COMMIT` may not have run (a cancelled future): then there
                // is nothing to roll back.
                if one.abandoned.swap(false, Ordering::AcqRel)
                    && !conn.is_autocommit()
                    && let Err(e) = conn.execute_batch("ROLLBACK")
                {
                    one.abandoned.store(true, Ordering::Release);
                    return Err(e.into());
                }
                Ok(Conn::One(conn, one.clone()))
            }
        }
    }

    /// Begins a transaction.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        // Open before `BEGIN` is sent: cancelled while it runs, the transaction still rolls
        // back.
        let mut tx = Tx {
            conn: self.acquire().await?,
            open: true,
        };
        // SQLite: the write lock from the start. Another process writing the same file
        // (`stardust ledger grant` beside a running domain) then makes this wait (the busy
        // timeout), where a deferred transaction that read first would fail at its first
        // write if the other committed meanwhile (SQLITE_BUSY_SNAPSHOT, not retried).
        let begin = match self {
            Self::One(_) => "BEGIN IMMEDIATE",
            Self::Pool(_) => "BEGIN",
        };
        query(begin).execute(&mut tx.conn).await?;
        Ok(tx)
    }
}
