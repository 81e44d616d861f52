//! The PostgreSQL store's writer: one task, one connection, group commit. Each group is one
//! transaction that first checks the leader epoch (`es_fence`, schema.rs) and commits only if
//! it is still this server's: a deposed leader never commits. A group is a handful of
//! statements over arrays (group.rs), pipelined with its BEGIN and COMMIT: one round trip and
//! at most ten statements whatever its size (a submission's group is four: BEGIN, the fence,
//! INSERT_JOBS and COMMIT).

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
use super::schema;
use super::{raw_job, JOB_COLUMNS};
use crate::store::ops::{answer_all, Op, OpAnswer, MAX_BATCH};
use crate::store::{scoped_key, Purged, StoreError};

/// The statements a group uses, prepared once per connection.
struct Prepared {
    begin: Statement,
    fence: Statement,
    insert_jobs: Statement,
    nested_loops: Statement,
    update_jobs: Statement,
    insert_events: Statement,
    insert_audit: Statement,
    purge: Statement,
    commit: Statement,
    existing: Statement,
}

/// Planner settings for the rest of the transaction, sent before the job updates: the update
/// joins the group's rows (1 to 4 096) to jobs, and only a nested loop over the primary key
/// suits every size. Its generic plan, made while the tables were still small (a new
/// database), otherwise joined the group to a scan of every job and kept doing so as they grew
/// (3 ms per group at 20 000 jobs). The statements after it (the purge) look jobs and events
/// up by key as well.
const NESTED_LOOPS: &str =
    "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)";

async fn prepare(c: &Client) -> Result<Prepared, tokio_postgres::Error> {
    // Planned once per connection: planning these statements cost more than running them for
    // a one-job group (0.6 ms of the 1.1 ms a submission's group took). Their plans suit any
    // group and table size: lookups by key (group.rs) and NESTED_LOOPS before the updates.
    // No JIT: it compiles a plan at every execution once its estimated cost passes
    // jit_above_cost, which a generic plan over big tables does; the purge's (a scan of old
    // audit entries it rarely runs) took 500-960 ms per batch instead of 32-36 ms on a table
    // of 876 000 entries (psql, README "Retention").
    c.batch_execute("SET plan_cache_mode = force_generic_plan; SET jit = off")
        .await?;
    Ok(Prepared {
        begin: c.prepare("BEGIN").await?,
        fence: c.prepare("SELECT es_fence($1)").await?,
        insert_jobs: c.prepare(group::INSERT_JOBS).await?,
        nested_loops: c.prepare(NESTED_LOOPS).await?,
        update_jobs: c.prepare(group::UPDATE_JOBS).await?,
        insert_events: c.prepare(group::INSERT_EVENTS).await?,
        insert_audit: c.prepare(group::INSERT_AUDIT).await?,
        // At most $2 jobs, oldest first (a job finished before the cutoff was created before
        // it: jobs_list finds them in order), with their events and audit entries found by
        // job. Only once fewer than $2 jobs were left, the entries of no job (or of a job gone
        // otherwise): at most $2. Entries of jobs kept (queued, running, or finished recently)
        // stay with them. Found by job, not by a scan of old entries: each batch's scan would
        // pass again over the rows the batches before it deleted (dead until a vacuum).
        purge: c
            .prepare(
                "WITH d AS (DELETE FROM jobs WHERE id IN (SELECT id FROM jobs
                     WHERE created_at_us < $1 AND finished_at_us > 0 AND finished_at_us < $1
                     ORDER BY created_at_us LIMIT $2) RETURNING id),
                 e AS (DELETE FROM events WHERE job_id IN (SELECT id FROM d)),
                 a AS (DELETE FROM audit WHERE job_id IN (SELECT id FROM d) AND at_us < $1
                     RETURNING 1),
                 o AS (DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at_us < $1
                     AND (SELECT count(*) FROM d) < $2
                     AND (job_id = '' OR NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = audit.job_id))
                     LIMIT $2) RETURNING 1)
                 SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM a), (SELECT count(*) FROM o)",
            )
            .await?,
        commit: c.prepare("COMMIT").await?,
        existing: c
            .prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = $1 OR id = $2
                 ORDER BY (id = $2) DESC LIMIT 1"
            ))
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
    client: &Client,
    p: &Prepared,
    batch: &[Op],
    epoch: i64,
) -> Result<Vec<OpAnswer>, Failed> {
    let db = |e: tokio_postgres::Error| Failed::of(&e);
    let group = Group::of(batch);
    let purge_before: Option<Params> = group
        .purge
        .map(|(before, batch)| -> Params { vec![Box::new(before), Box::new(i64::from(batch))] });
    let no_params: Option<Params> =
        (group.updates.is_some() || purge_before.is_some()).then(Vec::new);
    // In this order: jobs before their events, updates and audit entries; the planner
    // settings (NESTED_LOOPS) before the updates and the purge, after what needs hash joins.
    let statements: Vec<(&Statement, &Params)> = [
        (&p.insert_jobs, &group.inserts),
        (&p.insert_events, &group.events),
        (&p.insert_audit, &group.audit),
        (&p.nested_loops, &no_params),
        (&p.update_jobs, &group.updates),
        (&p.purge, &purge_before),
    ]
    .into_iter()
    .filter_map(|(st, params)| params.as_ref().map(|ps| (st, ps)))
    .collect();
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = statements
        .iter()
        .map(|(_, ps)| {
            ps.iter()
                .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                .collect()
        })
        .collect();
    type Query<'a> =
        Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;
    let queries: Vec<Query<'_>> = statements
        .iter()
        .zip(&params)
        .map(|((st, _), ps)| Box::pin(client.query(*st, ps)) as Query<'_>)
        .collect();
    // One round trip: BEGIN, the fence, every statement and COMMIT are sent before the first
    // answer is read (each future sends its request when first polled, and join! polls them
    // in this order). When the fence or a statement fails, PostgreSQL skips the rest of the
    // transaction and answers COMMIT with a rollback: nothing of the group is kept.
    let fence_params: [&(dyn ToSql + Sync); 1] = [&epoch];
    let (begin, fence, rows, commit) = futures::join!(
        client.execute(&p.begin, &[]),
        client.query_one(&p.fence, &fence_params),
        futures::future::join_all(queries),
        client.execute(&p.commit, &[]),
    );
    begin.map_err(db)?;
    fence.map_err(|e| match e.as_db_error() {
        Some(d) if d.code().code() == schema::DEPOSED => Failed::Deposed(d.message().to_owned()),
        _ => db(e),
    })?;
    let rows = rows
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    commit.map_err(db)?;
    let inserted: HashSet<String> = match group.inserts {
        Some(_) => rows[0].iter().map(|r| r.get::<_, String>(0)).collect(),
        None => HashSet::new(),
    };
    let purged = match group.purge {
        Some((_, batch)) => {
            let counts = &rows[rows.len() - 1][0];
            let (jobs, of_jobs, others) = (
                counts.get::<_, i64>(0) as u64,
                counts.get::<_, i64>(1) as u64,
                counts.get::<_, i64>(2) as u64,
            );
            Purged {
                jobs,
                audit: of_jobs + others,
                more: jobs >= u64::from(batch) || others >= u64::from(batch),
            }
        }
        None => Purged::default(),
    };
    let mut answers = Vec::with_capacity(batch.len());
    for op in batch {
        answers.push(match op {
            Op::Insert(job, _, _) if inserted.contains(&job.id) => {
                OpAnswer::Inserted(job.clone(), true)
            }
            Op::Insert(job, _, _) => {
                // Not inserted: the submitter's key answers its earlier job, or this group is
                // a replay and the job is ours already. Read after the commit: what it finds
                // is committed either way.
                let row = client
                    .query_one(&p.existing, &[&scoped_key(job), &job.id])
                    .await
                    .map_err(db)?;
                let existing = raw_job(&row)
                    .map_err(db)?
                    .decode()
                    .map_err(|e| Failed::Db(e.to_string()))?;
                let ours = existing.id == job.id;
                OpAnswer::Inserted(Box::new(existing), ours)
            }
            Op::Purge { .. } => OpAnswer::Purged(purged),
            _ => OpAnswer::Done,
        });
    }
    Ok(answers)
}
