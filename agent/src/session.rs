//! State shared by the session loop (`runtime.rs`), the heartbeat thread (`heartbeat.rs`) and the
//! job tasks: the session with the server, the jobs running and their leases, drain and release
//! flags. Its own module so that the runtime and the heartbeat thread need not import each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use es_proto::v1::agent_service_client::AgentServiceClient;
use es_proto::v1::HeldLease;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::AgentConfig;

/// Shutdown requests: `drain` on the first SIGTERM, `force` on the second.
#[derive(Clone, Default)]
pub struct Signals {
    pub drain: CancellationToken,
    pub force: CancellationToken,
}

#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub id: String,
    pub heartbeat_interval: Duration,
    pub lease_ttl: Duration,
    pub poll_wait: Duration,
}

pub(crate) struct RunningJob {
    pub(crate) epoch: u64,
    pub(crate) sandbox_id: String,
    pub(crate) cancel: CancellationToken,
    pub(crate) fence: CancellationToken,
    pub(crate) abort: Option<AbortHandle>,
    pub(crate) cancel_started: bool,
}

/// State shared by the session loop, the heartbeat thread and the job tasks.
pub(crate) struct Shared {
    pub cfg: AgentConfig,
    pub(crate) jobs: Mutex<HashMap<String, RunningJob>>,
    pub(crate) jobs_changed: Notify,
    pub session: watch::Sender<Option<Session>>,
    pub reregister: Notify,
    pub draining: AtomicBool,
    pub(crate) releasing: AtomicBool,
    pub(crate) released: Mutex<Vec<HeldLease>>,
    pub(crate) last_renew: Mutex<Instant>,
    pub signals: Signals,
    pub metrics: Arc<crate::metrics::AgentMetrics>,
    /// Who the agent acts as in AWS, and why it cannot use AWS now ("" = it can): told to the
    /// server at each heartbeat (aws_identity, aws_problem).
    pub aws: Mutex<(String, String)>,
    /// The server's addresses (`server`, comma-separated) and a client for each, on the main
    /// runtime; `current` is the one the session is (or is becoming) registered with.
    pub servers: Vec<String>,
    pub clients: Vec<AgentServiceClient<Channel>>,
    pub current: AtomicUsize,
}

impl Shared {
    /// A client of the server the session uses now: job tasks take it at each call, so their
    /// calls follow the session to another replica.
    pub(crate) fn client(&self) -> AgentServiceClient<Channel> {
        self.clients[self.server_index()].clone()
    }

    pub(crate) fn server_index(&self) -> usize {
        self.current.load(Ordering::SeqCst) % self.clients.len()
    }

    /// The address the session uses now.
    pub(crate) fn server(&self) -> &str {
        &self.servers[self.server_index()]
    }

    /// Moves on to the next address (in turn, wrapping), when this one does not answer or does
    /// not lead. Answers whether there is another to move to.
    pub(crate) fn next_server(&self) -> bool {
        if self.clients.len() < 2 {
            return false;
        }
        self.current.fetch_add(1, Ordering::SeqCst);
        true
    }

    pub(crate) fn aws(&self) -> (String, String) {
        self.aws.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningJob>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn session(&self) -> Option<Session> {
        self.session.borrow().clone()
    }

    /// Leases held now (for heartbeats and re-registration).
    pub fn held(&self) -> Vec<HeldLease> {
        self.jobs()
            .iter()
            .filter(|(_, j)| !j.fence.is_cancelled())
            .map(|(id, j)| HeldLease {
                job_id: id.clone(),
                epoch: j.epoch,
            })
            .collect()
    }

    pub fn in_flight(&self) -> usize {
        self.jobs().len()
    }

    pub fn renewed(&self, at: Instant) {
        *self.last_renew.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    pub fn last_renew(&self) -> Instant {
        *self.last_renew.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops a job at once because its lease is gone: it must not write anything any more.
    pub fn fence(&self, job_id: &str, epoch: u64, why: &str) {
        let jobs = self.jobs();
        if let Some(j) = jobs.get(job_id) {
            if j.epoch == epoch && !j.fence.is_cancelled() {
                log::warn!(job_id = job_id, sandbox_id = j.sandbox_id.as_str(), agent = self.cfg.name.as_str();
                    "stopping job {job_id} (epoch {epoch}): {why}");
                self.metrics.fenced();
                j.cancel.cancel();
                j.fence.cancel();
                if let Some(a) = &j.abort {
                    a.abort();
                }
            }
        }
    }

    /// Fences every job (the agent cannot prove it still holds any lease).
    pub fn fence_all(&self, why: &str) {
        for h in self.held() {
            self.fence(&h.job_id, h.epoch, why);
        }
    }

    /// Cooperative cancel now, forced (task aborted) after `grace`.
    pub fn cancel(self: &Arc<Self>, job_id: &str, epoch: u64, grace: Duration, reason: &str) {
        let mut jobs = self.jobs();
        let Some(j) = jobs.get_mut(job_id) else {
            return;
        };
        if j.epoch != epoch || j.cancel_started {
            return;
        }
        j.cancel_started = true;
        j.cancel.cancel();
        log::info!(job_id = job_id, sandbox_id = j.sandbox_id.as_str(), agent = self.cfg.name.as_str();
            "cancelling job {job_id}: {reason} (forced in {} ms)", grace.as_millis());
        let me = self.clone();
        let id = job_id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let jobs = me.jobs();
            if let Some(j) = jobs.get(&id) {
                if j.epoch == epoch {
                    if let Some(a) = &j.abort {
                        log::warn!(job_id = id.as_str(), agent = me.cfg.name.as_str(); "job {id} did not stop within {} ms; forcing it", grace.as_millis());
                        a.abort();
                    }
                }
            }
        });
    }

    pub(crate) fn remove(&self, job_id: &str) {
        let mut jobs = self.jobs();
        jobs.remove(job_id);
        self.metrics.running(jobs.len());
        drop(jobs);
        self.jobs_changed.notify_waiters();
    }

    /// Waits for a session other than `old` (after the server lost ours).
    pub(crate) async fn next_session(&self, old: &str) -> Option<Session> {
        let mut rx = self.session.subscribe();
        loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                if s.id != old {
                    return Some(s);
                }
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// Tells systemd (Type=notify) how the agent is doing; a no-op outside systemd.
pub(crate) fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::debug!("sd_notify failed: {e}");
    }
}
