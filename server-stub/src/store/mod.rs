//! The durable job store, as dispatch and the API need it: one trait ([`JobStore`]) and, behind
//! it, the SQLite store ([`sqlite`], one server) and the PostgreSQL store ([`postgres`],
//! replicas with one fenced leader).
//!
//! Every implementation keeps the same promises: a write is acknowledged only after it is
//! committed (so a `kill -9` of the server loses nothing acknowledged); writes queued by
//! [`JobStore::insert`], [`JobStore::update`] and [`JobStore::events`] commit in the order the
//! calls were made (dispatch queues them while it holds its lock, so the commit order is the
//! order of state changes); a job's events are kept once per sequence number; the audit entries
//! a job write implies ([`audit::of_event`], [`audit::of_submit`]) commit in the same
//! transaction as that write.

pub mod audit;
mod ops;
pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use es_proto::v1::{AuditEntry, Job, JobEvent, JobResult, JobSpec, JobState, Role};
use prost::Message;

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
    #[error("job store {db}: {detail}")]
    Config { db: String, detail: String },
    #[error("job store {db}: {message}")]
    Postgres { db: String, message: String },
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

/// What one batch of [`JobStore::purge`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Purged {
    pub jobs: u64,
    pub audit: u64,
    /// The batch was full (of jobs, or of audit entries of no job): more may be left.
    pub more: bool,
}

/// A store write or read in flight; resolves once committed (writes) or read.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'static>>;

/// The store shared by dispatch and the API.
pub type Store = Arc<dyn JobStore>;

/// What dispatch and the API need of a job store.
pub trait JobStore: Send + std::marker::Sync + 'static {
    /// Where the jobs are kept, for log lines (a file path, a database without its password).
    fn describe(&self) -> String;

    /// Queues the insert now (its place in the write order is fixed when this returns) and
    /// answers, once committed, the stored job and whether it is new: a job whose submitter
    /// already used its idempotency key answers that earlier job instead (and writes nothing).
    fn insert(&self, job: Job, events: Vec<JobEvent>) -> StoreFuture<(Job, bool)>;

    /// Queues an overwrite of the job's mutable columns plus events; resolves once committed.
    fn update(&self, job: &Job, events: Vec<JobEvent>) -> StoreFuture<()>;

    /// Queues events (a job's events are kept once per seq); resolves once committed.
    fn events(&self, events: Vec<JobEvent>) -> StoreFuture<()>;

    /// Appends audit entries no job write implies (cancel, drain); the store assigns ids.
    fn audit(&self, entries: Vec<AuditEntry>) -> StoreFuture<()>;

    /// Deletes at most `batch` jobs finished before `before_us`, oldest first, with their
    /// events and their audit entries older than that; once fewer than `batch` such jobs are
    /// left, also at most `batch` older audit entries of no job or of a job gone. One batch is
    /// one write among the others: the caller repeats while [`Purged::more`], so a large purge
    /// never holds the writer (and every submission behind it) for long.
    fn purge(&self, before_us: i64, batch: u32) -> StoreFuture<Purged>;

    fn get(&self, id: &str) -> StoreFuture<Option<Job>>;

    /// Jobs matching the filter, newest first.
    fn list(&self, filter: ListFilter) -> StoreFuture<Vec<Job>>;

    /// A job's events with seq > `after`, in order.
    fn events_after(&self, job_id: &str, after: u64) -> StoreFuture<Vec<JobEvent>>;

    /// Audit entries of a sandbox and/or a job (both `None`: all) with id > `after_id`,
    /// oldest first, at most `limit`.
    fn audit_trail(
        &self,
        sandbox_id: Option<String>,
        job_id: Option<String>,
        after_id: u64,
        limit: u32,
    ) -> StoreFuture<Vec<AuditEntry>>;

    /// Every job not in a terminal state, with the highest event seq it has (recovery).
    fn load_active(&self) -> StoreFuture<Vec<(Job, u64)>>;

    /// Every kept job that names a sandbox, oldest first (dispatch derives from it the
    /// sandboxes it knows are alive).
    fn sandbox_history(&self) -> StoreFuture<Vec<SandboxJob>>;

    /// Commits every write queued so far, then stops what the store runs in the background
    /// (threads, connections). Later writes fail. Blocking: call it from a blocking context.
    /// A second call does nothing.
    fn shutdown(&self);

    /// Whether anything the store started still runs (false after [`JobStore::shutdown`]).
    fn threads_running(&self) -> bool;
}

/// A job row as read, its protobuf columns not yet decoded.
pub(crate) struct RawJob {
    pub job: Job,
    pub spec: Vec<u8>,
    pub result: Option<Vec<u8>>,
}

impl RawJob {
    pub fn decode(self) -> Result<Job> {
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

/// One stored event.
pub(crate) fn decode_event(job_id: &str, body: &[u8]) -> Result<JobEvent> {
    JobEvent::decode(body).map_err(|e| StoreError::Corrupt {
        job_id: job_id.to_owned(),
        detail: e.to_string(),
    })
}

/// One job of [`JobStore::sandbox_history`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxJob {
    pub sandbox_id: String,
    pub created_at_us: i64,
    /// A CleanupSandbox job.
    pub cleanup: bool,
    pub state: i32,
}

impl SandboxJob {
    fn decode(
        sandbox_id: String,
        created_at_us: i64,
        spec: &[u8],
        state: i32,
        job_id: String,
    ) -> Result<SandboxJob> {
        let spec = JobSpec::decode(spec).map_err(|e| StoreError::Corrupt {
            job_id,
            detail: e.to_string(),
        })?;
        let cleanup = matches!(
            spec.kind,
            Some(es_proto::v1::job_spec::Kind::CleanupSandbox(_))
        );
        Ok(SandboxJob {
            sandbox_id,
            created_at_us,
            cleanup,
            state,
        })
    }
}

/// Filters of [`JobStore::list`].
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

/// Separates the submitter from its idempotency key in the stored key: keys are scoped per
/// submitter, so one submitter's key never answers another's job.
pub const KEY_SCOPE: char = '\u{1f}';

pub fn scoped_key(job: &Job) -> Option<String> {
    (!job.idempotency_key.is_empty())
        .then(|| format!("{}{KEY_SCOPE}{}", job.submitted_by, job.idempotency_key))
}

/// The idempotency key as the submitter gave it, from its stored (scoped) form.
pub fn unscoped_key(stored: String) -> String {
    match stored.split_once(KEY_SCOPE) {
        Some((_, k)) => k.to_owned(),
        None => stored,
    }
}
