//! The job store on PostgreSQL (`--db postgres://…`): several es-server replicas on one
//! database, one of them leading (leader.rs). Writes go through one task that commits in
//! groups, each group fenced by the leader epoch (writer.rs); reads use a pool. The schema is
//! versioned and migrated at start (schema.rs).

pub mod conn;
mod group;
pub mod leader;
pub mod schema;
mod writer;

use std::sync::{Arc, Mutex};

use es_proto::v1::{AuditEntry, Job, JobEvent, JobState};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

pub use conn::Database;
pub use leader::Leadership;

use super::ops::Op;
use super::{
    decode_event, unscoped_key, JobStore, ListFilter, Purged, RawJob, Result, SandboxJob,
    StoreError, StoreFuture,
};

const JOB_COLUMNS: &str = "id, idempotency_key, role, selector, sandbox_id, spec, state, attempt, \
    max_attempts, epoch, agent, timeout_ms, cancel_requested, result, created_at_us, started_at_us, \
    finished_at_us, submitted_by";

/// Connections for reads (Watch, List, audit); writes use one more of their own.
const READ_POOL: usize = 8;

fn raw_job(r: &Row) -> std::result::Result<RawJob, tokio_postgres::Error> {
    let key: Option<String> = r.try_get(1)?;
    let job = Job {
        id: r.try_get(0)?,
        idempotency_key: unscoped_key(key.unwrap_or_default()),
        role: r.try_get(2)?,
        selector: r.try_get(3)?,
        sandbox_id: r.try_get(4)?,
        spec: None,
        state: r.try_get(6)?,
        attempt: r.try_get::<_, i64>(7)? as u32,
        max_attempts: r.try_get::<_, i64>(8)? as u32,
        epoch: r.try_get::<_, i64>(9)? as u64,
        agent: r.try_get(10)?,
        timeout_ms: r.try_get::<_, i64>(11)? as u64,
        cancel_requested: r.try_get(12)?,
        result: None,
        created_at_us: r.try_get(14)?,
        started_at_us: r.try_get(15)?,
        finished_at_us: r.try_get(16)?,
        submitted_by: r.try_get(17)?,
    };
    Ok(RawJob {
        job,
        spec: r.try_get(5)?,
        result: r.try_get(13)?,
    })
}

/// Connects and brings the schema up to date (or refuses a newer one).
pub async fn prepare(db: &Database) -> Result<()> {
    let mut client = db.connect().await?;
    let (from, to) = schema::migrate(db, &mut client).await?;
    if from != to {
        log::info!(
            "job store {}: schema at version {to} (was {from})",
            db.shown()
        );
    }
    Ok(())
}

/// The PostgreSQL store of the leading server.
pub struct PgStore {
    db: Database,
    tx: mpsc::UnboundedSender<Op>,
    pool: deadpool_postgres::Pool,
    writer: Mutex<Option<(tokio::task::JoinHandle<()>, oneshot::Receiver<()>)>>,
}

impl PgStore {
    /// Opens the store for a server leading with `leadership` (every write is fenced by its
    /// epoch). Call [`prepare`] first.
    pub fn open(db: &Database, leadership: Arc<Leadership>) -> Result<PgStore> {
        let pool = db.pool(READ_POOL)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = oneshot::channel();
        let wdb = db.clone();
        let writer = tokio::spawn(async move {
            writer::writer_loop(wdb, rx, leadership).await;
            let _ = done_tx.send(());
        });
        Ok(PgStore {
            db: db.clone(),
            tx,
            pool,
            writer: Mutex::new(Some((writer, done_rx))),
        })
    }

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

    /// Runs one query on a pooled connection.
    fn query(
        &self,
        sql: String,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> impl std::future::Future<Output = Result<Vec<Row>>> + Send + 'static {
        let pool = self.pool.clone();
        let db = self.db.clone();
        async move {
            let client = pool.get().await.map_err(|e| StoreError::Postgres {
                db: db.shown().to_owned(),
                message: format!("no connection for a read: {e}"),
            })?;
            let stmt = client.prepare_cached(&sql).await.map_err(|e| db.error(e))?;
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                .collect();
            client.query(&stmt, &refs).await.map_err(|e| db.error(e))
        }
    }

    fn jobs(
        &self,
        sql: String,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> StoreFuture<Vec<Job>> {
        let rows = self.query(sql, params);
        let db = self.db.clone();
        Box::pin(async move {
            rows.await?
                .iter()
                .map(|r| raw_job(r).map_err(|e| db.error(e))?.decode())
                .collect()
        })
    }
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// Appends `value` to `params` and answers its placeholder (`$N`).
fn bind(params: &mut Params, value: impl ToSql + Sync + Send + 'static) -> String {
    params.push(Box::new(value));
    format!("${}", params.len())
}

impl JobStore for PgStore {
    fn describe(&self) -> String {
        self.db.shown().to_owned()
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

    fn get(&self, id: &str) -> StoreFuture<Option<Job>> {
        let jobs = self.jobs(
            format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
            vec![Box::new(id.to_owned())],
        );
        Box::pin(async move { Ok(jobs.await?.into_iter().next()) })
    }

    fn list(&self, filter: ListFilter) -> StoreFuture<Vec<Job>> {
        let mut p: Params = Vec::new();
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE true");
        if !filter.states.is_empty() {
            let states: Vec<i32> = filter.states.iter().map(|s| *s as i32).collect();
            sql.push_str(&format!(" AND state = ANY({})", bind(&mut p, states)));
        }
        if let Some(role) = filter.role {
            sql.push_str(&format!(" AND role = {}", bind(&mut p, role as i32)));
        }
        if let Some(sb) = filter.sandbox_id {
            sql.push_str(&format!(" AND sandbox_id = {}", bind(&mut p, sb)));
        }
        if let Some(sel) = filter.selector {
            sql.push_str(&format!(" AND selector = {}", bind(&mut p, sel)));
        }
        if let Some((at, id)) = filter.before {
            let (a, b) = (bind(&mut p, at), bind(&mut p, id));
            sql.push_str(&format!(" AND (created_at_us, id) < ({a}, {b})"));
        }
        sql.push_str(&format!(
            " ORDER BY created_at_us DESC, id DESC LIMIT {}",
            bind(&mut p, filter.limit as i64)
        ));
        self.jobs(sql, p)
    }

    fn events_after(&self, job_id: &str, after: u64) -> StoreFuture<Vec<JobEvent>> {
        let rows = self.query(
            "SELECT body FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq".into(),
            vec![Box::new(job_id.to_owned()), Box::new(after as i64)],
        );
        let job_id = job_id.to_owned();
        Box::pin(async move {
            rows.await?
                .iter()
                .map(|r| decode_event(&job_id, r.get::<_, &[u8]>(0)))
                .collect()
        })
    }

    fn audit_trail(
        &self,
        sandbox_id: Option<String>,
        job_id: Option<String>,
        after_id: u64,
        limit: u32,
    ) -> StoreFuture<Vec<AuditEntry>> {
        let mut p: Params = Vec::new();
        let mut sql = format!(
            "SELECT id, at_us, sandbox_id, job_id, actor, action, detail FROM audit WHERE id > {}",
            bind(&mut p, after_id as i64)
        );
        if let Some(sb) = sandbox_id {
            sql.push_str(&format!(" AND sandbox_id = {}", bind(&mut p, sb)));
        }
        if let Some(j) = job_id {
            sql.push_str(&format!(" AND job_id = {}", bind(&mut p, j)));
        }
        sql.push_str(&format!(
            " ORDER BY id LIMIT {}",
            bind(&mut p, limit as i64)
        ));
        let rows = self.query(sql, p);
        Box::pin(async move {
            Ok(rows
                .await?
                .iter()
                .map(|r| AuditEntry {
                    id: r.get::<_, i64>(0) as u64,
                    at_us: r.get(1),
                    sandbox_id: r.get(2),
                    job_id: r.get(3),
                    actor: r.get(4),
                    action: r.get(5),
                    detail_json: r.get(6),
                })
                .collect())
        })
    }

    fn load_active(&self) -> StoreFuture<Vec<(Job, u64)>> {
        let rows = self.query(
            format!(
                "SELECT {JOB_COLUMNS}, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.job_id = jobs.id)
                 FROM jobs WHERE finished_at_us = 0 AND state IN ({}, {})
                 ORDER BY created_at_us, id",
                // `finished_at_us = 0` (set only with a final state) as in the predicate of
                // the jobs_live index (schema.rs), so that PostgreSQL uses it.
                JobState::Queued as i32,
                JobState::Running as i32,
            ),
            vec![],
        );
        let db = self.db.clone();
        Box::pin(async move {
            rows.await?
                .iter()
                .map(|r| {
                    let job = raw_job(r).map_err(|e| db.error(e))?.decode()?;
                    Ok((job, r.get::<_, i64>(18) as u64))
                })
                .collect()
        })
    }

    fn sandbox_history(&self) -> StoreFuture<Vec<SandboxJob>> {
        let rows = self.query(
            "SELECT sandbox_id, created_at_us, spec, state, id FROM jobs
             WHERE sandbox_id != '' ORDER BY created_at_us, id"
                .into(),
            vec![],
        );
        Box::pin(async move {
            rows.await?
                .iter()
                .map(|r| SandboxJob::decode(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                .collect()
        })
    }

    fn shutdown(&self) {
        let Some((_, done)) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let _ = self.tx.send(Op::Stop);
        // The writer commits what was queued before Stop, then ends.
        let _ = done.blocking_recv();
        self.pool.close();
    }

    fn threads_running(&self) -> bool {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(w, _)| !w.is_finished())
    }
}
