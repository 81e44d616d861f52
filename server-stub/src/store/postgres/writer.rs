//! The PostgreSQL store's writer: one task, one connection, group commit. Each group is one
//! transaction that first reads the leader epoch `FOR SHARE` and commits only if it is still
//! this server's: a deposed leader never commits. A group is a handful of statements over
//! arrays (group.rs), pipelined (sent together, answered in order): three round trips and at
//! most seven statements whatever its size.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashSet;

use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::conn::{describe, Database};
use super::group::{self, Group, Params};
use super::leader::Leadership;
use super::{raw_job, JOB_COLUMNS};
use crate::store::ops::{answer_all, Op, OpAnswer, MAX_BATCH};
use crate::store::{scoped_key, StoreError};

/// The statements a group uses, prepared once per connection.
struct Prepared {
    fence: Statement,
    insert_jobs: Statement,
    update_jobs: Statement,
    insert_events: Statement,
    insert_audit: Statement,
    purge_jobs: Statement,
    purge_audit: Statement,
}

async fn prepare(c: &Client) -> Result<Prepared, tokio_postgres::Error> {
    Ok(Prepared {
        fence: c.prepare("SELECT epoch FROM leader FOR SHARE").await?,
        insert_jobs: c.prepare(group::INSERT_JOBS).await?,
        update_jobs: c.prepare(group::UPDATE_JOBS).await?,
        insert_events: c.prepare(group::INSERT_EVENTS).await?,
        insert_audit: c.prepare(group::INSERT_AUDIT).await?,
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
    let group = Group::of(batch);
    let purge_before: Option<Params> = group
        .purge
        .map(|before| -> Params { vec![Box::new(before)] });
    // In this order: jobs before their updates and events, audit entries last.
    let statements: Vec<(&Statement, &Params)> = [
        (&p.insert_jobs, &group.inserts),
        (&p.update_jobs, &group.updates),
        (&p.insert_events, &group.events),
        (&p.insert_audit, &group.audit),
        (&p.purge_jobs, &purge_before),
        (&p.purge_audit, &purge_before),
    ]
    .into_iter()
    .filter_map(|(st, params)| params.as_ref().map(|ps| (st, ps)))
    .collect();
    let tx = client.transaction().await.map_err(db)?;
    let rows = {
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = statements
            .iter()
            .map(|(_, ps)| {
                ps.iter()
                    .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                    .collect()
            })
            .collect();
        let fence = tx.query_one(&p.fence, &[]);
        type Query<'a> =
            Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;
        let queries: Vec<Query<'_>> = statements
            .iter()
            .zip(&params)
            .map(|((st, _), ps)| Box::pin(tx.query(*st, ps)) as Query<'_>)
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
    let inserted: HashSet<String> = match group.inserts {
        Some(_) => rows[0].iter().map(|r| r.get::<_, String>(0)).collect(),
        None => HashSet::new(),
    };
    let purged = match group.purge {
        Some(_) => rows[rows.len() - 2][0].get::<_, i64>(0) as u64,
        None => 0,
    };
    let mut answers = Vec::with_capacity(batch.len());
    for op in batch {
        answers.push(match op {
            Op::Insert(job, _, _) if inserted.contains(&job.id) => {
                OpAnswer::Inserted(job.clone(), true)
            }
            Op::Insert(job, _, _) => {
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
            Op::Purge(..) => OpAnswer::Purged(purged),
            _ => OpAnswer::Done,
        });
    }
    tx.commit().await.map_err(db)?;
    Ok(answers)
}
