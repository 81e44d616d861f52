//! One job task per accepted offer: acquire, execute (in a child task that can be aborted),
//! report events with sequence numbers, resend the result until acknowledged.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use es_proto::v1::*;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::backoff::Backoff;
use crate::executor::{self, JobCtx, JobEventOut};
use crate::rpc::call;
use crate::session::{RunningJob, Shared};

/// Acquire, run, report and complete one job.
pub(crate) async fn job_task(
    shared: Arc<Shared>,
    executor: Arc<executor::Executor>,
    job_id: String,
    permit: OwnedSemaphorePermit,
) {
    let agent = shared.cfg.name.clone();
    let Some(session) = shared.session() else {
        return;
    };
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let lease = loop {
        let req = AcquireRequest {
            session_id: session.id.clone(),
            job_id: job_id.clone(),
        };
        match shared.client().acquire(call(req)).await {
            Ok(r) => match r.into_inner().lease {
                Some(l) => break l,
                None => return,
            },
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
                ) && backoff.ceiling() < Duration::from_secs(2) =>
            {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(s) => {
                log::debug!(job_id = job_id.as_str(), agent = agent.as_str(); "acquire of {job_id} refused: {} ({})", s.message(), s.code());
                return;
            }
        }
    };
    let job = lease.job.clone().unwrap_or_default();
    let epoch = lease.epoch;
    let cancel = CancellationToken::new();
    let fence = CancellationToken::new();
    {
        let mut jobs = shared.jobs();
        if jobs.contains_key(&job_id) {
            return;
        }
        jobs.insert(
            job_id.clone(),
            RunningJob {
                epoch,
                sandbox_id: job.sandbox_id.clone(),
                cancel: cancel.clone(),
                fence: fence.clone(),
                abort: None,
                cancel_started: false,
            },
        );
    }
    log::info!(job_id = job_id.as_str(), sandbox_id = job.sandbox_id.as_str(), agent = agent.as_str();
        "running job {job_id} (attempt {}, epoch {epoch})", lease.attempt);

    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    shared.metrics.running(shared.in_flight());
    let ctx = JobCtx {
        cancel: cancel.clone(),
        events: ev_tx,
        metrics: shared.metrics.clone(),
    };
    let exec_job = job.clone();
    let mut exec = tokio::spawn(async move { executor.execute(&exec_job, ctx).await });
    if let Some(j) = shared.jobs().get_mut(&job_id) {
        j.abort = Some(exec.abort_handle());
    }
    let mut reporter = Reporter::default();
    let result = loop {
        tokio::select! {
            biased;
            _ = fence.cancelled() => {
                exec.abort();
                shared.remove(&job_id);
                return;
            }
            r = &mut exec => break match r {
                Ok(res) => res,
                Err(e) if e.is_cancelled() => executor::result(JobState::Cancelled, "", "forced to stop after the cancel grace"),
                Err(e) => executor::result(JobState::Failed, "", format!("job task panicked: {e}")),
            },
            Some(ev) = ev_rx.recv() => {
                reporter.push(ev);
                if let Err(s) = reporter.flush(&shared, &job_id, epoch).await {
                    if s.code() == Code::FailedPrecondition {
                        shared.fence(&job_id, epoch, s.message());
                    }
                }
            }
        }
    };
    // The work is done: free the slot now. The server frees it when it stores the result and
    // may offer the next job at once; that offer must find the slot free here.
    drop(permit);
    while let Ok(ev) = ev_rx.try_recv() {
        reporter.push(ev);
    }
    for _ in 0..3 {
        match reporter.flush(&shared, &job_id, epoch).await {
            Ok(()) => break,
            Err(s) if s.code() == Code::FailedPrecondition => {
                shared.fence(&job_id, epoch, s.message());
                break;
            }
            Err(_) => tokio::time::sleep(backoff.next_delay()).await,
        }
    }

    if shared.releasing.load(Ordering::SeqCst) && result.state == JobState::Cancelled as i32 {
        // Stopped by our own shutdown, not by a submitter: hand it back rather than finish it.
        shared
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(HeldLease {
                job_id: job_id.clone(),
                epoch,
            });
        shared.remove(&job_id);
        return;
    }

    // The result is resent until the server acknowledges it or refuses the lease.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let state = JobState::try_from(result.state).unwrap_or_default();
    shared.metrics.finished(state.name());
    let mut session_id = session.id;
    loop {
        if fence.is_cancelled() {
            break;
        }
        if let Some(s) = shared.session() {
            session_id = s.id;
        }
        let req = CompleteRequest {
            session_id: session_id.clone(),
            job_id: job_id.clone(),
            epoch,
            result: Some(result.clone()),
        };
        match shared.client().complete(call(req)).await {
            Ok(_) => {
                log::info!(job_id = job_id.as_str(), sandbox_id = job.sandbox_id.as_str(), agent = agent.as_str();
                    "job {job_id} {}", state.name());
                break;
            }
            Err(s) if s.code() == Code::FailedPrecondition => {
                log::warn!(job_id = job_id.as_str(), agent = agent.as_str(); "result of job {job_id} refused, lease lost: {}", s.message());
                break;
            }
            Err(s) if s.code() == Code::InvalidArgument => {
                log::error!(job_id = job_id.as_str(), agent = agent.as_str(); "result of job {job_id} rejected: {}", s.message());
                break;
            }
            Err(s) if s.code() == Code::Unauthenticated => {
                shared.reregister.notify_one();
                tokio::select! {
                    _ = shared.next_session(&session_id) => {}
                    _ = fence.cancelled() => break,
                }
            }
            Err(s) => {
                let delay = backoff.next_delay();
                log::warn!(job_id = job_id.as_str(), agent = agent.as_str(); "result of job {job_id} not acknowledged ({}); resending in {} ms", s.message(), delay.as_millis());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = fence.cancelled() => break,
                }
            }
        }
    }
    shared.remove(&job_id);
}

/// Numbers a job's events and resends those not yet acknowledged.
#[derive(Default)]
struct Reporter {
    seq: u64,
    unacked: Vec<AgentEvent>,
}

impl Reporter {
    fn push(&mut self, ev: JobEventOut) {
        self.seq += 1;
        let event = match ev {
            JobEventOut::Progress(p) => agent_event::Event::Progress(p),
            JobEventOut::Log(l) => agent_event::Event::Log(l),
            JobEventOut::AwsCall(c) => agent_event::Event::AwsCall(c),
        };
        self.unacked.push(AgentEvent {
            seq: self.seq,
            event: Some(event),
        });
    }

    async fn flush(
        &mut self,
        shared: &Shared,
        job_id: &str,
        epoch: u64,
    ) -> Result<(), tonic::Status> {
        if self.unacked.is_empty() {
            return Ok(());
        }
        let session = shared
            .session()
            .ok_or_else(|| tonic::Status::unavailable("no session"))?;
        let req = ReportRequest {
            session_id: session.id,
            job_id: job_id.to_owned(),
            epoch,
            events: self.unacked.clone(),
        };
        let acked = shared
            .client()
            .report(call(req))
            .await?
            .into_inner()
            .acked_seq;
        self.unacked.retain(|e| e.seq > acked);
        Ok(())
    }
}
