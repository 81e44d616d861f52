//! The PostgreSQL store's writer: one task, one connection, group commit. Each group is one
//! transaction that first reads the leader epoch `FOR SHARE` and commits only if it is still
//! this server's: a deposed leader never commits. The statements of a group are pipelined
//! (sent together, answered in order), so a group costs three round trips whatever its size.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use es_proto::v1::{AuditEntry, JobEvent};
use prost::Message;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::conn::{describe, Database};
use super::leader::Leadership;
use super::{raw_job, JOB_COLUMNS};
use crate::store::ops::{answer_all, Op, OpAnswer, MAX_BATCH};
use crate::store::{audit, scoped_key, StoreError};

type Param = Box<dyn ToSql + Sync + Send>;

/// The statements a group uses, prepared once per connection.
struct Prepared {
    fence: Statement,
    insert_job: Statement,
    update_job: Statement,
    event: Statement,
    event_audited: Statement,
    audit: Statement,
    purge_jobs: Statement,
    purge_audit: Statement,
}

const AUDIT_SANDBOX: &str =
    "COALESCE(NULLIF($2, ''), (SELECT sandbox_id FROM jobs WHERE id = $3), '')";

async fn prepare(c: &Client) -> Result<Prepared, tokio_postgres::Error> {
    Ok(Prepared {
        fence: c.prepare("SELECT epoch FROM leader FOR SHARE").await?,
        // The job and its submit audit entry, or nothing when the id or the submitter's key is
        // already there (a replayed group, or an earlier job with that key).
        insert_job: c
            .prepare(
                "WITH ins AS (
                   INSERT INTO jobs (id, idempotency_key, role, selector, sandbox_id, spec, state,
                     attempt, max_attempts, epoch, agent, timeout_ms, cancel_requested, result,
                     created_at_us, started_at_us, finished_at_us, submitted_by)
                   VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,NULL,$14,$15,$16,$17)
                   ON CONFLICT DO NOTHING RETURNING id)
                 INSERT INTO audit (at_us, sandbox_id, job_id, actor, action, detail)
                 SELECT $18, $19, id, $20, $21, $22 FROM ins RETURNING job_id",
            )
            .await?,
        update_job: c
            .prepare(
                "UPDATE jobs SET state=$2, attempt=$3, epoch=$4, agent=$5, cancel_requested=$6,
                   result=$7, started_at_us=$8, finished_at_us=$9 WHERE id=$1",
            )
            .await?,
        // Events of a job that is not there (an insert answered by an earlier job with the
        // same key, or a purged job) are dropped; a seq already kept is kept once.
        event: c
            .prepare(
                "INSERT INTO events (job_id, seq, at_us, body)
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1)
                 ON CONFLICT DO NOTHING",
            )
            .await?,
        // The same, plus the audit entry the event implies, only if the event is new.
        event_audited: c
            .prepare(
                "WITH e AS (
                   INSERT INTO events (job_id, seq, at_us, body)
                   SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1)
                   ON CONFLICT DO NOTHING RETURNING job_id)
                 INSERT INTO audit (at_us, sandbox_id, job_id, actor, action, detail)
                 SELECT $5, COALESCE((SELECT sandbox_id FROM jobs WHERE id = $1), ''), $1, $6, $7, $8
                 FROM e",
            )
            .await?,
        audit: c
            .prepare(&format!(
                "INSERT INTO audit (at_us, sandbox_id, job_id, actor, action, detail)
                 VALUES ($1, {AUDIT_SANDBOX}, $3, $4, $5, $6)"
            ))
            .await?,
        purge_jobs: c
            .prepare(
                "WITH d AS (DELETE FROM jobs WHERE finished_at_us > 0 AND finished_at_us < $1
                   RETURNING 1) SELECT count(*) FROM d",
            )
            .await?,
        // Entries of jobs still kept (queued, running, or finished recently) stay with them.
        purge_audit: c
            .prepare(
                "DELETE FROM audit WHERE at_us < $1
                   AND (job_id = '' OR NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = audit.job_id))",
            )
            .await?,
    })
}

/// One statement of a group, with its parameters.
struct Step {
    stmt: fn(&Prepared) -> &Statement,
    params: Vec<Param>,
}

fn step(stmt: fn(&Prepared) -> &Statement, params: Vec<Param>) -> Step {
    Step { stmt, params }
}

fn audit_step(e: &AuditEntry) -> Step {
    step(
        |p| &p.audit,
        vec![
            Box::new(e.at_us),
            Box::new(e.sandbox_id.clone()),
            Box::new(e.job_id.clone()),
            Box::new(e.actor.clone()),
            Box::new(e.action.clone()),
            Box::new(e.detail_json.clone()),
        ],
    )
}

fn event_steps(events: &[JobEvent], out: &mut Vec<Step>) {
    for ev in events {
        let mut params: Vec<Param> = vec![
            Box::new(ev.job_id.clone()),
            Box::new(ev.seq as i64),
            Box::new(ev.at_us),
            Box::new(ev.encode_to_vec()),
        ];
        match audit::of_event(ev) {
            Some(a) => {
                params.push(Box::new(a.at_us));
                params.push(Box::new(a.actor));
                params.push(Box::new(a.action));
                params.push(Box::new(a.detail_json));
                out.push(step(|p| &p.event_audited, params));
            }
            None => out.push(step(|p| &p.event, params)),
        }
    }
}

/// The steps of one op, appended to `out`; answers the index of the step whose rows answer it.
fn steps_of(op: &Op, out: &mut Vec<Step>) -> usize {
    let first = out.len();
    match op {
        Op::Insert(job, events, _) => {
            let spec = job
                .spec
                .as_ref()
                .map(|s| s.encode_to_vec())
                .unwrap_or_default();
            let a = audit::of_submit(job);
            out.push(step(
                |p| &p.insert_job,
                vec![
                    Box::new(job.id.clone()),
                    Box::new(scoped_key(job)),
                    Box::new(job.role),
                    Box::new(job.selector.clone()),
                    Box::new(job.sandbox_id.clone()),
                    Box::new(spec),
                    Box::new(job.state),
                    Box::new(job.attempt as i64),
                    Box::new(job.max_attempts as i64),
                    Box::new(job.epoch as i64),
                    Box::new(job.agent.clone()),
                    Box::new(job.timeout_ms as i64),
                    Box::new(job.cancel_requested),
                    Box::new(job.created_at_us),
                    Box::new(job.started_at_us),
                    Box::new(job.finished_at_us),
                    Box::new(job.submitted_by.clone()),
                    Box::new(a.at_us),
                    Box::new(a.sandbox_id),
                    Box::new(a.actor),
                    Box::new(a.action),
                    Box::new(a.detail_json),
                ],
            ));
            event_steps(events, out);
        }
        Op::Update(job, events, _) => {
            out.push(step(
                |p| &p.update_job,
                vec![
                    Box::new(job.id.clone()),
                    Box::new(job.state),
                    Box::new(job.attempt as i64),
                    Box::new(job.epoch as i64),
                    Box::new(job.agent.clone()),
                    Box::new(job.cancel_requested),
                    Box::new(job.result.as_ref().map(|r| r.encode_to_vec())),
                    Box::new(job.started_at_us),
                    Box::new(job.finished_at_us),
                ],
            ));
            event_steps(events, out);
        }
        Op::Events(events, _) => event_steps(events, out),
        Op::Audit(entries, _) => {
            for e in entries {
                out.push(audit_step(e));
            }
        }
        Op::Purge(before, _) => {
            out.push(step(|p| &p.purge_jobs, vec![Box::new(*before)]));
            out.push(step(|p| &p.purge_audit, vec![Box::new(*before)]));
        }
        Op::Stop => {}
    }
    first
}

/// Why a group failed.
enum Failed {
    /// Another server leads now: nothing of this group was committed, nor will be.
    Deposed(String),
    /// The database cannot be reached (down, restarting, cut off): the group is tried again.
    Unreachable(String),
    /// The database refused the group.
    Db(String),
}

impl Failed {
    fn of(e: &tokio_postgres::Error) -> Failed {
        // No server-side error: the connection failed. Classes 08 (connection), 57 (operator
        // intervention: shutdown, restart) and 53 (out of resources) pass too.
        let transient = match e.as_db_error() {
            None => true,
            Some(db) => matches!(&db.code().code()[..2], "08" | "57" | "53"),
        };
        if transient {
            Failed::Unreachable(describe(e))
        } else {
            Failed::Db(describe(e))
        }
    }
}

/// How long a group is tried again while the database cannot be reached. Past it, this server
/// stops leading (and restarts as a standby): what it holds in memory may no longer match what
/// it could store.
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

pub(super) async fn writer_loop(
    db: Database,
    mut rx: mpsc::UnboundedReceiver<Op>,
    leadership: Arc<Leadership>,
) {
    let mut conn: Option<(Client, Prepared)> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stop = false;
    while let Some(first) = rx.recv().await {
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
        let outcome = commit_retrying(&db, &mut conn, &batch, &leadership).await;
        let outcome = match outcome {
            Ok(answers) => Ok(answers),
            Err(Failed::Deposed(why)) => {
                log::warn!(
                    "job store {}: {} writes refused: {why}",
                    db.shown(),
                    batch.len()
                );
                leadership.depose(why.clone());
                Err(why)
            }
            Err(Failed::Db(message) | Failed::Unreachable(message)) => {
                log::error!(
                    "job store {}: group commit of {} writes failed: {message}",
                    db.shown(),
                    batch.len()
                );
                Err(message)
            }
        };
        answer_all(&mut batch, outcome, |message| StoreError::Postgres {
            db: db.shown().to_owned(),
            message: message.to_owned(),
        });
        if stop {
            return;
        }
    }
}

/// Commits one group, trying it again while the database cannot be reached: every statement of
/// a group can be replayed (a commit whose answer was lost is not applied twice).
async fn commit_retrying(
    db: &Database,
    conn: &mut Option<(Client, Prepared)>,
    batch: &[Op],
    leadership: &Leadership,
) -> Result<Vec<OpAnswer>, Failed> {
    let since = std::time::Instant::now();
    let mut warned = false;
    loop {
        if let Some(why) = leadership.deposed_reason() {
            return Err(Failed::Deposed(why));
        }
        match commit(db, conn, batch, leadership.epoch()).await {
            Err(Failed::Unreachable(why)) if since.elapsed() < UNREACHABLE_FOR => {
                if !warned {
                    log::warn!(
                        "job store {}: cannot commit {} writes: {why}; trying again for up to {}s",
                        db.shown(),
                        batch.len(),
                        UNREACHABLE_FOR.as_secs()
                    );
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(Failed::Unreachable(why)) => {
                leadership.depose(format!(
                    "the job store was unreachable for {}s ({why})",
                    UNREACHABLE_FOR.as_secs()
                ));
                return Err(Failed::Unreachable(why));
            }
            other => {
                if warned && other.is_ok() {
                    log::info!("job store {}: committing again", db.shown());
                }
                return other;
            }
        }
    }
}

/// Commits one group on the writer's connection (opened again if it broke).
async fn commit(
    db: &Database,
    conn: &mut Option<(Client, Prepared)>,
    batch: &[Op],
    epoch: i64,
) -> Result<Vec<OpAnswer>, Failed> {
    if conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
        *conn = None;
        let client = db
            .connect()
            .await
            .map_err(|e| Failed::Unreachable(e.to_string()))?;
        let prepared = prepare(&client).await.map_err(|e| Failed::of(&e))?;
        *conn = Some((client, prepared));
    }
    let (client, prepared) = conn.as_mut().expect("connected above");
    let res = apply(client, prepared, batch, epoch).await;
    if let Err(Failed::Db(_) | Failed::Unreachable(_)) = &res {
        if client.is_closed() {
            *conn = None;
        }
    }
    res
}

async fn apply(
    client: &mut Client,
    p: &Prepared,
    batch: &[Op],
    epoch: i64,
) -> Result<Vec<OpAnswer>, Failed> {
    let db = |e: tokio_postgres::Error| Failed::of(&e);
    let mut steps = Vec::new();
    let answer_at: Vec<usize> = batch.iter().map(|op| steps_of(op, &mut steps)).collect();
    let tx = client.transaction().await.map_err(db)?;
    let rows = {
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = steps
            .iter()
            .map(|s| {
                s.params
                    .iter()
                    .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                    .collect()
            })
            .collect();
        let fence = tx.query_one(&p.fence, &[]);
        type Query<'a> =
            Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;
        let queries: Vec<Query<'_>> = steps
            .iter()
            .zip(&params)
            .map(|(s, ps)| Box::pin(tx.query((s.stmt)(p), ps)) as Query<'_>)
            .collect();
        // Pipelined: the fence and every statement are sent before the first answer is read.
        let (fence, rows) = futures::join!(fence, futures::future::try_join_all(queries));
        let current: i64 = fence.map_err(db)?.get(0);
        if current != epoch {
            return Err(Failed::Deposed(format!(
                "another es-server leads the job store now (leader epoch {current}, this server's {epoch})"
            )));
        }
        rows.map_err(db)?
    };
    let mut answers = Vec::with_capacity(batch.len());
    for (op, at) in batch.iter().zip(answer_at) {
        answers.push(match op {
            Op::Insert(job, _, _) if rows[at].is_empty() => {
                // Not inserted: the submitter's key answers its earlier job, or this group is
                // a replay and the job is ours already.
                let row = tx
                    .query_one(
                        &format!(
                            "SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = $1 OR id = $2
                             ORDER BY (id = $2) DESC LIMIT 1"
                        ),
                        &[&scoped_key(job), &job.id],
                    )
                    .await
                    .map_err(db)?;
                let existing = raw_job(&row)
                    .map_err(db)?
                    .decode()
                    .map_err(|e| Failed::Db(e.to_string()))?;
                let ours = existing.id == job.id;
                OpAnswer::Inserted(Box::new(existing), ours)
            }
            Op::Insert(job, _, _) => OpAnswer::Inserted(job.clone(), true),
            Op::Purge(..) => OpAnswer::Purged(rows[at][0].get::<_, i64>(0) as u64),
            _ => OpAnswer::Done,
        });
    }
    tx.commit().await.map_err(db)?;
    Ok(answers)
}
