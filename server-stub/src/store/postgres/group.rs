//! One commit group as a handful of statements, whatever its size: the group's job inserts
//! (with their first events), events, audit entries and job updates each go to PostgreSQL as
//! arrays (`unnest`), one statement per kind, in that order (writer.rs). Per statement
//! PostgreSQL parses and plans once per connection; per row it only looks up by key and
//! inserts. Every statement can be replayed (a group whose commit answer was lost is sent
//! again, see writer.rs).

use std::collections::{HashMap, HashSet};

use es_proto::v1::{AuditEntry, Job, JobEvent};
use prost::Message;
use tokio_postgres::types::ToSql;

use crate::store::ops::Op;
use crate::store::{audit, scoped_key};

/// New jobs, each with its submit audit entry and its own first events (those that imply no
/// audit entry: the "queued" one), all written only with the job row: not for an earlier
/// job's key, nor twice on a replay. One statement, so that a submission's group is BEGIN,
/// fence, this and COMMIT. Answers the ids inserted.
pub const INSERT_JOBS: &str = "
WITH v AS (
  SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bytea[],
    $7::int[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[], $12::bigint[],
    $13::bool[], $14::bigint[], $15::bigint[], $16::bigint[], $17::text[], $18::text[])
    WITH ORDINALITY AS v(id, idempotency_key, role, selector, sandbox_id, spec, state, attempt,
      max_attempts, epoch, agent, timeout_ms, cancel_requested, created_at_us, started_at_us,
      finished_at_us, submitted_by, audit_detail, n)),
ins AS (
  INSERT INTO jobs (id, idempotency_key, role, selector, sandbox_id, spec, state, attempt,
    max_attempts, epoch, agent, timeout_ms, cancel_requested, result, created_at_us,
    started_at_us, finished_at_us, submitted_by)
  SELECT id, idempotency_key, role, selector, sandbox_id, spec, state, attempt, max_attempts,
    epoch, agent, timeout_ms, cancel_requested, NULL, created_at_us, started_at_us,
    finished_at_us, submitted_by
  FROM v ORDER BY n
  ON CONFLICT DO NOTHING RETURNING id),
aud AS (
  INSERT INTO audit (at_us, sandbox_id, job_id, actor, action, detail)
  SELECT v.created_at_us, v.sandbox_id, v.id, v.submitted_by, 'submit', v.audit_detail
  FROM v JOIN ins USING (id) ORDER BY v.n),
ev AS (
  INSERT INTO events (job_id, seq, at_us, body)
  SELECT e.job_id, e.seq, e.at_us, e.body
  FROM unnest($19::text[], $20::bigint[], $21::bigint[], $22::bytea[])
    WITH ORDINALITY AS e(job_id, seq, at_us, body, n)
  JOIN ins ON ins.id = e.job_id ORDER BY e.n
  ON CONFLICT DO NOTHING)
SELECT id FROM ins";

/// The mutable columns of jobs (the last state of each job in the group).
pub const UPDATE_JOBS: &str = "
UPDATE jobs j SET state = u.state, attempt = u.attempt, epoch = u.epoch, agent = u.agent,
  cancel_requested = u.cancel_requested, result = u.result, started_at_us = u.started_at_us,
  finished_at_us = u.finished_at_us
FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bigint[], $5::text[], $6::bool[],
  $7::bytea[], $8::bigint[], $9::bigint[])
  AS u(id, state, attempt, epoch, agent, cancel_requested, result, started_at_us, finished_at_us)
WHERE j.id = u.id";

/// Events (kept once per job and seq; those of a job that is not there are dropped), and the
/// audit entry each new one implies. Every lookup is a scalar subquery by key, never a join
/// the planner could turn into a scan of the table (plans are generic, see writer.rs). Both
/// inserts see the database as it was before the statement, so "not stored yet" is the same
/// test for the event and its entry (the group holds each job and seq once).
pub const INSERT_EVENTS: &str = "
WITH v AS (
  SELECT v.*, (SELECT sandbox_id FROM jobs WHERE id = v.job_id) AS sandbox_id,
    (SELECT true FROM events e WHERE e.job_id = v.job_id AND e.seq = v.seq) AS stored
  FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[], $5::text[], $6::text[],
    $7::text[]) WITH ORDINALITY AS v(job_id, seq, at_us, body, actor, action, detail, n)),
e AS (
  INSERT INTO events (job_id, seq, at_us, body)
  SELECT job_id, seq, at_us, body FROM v WHERE sandbox_id IS NOT NULL AND stored IS NULL
  ORDER BY n
  ON CONFLICT DO NOTHING)
INSERT INTO audit (at_us, sandbox_id, job_id, actor, action, detail)
SELECT at_us, sandbox_id, job_id, actor, action, detail FROM v
WHERE sandbox_id IS NOT NULL AND stored IS NULL AND action IS NOT NULL ORDER BY n";

/// Audit entries no job write implies (cancel, drain); an empty sandbox id is taken from the
/// job's row.
pub const INSERT_AUDIT: &str = "
INSERT INTO audit (at_us, sandbox_id, job_id, actor, action, detail)
SELECT v.at_us, COALESCE(NULLIF(v.sandbox_id, ''),
    (SELECT sandbox_id FROM jobs WHERE id = v.job_id), ''),
  v.job_id, v.actor, v.action, v.detail
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
  WITH ORDINALITY AS v(at_us, sandbox_id, job_id, actor, action, detail, n)
ORDER BY v.n";

pub type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// The parameters of each statement of one group (`None`: nothing of that kind).
#[derive(Default)]
pub struct Group {
    pub inserts: Option<Params>,
    pub updates: Option<Params>,
    pub events: Option<Params>,
    pub audit: Option<Params>,
    /// The cutoff and batch size of the group's last Purge op, if any.
    pub purge: Option<(i64, u32)>,
}

#[derive(Default)]
struct Inserts {
    id: Vec<String>,
    key: Vec<Option<String>>,
    role: Vec<i32>,
    selector: Vec<String>,
    sandbox: Vec<String>,
    spec: Vec<Vec<u8>>,
    state: Vec<i32>,
    attempt: Vec<i64>,
    max_attempts: Vec<i64>,
    epoch: Vec<i64>,
    agent: Vec<String>,
    timeout: Vec<i64>,
    cancel: Vec<bool>,
    created: Vec<i64>,
    started: Vec<i64>,
    finished: Vec<i64>,
    by: Vec<String>,
    detail: Vec<String>,
    /// The jobs' own events that imply no audit entry (written with the job, INSERT_JOBS).
    ev_job: Vec<String>,
    ev_seq: Vec<i64>,
    ev_at: Vec<i64>,
    ev_body: Vec<Vec<u8>>,
}

#[derive(Default)]
struct Events {
    job: Vec<String>,
    seq: Vec<i64>,
    at: Vec<i64>,
    body: Vec<Vec<u8>>,
    actor: Vec<Option<String>>,
    action: Vec<Option<String>>,
    detail: Vec<Option<String>>,
    seen: HashSet<(String, u64)>,
}

impl Events {
    fn push(&mut self, ev: &JobEvent) {
        // Once per (job, seq) in a group too: a resent event must not imply a second entry.
        if !self.seen.insert((ev.job_id.clone(), ev.seq)) {
            return;
        }
        let a = audit::of_event(ev);
        self.job.push(ev.job_id.clone());
        self.seq.push(ev.seq as i64);
        self.at.push(ev.at_us);
        self.body.push(ev.encode_to_vec());
        self.actor.push(a.as_ref().map(|a| a.actor.clone()));
        self.action.push(a.as_ref().map(|a| a.action.clone()));
        self.detail.push(a.map(|a| a.detail_json));
    }
}

fn some_if<T>(rows: usize, params: impl FnOnce() -> T) -> Option<T> {
    (rows > 0).then(params)
}

impl Group {
    pub fn of(batch: &[Op]) -> Group {
        let mut ins = Inserts::default();
        let mut updates: Vec<Job> = Vec::new();
        let mut updated_at: HashMap<String, usize> = HashMap::new();
        let mut events = Events::default();
        let mut entries: Vec<AuditEntry> = Vec::new();
        let mut purge = None;
        let mut update = |job: &Job| match updated_at.get(&job.id) {
            // Updates overwrite every mutable column: the last one of the group wins.
            Some(&i) => updates[i] = job.clone(),
            None => {
                updated_at.insert(job.id.clone(), updates.len());
                updates.push(job.clone());
            }
        };
        for op in batch {
            match op {
                Op::Insert(job, evs, _) => {
                    ins.id.push(job.id.clone());
                    ins.key.push(scoped_key(job));
                    ins.role.push(job.role);
                    ins.selector.push(job.selector.clone());
                    ins.sandbox.push(job.sandbox_id.clone());
                    ins.spec.push(
                        job.spec
                            .as_ref()
                            .map(|s| s.encode_to_vec())
                            .unwrap_or_default(),
                    );
                    ins.state.push(job.state);
                    ins.attempt.push(job.attempt as i64);
                    ins.max_attempts.push(job.max_attempts as i64);
                    ins.epoch.push(job.epoch as i64);
                    ins.agent.push(job.agent.clone());
                    ins.timeout.push(job.timeout_ms as i64);
                    ins.cancel.push(job.cancel_requested);
                    ins.created.push(job.created_at_us);
                    ins.started.push(job.started_at_us);
                    ins.finished.push(job.finished_at_us);
                    ins.by.push(job.submitted_by.clone());
                    ins.detail.push(audit::of_submit(job).detail_json);
                    for ev in evs {
                        if audit::of_event(ev).is_some() {
                            events.push(ev);
                        } else if events.seen.insert((ev.job_id.clone(), ev.seq)) {
                            ins.ev_job.push(ev.job_id.clone());
                            ins.ev_seq.push(ev.seq as i64);
                            ins.ev_at.push(ev.at_us);
                            ins.ev_body.push(ev.encode_to_vec());
                        }
                    }
                }
                Op::Update(job, evs, _) => {
                    update(job);
                    evs.iter().for_each(|e| events.push(e));
                }
                Op::Events(evs, _) => evs.iter().for_each(|e| events.push(e)),
                Op::Audit(es, _) => entries.extend(es.iter().cloned()),
                Op::Purge { before, batch, .. } => purge = Some((*before, *batch)),
                Op::Stop => {}
            }
        }
        Group {
            inserts: some_if(ins.id.len(), || -> Params {
                vec![
                    Box::new(ins.id),
                    Box::new(ins.key),
                    Box::new(ins.role),
                    Box::new(ins.selector),
                    Box::new(ins.sandbox),
                    Box::new(ins.spec),
                    Box::new(ins.state),
                    Box::new(ins.attempt),
                    Box::new(ins.max_attempts),
                    Box::new(ins.epoch),
                    Box::new(ins.agent),
                    Box::new(ins.timeout),
                    Box::new(ins.cancel),
                    Box::new(ins.created),
                    Box::new(ins.started),
                    Box::new(ins.finished),
                    Box::new(ins.by),
                    Box::new(ins.detail),
                    Box::new(ins.ev_job),
                    Box::new(ins.ev_seq),
                    Box::new(ins.ev_at),
                    Box::new(ins.ev_body),
                ]
            }),
            updates: some_if(updates.len(), || -> Params {
                let col = |f: fn(&Job) -> i64| updates.iter().map(f).collect::<Vec<i64>>();
                vec![
                    Box::new(updates.iter().map(|j| j.id.clone()).collect::<Vec<_>>()),
                    Box::new(updates.iter().map(|j| j.state).collect::<Vec<_>>()),
                    Box::new(col(|j| j.attempt as i64)),
                    Box::new(col(|j| j.epoch as i64)),
                    Box::new(updates.iter().map(|j| j.agent.clone()).collect::<Vec<_>>()),
                    Box::new(
                        updates
                            .iter()
                            .map(|j| j.cancel_requested)
                            .collect::<Vec<_>>(),
                    ),
                    Box::new(
                        updates
                            .iter()
                            .map(|j| j.result.as_ref().map(|r| r.encode_to_vec()))
                            .collect::<Vec<_>>(),
                    ),
                    Box::new(col(|j| j.started_at_us)),
                    Box::new(col(|j| j.finished_at_us)),
                ]
            }),
            events: some_if(events.job.len(), || -> Params {
                vec![
                    Box::new(events.job),
                    Box::new(events.seq),
                    Box::new(events.at),
                    Box::new(events.body),
                    Box::new(events.actor),
                    Box::new(events.action),
                    Box::new(events.detail),
                ]
            }),
            audit: some_if(entries.len(), || -> Params {
                let text = |f: fn(&AuditEntry) -> &String| {
                    entries.iter().map(|e| f(e).clone()).collect::<Vec<_>>()
                };
                vec![
                    Box::new(entries.iter().map(|e| e.at_us).collect::<Vec<_>>()),
                    Box::new(text(|e| &e.sandbox_id)),
                    Box::new(text(|e| &e.job_id)),
                    Box::new(text(|e| &e.actor)),
                    Box::new(text(|e| &e.action)),
                    Box::new(text(|e| &e.detail_json)),
                ]
            }),
            purge,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::v1::{job_event, JobState};
    use tokio::sync::oneshot;

    fn job(id: &str) -> Box<Job> {
        Box::new(Job {
            id: id.into(),
            ..Default::default()
        })
    }

    fn state(id: &str, seq: u64, s: JobState, attempt: u32) -> JobEvent {
        JobEvent {
            job_id: id.into(),
            seq,
            attempt,
            event: Some(job_event::Event::State(s as i32)),
            ..Default::default()
        }
    }

    /// The rows of column `i` of `params`, as Debug shows them.
    fn column(params: &Option<Params>, i: usize) -> String {
        format!("{:?}", params.as_ref().expect("statement present")[i])
    }

    #[test]
    fn a_group_sorts_each_write_to_its_statement() {
        let batch = vec![
            // A submission: its "queued" event goes with the job row (no audit entry).
            Op::Insert(
                job("a"),
                vec![state("a", 1, JobState::Queued, 0)],
                oneshot::channel().0,
            ),
            // Its lease in the same group: an update, and an event with an audit entry.
            Op::Update(
                Box::new(Job {
                    state: JobState::Running as i32,
                    ..*job("a")
                }),
                vec![state("a", 2, JobState::Running, 1)],
                oneshot::channel().0,
            ),
            // The same event sent again: kept once.
            Op::Events(
                vec![state("a", 2, JobState::Running, 1)],
                oneshot::channel().0,
            ),
            // The result: the last update of a job wins.
            Op::Update(
                Box::new(Job {
                    state: JobState::Succeeded as i32,
                    ..*job("a")
                }),
                vec![state("a", 3, JobState::Succeeded, 1)],
                oneshot::channel().0,
            ),
        ];
        let g = Group::of(&batch);
        assert_eq!(column(&g.inserts, 0), r#"["a"]"#);
        assert_eq!(column(&g.inserts, 18), r#"["a"]"#, "the queued event's job");
        assert_eq!(column(&g.inserts, 19), "[1]", "the queued event's seq");
        assert_eq!(column(&g.updates, 0), r#"["a"]"#, "one update per job");
        assert_eq!(
            column(&g.updates, 1),
            format!("[{}]", JobState::Succeeded as i32),
            "the last one"
        );
        assert_eq!(
            column(&g.events, 1),
            "[2, 3]",
            "each seq once, the queued one not here"
        );
        assert_eq!(
            column(&g.events, 5),
            r#"[Some("lease"), Some("state")]"#,
            "each with its audit entry"
        );
        assert!(g.audit.is_none() && g.purge.is_none());
    }
}
