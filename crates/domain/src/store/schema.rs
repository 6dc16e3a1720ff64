//! The schema, as a chain of migrations, one SQL text per backend for each step.
//!
//! Each step runs once, in a transaction, and bumps `schema_version`. Steps are never edited
//! after they ship: a change is a new step at the end of [`MIGRATIONS`].

/// One migration step.
pub struct Migration {
    /// Version reached after the step.
    pub version: i64,
    /// What the step does.
    pub name: &'static str,
    /// SQL for SQLite (statements separated by `;`).
    pub sqlite: &'static str,
    /// SQL for PostgreSQL.
    pub postgres: &'static str,
}

/// The migration chain, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "blobs, modules, jobs, tasks, leases, nodes",
        sqlite: r#"
CREATE TABLE blobs (
    id TEXT PRIMARY KEY,
    bytes BLOB NOT NULL,
    size INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE modules (
    id TEXT PRIMARY KEY,
    metered TEXT NOT NULL,
    author TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    module TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    redundancy INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    deadline_ms INTEGER,
    finished_ms INTEGER
);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    args TEXT NOT NULL,
    input TEXT NOT NULL,
    seed TEXT NOT NULL,
    state TEXT NOT NULL,
    replicas INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    output TEXT,
    fuel INTEGER,
    report TEXT,
    finished_ms INTEGER,
    UNIQUE (job_id, idx)
);
CREATE INDEX tasks_by_state ON tasks (state, job_id, idx);
CREATE TABLE leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id INTEGER NOT NULL REFERENCES tasks(id),
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    report TEXT,
    envelope BLOB,
    finished_ms INTEGER
);
CREATE INDEX leases_by_task ON leases (task_id, node);
CREATE INDEX leases_by_state ON leases (state, deadline_ms);
CREATE INDEX leases_by_node ON leases (node, state);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    hardware TEXT NOT NULL,
    tier TEXT NOT NULL,
    slots INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    agreed INTEGER NOT NULL DEFAULT 0,
    disagreed INTEGER NOT NULL DEFAULT 0
);
"#,
        postgres: r#"
CREATE TABLE blobs (
    id TEXT PRIMARY KEY,
    bytes BYTEA NOT NULL,
    size BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE modules (
    id TEXT PRIMARY KEY,
    metered TEXT NOT NULL,
    author TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    module TEXT NOT NULL,
    state TEXT NOT NULL,
    priority BIGINT NOT NULL,
    redundancy BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    deadline_ms BIGINT,
    finished_ms BIGINT
);
CREATE TABLE tasks (
    id BIGSERIAL PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES jobs(id),
    idx BIGINT NOT NULL,
    args TEXT NOT NULL,
    input TEXT NOT NULL,
    seed TEXT NOT NULL,
    state TEXT NOT NULL,
    replicas BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    reason TEXT,
    output TEXT,
    fuel BIGINT,
    report TEXT,
    finished_ms BIGINT,
    UNIQUE (job_id, idx)
);
CREATE INDEX tasks_by_state ON tasks (state, job_id, idx);
CREATE TABLE leases (
    id BIGSERIAL PRIMARY KEY,
    task_id BIGINT NOT NULL REFERENCES tasks(id),
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    report TEXT,
    envelope BYTEA,
    finished_ms BIGINT
);
CREATE INDEX leases_by_task ON leases (task_id, node);
CREATE INDEX leases_by_state ON leases (state, deadline_ms);
CREATE INDEX leases_by_node ON leases (node, state);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    hardware TEXT NOT NULL,
    tier TEXT NOT NULL,
    slots BIGINT NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    agreed BIGINT NOT NULL DEFAULT 0,
    disagreed BIGINT NOT NULL DEFAULT 0
);
"#,
    },
    Migration {
        version: 2,
        name: "ledger, balances, prices, lease kinds, reputation, uptime",
        sqlite: r#"
CREATE TABLE ledger (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    record BLOB NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE ledger_head (
    one INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    head TEXT NOT NULL,
    compute_micro_scu INTEGER NOT NULL
);
INSERT INTO ledger_head (one, seq, head, compute_micro_scu) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', 0);
CREATE TABLE balances (
    account TEXT PRIMARY KEY,
    amount INTEGER NOT NULL
);
ALTER TABLE jobs ADD COLUMN price INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN author TEXT;
ALTER TABLE jobs ADD COLUMN adaptive INTEGER NOT NULL DEFAULT 0;
ALTER TABLE leases ADD COLUMN kind TEXT NOT NULL DEFAULT 'replica';
ALTER TABLE nodes ADD COLUMN rep_good REAL NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN rep_bad REAL NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN streak INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN spot_passed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN spot_failed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN uptime_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN uptime_paid INTEGER NOT NULL DEFAULT 0
"#,
        postgres: r#"
CREATE TABLE ledger (
    seq BIGINT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    record BYTEA NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE TABLE ledger_head (
    one BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL,
    head TEXT NOT NULL,
    compute_micro_scu BIGINT NOT NULL
);
INSERT INTO ledger_head (one, seq, head, compute_micro_scu) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', 0);
CREATE TABLE balances (
    account TEXT PRIMARY KEY,
    amount BIGINT NOT NULL
);
ALTER TABLE jobs ADD COLUMN price BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN author TEXT;
ALTER TABLE jobs ADD COLUMN adaptive BIGINT NOT NULL DEFAULT 0;
ALTER TABLE leases ADD COLUMN kind TEXT NOT NULL DEFAULT 'replica';
ALTER TABLE nodes ADD COLUMN rep_good DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN rep_bad DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN streak BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN spot_passed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN spot_failed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN uptime_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN uptime_paid BIGINT NOT NULL DEFAULT 0
"#,
    },
    Migration {
        version: 3,
        name: "indexes for dispatch and spot checks; job terms apart from the spec",
        sqlite: r#"
CREATE INDEX jobs_by_state ON jobs (state, priority, id);
CREATE INDEX tasks_by_state_id ON tasks (state, id);
CREATE INDEX tasks_by_job_state ON tasks (job_id, state);
CREATE INDEX leases_by_task_state ON leases (task_id, state, id);
ALTER TABLE jobs ADD COLUMN terms TEXT
"#,
        postgres: r#"
CREATE INDEX jobs_by_state ON jobs (state, priority, id);
CREATE INDEX tasks_by_state_id ON tasks (state, id);
CREATE INDEX tasks_by_job_state ON tasks (job_id, state);
CREATE INDEX leases_by_task_state ON leases (task_id, state, id);
ALTER TABLE jobs ADD COLUMN terms TEXT
"#,
    },
    Migration {
        version: 4,
        name: "result frames kept once, named by the leases they carried; one lease index fewer",
        sqlite: r#"
CREATE TABLE frames (
    id TEXT PRIMARY KEY,
    bytes BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
ALTER TABLE leases ADD COLUMN frame TEXT;
DROP INDEX leases_by_task
"#,
        postgres: r#"
CREATE TABLE frames (
    id TEXT PRIMARY KEY,
    bytes BYTEA NOT NULL,
    created_ms BIGINT NOT NULL
);
ALTER TABLE leases ADD COLUMN frame TEXT;
DROP INDEX leases_by_task
"#,
    },
    Migration {
        version: 5,
        name: "partial indexes: pending tasks, active leases (a task or lease leaves them once instead of moving within them)",
        sqlite: r#"
DROP INDEX tasks_by_state;
CREATE INDEX tasks_pending ON tasks (job_id, idx) WHERE state = 'pending';
DROP INDEX leases_by_state;
CREATE INDEX leases_active_by_deadline ON leases (deadline_ms) WHERE state = 'active';
DROP INDEX leases_by_node;
CREATE INDEX leases_active_by_node ON leases (node) WHERE state = 'active'
"#,
        postgres: r#"
DROP INDEX tasks_by_state;
CREATE INDEX tasks_pending ON tasks (job_id, idx) WHERE state = 'pending';
DROP INDEX leases_by_state;
CREATE INDEX leases_active_by_deadline ON leases (deadline_ms) WHERE state = 'active';
DROP INDEX leases_by_node;
CREATE INDEX leases_active_by_node ON leases (node) WHERE state = 'active'
"#,
    },
    Migration {
        version: 6,
        name: "indexes that a task's or lease's change of state does not move: verified tasks partial, leases by task alone",
        sqlite: r#"
DROP INDEX tasks_by_state_id;
CREATE INDEX tasks_verified ON tasks (id) WHERE state = 'verified';
DROP INDEX leases_by_task_state;
CREATE INDEX leases_by_task ON leases (task_id)
"#,
        postgres: r#"
DROP INDEX tasks_by_state_id;
CREATE INDEX tasks_verified ON tasks (id) WHERE state = 'verified';
DROP INDEX leases_by_task_state;
CREATE INDEX leases_by_task ON leases (task_id)
"#,
    },
    Migration {
        version: 7,
        name: "task counts kept on their job (the index of tasks by job and state goes); a task no longer stored as running",
        sqlite: r#"
UPDATE tasks SET state = 'pending' WHERE state = 'running';
ALTER TABLE jobs ADD COLUMN n_open INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN n_verified INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN n_failed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN n_cancelled INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET
    n_open = (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'pending'),
    n_verified = (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'verified'),
    n_failed = (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'failed'),
    n_cancelled = (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'cancelled');
DROP INDEX tasks_by_job_state
"#,
        postgres: r#"
UPDATE tasks SET state = 'pending' WHERE state = 'running';
ALTER TABLE jobs ADD COLUMN n_open BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN n_verified BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN n_failed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN n_cancelled BIGINT NOT NULL DEFAULT 0;
UPDATE jobs SET
    n_open = (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'pending'),
    n_verified = (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'verified'),
    n_failed = (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'failed'),
    n_cancelled = (SELECT COUNT(*) FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'cancelled');
DROP INDEX tasks_by_job_state
"#,
    },
];
