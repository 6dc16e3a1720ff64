//! The VFS against real SQLite files: commits reach the file in one write each and without a
//! sync, survive their process's crash, and large transactions spill and read back.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use rusqlite::{Connection, OpenFlags};
use stardust_walvfs::{MAX_GATHERED, NAME, WAL_SYNCS, WAL_WRITES, register};

/// A connection through the VFS, set up as the domain's store sets up its own.
fn open(path: &Path) -> Connection {
    register().expect("register the VFS");
    let c = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), NAME).expect("open");
    let mode: String = c
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .expect("WAL");
    assert_eq!(mode, "wal");
    c.execute_batch(
        "PRAGMA synchronous = FULL; PRAGMA checkpoint_fullfsync = ON; PRAGMA wal_autocheckpoint = 0;",
    )
    .expect("pragmas");
    c
}

/// A plain connection (the platform's VFS), as the checkpointer or another process opens it.
fn plain(path: &Path) -> Connection {
    Connection::open(path).expect("open plainly")
}

fn count(c: &Connection) -> i64 {
    c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
        .expect("count")
}

/// The counters are process-wide: under `cargo test` (threads, where nextest runs a process
/// per test) the tests of this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn a_commit_is_one_write_and_no_sync_and_a_checkpoint_syncs() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let c = open(&path);
    c.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB);
         CREATE INDEX t_v ON t (v);",
    )
    .expect("schema");
    let writes = WAL_WRITES.load(Ordering::Relaxed);
    let syncs = WAL_SYNCS.load(Ordering::Relaxed);
    for i in 0..20 {
        // Each commit dirties several pages: the table, two indexes, overflow.
        c.execute(
            "INSERT INTO t (k, v) VALUES (?1, ?2)",
            (format!("key {i}"), vec![i as u8; 6000]),
        )
        .expect("insert");
    }
    let wrote = WAL_WRITES.load(Ordering::Relaxed) - writes;
    assert_eq!(wrote, 20, "one write per commit, however many pages it has");
    assert_eq!(
        WAL_SYNCS.load(Ordering::Relaxed),
        syncs,
        "a commit syncs nothing (synchronous = NORMAL's promise)"
    );
    let (busy, log, done): (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(FULL)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("checkpoint");
    assert_eq!((busy, log), (0, done), "the whole log checkpointed");
    assert!(log > 40, "the log held the 20 commits' frames: {log}");
    assert!(
        WAL_SYNCS.load(Ordering::Relaxed) > syncs,
        "a checkpoint syncs the log before copying it into the database"
    );
    assert_eq!(count(&plain(&path)), 20);
}

#[test]
fn committed_transactions_are_in_the_file_before_the_commit_returns() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let c = open(&path);
    c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        .expect("schema");
    c.execute("INSERT INTO t (v) VALUES ('one')", [])
        .expect("insert");
    // Another connection, through the platform's VFS, reads the log file itself.
    let other = plain(&path);
    assert_eq!(count(&other), 1);
    c.execute("INSERT INTO t (v) VALUES ('two')", [])
        .expect("insert");
    assert_eq!(count(&other), 2, "the second commit is in the file too");
    // A transaction in progress is not visible (nor needed) anywhere else.
    c.execute_batch("BEGIN; INSERT INTO t (v) VALUES ('three');")
        .expect("open a transaction");
    assert_eq!(count(&other), 2);
    c.execute_batch("COMMIT").expect("commit");
    assert_eq!(count(&other), 3);
}

/// Run by the next test in a process of its own, which it crashes.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os("STARDUST_WALVFS_CRASH_DB") else {
        return;
    };
    let c = open(Path::new(&path));
    c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        .expect("schema");
    for i in 0..50u8 {
        c.execute("INSERT INTO t (v) VALUES (?1)", [vec![i; 3000]])
            .expect("insert");
    }
    // Uncommitted: must not survive.
    c.execute_batch("BEGIN; INSERT INTO t (v) VALUES (x'00');")
        .expect("open a transaction");
    std::process::abort();
}

#[test]
fn commits_survive_the_crash_of_their_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_child", "--nocapture"])
        .env("STARDUST_WALVFS_CRASH_DB", &path)
        .status()
        .expect("run the child");
    assert!(!status.success(), "the child aborts: {status}");
    let c = plain(&path);
    assert_eq!(count(&c), 50, "every commit, and nothing uncommitted");
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity");
    assert_eq!(ok, "ok");
}

#[test]
fn a_transaction_larger_than_the_gathering_spills_and_reads_back() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let c = open(&path);
    // A tiny page cache: the transaction spills its pages into the log and reads them back.
    c.execute_batch(
        "PRAGMA cache_size = 10;
         CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB);",
    )
    .expect("schema");
    let rows = 3 * MAX_GATHERED / 4000;
    c.execute_batch("BEGIN").expect("begin");
    for i in 0..rows {
        c.execute(
            "INSERT INTO t (k, v) VALUES (?1, ?2)",
            (
                format!("{:08}", (i * 7919) % rows),
                vec![(i % 251) as u8; 4000],
            ),
        )
        .expect("insert");
    }
    // Read back inside the transaction, across spilled pages.
    let sum: i64 = c
        .query_row("SELECT SUM(length(v)) FROM t", [], |r| r.get(0))
        .expect("sum");
    assert_eq!(sum, (rows * 4000) as i64);
    c.execute_batch("COMMIT").expect("commit");
    let other = plain(&path);
    assert_eq!(count(&other), rows as i64);
    let ok: String = other
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity");
    assert_eq!(ok, "ok");
    // And once checkpointed into the database file.
    other
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    drop(other);
    drop(c);
    assert_eq!(count(&plain(&path)), rows as i64);
}
