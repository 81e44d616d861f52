//! `JobService`: submit, get, watch, list, cancel, agents, drain and audit for submitters, each
//! under its scope; what a submitter reads back has its secrets masked.

use std::sync::Arc;

use es_proto::v1::job_service_server::JobService;
use es_proto::v1::*;
use tonic::{Request, Response, Status};

use super::auth::{Auth, Caller, Scope};
use super::{invalid, require, validate, BoxStream};
use crate::dispatch::{DispatchError, Dispatcher};
use crate::store::ListFilter;
use es_proto::limits::PAGE_BUDGET;
use prost::Message;

pub struct JobApi {
    pub d: Arc<Dispatcher>,
    pub auth: Arc<Auth>,
}

impl JobApi {
    /// Any authenticated submitter may read (read scope).
    fn reader<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let c = self.auth.submitter(req, "")?;
        self.auth.require(req, &c, Scope::Read, "reading jobs")?;
        Ok(c)
    }

    /// Records an operator or submitter action that no job event implies (cancel, drain).
    async fn audit(&self, mut entry: AuditEntry) -> Result<(), Status> {
        entry.at_us = crate::dispatch::now_us();
        self.d
            .store()
            .audit(vec![entry])
            .await
            .map_err(|e| DispatchError::from(e).into())
    }
}

/// What a submitter reads back: secret values of a job's variables are masked. Only the agent
/// that runs the job receives them (in its lease).
pub fn redact(mut job: Job) -> Job {
    if let Some(spec) = job.spec.as_mut() {
        if let Some(es_proto::v1::job_spec::Kind::RunCommand(rc)) = spec.kind.as_mut() {
            for v in rc.env.iter_mut().filter(|v| v.secret) {
                v.value = MASK.into();
            }
        }
        // Jobs stored before external ids were refused may still hold one.
        if let Some(t) = spec.target.as_mut().filter(|t| !t.external_id.is_empty()) {
            t.external_id = MASK.into();
        }
    }
    job
}

/// Whether the submitted job is the one stored under its idempotency key.
fn same_job(req: &SubmitRequest, job: &Job) -> bool {
    req.role == job.role
        && req.selector == job.selector
        && req.sandbox_id == job.sandbox_id
        && req.spec == job.spec
}

/// Stops adding items once their encoded size would pass the page budget (at least one item).
fn within_budget<T: Message>(items: &mut Vec<T>) -> bool {
    let mut used = 0;
    for (i, it) in items.iter().enumerate() {
        used += it.encoded_len() + 8;
        if used > PAGE_BUDGET && i > 0 {
            items.truncate(i);
            return true;
        }
    }
    false
}

/// Replaces a secret value wherever it is shown.
pub const MASK: &str = "***";

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit(
        &self,
        req: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let caller = self.auth.submitter(&req, &req.get_ref().submitted_by)?;
        self.auth.require(&req, &caller, Scope::Submit, "Submit")?;
        if let Some(es_proto::v1::job_spec::Kind::SweepOrphans(_)) =
            req.get_ref().spec.as_ref().and_then(|s| s.kind.as_ref())
        {
            self.auth.require(
                &req,
                &caller,
                Scope::Admin,
                "SweepOrphans (it deletes sandboxes)",
            )?;
        }
        let req = req.into_inner();
        validate::submit(&req).map_err(invalid)?;
        let who = caller.actor;
        let job = Job {
            // Time-ordered ids keep the store's B-trees append-mostly (fewer pages per commit).
            id: uuid::Uuid::now_v7().to_string(),
            idempotency_key: req.idempotency_key.clone(),
            role: req.role,
            selector: req.selector.clone(),
            sandbox_id: req.sandbox_id.clone(),
            spec: req.spec.clone(),
            timeout_ms: req.timeout_ms,
            max_attempts: req.max_attempts,
            submitted_by: who,
            ..Default::default()
        };
        let (job, created) = self.d.submit(job).await?;
        if !created && !same_job(&req, &job) {
            return Err(Status::already_exists(format!(
                "idempotency key {:?} was used for another job ({}, different role, selector, sandbox or spec): use a new key",
                req.idempotency_key, job.id
            )));
        }
        let warnings = if job.state == JobState::Queued as i32 {
            self.d.no_server_warning(job.role, &job.selector)
        } else {
            None
        };
        Ok(Response::new(SubmitResponse {
            job: Some(redact(job)),
            created,
            warnings: warnings.into_iter().collect(),
        }))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<Job>, Status> {
        self.reader(&req)?;
        let id = req.into_inner().job_id;
        require("job_id", &id)?;
        Ok(Response::new(redact(self.d.get(&id).await?)))
    }

    type WatchStream = BoxStream<JobEvent>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.reader(&req)?;
        let req = req.into_inner();
        require("job_id", &req.job_id)?;
        // Subscribe first, then read history: nothing falls between the two.
        let mut live = self.d.subscribe();
        self.d.get(&req.job_id).await?;
        let d = self.d.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let gauge = d.metrics().watch_streams.clone();
        tokio::spawn(async move {
            // Counted while this task lives (the metric shows tasks that outlive clients).
            gauge.inc();
            struct Dec(prometheus_client::metrics::gauge::Gauge);
            impl Drop for Dec {
                fn drop(&mut self) {
                    self.0.dec();
                }
            }
            let _counted = Dec(gauge);
            let id = req.job_id;
            let mut last = req.after_seq;
            let mut done = false;
            // History (and again after a lag).
            loop {
                match d.store().events_after(&id, last).await {
                    Ok(events) => {
                        for ev in events {
                            last = ev.seq;
                            done |= matches!(ev.event, Some(job_event::Event::Result(_)));
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                        return;
                    }
                }
                if done {
                    return;
                }
                loop {
                    // A client that went away ends this task now, not at the job's next event.
                    let next = tokio::select! {
                        _ = tx.closed() => return,
                        next = live.recv() => next,
                    };
                    match next {
                        Ok(ev) if ev.job_id == id && ev.seq > last => {
                            if ev.seq > last + 1 {
                                // Published out of order: read the gap from the store.
                                break;
                            }
                            last = ev.seq;
                            let end = matches!(ev.event, Some(job_event::Event::Result(_)));
                            if tx.send(Ok(ev)).await.is_err() || end {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel(
        &self,
        req: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let caller = self.auth.submitter(&req, "")?;
        self.auth.require(&req, &caller, Scope::Submit, "Cancel")?;
        require("job_id", &req.get_ref().job_id)?;
        validate::reason("reason", &req.get_ref().reason).map_err(invalid)?;
        let before = self.d.get(&req.get_ref().job_id).await?;
        if before.submitted_by != caller.actor {
            self.auth.require(
                &req,
                &caller,
                Scope::Admin,
                "Cancel of another submitter's job",
            )?;
        }
        let req = req.into_inner();
        let finished = JobState::try_from(before.state).is_ok_and(|s| s.is_terminal());
        let job = self.d.cancel(&req.job_id, &req.reason).await?;
        if finished || before.cancel_requested {
            // Nothing changed: no audit row (repeated cancels must not grow the trail).
            return Ok(Response::new(CancelResponse {
                job: Some(redact(job)),
            }));
        }
        let who = caller.actor;
        self.audit(AuditEntry {
            sandbox_id: job.sandbox_id.clone(),
            job_id: job.id.clone(),
            actor: who,
            action: "cancel".into(),
            detail_json: serde_json::json!({"reason": req.reason}).to_string(),
            ..Default::default()
        })
        .await?;
        Ok(Response::new(CancelResponse {
            job: Some(redact(job)),
        }))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        self.reader(&req)?;
        let req = req.into_inner();
        let mut states = Vec::new();
        for s in &req.states {
            match JobState::try_from(*s) {
                Ok(st) if st != JobState::Unspecified => states.push(st),
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "invalid `states`: unknown state {s}"
                    )))
                }
            }
        }
        let role = match Role::try_from(req.role) {
            Ok(Role::Unspecified) => None,
            Ok(r) => Some(r),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "invalid `role`: unknown role {}; must be shells or commands",
                    req.role
                )))
            }
        };
        if req.limit > 10_000 {
            return Err(Status::invalid_argument("invalid `limit`: at most 10000"));
        }
        let before = match req.page_token.as_str() {
            "" => None,
            t => Some(
                t.split_once('/')
                    .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_owned())))
                    .ok_or_else(|| {
                        Status::invalid_argument(
                            "invalid `page_token`: pass the next_page_token of a previous answer unchanged",
                        )
                    })?,
            ),
        };
        let limit = if req.limit == 0 { 100 } else { req.limit };
        let filter = ListFilter {
            states,
            role,
            sandbox_id: (!req.sandbox_id.is_empty()).then_some(req.sandbox_id),
            selector: (!req.selector.is_empty()).then_some(req.selector),
            before,
            limit: limit + 1,
        };
        let mut jobs: Vec<Job> = self
            .d
            .store()
            .list(filter)
            .await
            .map_err(DispatchError::from)?
            .into_iter()
            .map(redact)
            .collect();
        let mut more = jobs.len() > limit as usize;
        jobs.truncate(limit as usize);
        more |= within_budget(&mut jobs);
        let next_page_token = match jobs.last() {
            Some(j) if more => format!("{}/{}", j.created_at_us, j.id),
            _ => String::new(),
        };
        Ok(Response::new(ListResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn agents(
        &self,
        req: Request<AgentsRequest>,
    ) -> Result<Response<AgentsResponse>, Status> {
        self.reader(&req)?;
        Ok(Response::new(AgentsResponse {
            agents: self.d.agents(),
        }))
    }

    async fn audit(&self, req: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        self.reader(&req)?;
        let req = req.into_inner();
        if req.sandbox_id.is_empty() && req.job_id.is_empty() && !req.all {
            return Err(Status::invalid_argument(
                "invalid `sandbox_id`: give a sandbox id, a job id, or all = true",
            ));
        }
        if req.limit > 10_000 {
            return Err(Status::invalid_argument("invalid `limit`: at most 10000"));
        }
        let limit = if req.limit == 0 { 1000 } else { req.limit };
        let mut entries = self
            .d
            .store()
            .audit_trail(
                (!req.sandbox_id.is_empty()).then_some(req.sandbox_id),
                (!req.job_id.is_empty()).then_some(req.job_id),
                req.after_id,
                limit + 1,
            )
            .await
            .map_err(DispatchError::from)?;
        let mut more = entries.len() > limit as usize;
        entries.truncate(limit as usize);
        more |= within_budget(&mut entries);
        let next_after_id = match entries.last() {
            Some(e) if more => e.id,
            _ => 0,
        };
        Ok(Response::new(AuditResponse {
            entries,
            next_after_id,
        }))
    }

    async fn drain_agent(
        &self,
        req: Request<DrainAgentRequest>,
    ) -> Result<Response<DrainAgentResponse>, Status> {
        let caller = self.auth.submitter(&req, "")?;
        self.auth
            .require(&req, &caller, Scope::Admin, "DrainAgent")?;
        let who = caller.actor;
        let req = req.into_inner();
        require("name", &req.name)?;
        validate::reason("reason", &req.reason).map_err(invalid)?;
        let agent = self.d.drain_agent(&req.name, &req.reason)?;
        self.audit(AuditEntry {
            actor: who,
            action: "drain".into(),
            detail_json: serde_json::json!({"agent": req.name, "reason": req.reason}).to_string(),
            ..Default::default()
        })
        .await?;
        Ok(Response::new(DrainAgentResponse { agent: Some(agent) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_stop_at_the_budget_but_hold_at_least_one_item() {
        let entry = |n: usize| AuditEntry {
            detail_json: "x".repeat(n),
            ..Default::default()
        };
        let mut small: Vec<AuditEntry> = (0..10).map(|_| entry(100)).collect();
        assert!(!within_budget(&mut small));
        assert_eq!(small.len(), 10);
        let mut big: Vec<AuditEntry> = (0..10).map(|_| entry(1024 * 1024)).collect();
        assert!(within_budget(&mut big), "more remain");
        assert_eq!(big.len(), 2, "two 1 MiB entries fit 3 MiB, three do not");
        let mut huge = vec![entry(PAGE_BUDGET + 1)];
        assert!(!within_budget(&mut huge));
        assert_eq!(huge.len(), 1, "a single item is always answered");
    }

    #[test]
    fn a_resubmission_is_the_same_job_only_with_the_same_work() {
        let req = SubmitRequest {
            role: Role::Shells as i32,
            sandbox_id: "sb-1".into(),
            spec: Some(es_proto::v1::JobSpec {
                kind: Some(es_proto::v1::job_spec::Kind::Echo(EchoJob {
                    message: "a".into(),
                })),
                target: None,
            }),
            ..Default::default()
        };
        let job = Job {
            role: req.role,
            sandbox_id: req.sandbox_id.clone(),
            spec: req.spec.clone(),
            timeout_ms: 3_600_000,
            ..Default::default()
        };
        assert!(
            same_job(&req, &job),
            "defaults filled in by the server do not count"
        );
        let mut other = req.clone();
        other.sandbox_id = "sb-2".into();
        assert!(!same_job(&other, &job));
    }
}
