-- The task store's tables as the last release before migrations created them (no alembic_version).
-- published_at and deliveries were added to tasks by that release when it opened the file.
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    filename TEXT NOT NULL,
    input TEXT NOT NULL,
    options TEXT NOT NULL,
    route TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    outputs TEXT NOT NULL DEFAULT '[]',
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks(created_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL REFERENCES tasks(id),
    ts REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_task ON events(task_id, id);
CREATE TABLE IF NOT EXISTS seen_nonces (nonce TEXT PRIMARY KEY, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS upload_usage (
    key TEXT NOT NULL,
    day INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (key, day)
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    host TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    capability TEXT NOT NULL,
    queues TEXT NOT NULL DEFAULT '[]',
    threads INTEGER NOT NULL DEFAULT 0,
    hardware TEXT NOT NULL DEFAULT '{}',
    models TEXT NOT NULL DEFAULT '[]',
    current TEXT NOT NULL DEFAULT '[]',
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    speed TEXT NOT NULL DEFAULT '{}',
    draining INTEGER NOT NULL DEFAULT 0,
    version TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT,
    first_seen REAL NOT NULL,
    joined_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    sent_at REAL,
    state_since REAL NOT NULL,
    booted_at REAL,
    beats INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS workers_state ON workers(state);
CREATE TABLE IF NOT EXISTS worker_processes (
    worker_id TEXT NOT NULL,
    session TEXT NOT NULL,
    host TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    capability TEXT NOT NULL,
    queues TEXT NOT NULL DEFAULT '[]',
    threads INTEGER NOT NULL DEFAULT 0,
    hardware TEXT NOT NULL DEFAULT '{}',
    models TEXT NOT NULL DEFAULT '[]',
    current TEXT NOT NULL DEFAULT '[]',
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    speed TEXT NOT NULL DEFAULT '{}',
    draining INTEGER NOT NULL DEFAULT 0,
    version TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT,
    joined_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    sent_at REAL,
    state_since REAL NOT NULL,
    booted_at REAL,
    beats INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (worker_id, session)
);
CREATE TABLE IF NOT EXISTS worker_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_id TEXT NOT NULL,
    ts REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS worker_events_worker ON worker_events(worker_id, id);
CREATE TABLE IF NOT EXISTS refused_senders (
    worker TEXT PRIMARY KEY,
    refused INTEGER NOT NULL DEFAULT 0,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    last_reason TEXT NOT NULL,
    last_report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queue_liveness (
    queue TEXT PRIMARY KEY,
    down_since REAL
);
CREATE TABLE IF NOT EXISTS worker_tokens (
    id TEXT PRIMARY KEY,
    worker TEXT NOT NULL,
    capability TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL,
    broker_user TEXT,
    last_used_at REAL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    digest TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS server_parts (
    name TEXT PRIMARY KEY,
    at REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
ALTER TABLE tasks ADD COLUMN published_at REAL;
ALTER TABLE tasks ADD COLUMN deliveries INTEGER NOT NULL DEFAULT 0;
