//! The job store on one SQLite file in WAL mode.
//!
//! All writes go through a single writer thread that commits in groups: it takes every operation
//! waiting in its queue, applies them in one transaction, commits, and only then answers each
//! caller. With `synchronous=NORMAL` (the default) a commit survives a process crash;
//! `synchronous=FULL` (`--db-sync full`) also survives power loss at the cost of an fsync per
//! group. Reads use their own connection (WAL lets readers run beside the writer).

mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use es_proto::v1::{AuditEntry, Job, JobEvent, JobState};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::ops::Op;
use writer::{checkpointer, writer_loop};

use super::{
    decode_event, unscoped_key, JobStore, ListFilter, Purged, RawJob, Result, SandboxJob, Store,
    StoreError, StoreFuture, Sync,
};

/// The store's threads, joined by [`JobStore::shutdown`].
struct Threads {
    writer: std::thread::JoinHandle<()>,
    checkpoint: std::thread::JoinHandle<()>,
    stop_checkpoints: Arc<std::sync::atomic::AtomicBool>,
}

/// The SQLite store; share it as a [`Store`].
pub struct SqliteStore {
    tx: std::sync::mpsc::Sender<Op>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
    threads: Mutex<Option<Threads>>,
}

/// Opens (creating if needed) the store at `path` and starts its writer thread.
pub fn open(path: &Path, sync: Sync) -> Result<Store> {
    Ok(Arc::new(SqliteStore::open(path, sync)?))
}

fn connect(path: &Path, sync: Sync) -> Result<Connection> {
    let err = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    let sync = match sync {
        Sync::Normal => "NORMAL",
        Sync::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync).map_err(err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(err)?;
    // 64 MiB page cache; checkpoints run on their own thread (see `checkpointer`), so the
    // writer never stalls copying the WAL back into the database.
    conn.pragma_update(None, "cache_size", -65536)
        .map_err(err)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(err)?;
    Ok(conn)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    role INTEGER NOT NULL,
    selector TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    spec BLOB NOT NULL,
    state INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    agent TEXT NOT NULL,
    timeout_ms INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL,
    result BLOB,
    created_at_us INTEGER NOT NULL,
    started_at_us INTEGER NOT NULL,
    finished_at_us INTEGER NOT NULL,
    submitted_by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at_us);
CREATE INDEX IF NOT EXISTS jobs_sandbox ON jobs(sandbox_id, created_at_us);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at_us) WHERE finished_at_us > 0;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    at_us INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
-- The audit trail: append-only, kept apart from jobs and events. Retention removes an entry
-- once it is older than the cutoff and its job is gone (see Store::purge).
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_us INTEGER NOT NULL,
    sandbox_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_job ON audit(job_id, id);
CREATE INDEX IF NOT EXISTS audit_sandbox ON audit(sandbox_id, id);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at_us);
";

/// Creates the store file readable by its owner only (it holds secret variables of queued jobs);
/// SQLite gives the WAL and shared-memory files the same mode. An existing file that others may
/// read is reported, not changed (the operator may have reasons).
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| StoreError::Sqlite {
        path: path.to_owned(),
        source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
    };
    match std::fs::metadata(path) {
        Ok(m) => {
            if m.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "job store {} is readable by others (mode {:o}); it holds secret variables: chmod 600 it",
                    path.display(),
                    m.permissions().mode() & 0o777
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map(drop)
            .map_err(io),
        Err(e) => Err(io(e)),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and starts its writer and checkpoint
    /// threads.
    pub fn open(path: &Path, sync: Sync) -> Result<SqliteStore> {
        create_private(path)?;
        let writer = connect(path, sync)?;
        writer
            .execute_batch(SCHEMA)
            .map_err(|source| StoreError::Sqlite {
                path: path.to_owned(),
                source,
            })?;
        let reader = connect(path, sync)?;
        let checkpoints = connect(path, sync)?;
        let cpath = path.to_owned();
        let stop_checkpoints = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = stop_checkpoints.clone();
        let checkpoint = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpointer(checkpoints, cpath, stop))
            .expect("spawn store checkpoint thread");
        let (tx, rx) = std::sync::mpsc::channel();
        let wpath = path.to_owned();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(writer, rx, wpath))
            .expect("spawn store writer thread");
        Ok(SqliteStore {
            tx,
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_owned(),
            threads: Mutex::new(Some(Threads {
                writer,
                checkpoint,
                stop_checkpoints,
            })),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a write to the writer thread now; the future resolves once it is committed.
    fn write<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Op,
    ) -> StoreFuture<T> {
        let (tx, rx) = oneshot::channel();
        let sent = self.tx.send(make(tx));
        Box::pin(async move {
            sent.map_err(|_| StoreError::WriterGone)?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        })
    }

    /// Runs a read on the reader connection, off the async runtime.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static {
        let reader = self.reader.clone();
        let path = self.path.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
                f(&conn).map_err(|source| StoreError::Sqlite { path, source })
            })
            .await
            .map_err(|_| StoreError::WriterGone)?
        }
    }
}

impl JobStore for SqliteStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn insert(&self, job: Job, events: Vec<JobEvent>) -> StoreFuture<(Job, bool)> {
        self.write(|tx| Op::Insert(Box::new(job), events, tx))
    }

    fn update(&self, job: &Job, events: Vec<JobEvent>) -> StoreFuture<()> {
        self.write(|tx| Op::Update(Box::new(job.clone()), events, tx))
    }

    fn events(&self, events: Vec<JobEvent>) -> StoreFuture<()> {
        self.write(|tx| Op::Events(events, tx))
    }

    fn audit(&self, entries: Vec<AuditEntry>) -> StoreFuture<()> {
        self.write(|tx| Op::Audit(entries, tx))
    }

    fn purge(&self, before_us: i64, batch: u32) -> StoreFuture<Purged> {
        self.write(|tx| Op::Purge {
            before: before_us,
            batch,
            tx,
        })
    }

    fn shutdown(&self) {
        let Some(t) = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let _ = self.tx.send(Op::Stop);
        t.stop_checkpoints
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if t.writer.join().is_err() {
            log::error!(
                "job store {}: the writer thread panicked",
                self.path.display()
            );
        }
        let _ = t.checkpoint.join();
    }

    fn threads_running(&self) -> bool {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.writer.is_finished() || !t.checkpoint.is_finished())
    }

    fn audit_trail(
        &self,
        sandbox_id: Option<String>,
        job_id: Option<String>,
        after_id: u64,
        limit: u32,
    ) -> StoreFuture<Vec<AuditEntry>> {
        Box::pin(self.read(move |c| {
            let mut sql = "SELECT id, at_us, sandbox_id, job_id, actor, action, detail FROM audit WHERE id > ?1".to_owned();
            let mut args: Vec<rusqlite::types::Value> = vec![(after_id as i64).into()];
            if let Some(sb) = sandbox_id {
                args.push(sb.into());
                sql.push_str(&format!(" AND sandbox_id = ?{}", args.len()));
            }
            if let Some(j) = job_id {
                args.push(j.into());
                sql.push_str(&format!(" AND job_id = ?{}", args.len()));
            }
            args.push((limit as i64).into());
            sql.push_str(&format!(" ORDER BY id LIMIT ?{}", args.len()));
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
                Ok(AuditEntry {
                    id: r.get::<_, i64>(0)? as u64,
                    at_us: r.get(1)?,
                    sandbox_id: r.get(2)?,
                    job_id: r.get(3)?,
                    actor: r.get(4)?,
                    action: r.get(5)?,
                    detail_json: r.get(6)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        }))
    }

    fn get(&self, id: &str) -> StoreFuture<Option<Job>> {
        let id = id.to_owned();
        let read_row = self.read(move |c| {
            c.query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [&id],
                row_to_raw,
            )
            .optional()
        });
        Box::pin(async move {
            let row = read_row.await?;
            row.map(RawJob::decode).transpose()
        })
    }

    /// Jobs matching the filters, newest first.
    fn list(&self, filter: ListFilter) -> StoreFuture<Vec<Job>> {
        let read_rows = self.read(move |c| {
            let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1=1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            if !filter.states.is_empty() {
                let marks: Vec<String> = filter
                    .states
                    .iter()
                    .map(|s| {
                        args.push((*s as i64).into());
                        format!("?{}", args.len())
                    })
                    .collect();
                sql.push_str(&format!(" AND state IN ({})", marks.join(",")));
            }
            if let Some(role) = filter.role {
                args.push((role as i64).into());
                sql.push_str(&format!(" AND role = ?{}", args.len()));
            }
            if let Some(sb) = filter.sandbox_id {
                args.push(sb.into());
                sql.push_str(&format!(" AND sandbox_id = ?{}", args.len()));
            }
            if let Some(sel) = filter.selector {
                args.push(sel.into());
                sql.push_str(&format!(" AND selector = ?{}", args.len()));
            }
            if let Some((at, id)) = filter.before {
                args.push(at.into());
                args.push(id.into());
                sql.push_str(&format!(
                    " AND (created_at_us < ?{a} OR (created_at_us = ?{a} AND id < ?{b}))",
                    a = args.len() - 1,
                    b = args.len()
                ));
            }
            args.push((filter.limit as i64).into());
            sql.push_str(&format!(
                " ORDER BY created_at_us DESC, id DESC LIMIT ?{}",
                args.len()
            ));
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map(rusqlite::params_from_iter(args), row_to_raw)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        });
        Box::pin(async move {
            let rows = read_rows.await?;
            rows.into_iter().map(RawJob::decode).collect()
        })
    }

    /// Every job not in a terminal state, with the highest event seq it has (for recovery).
    fn load_active(&self) -> StoreFuture<Vec<(Job, u64)>> {
        let read_rows = self.read(|c| {
                let mut st = c.prepare(&format!(
                    "SELECT {JOB_COLUMNS}, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.job_id = jobs.id)
                     FROM jobs WHERE state IN (?1, ?2) ORDER BY created_at_us, id"
                ))?;
                let rows = st.query_map(
                    params![JobState::Queued as i64, JobState::Running as i64],
                    |r| Ok((row_to_raw(r)?, r.get::<_, i64>(18)? as u64)),
                )?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            });
        Box::pin(async move {
            let rows = read_rows.await?;
            rows.into_iter()
                .map(|(raw, seq)| Ok((raw.decode()?, seq)))
                .collect()
        })
    }

    /// Every kept job that names a sandbox, oldest first: (sandbox, created_at_us, whether it
    /// is a CleanupSandbox, its state). The dispatcher derives the sandboxes it knows are alive.
    fn sandbox_history(&self) -> StoreFuture<Vec<SandboxJob>> {
        let read_rows = self.read(|c| {
            let mut st = c.prepare(
                "SELECT sandbox_id, created_at_us, spec, state, id FROM jobs
                     WHERE sandbox_id != '' ORDER BY created_at_us, id",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i32>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        });
        Box::pin(async move {
            let rows = read_rows.await?;
            rows.into_iter()
                .map(|(sandbox_id, created_at_us, spec, state, id)| {
                    SandboxJob::decode(sandbox_id, created_at_us, &spec, state, id)
                })
                .collect()
        })
    }

    /// A job's events with seq > `after`, in order.
    fn events_after(&self, job_id: &str, after: u64) -> StoreFuture<Vec<JobEvent>> {
        let id = job_id.to_owned();
        let job_id = id.clone();
        let read_rows = self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT body FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = st.query_map(params![id, after as i64], |r| r.get::<_, Vec<u8>>(0))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        });
        Box::pin(async move {
            let rows = read_rows.await?;
            rows.into_iter()
                .map(|b| decode_event(&job_id, &b))
                .collect()
        })
    }
}

const JOB_COLUMNS: &str = "id, idempotency_key, role, selector, sandbox_id, spec, state, attempt, \
    max_attempts, epoch, agent, timeout_ms, cancel_requested, result, created_at_us, started_at_us, \
    finished_at_us, submitted_by";

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawJob> {
    let key: Option<String> = r.get(1)?;
    let key = key.unwrap_or_default();
    let job = Job {
        id: r.get(0)?,
        idempotency_key: unscoped_key(key),
        role: r.get(2)?,
        selector: r.get(3)?,
        sandbox_id: r.get(4)?,
        spec: None,
        state: r.get(6)?,
        attempt: r.get(7)?,
        max_attempts: r.get(8)?,
        epoch: r.get::<_, i64>(9)? as u64,
        agent: r.get(10)?,
        timeout_ms: r.get::<_, i64>(11)? as u64,
        cancel_requested: r.get(12)?,
        result: None,
        created_at_us: r.get(14)?,
        started_at_us: r.get(15)?,
        finished_at_us: r.get(16)?,
        submitted_by: r.get(17)?,
    };
    Ok(RawJob {
        job,
        spec: r.get(5)?,
        result: r.get(13)?,
    })
}

#[cfg(test)]
mod tests;
