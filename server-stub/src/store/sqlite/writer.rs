//! The SQLite store's writer thread (group commit) and checkpoint thread.

use std::path::PathBuf;
use std::sync::Arc;

use es_proto::v1::{AuditEntry, JobEvent};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};

use super::{row_to_raw, JOB_COLUMNS};
use crate::store::ops::{answer_all, Op, OpAnswer, MAX_BATCH};
use crate::store::{audit, scoped_key, Purged, StoreError};

/// Copies the WAL back into the database every 200 ms without blocking the writer (PASSIVE),
/// and truncates the WAL file once it has grown past 64 MiB and is fully copied. Ends when the
/// database file goes away (tests) or the process exits.
pub(super) fn checkpointer(
    conn: Connection,
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
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

pub(super) fn writer_loop(mut conn: Connection, rx: std::sync::mpsc::Receiver<Op>, path: PathBuf) {
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
        let outcome = apply_batch(&mut conn, &mut batch).map_err(|e| e.to_string());
        if let Err(e) = &outcome {
            log::error!(
                "job store {}: group commit of {} writes failed: {e}",
                path.display(),
                batch.len()
            );
        }
        answer_all(&mut batch, outcome, |message| StoreError::Commit {
            path: path.clone(),
            message: message.to_owned(),
        });
        if stop {
            return;
        }
    }
}

fn apply_batch(conn: &mut Connection, batch: &mut [Op]) -> rusqlite::Result<Vec<OpAnswer>> {
    // The write lock from the start (IMMEDIATE), waited for with the busy timeout. A deferred
    // transaction that read first (a submission's key, a purge's batch) and then had to wait
    // to write, behind the checkpointer's TRUNCATE or any other writer, failed at once with
    // "database is locked": its snapshot was stale by then, and the whole group with it.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
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
            insert_audit(c, &audit::of_submit(job))?;
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
        Op::Purge { before, batch, .. } => {
            // The oldest jobs first (jobs_finished), each with its events (ON DELETE CASCADE)
            // and its audit entries (audit_job).
            let ids: Vec<String> = c
                .prepare_cached(
                    "SELECT id FROM jobs WHERE finished_at_us > 0 AND finished_at_us < ?1
                       ORDER BY finished_at_us LIMIT ?2",
                )?
                .query_map(params![before, batch], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut audit = 0;
            for id in &ids {
                audit += c
                    .prepare_cached("DELETE FROM audit WHERE job_id = ?1 AND at_us < ?2")?
                    .execute(params![id, before])?;
                c.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                    .execute([id])?;
            }
            // Once the jobs are done: entries of no job, or of a job gone otherwise. Entries of
            // jobs kept (queued, running, or finished recently) stay with them.
            let mut others = 0;
            if ids.len() < *batch as usize {
                others = c
                    .prepare_cached(
                        "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at_us < ?1
                           AND (job_id = '' OR job_id NOT IN (SELECT id FROM jobs))
                           ORDER BY at_us LIMIT ?2)",
                    )?
                    .execute(params![before, batch])?;
            }
            Ok(OpAnswer::Purged(Purged {
                jobs: ids.len() as u64,
                audit: (audit + others) as u64,
                more: ids.len() >= *batch as usize || others >= *batch as usize,
            }))
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
            if let Some(entry) = audit::of_event(ev) {
                insert_audit(c, &entry)?;
            }
        }
    }
    Ok(())
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
