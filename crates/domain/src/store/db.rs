//! Where the store's statements run: PostgreSQL's connection pool, or SQLite's one
//! connection held directly.
//!
//! SQLite has one writer, so the store keeps one connection. Behind sqlx's pool, every use of
//! it cost a checkout, and its return a spawned task that pings the connection before the
//! next user may take it: three hops to the connection's thread where one statement needs
//! one. Holding the connection behind a mutex costs a lock.
//!
//! [`Tx`] is a transaction over either: like sqlx's `Transaction`, it dereferences to the
//! connection and rolls back when dropped without [`Tx::commit`] (an error returned early,
//! or a future cancelled mid-way).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use super::script::Script;

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
    conn: Arc<Mutex<AnyConnection>>,
    /// A transaction was dropped open (an error or a cancelled future): roll it back before
    /// the connection's next use.
    abandoned: AtomicBool,
    /// Told after each commit (and when this is dropped): wakes the checkpointer.
    wrote: Arc<Notify>,
}

/// How long the checkpointer lets writes gather before it copies them into the database
/// file.
const CHECKPOINT_AFTER: Duration = Duration::from_millis(100);

/// WAL pages after which the writer checkpoints by itself, should the checkpointer fall
/// behind (SQLite's default is 1,000; the checkpointer keeps the WAL far below this).
pub(crate) const WAL_BACKSTOP_PAGES: u32 = 20_000;

impl One {
    /// The store's connection, and a second one to the same file that checkpoints the WAL
    /// off the writer's path: a checkpoint copies the WAL's pages into the database file and
    /// syncs it, tens of milliseconds that the writer's commits (and everything waiting on
    /// the connection) used to wait for every 1,000 pages.
    pub fn new(conn: AnyConnection, checkpointer: AnyConnection) -> Arc<Self> {
        let one = Arc::new(Self {
            conn: Arc::new(Mutex::new(conn)),
            abandoned: AtomicBool::new(false),
            wrote: Arc::new(Notify::new()),
        });
        tokio::spawn(checkpoints(
            Arc::downgrade(&one),
            one.wrote.clone(),
            checkpointer,
        ));
        one
    }
}

impl Drop for One {
    fn drop(&mut self) {
        self.wrote.notify_one();
    }
}

/// Checkpoints (PASSIVE: never blocks the writer) once writes have gathered for
/// [`CHECKPOINT_AFTER`]; ends when the store's connection is dropped.
async fn checkpoints(one: Weak<One>, wrote: Arc<Notify>, mut conn: AnyConnection) {
    loop {
        wrote.notified().await;
        tokio::time::sleep(CHECKPOINT_AFTER).await;
        if one.strong_count() == 0 {
            break;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "checkpointing the WAL failed; the writer checkpoints it later");
        }
    }
    let _ = sqlx::Connection::close(conn).await;
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
    One(OwnedMutexGuard<AnyConnection>, Arc<One>),
}

impl Deref for Conn {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        match self {
            Self::Pooled(c) => c,
            Self::One(c, _) => c,
        }
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self {
            Self::Pooled(c) => c,
            Self::One(c, _) => c,
        }
    }
}

/// A transaction: statements run on `&mut *tx`. Dropped without [`Tx::commit`] or
/// [`Tx::rollback`], it rolls back: SQLite's before the connection's next use, a pooled
/// connection by closing it (the server rolls back).
pub(crate) struct Tx {
    conn: Conn,
    open: bool,
}

impl Tx {
    /// Commits.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        self.open = false;
        if let Conn::One(_, one) = &self.conn {
            one.wrote.notify_one();
        }
        Ok(())
    }

    /// Runs `script`'s writes and commits: on SQLite in one trip when its last statements
    /// were joined.
    pub async fn commit_with(mut self, mut script: Script) -> Result<(), sqlx::Error> {
        if !script.append_commit() {
            script.run(&mut self).await?;
            return self.commit().await;
        }
        script.run(&mut self).await?;
        self.open = false;
        if let Conn::One(_, one) = &self.conn {
            one.wrote.notify_one();
        }
        Ok(())
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("ROLLBACK").execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }
}

impl Deref for Tx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
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
    pub async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        match self {
            Self::Pool(p) => Ok(Conn::Pooled(p.acquire().await?)),
            Self::One(one) => {
                let mut conn = one.conn.clone().lock_owned().await;
                if one.abandoned.swap(false, Ordering::AcqRel) {
                    // Its `BEGIN` or `COMMIT` may not have run (a cancelled future): then
                    // there is nothing to roll back, and SQLite says so.
                    if let Err(e) = sqlx::query("ROLLBACK").execute(&mut *conn).await
                        && !e.to_string().contains("no transaction is active")
                    {
                        one.abandoned.store(true, Ordering::Release);
                        return Err(e);
                    }
                }
                Ok(Conn::One(conn, one.clone()))
            }
        }
    }

    /// Begins a transaction.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
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
        sqlx::query(begin).execute(&mut *tx.conn).await?;
        Ok(tx)
    }
}
