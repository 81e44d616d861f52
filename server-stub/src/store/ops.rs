//! The write queue every store commits in groups: one [`Op`] per queued write, answered once
//! its group is committed (or failed). Shared by the SQLite and PostgreSQL writers, so both
//! keep the same order and the same answers.

use es_proto::v1::{AuditEntry, Job, JobEvent};
use tokio::sync::oneshot;

use super::{Purged, Result, StoreError};

/// Most operations committed in one transaction.
pub(super) const MAX_BATCH: usize = 4096;

pub(super) enum Op {
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
    /// Delete at most `batch` jobs (and their events) finished before `before`, and at most
    /// `batch` older audit entries whose job is gone.
    Purge {
        before: i64,
        batch: u32,
        tx: oneshot::Sender<Result<Purged>>,
    },
    /// Append audit entries that no job write implies (cancel, drain).
    Audit(Vec<AuditEntry>, oneshot::Sender<Result<()>>),
    /// Commit what came before, then end the writer (see `JobStore::shutdown`).
    Stop,
}

/// What one committed op answers.
pub(super) enum OpAnswer {
    Inserted(Box<Job>, bool),
    Done,
    Purged(Purged),
}

/// Answers every op of a group: with its own answer once committed, or with the group's
/// failure (`make_err` builds one error per op: errors are not `Clone`).
pub(super) fn answer_all(
    batch: &mut Vec<Op>,
    outcome: std::result::Result<Vec<OpAnswer>, String>,
    make_err: impl Fn(&str) -> StoreError,
) {
    match outcome {
        Ok(answers) => {
            for (op, a) in batch.drain(..).zip(answers) {
                answer(op, Ok(a));
            }
        }
        Err(msg) => {
            for op in batch.drain(..) {
                answer(op, Err(make_err(&msg)));
            }
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
        Op::Purge { tx, .. } => {
            let _ = tx.send(res.map(|a| match a {
                OpAnswer::Purged(p) => p,
                _ => Purged::default(),
            }));
        }
    }
}
