//! Heartbeats and lease renewal, on a thread of their own with their own runtime and HTTP/2
//! connection: jobs that keep the main runtime busy can never delay a renewal.
//!
//! Each beat renews every held lease. Leases the server reports lost are fenced at once. When
//! renewals keep failing, the agent fences all its jobs before the server's lease TTL can run
//! out (`lease_ttl - heartbeat_interval / 2` after the last success was sent), so a partitioned
//! agent stops before another agent is given its jobs. That check runs on its own clock
//! ([`silence_watch`]): a heartbeat call blocked by a cut link (up to its timeout) must not
//! delay it past the server's TTL.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use es_proto::v1::HeartbeatRequest;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::Code;

use crate::session::Shared;

/// Consecutive failed beats after which the session loop reconnects its stream.
const RECONNECT_AFTER_FAILURES: u32 = 3;

pub(crate) fn spawn(
    shared: Arc<Shared>,
    endpoints: Vec<Endpoint>,
    stop: CancellationToken,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("es-heartbeat".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("heartbeat runtime");
            rt.block_on(async move {
                let watch = tokio::spawn(silence_watch(shared.clone(), stop.clone()));
                beat_loop(shared, endpoints, stop).await;
                let _ = watch.await;
            });
        })
        .expect("spawn heartbeat thread")
}

async fn beat_loop(shared: Arc<Shared>, endpoints: Vec<Endpoint>, stop: CancellationToken) {
    // Own connections, on this thread's runtime; the beat goes to the server the session
    // registered with (the session loop moves to the next address when one does not lead).
    let mut clients = crate::rpc::clients(&endpoints);
    let mut failures = 0u32;
    loop {
        let interval = shared
            .session()
            .map(|s| s.heartbeat_interval)
            .unwrap_or(Duration::from_millis(500));
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        let Some(session) = shared.session() else {
            continue;
        };
        let aws = shared.aws();
        let req = HeartbeatRequest {
            session_id: session.id.clone(),
            leases: shared.held(),
            slots_in_use: shared.in_flight() as u32,
            draining: shared.draining.load(Ordering::SeqCst),
            aws_identity: aws.0,
            aws_problem: aws.1,
        };
        let req_leases = req.leases.len();
        let mut r = tonic::Request::new(req);
        r.set_timeout(interval.max(Duration::from_millis(500)));
        let sent = Instant::now();
        let client = &mut clients[shared.server_index()];
        match client.heartbeat(r).await {
            Ok(resp) => {
                failures = 0;
                shared.renewed(sent);
                // systemd's watchdog is fed only while the server answers: an agent that cannot
                // reach it for WatchdogSec is restarted.
                crate::session::notify(&[sd_notify::NotifyState::Watchdog]);
                let resp = resp.into_inner();
                shared
                    .metrics
                    .heartbeat(true, req_leases.saturating_sub(resp.lost.len()));
                for l in resp.lost {
                    shared.fence(&l.job_id, l.epoch, "the server says this lease is lost");
                }
                for c in resp.cancel {
                    let grace = Duration::from_millis(c.grace_ms).min(shared.cfg.cancel_grace);
                    shared.cancel(&c.job_id, c.epoch, grace, &c.reason);
                }
                if resp.drain {
                    shared.signals.drain.cancel();
                }
            }
            Err(s) if s.code() == Code::Unauthenticated => {
                shared.metrics.heartbeat(false, 0);
                // The server does not know our session (it restarted): register again.
                shared.reregister.notify_one();
            }
            Err(s) => {
                shared.metrics.heartbeat(false, 0);
                failures += 1;
                log::warn!(agent = shared.cfg.name.as_str(); "heartbeat failed ({failures} in a row): {} ({})", s.message(), s.code());
                if failures == RECONNECT_AFTER_FAILURES {
                    shared.reregister.notify_one();
                }
            }
        }
    }
}

/// What the silence watch does at `now`, given the last renewal (when its heartbeat was sent),
/// the lease TTL and heartbeat interval, the jobs in flight and the renewal it last fenced for:
/// whether to fence every job now, and how long to sleep before looking again. Pure, so its
/// table test covers every case.
fn silence_step(
    now: Instant,
    last_renew: Instant,
    ttl: Duration,
    hb: Duration,
    in_flight: usize,
    fenced_for: Option<Instant>,
) -> (bool, Duration) {
    let due = last_renew + ttl.saturating_sub(hb / 2);
    if now < due {
        return (false, due - now);
    }
    // Past due: fence once per silence (a renewal since then starts a new one); look again
    // soon, for a renewal or for a job that started anyway.
    let again = (hb / 4).max(Duration::from_millis(10));
    let fence = in_flight > 0 && fenced_for != Some(last_renew);
    (fence, again)
}

/// Fences every job once no renewal has succeeded for `lease_ttl - heartbeat_interval / 2`,
/// waking exactly when that is due. Runs even while the agent has no session (re-registering
/// through a cut link): a cut-off agent must still stop its jobs before the server re-lets them.
async fn silence_watch(shared: Arc<Shared>, stop: CancellationToken) {
    let mut known: Option<(Duration, Duration)> = None;
    let mut fenced_for: Option<Instant> = None;
    loop {
        if let Some(s) = shared.session() {
            known = Some((s.lease_ttl, s.heartbeat_interval));
        }
        let wait = match known {
            None => Duration::from_millis(100),
            Some((ttl, hb)) => {
                let last = shared.last_renew();
                let (fence, wait) = silence_step(
                    Instant::now(),
                    last,
                    ttl,
                    hb,
                    shared.in_flight(),
                    fenced_for,
                );
                if fence {
                    fenced_for = Some(last);
                    shared.fence_all(&format!(
                        "no lease renewal for {} ms (lease TTL {} ms): another agent may own these jobs now",
                        last.elapsed().as_millis(),
                        ttl.as_millis()
                    ));
                }
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_silence_fence_is_due_before_the_server_ttl_and_fires_once_per_silence() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let (ttl, hb) = (ms(1500), ms(250));
        // (now after t0, jobs in flight, fenced for t0 already) -> (fence, wait)
        let cases = [
            (ms(0), 2, false, (false, ms(1375))),
            (ms(1000), 2, false, (false, ms(375))),
            (ms(1374), 2, false, (false, ms(1))),
            (ms(1375), 2, false, (true, hb / 4)),
            (ms(1400), 2, true, (false, hb / 4)),
            (ms(1400), 0, false, (false, hb / 4)),
            (ms(5000), 1, false, (true, hb / 4)),
        ];
        for (at, jobs, fenced, want) in cases {
            let fenced_for = fenced.then_some(t0);
            let got = silence_step(t0 + at, t0, ttl, hb, jobs, fenced_for);
            assert_eq!(got, want, "at {at:?}, {jobs} jobs, fenced {fenced}");
        }
        // Due strictly before the server's TTL would run out.
        assert!(ttl.saturating_sub(hb / 2) < ttl);
    }
}
