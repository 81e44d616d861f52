//! The durable job store: one SQLite file in WAL mode.
//!
//! All writes go through a single writer thread that commits in groups: it takes every operation
//! waiting in its queue (up to [`MAX_BATCH`]), applies them in one transaction, commits, and only
//! then answers each caller. A caller is acknowledged only after its write is committed, so a
//! `kill -9` of the server loses nothing that was acknowledged. With `synchronous=NORMAL` (the
//! default) a commit survives a process crash; `synchronous=FULL` (`--db-sync full`) also survives
//! power loss at the cost of an fsync per group.
//!
//! Reads use their own connection (WAL lets readers run beside the writer).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use es_proto::v1::{job_event, AuditEntry, Job, JobEvent, JobResult, JobSpec, JobState, Role};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("job store {path}: group commit failed: {message}")]
    Commit { path: PathBuf, message: String },
    #[error("job store writer has stopped")]
    WriterGone,
    #[error("job store: corrupt row for job {job_id}: {detail}")]
    Corrupt { job_id: String, detail: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Sync {
    /// Survives a crash of the server process (WAL + synchronous=NORMAL).
    #[default]
    Normal,
    /// Also survives power loss (fsync at every group commit).
    Full,
}

enum Op {
    /// Insert unless the idempotency key exists; answers the stored job and whether it is new.
    Insert(
        Box<Job>,
        Vec<JobEvent>,
        oneshot::Sender<Result<(Job, bool)>>,
    ),
    /// Overwrite the mutable columns of a job and append events.
    Update(Box<Job>, Vec<JobEvent>, oneshot::Sender<Result<()>>),
    /// Append events only.
    Events(Vec<JobEvent>, oneshot::Sender<Result<()>>),
    /// Delete finished jobs (and their events) finished before the given time, and older
    /// audit entries.
    Purge(i64, oneshot::Sender<Result<u64>>),
    /// Append audit entries that no job write implies (cancel, drain).
    Audit(Vec<AuditEntry>, oneshot::Sender<Result<()>>),
    /// Commit what came before, then end the writer thread (see [`Store::shutdown`]).
    Stop,
}

/// The store's threads, joined by [`Store::shutdown`].
struct Threads {
    writer: std::thread::JoinHandle<()>,
    checkpoint: std::thread::JoinHandle<()>,
    stop_checkpoints: Arc<std::sync::atomic::AtomicBool>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: std::sync::mpsc::Sender<Op>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
    threads: Arc<Mutex<Option<Threads>>>,
}

fn open(path: &Path, sync: Sync) -> Result<Connection> {
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

/// Separates the submitter from its idempotency key in the stored key: keys are scoped per
/// submitter, so one submitter's key never answers another's job.
const KEY_SCOPE: char = '\u{1f}';

fn scoped_key(job: &Job) -> Option<String> {
    (!job.idempotency_key.is_empty())
        .then(|| format!("{}{KEY_SCOPE}{}", job.submitted_by, job.idempotency_key))
}

impl Store {
    /// Opens (creating if needed) the store at `path` and starts its writer thread.
    pub fn open(path: &Path, sync: Sync) -> Result<Store> {
        create_private(path)?;
        let writer = open(path, sync)?;
        writer
            .execute_batch(SCHEMA)
            .map_err(|source| StoreError::Sqlite {
                path: path.to_owned(),
                source,
            })?;
        let reader = open(path, sync)?;
        let checkpoints = open(path, sync)?;
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
        Ok(Store {
            tx,
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_owned(),
            threads: Arc::new(Mutex::new(Some(Threads {
                writer,
                checkpoint,
                stop_checkpoints,
            }))),
        })
    }

    /// Commits every write queued so far, then stops and joins the writer and checkpoint
    /// threads. Later writes answer [`StoreError::WriterGone`]. Blocking: call it from a
    /// blocking context. A second call does nothing.
    pub fn shutdown(&self) {
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

    /// Whether the writer or checkpoint thread still runs (false after [`Store::shutdown`]).
    pub fn threads_running(&self) -> bool {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.writer.is_finished() || !t.checkpoint.is_finished())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Queues the insert now (so its place in the write order is fixed when this returns) and
    /// gives a future that resolves once it is committed.
    pub fn insert(
        &self,
        job: Job,
        events: Vec<JobEvent>,
    ) -> impl std::future::Future<Output = Result<(Job, bool)>> + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self.tx.send(Op::Insert(Box::new(job), events, tx));
        async move {
            sent.map_err(|_| StoreError::WriterGone)?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        }
    }

    /// Queues an update now; the future resolves once it is committed. Callers queue while
    /// holding the dispatch lock, so the commit order matches the order of state changes.
    pub fn update(
        &self,
        job: &Job,
        events: Vec<JobEvent>,
    ) -> impl std::future::Future<Output = Result<()>> + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self.tx.send(Op::Update(Box::new(job.clone()), events, tx));
        async move {
            sent.map_err(|_| StoreError::WriterGone)?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        }
    }

    pub fn events(
        &self,
        events: Vec<JobEvent>,
    ) -> impl std::future::Future<Output = Result<()>> + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self.tx.send(Op::Events(events, tx));
        async move {
            sent.map_err(|_| StoreError::WriterGone)?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        }
    }

    /// Appends audit entries (their `id` is assigned by the store).
    pub async fn audit(&self, entries: Vec<AuditEntry>) -> Result<()> {
        self.call(|tx| Op::Audit(entries, tx)).await
    }

    /// Audit entries of a sandbox and/or a job (both `None`: all), oldest first.
    pub async fn audit_trail(
        &self,
        sandbox_id: Option<String>,
        job_id: Option<String>,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>> {
        self.read(move |c| {
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
        })
        .await
    }

    /// Deletes jobs that finished before `before_us`; answers how many.
    pub async fn purge(&self, before_us: i64) -> Result<u64> {
        self.call(|tx| Op::Purge(before_us, tx)).await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let reader = self.reader.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn).map_err(|source| StoreError::Sqlite { path, source })
        })
        .await
        .map_err(|_| StoreError::WriterGone)?
    }

    pub async fn get(&self, id: &str) -> Result<Option<Job>> {
        let id = id.to_owned();
        let row = self
            .read(move |c| {
                c.query_row(
                    &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                    [&id],
                    row_to_raw,
                )
                .optional()
            })
            .await?;
        row.map(RawJob::decode).transpose()
    }

    /// Jobs matching the filters, newest first.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<Job>> {
        let rows = self
            .read(move |c| {
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
            })
            .await?;
        rows.into_iter().map(RawJob::decode).collect()
    }

    /// Every job not in a terminal state, with the highest event seq it has (for recovery).
    pub async fn load_active(&self) -> Result<Vec<(Job, u64)>> {
        let rows = self
            .read(|c| {
                let mut st = c.prepare(&format!(
                    "SELECT {JOB_COLUMNS}, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.job_id = jobs.id)
                     FROM jobs WHERE state IN (?1, ?2) ORDER BY created_at_us, id"
                ))?;
                let rows = st.query_map(
                    params![JobState::Queued as i64, JobState::Running as i64],
                    |r| Ok((row_to_raw(r)?, r.get::<_, i64>(18)? as u64)),
                )?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter()
            .map(|(raw, seq)| Ok((raw.decode()?, seq)))
            .collect()
    }

    /// Every kept job that names a sandbox, oldest first: (sandbox, created_at_us, whether it
    /// is a CleanupSandbox, its state). The dispatcher derives the sandboxes it knows are alive.
    pub async fn sandbox_history(&self) -> Result<Vec<(String, i64, bool, i32)>> {
        let rows = self
            .read(|c| {
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
            })
            .await?;
        rows.into_iter()
            .map(|(sb, at, spec, state, id)| {
                let spec = JobSpec::decode(spec.as_slice()).map_err(|e| StoreError::Corrupt {
                    job_id: id,
                    detail: e.to_string(),
                })?;
                let cleanup = matches!(
                    spec.kind,
                    Some(es_proto::v1::job_spec::Kind::CleanupSandbox(_))
                );
                Ok((sb, at, cleanup, state))
            })
            .collect()
    }

    /// A job's events with seq > `after`, in order.
    pub async fn events_after(&self, job_id: &str, after: u64) -> Result<Vec<JobEvent>> {
        let id = job_id.to_owned();
        let rows = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT body FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq",
                )?;
                let rows = st.query_map(params![id, after as i64], |r| r.get::<_, Vec<u8>>(0))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter()
            .map(|b| {
                JobEvent::decode(b.as_slice()).map_err(|e| StoreError::Corrupt {
                    job_id: job_id.to_owned(),
                    detail: e.to_string(),
                })
            })
            .collect()
    }
}

/// Filters of [`Store::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub states: Vec<JobState>,
    pub role: Option<Role>,
    pub sandbox_id: Option<String>,
    pub selector: Option<String>,
    /// Only jobs listed after this one (created_at_us, id) in the newest-first order.
    pub before: Option<(i64, String)>,
    pub limit: u32,
}

const JOB_COLUMNS: &str = "id, idempotency_key, role, selector, sandbox_id, spec, state, attempt, \
    max_attempts, epoch, agent, timeout_ms, cancel_requested, result, created_at_us, started_at_us, \
    finished_at_us, submitted_by";

struct RawJob {
    job: Job,
    spec: Vec<u8>,
    result: Option<Vec<u8>>,
}

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawJob> {
    let key: Option<String> = r.get(1)?;
    let key = key.unwrap_or_default();
    let job = Job {
        id: r.get(0)?,
        idempotency_key: match key.split_once(KEY_SCOPE) {
            Some((_, k)) => k.to_owned(),
            None => key,
        },
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

impl RawJob {
    fn decode(self) -> Result<Job> {
        let mut job = self.job;
        let corrupt = |e: prost::DecodeError| StoreError::Corrupt {
            job_id: job.id.clone(),
            detail: e.to_string(),
        };
        let spec = JobSpec::decode(self.spec.as_slice()).map_err(corrupt)?;
        let result = self
            .result
            .map(|b| JobResult::decode(b.as_slice()))
            .transpose()
            .map_err(corrupt)?;
        job.spec = Some(spec);
        job.result = result;
        Ok(job)
    }
}

/// Copies the WAL back into the database every 200 ms without blocking the writer (PASSIVE),
/// and truncates the WAL file once it has grown past 64 MiB and is fully copied. Ends when the
/// database file goes away (tests) or the process exits.
fn checkpointer(conn: Connection, path: PathBuf, stop: Arc<std::sync::atomic::AtomicBool>) {
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if stop.load(std::sync::atomic::Ordering::SeqCst) || !path.exists() {
            return;
        }
        let res = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match res {
            Ok((wal_pages, done)) if wal_pages == done && wal_pages > 16 * 1024 => {
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            }
            Ok(_) => {}
            Err(e) => log::warn!("job store {}: checkpoint failed: {e}", path.display()),
        }
    }
}

fn writer_loop(mut conn: Connection, rx: std::sync::mpsc::Receiver<Op>, path: PathBuf) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stop = false;
    while let Ok(first) = rx.recv() {
        if matches!(first, Op::Stop) {
            return;
        }
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Op::Stop) => {
                    stop = true;
                    break;
                }
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let outcome = apply_batch(&mut conn, &mut batch);
        if let Err(e) = &outcome {
            log::error!(
                "job store {}: group commit of {} writes failed: {e}",
                path.display(),
                batch.len()
            );
        }
        for (op, res) in batch.drain(..).zip(outcome_per_op(outcome, &path)) {
            answer(op, res);
        }
        if stop {
            return;
        }
    }
}

/// Per-op outcome of a batch: `Ok(answers)` or the shared failure for every op.
type BatchOutcome = rusqlite::Result<Vec<OpAnswer>>;

enum OpAnswer {
    Inserted(Box<Job>, bool),
    Done,
    Purged(u64),
}

fn outcome_per_op(
    outcome: BatchOutcome,
    path: &Path,
) -> Box<dyn Iterator<Item = Result<OpAnswer>> + '_> {
    match outcome {
        Ok(answers) => Box::new(answers.into_iter().map(Ok)),
        Err(e) => {
            let msg = e.to_string();
            Box::new(std::iter::repeat_with(move || {
                Err(StoreError::Commit {
                    path: path.to_owned(),
                    message: msg.clone(),
                })
            }))
        }
    }
}

fn answer(op: Op, res: Result<OpAnswer>) {
    match op {
        Op::Insert(_, _, tx) => {
            let _ = tx.send(res.map(|a| match a {
                OpAnswer::Inserted(job, created) => (*job, created),
                _ => unreachable!("insert answered with another kind"),
            }));
        }
        Op::Update(_, _, tx) | Op::Events(_, tx) | Op::Audit(_, tx) => {
            let _ = tx.send(res.map(|_| ()));
        }
        Op::Stop => {}
        Op::Purge(_, tx) => {
            let _ = tx.send(res.map(|a| match a {
                OpAnswer::Purged(n) => n,
                _ => 0,
            }));
        }
    }
}

fn apply_batch(conn: &mut Connection, batch: &mut [Op]) -> BatchOutcome {
    let tx = conn.transaction()?;
    let mut answers = Vec::with_capacity(batch.len());
    for op in batch.iter() {
        answers.push(apply(&tx, op)?);
    }
    tx.commit()?;
    Ok(answers)
}

fn apply(c: &rusqlite::Transaction<'_>, op: &Op) -> rusqlite::Result<OpAnswer> {
    match op {
        Op::Insert(job, events, _) => {
            let key = scoped_key(job);
            if let Some(key) = &key {
                // Rows written before keys were scoped hold the bare key: theirs only when the
                // submitter matches too.
                let existing: Option<String> = c
                    .prepare_cached(
                        "SELECT id FROM jobs WHERE idempotency_key = ?1
                           OR (idempotency_key = ?2 AND submitted_by = ?3)",
                    )?
                    .query_row(params![key, job.idempotency_key, job.submitted_by], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if let Some(id) = existing {
                    let raw = c
                        .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
                        .query_row([&id], row_to_raw)?;
                    let job = raw
                        .decode()
                        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                    return Ok(OpAnswer::Inserted(Box::new(job), false));
                }
            }
            let spec = job
                .spec
                .as_ref()
                .map(|s| s.encode_to_vec())
                .unwrap_or_default();
            c.prepare_cached(
                "INSERT INTO jobs (id, idempotency_key, role, selector, sandbox_id, spec, state, attempt,
                  max_attempts, epoch, agent, timeout_ms, cancel_requested, result, created_at_us,
                  started_at_us, finished_at_us, submitted_by)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,NULL,?14,?15,?16,?17)",
            )?
            .execute(params![
                job.id,
                key,
                job.role,
                job.selector,
                job.sandbox_id,
                spec,
                job.state,
                job.attempt,
                job.max_attempts,
                job.epoch as i64,
                job.agent,
                job.timeout_ms as i64,
                job.cancel_requested,
                job.created_at_us,
                job.started_at_us,
                job.finished_at_us,
                job.submitted_by,
            ])?;
            insert_audit(
                c,
                &AuditEntry {
                    at_us: job.created_at_us,
                    sandbox_id: job.sandbox_id.clone(),
                    job_id: job.id.clone(),
                    actor: job.submitted_by.clone(),
                    action: "submit".into(),
                    detail_json: serde_json::json!({
                        "kind": es_proto::kinds::name(job),
                        "role": Role::try_from(job.role).unwrap_or_default().name(),
                        "selector": job.selector,
                        "max_attempts": job.max_attempts,
                        "timeout_ms": job.timeout_ms,
                        "idempotency_key": job.idempotency_key,
                    })
                    .to_string(),
                    ..Default::default()
                },
            )?;
            insert_events(c, events)?;
            Ok(OpAnswer::Inserted(job.clone(), true))
        }
        Op::Update(job, events, _) => {
            let result = job.result.as_ref().map(|r| r.encode_to_vec());
            c.prepare_cached(
                "UPDATE jobs SET state=?2, attempt=?3, epoch=?4, agent=?5, cancel_requested=?6,
                   result=?7, started_at_us=?8, finished_at_us=?9 WHERE id=?1",
            )?
            .execute(params![
                job.id,
                job.state,
                job.attempt,
                job.epoch as i64,
                job.agent,
                job.cancel_requested,
                result,
                job.started_at_us,
                job.finished_at_us,
            ])?;
            insert_events(c, events)?;
            Ok(OpAnswer::Done)
        }
        Op::Events(events, _) => {
            insert_events(c, events)?;
            Ok(OpAnswer::Done)
        }
        Op::Purge(before, _) => {
            let n = c
                .prepare_cached(
                    "DELETE FROM jobs WHERE finished_at_us > 0 AND finished_at_us < ?1",
                )?
                .execute([before])?;
            // Entries of jobs still kept (queued, running, or finished recently) stay with them.
            c.prepare_cached(
                "DELETE FROM audit WHERE at_us < ?1
                   AND (job_id = '' OR job_id NOT IN (SELECT id FROM jobs))",
            )?
            .execute([before])?;
            Ok(OpAnswer::Purged(n as u64))
        }
        Op::Audit(entries, _) => {
            for e in entries {
                insert_audit(c, e)?;
            }
            Ok(OpAnswer::Done)
        }
        // Never batched: the writer ends before it.
        Op::Stop => Ok(OpAnswer::Done),
    }
}

fn insert_events(c: &rusqlite::Transaction<'_>, events: &[JobEvent]) -> rusqlite::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut st = c.prepare_cached(
        "INSERT OR IGNORE INTO events (job_id, seq, at_us, body) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for ev in events {
        let new = st.execute(params![
            ev.job_id,
            ev.seq as i64,
            ev.at_us,
            ev.encode_to_vec()
        ])? == 1;
        if new {
            if let Some(entry) = audit_of(ev) {
                insert_audit(c, &entry)?;
            }
        }
    }
    Ok(())
}

/// The audit entry a job event implies: leases, state changes, results and AWS calls (progress
/// and log lines are not audited). The sandbox id is filled in from the job's row.
fn audit_of(ev: &JobEvent) -> Option<AuditEntry> {
    let agent_actor = || {
        if ev.agent.is_empty() {
            "server".to_owned()
        } else {
            format!("agent:{}", ev.agent)
        }
    };
    let (actor, action, detail) = match ev.event.as_ref()? {
        job_event::Event::State(s) => {
            let state = JobState::try_from(*s).unwrap_or_default();
            if state == JobState::Queued && ev.attempt == 0 {
                return None; // the submit entry says it
            }
            if state == JobState::Running {
                (
                    agent_actor(),
                    "lease",
                    serde_json::json!({"attempt": ev.attempt, "agent": ev.agent}),
                )
            } else {
                (
                    "server".to_owned(),
                    "state",
                    serde_json::json!({"state": state.name(), "attempt": ev.attempt}),
                )
            }
        }
        job_event::Event::Result(r) => (
            agent_actor(),
            "result",
            serde_json::json!({
                "state": JobState::try_from(r.state).unwrap_or_default().name(),
                "error": r.error,
                "attempt": ev.attempt,
            }),
        ),
        job_event::Event::AwsCall(c) => (
            agent_actor(),
            "aws_call",
            serde_json::json!({
                "service": c.service,
                "operation": c.operation,
                "resource_ids": c.resource_ids,
                "outcome": if c.error.is_empty() { "ok" } else { c.error.as_str() },
                "attempt": ev.attempt,
            }),
        ),
        job_event::Event::Progress(_) | job_event::Event::Log(_) => return None,
    };
    Some(AuditEntry {
        at_us: ev.at_us,
        job_id: ev.job_id.clone(),
        actor,
        action: action.into(),
        detail_json: detail.to_string(),
        ..Default::default()
    })
}

/// Appends one audit entry; an empty sandbox id is taken from the job's row.
fn insert_audit(c: &rusqlite::Transaction<'_>, e: &AuditEntry) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO audit (at_us, sandbox_id, job_id, actor, action, detail)
         VALUES (?1, CASE WHEN ?2 = '' THEN COALESCE((SELECT sandbox_id FROM jobs WHERE id = ?3), '') ELSE ?2 END,
                 ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        e.at_us,
        e.sandbox_id,
        e.job_id,
        e.actor,
        e.action,
        e.detail_json
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::v1::{job_spec, EchoJob};

    fn job(id: &str, key: &str) -> Job {
        Job {
            id: id.into(),
            idempotency_key: key.into(),
            role: Role::Shells as i32,
            selector: "us-east-1".into(),
            spec: Some(JobSpec {
                kind: Some(job_spec::Kind::Echo(EchoJob {
                    message: "hi".into(),
                })),
                target: None,
            }),
            state: JobState::Queued as i32,
            max_attempts: 3,
            created_at_us: 1,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn insert_is_idempotent_by_key_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("es.db");
        let store = Store::open(&path, Sync::Normal).unwrap();
        let (a, created) = store.insert(job("j1", "k"), vec![]).await.unwrap();
        assert!(created);
        let (b, created) = store.insert(job("j2", "k"), vec![]).await.unwrap();
        assert!(!created, "same key must return the first job");
        assert_eq!(b.id, a.id);
        let mut done = a.clone();
        done.state = JobState::Succeeded as i32;
        done.finished_at_us = 10;
        done.result = Some(JobResult {
            state: JobState::Succeeded as i32,
            output: "hi".into(),
            error: String::new(),
            ..Default::default()
        });
        store.update(&done, vec![]).await.unwrap();
        drop(store);

        let store = Store::open(&path, Sync::Full).unwrap();
        let got = store.get("j1").await.unwrap().unwrap();
        assert_eq!(got.state, JobState::Succeeded as i32);
        assert_eq!(got.result.unwrap().output, "hi");
        assert!(store.get("j2").await.unwrap().is_none());
        assert!(store.load_active().await.unwrap().is_empty());
        assert_eq!(store.purge(11).await.unwrap(), 1);
        assert!(store.get("j1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn events_are_deduplicated_by_seq_and_listed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("es.db"), Sync::Normal).unwrap();
        store.insert(job("j1", ""), vec![]).await.unwrap();
        let ev = |seq| JobEvent {
            job_id: "j1".into(),
            seq,
            at_us: seq as i64,
            ..Default::default()
        };
        store.events(vec![ev(1), ev(2)]).await.unwrap();
        store.events(vec![ev(2), ev(3)]).await.unwrap();
        let got: Vec<u64> = store
            .events_after("j1", 1)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(got, vec![2, 3]);
        let active = store.load_active().await.unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].1, 3);
    }
}
