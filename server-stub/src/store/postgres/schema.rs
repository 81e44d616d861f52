//! The PostgreSQL schema, versioned: each entry of [`MIGRATIONS`] moves the database one
//! version up, applied at start inside one transaction under an advisory lock (replicas
//! starting together migrate once). A database newer than this binary is refused, naming both
//! versions: an older replica must not write a schema it does not know.

use tokio_postgres::Client;

use super::conn::Database;
use crate::store::{Result, StoreError};

/// Advisory lock key held while migrating ("es-mig" in ASCII).
const MIGRATE_LOCK: i64 = 0x0000_6573_2d6d_6967;

/// Version N is reached by applying `MIGRATIONS[N - 1]`. Append only; never edit a released one.
pub const MIGRATIONS: &[&str] = &[
    // 1: jobs, events, audit, and the leader row (epoch fencing, see leader.rs).
    "
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    role INTEGER NOT NULL,
    selector TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    spec BYTEA NOT NULL,
    state INTEGER NOT NULL,
    attempt BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    agent TEXT NOT NULL,
    timeout_ms BIGINT NOT NULL,
    cancel_requested BOOLEAN NOT NULL,
    result BYTEA,
    created_at_us BIGINT NOT NULL,
    started_at_us BIGINT NOT NULL,
    finished_at_us BIGINT NOT NULL,
    submitted_by TEXT NOT NULL
);
CREATE INDEX jobs_state ON jobs(state, created_at_us);
CREATE INDEX jobs_sandbox ON jobs(sandbox_id, created_at_us);
CREATE INDEX jobs_list ON jobs(created_at_us DESC, id DESC);
CREATE INDEX jobs_finished ON jobs(finished_at_us) WHERE finished_at_us > 0;
CREATE TABLE events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    at_us BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    at_us BIGINT NOT NULL,
    sandbox_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_job ON audit(job_id, id);
CREATE INDEX audit_sandbox ON audit(sandbox_id, id);
CREATE INDEX audit_at ON audit(at_us);
-- One row: the epoch of the current leader, raised at each takeover and checked by every
-- write transaction (FOR SHARE, so a takeover waits for a write in flight and every later
-- write of the old leader sees the new epoch and is refused).
CREATE TABLE leader (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    address TEXT NOT NULL,
    since TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO leader (epoch, holder, address) VALUES (0, '', '');
",
    // 2: fewer index entries per job write (measured with es-bench: each job is inserted,
    // updated twice and gets three events and three audit entries, so every index and check
    // is paid about ten times per job), and the write fence as one statement.
    "
-- Events are deleted with their job by the purge itself (writer.rs): the per-row foreign key
-- check cost as much as the insert.
ALTER TABLE events DROP CONSTRAINT events_job_id_fkey;
-- Ids and keys compare byte by byte: under the database's collation every comparison of an
-- index insert went through the locale (strcoll).
ALTER TABLE jobs ALTER COLUMN id TYPE TEXT COLLATE \"C\",
  ALTER COLUMN idempotency_key TYPE TEXT COLLATE \"C\",
  ALTER COLUMN sandbox_id TYPE TEXT COLLATE \"C\";
ALTER TABLE events ALTER COLUMN job_id TYPE TEXT COLLATE \"C\";
ALTER TABLE audit ALTER COLUMN job_id TYPE TEXT COLLATE \"C\",
  ALTER COLUMN sandbox_id TYPE TEXT COLLATE \"C\";
-- Only unfinished (queued and running) jobs are looked up as such (recovery at takeover), so
-- only they are indexed, by a column the lease leaves alone: with room on the page
-- (fillfactor) the lease's update is a HOT update, adding no index entry at all, and the final
-- one adds none here.
DROP INDEX jobs_state;
CREATE INDEX jobs_live ON jobs (created_at_us, id) WHERE finished_at_us = 0;
ALTER TABLE jobs SET (fillfactor = 50);
-- The purge finds finished jobs through jobs_list (a job finished before a time was created
-- before it).
DROP INDEX jobs_finished;
-- Most jobs have no idempotency key: they need no entry.
ALTER TABLE jobs DROP CONSTRAINT jobs_idempotency_key_key;
CREATE UNIQUE INDEX jobs_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Entries are appended in time order: a block range index serves the purge for almost nothing.
DROP INDEX audit_at;
CREATE INDEX audit_at ON audit USING brin (at_us);
-- The fence of every write group: fails the transaction itself when another server leads, so
-- a group is sent in one round trip (BEGIN, fence, statements, COMMIT) and commits only if
-- the epoch is still the writer's. Read FOR SHARE: a takeover waits for a group in flight.
CREATE FUNCTION es_fence(mine BIGINT) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
  now_epoch BIGINT;
BEGIN
  SELECT epoch INTO now_epoch FROM leader FOR SHARE;
  IF now_epoch IS DISTINCT FROM mine THEN
    RAISE EXCEPTION 'another es-server leads the job store now (leader epoch %, this server''s %)',
      now_epoch, mine USING ERRCODE = 'ES001';
  END IF;
  RETURN now_epoch;
END
$$;
",
];

/// The SQLSTATE `es_fence` raises when another server leads.
pub const DEPOSED: &str = "ES001";

/// The version this binary writes.
pub fn current() -> i32 {
    MIGRATIONS.len() as i32
}

/// Brings the database to [`current`], or refuses a newer one. Answers (from, to).
pub async fn migrate(db: &Database, client: &mut Client) -> Result<(i32, i32)> {
    let err = |e| db.error(e);
    let tx = client.transaction().await.map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS es_schema (version INTEGER NOT NULL)")
        .await
        .map_err(err)?;
    let from: i32 = match tx
        .query_opt("SELECT version FROM es_schema", &[])
        .await
        .map_err(err)?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO es_schema (version) VALUES (0)", &[])
                .await
                .map_err(err)?;
            0
        }
    };
    if from > current() {
        return Err(StoreError::Config {
            db: db.shown().to_owned(),
            detail: format!(
                "the database's schema is version {from}, newer than this es-server knows ({}): upgrade this es-server to the release the other replicas run",
                current()
            ),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        log::info!(
            "job store {}: migrating the schema to version {}",
            db.shown(),
            i + 1
        );
        tx.batch_execute(sql).await.map_err(err)?;
    }
    tx.execute("UPDATE es_schema SET version = $1", &[&current()])
        .await
        .map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok((from, current()))
}
