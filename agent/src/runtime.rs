//! The agent runtime: register, receive offers, acquire, run, report, complete; drain on signal.
//!
//! Tasks and who owns what:
//! - the **session loop** (this module's [`run`]) registers with backoff, reads the Listen stream
//!   (or long-polls) and starts a job task per accepted offer, bounded by the slot semaphore;
//! - the **heartbeat thread** (`heartbeat.rs`) has its own OS thread, runtime and HTTP/2
//!   connection, so busy jobs can never starve lease renewal;
//! - one **job task** per job: acquire, execute (in a child task that can be aborted), report
//!   events with sequence numbers, resend the result until acknowledged.
//!
//! Shutdown order (first SIGTERM): stop taking work -> report not-serving and `draining` -> let
//! in-flight jobs finish within `drain_grace` -> cancel what is left (cooperatively, then forced
//! after `cancel_grace`) and release it -> `GoingAway` -> exit 0. A second SIGTERM skips the wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use es_proto::v1::agent_service_client::AgentServiceClient;
use es_proto::v1::*;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::backoff::Backoff;
use crate::config::{AgentConfig, Transport};
pub use crate::error::AgentError;
use crate::executor::{self, JobCtx, JobEventOut};
pub use crate::session::Signals;
use crate::session::{notify, RunningJob, Session, Shared};
use es_proto::error_chain;

/// Time limit of a unary call to the server.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A unary request with a deadline.
fn call<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// The endpoint the agent dials, with HTTP/2 keepalives so an idle connection survives load
/// balancers (AWS NLB idle cut: 350 s) and a dead peer is noticed.
pub fn endpoint(cfg: &AgentConfig) -> Result<Endpoint, AgentError> {
    let server = &cfg.server;
    let mut ep = Endpoint::from_shared(server.to_owned())
        .map_err(|e| AgentError::Server(server.to_owned(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    match cfg
        .client_tls()
        .map_err(|e| AgentError::Server(server.to_owned(), e.to_string()))?
    {
        Some(tls) => {
            ep = ep
                .tls_config(tls)
                .map_err(|e| AgentError::Server(server.to_owned(), error_chain(&e)))?;
        }
        None => {
            log::warn!(agent = cfg.name.as_str(); "INSECURE: talking plaintext to {server} without a client certificate (insecure = true)");
        }
    }
    Ok(ep)
}

/// A gRPC status with the causes of a transport failure (TLS refusals are named there, e.g.
/// "invalid peer certificate: UnknownIssuer" or "received fatal alert: CertificateExpired").
pub(crate) fn status_text(s: &tonic::Status) -> String {
    let mut out = s.message().to_owned();
    if let Some(src) = std::error::Error::source(s) {
        let chain = error_chain(src);
        if !out.contains(&chain) {
            out = format!("{out}: {chain}");
        }
    }
    out
}

/// Runs the agent until it has drained (after `signals.drain`) and said goodbye.
pub async fn run(cfg: AgentConfig, signals: Signals) -> Result<(), AgentError> {
    let endpoint = endpoint(&cfg)?;
    // Explicit limits on both sides: the server never sends more than MAX_MESSAGE.
    let mut client = AgentServiceClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(es_proto::limits::MAX_MESSAGE)
        .max_encoding_message_size(es_proto::limits::MAX_MESSAGE);
    let health = crate::health::start(&cfg).await?;
    let metrics = Arc::new(crate::metrics::AgentMetrics::default());
    if let Some(addr) = &cfg.metrics_addr {
        let bound = crate::metrics::start(addr, metrics.clone())
            .await
            .map_err(|source| AgentError::Metrics {
                addr: addr.clone(),
                source,
            })?;
        log::info!(agent = cfg.name.as_str(); "metrics on http://{bound}/metrics");
    }
    let identity = AgentIdentity {
        name: cfg.name.clone(),
        role: cfg.role() as i32,
        selector: cfg.selector.clone(),
        slots: cfg.slots,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        fallback: cfg.fallback,
        health_addr: health
            .as_ref()
            .map(|h| h.advertised.clone())
            .unwrap_or_default(),
    };
    let (session_tx, _) = watch::channel(None);
    let shared = Arc::new(Shared {
        jobs: Mutex::new(HashMap::new()),
        jobs_changed: Notify::new(),
        session: session_tx,
        reregister: Notify::new(),
        draining: AtomicBool::new(false),
        releasing: AtomicBool::new(false),
        released: Mutex::new(Vec::new()),
        last_renew: Mutex::new(Instant::now()),
        signals: signals.clone(),
        cfg: cfg.clone(),
        metrics,
    });
    let slots = Arc::new(Semaphore::new(cfg.slots as usize));
    let executor = Arc::new(executor::Executor::with_ssh(
        cfg.aws_settings(),
        cfg.ssh_settings(),
    ));
    let hb_stop = CancellationToken::new();
    let hb = crate::heartbeat::spawn(shared.clone(), endpoint.clone(), hb_stop.clone());
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_cap);
    let drain = signals.drain.clone();

    'session: loop {
        if drain.is_cancelled() {
            break;
        }
        let req = RegisterRequest {
            identity: Some(identity.clone()),
            held: shared.held(),
        };
        let reg = tokio::select! {
            r = client.register(call(req)) => r,
            _ = drain.cancelled() => break,
        };
        let reg = match reg {
            Ok(r) => r.into_inner(),
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::PermissionDenied) => {
                hb_stop.cancel();
                return Err(AgentError::Refused(s.message().to_owned()));
            }
            Err(s) => {
                let delay = backoff.next_delay();
                let why = status_text(&s);
                log::warn!(agent = cfg.name.as_str(); "cannot register with {}: {} ({}); retrying in {} ms",
                    cfg.server, why, s.code(), delay.as_millis());
                notify(&[sd_notify::NotifyState::Status(&format!(
                    "cannot register with {}: {why}",
                    cfg.server
                ))]);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = drain.cancelled() => break,
                }
            }
        };
        let session = Session {
            id: reg.session_id.clone(),
            heartbeat_interval: Duration::from_millis(reg.heartbeat_interval_ms.max(50)),
            lease_ttl: Duration::from_millis(reg.lease_ttl_ms.max(100)),
            poll_wait: Duration::from_millis(reg.poll_wait_ms.max(100)),
        };
        for r in &reg.revoked {
            shared.fence(
                &r.job_id,
                r.epoch,
                "the server revoked this lease while we were away",
            );
        }
        shared.renewed(Instant::now());
        shared.session.send_replace(Some(session.clone()));
        if let Some(h) = &health {
            h.set_serving(true).await;
        }
        log::info!(agent = cfg.name.as_str(), role = cfg.role().name(); "registered with {} as {} (session {}, {} slots, {} transport)",
            cfg.server, cfg.name, session.id, cfg.slots, format!("{:?}", cfg.transport).to_lowercase());
        // systemd: started once registered (READY is idempotent on re-registration).
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!(
                "registered with {} as {}",
                cfg.server, cfg.name
            )),
        ]);

        match cfg.transport {
            Transport::Stream => {
                let stream = tokio::select! {
                    r = client.listen(ListenRequest { session_id: session.id.clone() }) => r,
                    _ = drain.cancelled() => break,
                };
                let mut stream = match stream {
                    Ok(s) => s.into_inner(),
                    Err(s) => {
                        let delay = backoff.next_delay();
                        log::warn!(agent = cfg.name.as_str(); "listen failed: {} ({}); retrying in {} ms", s.message(), s.code(), delay.as_millis());
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => continue,
                            _ = drain.cancelled() => break,
                        }
                    }
                };
                backoff.reset();
                loop {
                    tokio::select! {
                        _ = drain.cancelled() => break 'session,
                        _ = shared.reregister.notified() => continue 'session,
                        m = stream.message() => match m {
                            Ok(Some(m)) => handle(&shared, &client, &slots, &executor, m),
                            Ok(None) | Err(_) => {
                                let delay = backoff.next_delay();
                                log::warn!(agent = cfg.name.as_str(); "stream from the server ended; reconnecting in {} ms", delay.as_millis());
                                tokio::select! {
                                    _ = tokio::time::sleep(delay) => continue 'session,
                                    _ = drain.cancelled() => break 'session,
                                }
                            }
                        },
                    }
                }
            }
            Transport::Poll => {
                backoff.reset();
                loop {
                    let req = PollRequest {
                        session_id: session.id.clone(),
                        wait_ms: session.poll_wait.as_millis() as u64,
                    };
                    let mut r = tonic::Request::new(req);
                    r.set_timeout(session.poll_wait + CALL_TIMEOUT);
                    tokio::select! {
                        _ = drain.cancelled() => break 'session,
                        _ = shared.reregister.notified() => continue 'session,
                        resp = client.poll(r) => match resp {
                            Ok(resp) => {
                                for m in resp.into_inner().messages {
                                    handle(&shared, &client, &slots, &executor, m);
                                }
                            }
                            Err(s) => {
                                let delay = backoff.next_delay();
                                log::warn!(agent = cfg.name.as_str(); "poll failed: {} ({}); reconnecting in {} ms", s.message(), s.code(), delay.as_millis());
                                tokio::select! {
                                    _ = tokio::time::sleep(delay) => continue 'session,
                                    _ = drain.cancelled() => break 'session,
                                }
                            }
                        },
                    }
                }
            }
        }
    }

    drain_and_leave(&shared, &mut client, health.as_ref()).await;
    hb_stop.cancel();
    let _ = tokio::task::spawn_blocking(move || hb.join()).await;
    log::info!(agent = cfg.name.as_str(); "stopped");
    Ok(())
}

fn handle(
    shared: &Arc<Shared>,
    client: &AgentServiceClient<Channel>,
    slots: &Arc<Semaphore>,
    executor: &Arc<executor::Executor>,
    m: ServerMessage,
) {
    match m.msg {
        Some(server_message::Msg::Offer(o)) => {
            if shared.draining.load(Ordering::SeqCst) || shared.jobs().contains_key(&o.job_id) {
                return;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                log::debug!(job_id = o.job_id.as_str(); "offer of job {} declined: no free slot", o.job_id);
                return;
            };
            let (shared, client, executor) = (shared.clone(), client.clone(), executor.clone());
            tokio::spawn(job_task(shared, client, executor, o.job_id, permit));
        }
        Some(server_message::Msg::Cancel(c)) => {
            let grace = Duration::from_millis(c.grace_ms).min(shared.cfg.cancel_grace);
            shared.cancel(&c.job_id, c.epoch, grace, &c.reason);
        }
        Some(server_message::Msg::Drain(d)) => {
            log::info!(agent = shared.cfg.name.as_str(); "the server asked us to drain: {}", d.reason);
            shared.signals.drain.cancel();
        }
        Some(server_message::Msg::Ping(_)) | None => {}
    }
}

/// Acquire, run, report and complete one job.
async fn job_task(
    shared: Arc<Shared>,
    mut client: AgentServiceClient<Channel>,
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
        match client.acquire(call(req)).await {
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
                if let Err(s) = reporter.flush(&shared, &mut client, &job_id, epoch).await {
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
        match reporter.flush(&shared, &mut client, &job_id, epoch).await {
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
        match client.complete(call(req)).await {
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
        client: &mut AgentServiceClient<Channel>,
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
        let acked = client.report(call(req)).await?.into_inner().acked_seq;
        self.unacked.retain(|e| e.seq > acked);
        Ok(())
    }
}

async fn drain_and_leave(
    shared: &Arc<Shared>,
    client: &mut AgentServiceClient<Channel>,
    health: Option<&crate::health::Health>,
) {
    let cfg = &shared.cfg;
    shared.draining.store(true, Ordering::SeqCst);
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    if let Some(h) = health {
        h.set_serving(false).await;
    }
    let n = shared.in_flight();
    log::info!(agent = cfg.name.as_str(); "draining: taking no new work; {n} jobs in flight, grace {} ms", cfg.drain_grace.as_millis());
    // Tell the server now rather than at the next heartbeat.
    if let Some(s) = shared.session() {
        let _ = client
            .heartbeat(call(HeartbeatRequest {
                session_id: s.id,
                leases: shared.held(),
                slots_in_use: n as u32,
                draining: true,
            }))
            .await;
    }
    let wait_empty = async {
        loop {
            let changed = shared.jobs_changed.notified();
            if shared.in_flight() == 0 {
                return;
            }
            changed.await;
        }
    };
    tokio::select! {
        _ = wait_empty => {}
        _ = tokio::time::sleep(cfg.drain_grace) => {
            log::warn!(agent = cfg.name.as_str(); "drain grace of {} ms is over; cancelling {} jobs", cfg.drain_grace.as_millis(), shared.in_flight());
        }
        _ = shared.signals.force.cancelled() => {
            log::warn!(agent = cfg.name.as_str(); "second signal: cancelling {} jobs now", shared.in_flight());
        }
    }
    if shared.in_flight() > 0 {
        shared.releasing.store(true, Ordering::SeqCst);
        for h in shared.held() {
            shared.cancel(&h.job_id, h.epoch, cfg.cancel_grace, "agent shutting down");
        }
        let wait_empty = async {
            loop {
                let changed = shared.jobs_changed.notified();
                if shared.in_flight() == 0 {
                    return;
                }
                changed.await;
            }
        };
        let _ = tokio::time::timeout(cfg.cancel_grace + Duration::from_secs(1), wait_empty).await;
        // Anything still there is stuck in a resend; release it.
        for h in shared.held() {
            shared.fence(&h.job_id, h.epoch, "agent shutting down");
            shared
                .released
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(h);
        }
    }
    let released = std::mem::take(&mut *shared.released.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(s) = shared.session() {
        let req = GoingAwayRequest {
            session_id: s.id,
            released: released.clone(),
            reason: "drained".into(),
        };
        match client.going_away(call(req)).await {
            Ok(_) => {
                log::info!(agent = cfg.name.as_str(); "told the server we are leaving ({} jobs released)", released.len())
            }
            Err(e) => {
                log::warn!(agent = cfg.name.as_str(); "could not tell the server we are leaving: {}", e.message())
            }
        }
    }
    shared.session.send_replace(None);
}
