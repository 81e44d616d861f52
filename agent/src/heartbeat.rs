//! Heartbeats and lease renewal, on a thread of their own with their own runtime and HTTP/2
//! connection: jobs that keep the main runtime busy can never delay a renewal.
//!
//! Each beat renews every held lease. Leases the server reports lost are fenced at once. When
//! renewals keep failing, the agent fences all its jobs before the server's lease TTL can run
//! out (`lease_ttl - heartbeat_interval / 2` after the last success), so a partitioned agent
//! stops before another agent is given its jobs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use es_proto::v1::agent_service_client::AgentServiceClient;
use es_proto::v1::HeartbeatRequest;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::Code;

use crate::session::Shared;

/// Consecutive failed beats after which the session loop reconnects its stream.
const RECONNECT_AFTER_FAILURES: u32 = 3;

pub(crate) fn spawn(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    stop: CancellationToken,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("es-heartbeat".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("heartbeat runtime");
            rt.block_on(beat_loop(shared, endpoint, stop));
        })
        .expect("spawn heartbeat thread")
}

async fn beat_loop(shared: Arc<Shared>, endpoint: Endpoint, stop: CancellationToken) {
    let mut client = AgentServiceClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(es_proto::limits::MAX_MESSAGE)
        .max_encoding_message_size(es_proto::limits::MAX_MESSAGE);
    let mut failures = 0u32;
    let mut fenced_for_silence = false;
    let mut known: Option<(Duration, Duration)> = None;
    loop {
        let interval = shared
            .session()
            .map(|s| s.heartbeat_interval)
            .unwrap_or(Duration::from_millis(500));
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        // The silence check runs even while the agent has no session (re-registering through
        // a cut link): a cut-off agent must still stop its jobs before the server re-lets them.
        if let Some(s) = shared.session() {
            known = Some((s.lease_ttl, s.heartbeat_interval));
        }
        if let Some((ttl, hb)) = known {
            fence_if_silent(&shared, ttl, hb, &mut fenced_for_silence);
        }
        let Some(session) = shared.session() else {
            continue;
        };
        let req = HeartbeatRequest {
            session_id: session.id.clone(),
            leases: shared.held(),
            slots_in_use: shared.in_flight() as u32,
            draining: shared.draining.load(Ordering::SeqCst),
        };
        let req_leases = req.leases.len();
        let mut r = tonic::Request::new(req);
        r.set_timeout(interval.max(Duration::from_millis(500)));
        let sent = Instant::now();
        match client.heartbeat(r).await {
            Ok(resp) => {
                failures = 0;
                fenced_for_silence = false;
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
        fence_if_silent(
            &shared,
            session.lease_ttl,
            session.heartbeat_interval,
            &mut fenced_for_silence,
        );
    }
}

/// Fences every job once no renewal has succeeded for `lease_ttl - heartbeat_interval / 2`.
fn fence_if_silent(shared: &Shared, ttl: Duration, hb: Duration, fenced: &mut bool) {
    let silent = shared.last_renew().elapsed();
    if silent > ttl.saturating_sub(hb / 2) && !*fenced && shared.in_flight() > 0 {
        *fenced = true;
        shared.fence_all(&format!(
            "no lease renewal for {} ms (lease TTL {} ms): another agent may own these jobs now",
            silent.as_millis(),
            ttl.as_millis()
        ));
    }
}
