//! The agent runtime: register, receive offers, acquire, run, report, complete; drain on signal.
//!
//! Tasks and who owns what:
//! - the **session loop** (this module's [`run`]) registers with backoff, reads the Listen stream
//!   (or long-polls) and starts a job task per accepted offer, bounded by the slot semaphore;
//! - the **heartbeat thread** (`heartbeat.rs`) has its own OS thread, runtime and HTTP/2
//!   connection, so busy jobs can never starve lease renewal;
//! - one **job task** per job (`job_task.rs`): acquire, execute (in a child task that can be aborted), report
//!   events with sequence numbers, resend the result until acknowledged.
//!
//! Shutdown order (first SIGTERM): stop taking work -> report not-serving and `draining` -> let
//! in-flight jobs finish within `drain_grace` -> cancel what is left (cooperatively, then forced
//! after `cancel_grace`) and release it -> `GoingAway` -> exit 0. A second SIGTERM skips the wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use es_proto::v1::*;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::backoff::{Backoff, Rounds};
use crate::config::{AgentConfig, Transport};
pub use crate::error::AgentError;
use crate::executor::{self};
use crate::rpc::{call, endpoints, status_text, CALL_TIMEOUT};
pub use crate::session::Signals;
use crate::session::{notify, Session, Shared};

/// Runs the agent until it has drained (after `signals.drain`) and said goodbye.
pub async fn run(cfg: AgentConfig, signals: Signals) -> Result<(), AgentError> {
    let endpoints = endpoints(&cfg)?;
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
        version: version(),
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
        aws: Mutex::new((String::new(), "AWS credentials not checked yet".into())),
        servers: cfg.servers(),
        // Explicit limits on both sides: the server never sends more than MAX_MESSAGE.
        clients: crate::rpc::clients(&endpoints),
        current: std::sync::atomic::AtomicUsize::new(0),
    });
    let slots = Arc::new(Semaphore::new(cfg.slots as usize));
    let executor = Arc::new(executor::Executor::with_ssh(
        cfg.aws_settings(),
        cfg.ssh_settings(),
    ));
    let hb_stop = CancellationToken::new();
    let hb = crate::heartbeat::spawn(shared.clone(), endpoints, hb_stop.clone());
    let aws_watch = tokio::spawn(watch_aws(
        shared.clone(),
        health.as_ref().map(|h| h.reporter.clone()),
        hb_stop.clone(),
    ));
    let mut backoff = Rounds::new(
        Backoff::new(cfg.backoff_base, cfg.backoff_cap),
        shared.servers.len(),
    );
    let drain = signals.drain.clone();

    'session: loop {
        if drain.is_cancelled() {
            break;
        }
        let mut client = shared.client();
        let req = RegisterRequest {
            identity: Some(identity.clone()),
            held: shared.held(),
        };
        let mut req = call(req);
        req.set_timeout(crate::rpc::register_timeout(shared.servers.len()));
        let reg = tokio::select! {
            r = client.register(req) => r,
            _ = drain.cancelled() => break,
        };
        let reg = match reg {
            Ok(r) => r.into_inner(),
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::PermissionDenied) => {
                hb_stop.cancel();
                return Err(AgentError::Refused(s.message().to_owned()));
            }
            Err(s) => {
                let delay = backoff.failed();
                let why = with_expired_cert(&cfg.tls_cert, status_text(&s));
                let failed = shared.server().to_owned();
                // Another replica may lead: the next address is tried, at once unless every
                // address has now failed in a row (then after the backoff, see `Rounds`).
                let then = if shared.next_server() {
                    format!("trying {} in {} ms", shared.server(), delay.as_millis())
                } else {
                    format!("retrying in {} ms", delay.as_millis())
                };
                log::warn!(agent = cfg.name.as_str(); "cannot register with {failed}: {why} ({}); {then}", s.code());
                notify(&[sd_notify::NotifyState::Status(&format!(
                    "cannot register with {failed}: {why}"
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
            shared.server(), cfg.name, session.id, cfg.slots, format!("{:?}", cfg.transport).to_lowercase());
        // systemd: started once registered (READY is idempotent on re-registration).
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!(
                "registered with {} as {}",
                shared.server(),
                cfg.name
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
                            Ok(Some(m)) => handle(&shared, &slots, &executor, m),
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
                                    handle(&shared, &slots, &executor, m);
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

    drain_and_leave(&shared, health.as_ref()).await;
    hb_stop.cancel();
    let _ = tokio::task::spawn_blocking(move || hb.join()).await;
    let _ = aws_watch.await;
    log::info!(agent = cfg.name.as_str(); "stopped");
    Ok(())
}

fn handle(
    shared: &Arc<Shared>,
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
            let (shared, executor) = (shared.clone(), executor.clone());
            tokio::spawn(crate::job_task::job_task(
                shared, executor, o.job_id, permit,
            ));
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

async fn drain_and_leave(shared: &Arc<Shared>, health: Option<&crate::health::Health>) {
    let cfg = &shared.cfg;
    let mut client = shared.client();
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
        let (aws_identity, aws_problem) = shared.aws();
        let _ = client
            .heartbeat(call(HeartbeatRequest {
                session_id: s.id,
                leases: shared.held(),
                slots_in_use: n as u32,
                draining: true,
                aws_identity,
                aws_problem,
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

/// The version shown by `es-server agents`: the crate's, and when this binary was built (its
/// file's modification time, which dpkg sets from the package): a package rebuilt from the same
/// version still shows as the new one after an upgrade.
fn version() -> String {
    let built = std::env::current_exe()
        .and_then(std::fs::metadata)
        .and_then(|m| m.modified());
    match built {
        Ok(t) => format!(
            "{} (built {})",
            env!("CARGO_PKG_VERSION"),
            humantime::format_rfc3339_seconds(t)
        ),
        Err(_) => env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// How often an agent without usable AWS credentials checks again.
const AWS_RECHECK: Duration = Duration::from_secs(30);

/// Finds who the agent acts as in AWS (STS GetCallerIdentity) and keeps asking every 30 s
/// while it cannot: the server holds back AWS jobs until then, the health service `es.aws`
/// reports NOT_SERVING, and the log says why once per change, in one line with the fix.
async fn watch_aws(
    shared: Arc<Shared>,
    health: Option<tonic_health::server::HealthReporter>,
    stop: CancellationToken,
) {
    let name = shared.cfg.name.clone();
    let mut said = String::new();
    loop {
        let found = tokio::select! {
            r = crate::aws::identity::check(shared.cfg.aws_settings()) => r,
            _ = stop.cancelled() => return,
        };
        let status = match &found {
            Ok(_) => tonic_health::ServingStatus::Serving,
            Err(_) => tonic_health::ServingStatus::NotServing,
        };
        if let Some(h) = &health {
            h.set_service_status("es.aws", status).await;
        }
        match found {
            Ok(id) => {
                log::info!(agent = name.as_str(); "acting in AWS as {id}");
                shared.metrics.aws_identity(Some((&id.arn, &id.account)));
                *shared.aws.lock().unwrap_or_else(|p| p.into_inner()) =
                    (id.to_string(), String::new());
                return;
            }
            Err(problem) => {
                if problem != said {
                    log::warn!(agent = name.as_str(); "cannot use AWS: {problem}; AWS jobs wait until this is fixed (checked again every {} s)", AWS_RECHECK.as_secs());
                    said = problem.clone();
                }
                shared.metrics.aws_identity(None);
                *shared.aws.lock().unwrap_or_else(|p| p.into_inner()) = (String::new(), problem);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(AWS_RECHECK) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// A refused handshake reaches the agent as whatever TLS 1.3 left it to see ("broken pipe",
/// sometimes the server's `CertificateExpired` alert): say plainly when the agent's own
/// certificate is the cause.
fn with_expired_cert(tls_cert: &str, why: String) -> String {
    if tls_cert.is_empty() {
        return why;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match std::fs::read(tls_cert)
        .ok()
        .and_then(|pem| es_proto::cert::pem_expired_at(&pem, now))
    {
        Some(at) => format!(
            "{why} (this agent's certificate {tls_cert} expired at {at}: renew it, see docs/operations.md section 7)"
        ),
        None => why,
    }
}
