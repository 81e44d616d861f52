//! The dispatch core: queues, offers, leases with fencing epochs, agents and their health.
//!
//! All live state sits in one `Core` behind a mutex; every operation is short and never awaits
//! while holding it. A state change is queued to the store *while the lock is held* (so commits
//! follow the order of changes) and awaited after the lock is released; callers are answered only
//! once their change is committed.
//!
//! Lease rules (see ARCHITECTURE.md):
//! - `Acquire` moves a queued job to RUNNING with `attempt + 1` and `epoch + 1`.
//! - Every write from an agent (`Report`, `Complete`, renewals in `Heartbeat`) must carry the
//!   current epoch and come from the holding agent, else it is refused (FAILED_PRECONDITION).
//! - A lease not renewed within the TTL expires: the job is queued again (or fails once
//!   `max_attempts` is spent). A hard cancel or timeout bumps the epoch, fencing the old holder.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use es_proto::v1::{
    job_event, server_message, AgentCounters, AgentEvent, AgentIdentity, AgentStatus, CancelJob,
    HeldLease, Job, JobEvent, JobResult, JobState, Lease, Offer, Ping, ServerMessage,
};
use tokio::sync::{broadcast, mpsc};

mod agents;
mod lease;
mod queue;
mod reaper;
mod selector;
mod settings;
mod state;

use crate::store::{Store, StoreError};
use selector::Candidate;
pub use settings::Settings;

/// Why a dispatch operation was refused. Mapped to gRPC codes in `service.rs`, and only there.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("unknown session {0:?}: register again")]
    UnknownSession(String),
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("job {job_id}: stale lease (epoch {got}, current {current}, holder {holder:?}): stop this job")]
    StaleEpoch {
        job_id: String,
        got: u64,
        current: u64,
        holder: String,
    },
    #[error("job {job_id} is {state}; it cannot be acquired")]
    NotAcquirable { job_id: String, state: &'static str },
    #[error("job {job_id} is for role {job_role}, agent {agent} has role {agent_role}")]
    WrongRole {
        job_id: String,
        job_role: &'static str,
        agent: String,
        agent_role: &'static str,
    },
    #[error("job {job_id} is offered to another agent")]
    OfferedElsewhere { job_id: String },
    #[error("no connected agent is named {0:?} (see `es-server agents`)")]
    AgentNotFound(String),
    #[error("agent {0} has no free slot or is draining")]
    NoCapacity(String),
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{submitter} has {limit} unfinished jobs, the most one submitter may have: wait for some to finish, or cancel them")]
    TooManyQueued { submitter: String, limit: usize },
    #[error("this es-server is stopping or no longer leads: connect to another")]
    Stopping,
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Res<T> = Result<T, DispatchError>;

/// Wall-clock microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

type QueueKey = (i32, String);

struct Active {
    job: Job,
    /// Offered to this agent until the deadline.
    offered: Option<(String, Instant)>,
    lease_expires: Option<Instant>,
    /// Per-job timeout, counted from the start of the current attempt.
    deadline: Option<Instant>,
    /// When a requested cancel turns into a hard fence.
    cancel_hard_at: Option<Instant>,
    /// Final state once the cancel completes (CANCELLED, or TIMED_OUT for a timeout).
    cancel_final: JobState,
    cancel_reason: String,
    /// Last event seq assigned (server side, per job).
    next_seq: u64,
    /// Highest agent seq accepted for the current epoch.
    agent_seq: u64,
    /// When the job (re)entered the queue (for the dispatch-latency metric).
    queued_at: Instant,
}

impl Active {
    /// A job entering the core (submitted, or reloaded at start) with `next_seq` events so far.
    fn new(job: Job, next_seq: u64, now: Instant) -> Active {
        Active {
            job,
            offered: None,
            lease_expires: None,
            deadline: None,
            cancel_hard_at: None,
            cancel_final: JobState::Cancelled,
            cancel_reason: String::new(),
            next_seq,
            // After a restart the agent's seq is unknown: it resends from its own, and the
            // store's (job, seq) key drops duplicates.
            agent_seq: 0,
            queued_at: now,
        }
    }

    /// The sandbox this job must have to itself: es-shells jobs of one sandbox run one at a
    /// time (two provisioning runs at once could each create what the other is creating).
    /// Needs the cloud: every kind but the diagnostic ones (echo, sleep).
    fn needs_aws(&self) -> bool {
        es_proto::kinds::of(&self.job)
            .is_some_and(|k| k.family != es_proto::kinds::Family::Diagnostic)
    }

    fn exclusive_sandbox(&self) -> Option<&str> {
        let exclusive = es_proto::kinds::of(&self.job).is_some_and(|k| k.exclusive_sandbox);
        (exclusive && !self.job.sandbox_id.is_empty()).then_some(self.job.sandbox_id.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Unknown,
    Serving,
    Failing,
}

struct AgentEntry {
    identity: AgentIdentity,
    session: String,
    outbox: mpsc::UnboundedSender<ServerMessage>,
    /// Receiver for long-poll mode (None while a Listen stream owns the channel).
    poll_rx: Option<Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ServerMessage>>>>,
    /// Generation of the current Listen stream; bumped by each Listen or Poll switch.
    listen_gen: u64,
    streaming: bool,
    last_poll: Option<Instant>,
    last_heartbeat: Instant,
    last_heartbeat_us: i64,
    /// When this session registered (shown instead of the session id, which is a credential).
    registered_at_us: i64,
    probe: Probe,
    probe_detail: String,
    draining: bool,
    /// An operator asked this agent to drain (`es-server drain`); told at each heartbeat.
    drain_requested: bool,
    gone: bool,
    leased: HashSet<String>,
    offered: HashSet<String>,
    last_pick: u64,
    /// Its AWS identity, and why it cannot use AWS (empty: it can), from its heartbeats.
    aws_identity: String,
    aws_problem: String,
}

impl AgentEntry {
    /// Connected: its Listen stream is open or it polls. A draining agent closes its stream
    /// and stops polling but still heartbeats and reports its jobs until it says goodbye:
    /// connected until then (what `es-server drain` waits for), or until its heartbeats stop.
    fn connected(&self, s: &Settings, now: Instant) -> bool {
        !self.gone
            && (self.streaming
                || self.last_poll.is_some_and(|t| {
                    now.duration_since(t) <= s.poll_wait * 2 + s.heartbeat_timeout
                })
                || (self.draining
                    && now.duration_since(self.last_heartbeat) <= s.heartbeat_timeout))
    }

    fn health(&self, s: &Settings, now: Instant) -> Result<(), String> {
        if self.gone {
            return Err("went away".into());
        }
        if !self.connected(s, now) {
            return Err("not connected".into());
        }
        let since = now.duration_since(self.last_heartbeat);
        if since > s.heartbeat_timeout {
            return Err(format!(
                "no heartbeat for {} ms (limit {} ms)",
                since.as_millis(),
                s.heartbeat_timeout.as_millis()
            ));
        }
        if self.probe == Probe::Failing {
            return Err(format!("health probe failing: {}", self.probe_detail));
        }
        Ok(())
    }

    fn send(&self, msg: server_message::Msg) {
        let _ = self.outbox.send(ServerMessage { msg: Some(msg) });
    }
}

struct Core {
    jobs: HashMap<String, Active>,
    queues: HashMap<QueueKey, VecDeque<String>>,
    agents: HashMap<String, AgentEntry>,
    sessions: HashMap<String, String>,
    /// Recently finished jobs: id -> final epoch, so a resent Complete is acknowledged.
    finished: HashMap<String, (u64, Instant)>,
    picks: u64,
    /// Sandboxes with an es-shells job offered or running (see `Active::exclusive_sandbox`).
    busy_sandboxes: HashMap<String, u32>,
    /// Per agent name, since the server started (survives re-registration).
    counters: HashMap<String, AgentCounters>,
    metrics: Arc<crate::metrics::ServerMetrics>,
    /// Unfinished jobs per submitter (for `max_queued_per_submitter`).
    unfinished_by: HashMap<String, usize>,
    /// Sandboxes the server knows are alive: sandbox -> creation time of its newest job that
    /// is not a CleanupSandbox. A successful cleanup created after that forgets it. A sweep
    /// never touches these (they are added to its live list when it is leased).
    alive: HashMap<String, i64>,
    /// Set by `close_streams`: this server is stopping or no longer leads, so no new Listen
    /// stream is opened (one opened after the others were closed would hold the graceful stop
    /// until the agent ended it).
    streams_closed: bool,
}

fn kind_of(job: &Job) -> Option<&es_proto::v1::job_spec::Kind> {
    job.spec.as_ref().and_then(|s| s.kind.as_ref())
}

fn is_cleanup(job: &Job) -> bool {
    matches!(
        kind_of(job),
        Some(es_proto::v1::job_spec::Kind::CleanupSandbox(_))
    )
}

/// Folds one job into the alive map: `finished_ok` is whether it succeeded (for cleanups).
fn note_sandbox(
    alive: &mut HashMap<String, i64>,
    sandbox: &str,
    created_at_us: i64,
    cleanup: bool,
    succeeded: bool,
) {
    if sandbox.is_empty() {
        return;
    }
    if !cleanup {
        let t = alive.entry(sandbox.to_owned()).or_insert(created_at_us);
        *t = (*t).max(created_at_us);
    } else if succeeded && alive.get(sandbox).is_some_and(|t| *t < created_at_us) {
        alive.remove(sandbox);
    }
}

/// A committed-later write plus the events to publish once it is committed.
struct Pending {
    commit: crate::store::StoreFuture<()>,
    events: Vec<JobEvent>,
}

/// The dispatch core; cheap to share behind an `Arc`.
pub struct Dispatcher {
    core: Mutex<Core>,
    store: Store,
    pub settings: Settings,
    events: broadcast::Sender<JobEvent>,
}

impl Dispatcher {
    /// Builds the core and reloads every queued or running job from the store. Running jobs get
    /// a fresh lease TTL so their agents can reconnect and renew.
    pub async fn recover(store: Store, settings: Settings) -> Res<Arc<Dispatcher>> {
        Dispatcher::recover_with(store, settings, Arc::default()).await
    }

    /// [`Dispatcher::recover`], counting into `metrics` (made before the dispatcher, for the
    /// counters of a server that stood by first).
    pub async fn recover_with(
        store: Store,
        settings: Settings,
        metrics: Arc<crate::metrics::ServerMetrics>,
    ) -> Res<Arc<Dispatcher>> {
        let active = store.load_active().await?;
        let now = Instant::now();
        let wall = now_us();
        let mut core = Core {
            jobs: HashMap::new(),
            queues: HashMap::new(),
            agents: HashMap::new(),
            sessions: HashMap::new(),
            finished: HashMap::new(),
            picks: 0,
            busy_sandboxes: HashMap::new(),
            counters: HashMap::new(),
            metrics,
            unfinished_by: HashMap::new(),
            alive: HashMap::new(),
            streams_closed: false,
        };
        for h in store.sandbox_history().await? {
            note_sandbox(
                &mut core.alive,
                &h.sandbox_id,
                h.created_at_us,
                h.cleanup,
                h.state == JobState::Succeeded as i32,
            );
        }
        let (mut queued, mut running) = (0, 0);
        for (job, seq) in active {
            let state = JobState::try_from(job.state).unwrap_or(JobState::Queued);
            let key = (job.role, job.selector.clone());
            let mut a = Active::new(job, seq, now);
            if state == JobState::Running {
                running += 1;
                a.lease_expires = Some(now + settings.lease_ttl);
                let elapsed_us = (wall - a.job.started_at_us).max(0) as u64;
                let left = Duration::from_millis(a.job.timeout_ms)
                    .saturating_sub(Duration::from_micros(elapsed_us));
                a.deadline = Some(now + left);
                if a.job.cancel_requested {
                    a.cancel_hard_at = Some(now + settings.cancel_grace + settings.lease_ttl);
                }
            } else {
                queued += 1;
                core.queues
                    .entry(key)
                    .or_default()
                    .push_back(a.job.id.clone());
            }
            if state == JobState::Running {
                if let Some(sb) = a.exclusive_sandbox() {
                    *core.busy_sandboxes.entry(sb.to_owned()).or_default() += 1;
                }
            }
            *core
                .unfinished_by
                .entry(a.job.submitted_by.clone())
                .or_default() += 1;
            core.jobs.insert(a.job.id.clone(), a);
        }
        if queued + running > 0 {
            log::info!(
                "recovered {queued} queued and {running} running jobs from {}",
                store.describe()
            );
        }
        let (events, _) = broadcast::channel(16 * 1024);
        Ok(Arc::new(Dispatcher {
            core: Mutex::new(core),
            store,
            settings,
            events,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> Arc<crate::metrics::ServerMetrics> {
        self.lock().metrics.clone()
    }

    /// Active jobs by (state, role) name.
    pub fn active_counts(&self) -> HashMap<(&'static str, &'static str), usize> {
        let core = self.lock();
        let mut out = HashMap::new();
        for a in core.jobs.values() {
            let state = JobState::try_from(a.job.state).unwrap_or_default().name();
            let role = es_proto::Role::try_from(a.job.role)
                .unwrap_or_default()
                .name();
            *out.entry((state, role)).or_default() += 1;
        }
        out
    }

    /// Live job events (after commit). Watchers filter by job id.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    async fn finish(&self, pending: Vec<Pending>) -> Res<()> {
        let mut first_err = None;
        let mut publish = Vec::new();
        for p in pending {
            match p.commit.await {
                Ok(()) => publish.extend(p.events),
                Err(e) => {
                    log::error!("commit failed: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        for ev in publish {
            let _ = self.events.send(ev);
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Stores a new job (or returns the one with the same idempotency key) and dispatches it.
    pub async fn submit(&self, mut job: Job) -> Res<(Job, bool)> {
        if job.timeout_ms == 0 {
            job.timeout_ms = self.settings.default_timeout.as_millis() as u64;
        }
        if job.max_attempts == 0 {
            job.max_attempts = self.settings.default_max_attempts;
        }
        {
            let core = self.lock();
            let n = core
                .unfinished_by
                .get(&job.submitted_by)
                .copied()
                .unwrap_or(0);
            if n >= self.settings.max_queued_per_submitter {
                return Err(DispatchError::TooManyQueued {
                    submitter: job.submitted_by.clone(),
                    limit: self.settings.max_queued_per_submitter,
                });
            }
        }
        job.state = JobState::Queued as i32;
        job.created_at_us = now_us();
        let ev = JobEvent {
            job_id: job.id.clone(),
            seq: 1,
            at_us: job.created_at_us,
            event: Some(job_event::Event::State(JobState::Queued as i32)),
            ..Default::default()
        };
        let (stored, created) = self.store.insert(job, vec![ev.clone()]).await?;
        if created {
            let mut core = self.lock();
            let key = (stored.role, stored.selector.clone());
            *core
                .unfinished_by
                .entry(stored.submitted_by.clone())
                .or_default() += 1;
            note_sandbox(
                &mut core.alive,
                &stored.sandbox_id,
                stored.created_at_us,
                is_cleanup(&stored),
                false,
            );
            core.jobs.insert(
                stored.id.clone(),
                Active::new(stored.clone(), 1, Instant::now()),
            );
            core.queues
                .entry(key.clone())
                .or_default()
                .push_back(stored.id.clone());
            core.metrics.submitted();
            core.dispatch(&self.settings, &key, Instant::now());
            drop(core);
            let _ = self.events.send(ev);
        } else if let Some(a) = self.lock().jobs.get(&stored.id) {
            return Ok((a.job.clone(), false));
        }
        Ok((stored, created))
    }

    /// The job as it is now.
    pub async fn get(&self, id: &str) -> Res<Job> {
        if let Some(a) = self.lock().jobs.get(id) {
            return Ok(a.job.clone());
        }
        self.store
            .get(id)
            .await?
            .ok_or_else(|| DispatchError::JobNotFound(id.to_owned()))
    }

    /// Cancels a job: a queued job at once; a running one cooperatively, fenced after the grace.
    pub async fn cancel(&self, id: &str, reason: &str) -> Res<Job> {
        let pending = {
            let mut core = self.lock();
            let now = Instant::now();
            let reason = if reason.is_empty() {
                "cancelled by request"
            } else {
                reason
            };
            match core.jobs.get(id).map(|a| JobState::try_from(a.job.state)) {
                None => None,
                Some(Ok(JobState::Running)) => Some(core.request_cancel(
                    &self.store,
                    &self.settings,
                    id,
                    JobState::Cancelled,
                    reason,
                    now,
                )),
                Some(_) => Some(core.terminate(
                    &self.store,
                    id,
                    JobResult {
                        state: JobState::Cancelled as i32,
                        output: String::new(),
                        error: reason.to_owned(),
                        ..Default::default()
                    },
                    false,
                    now,
                )),
            }
        };
        if let Some(p) = pending {
            self.finish(vec![p]).await?;
        }
        self.get(id).await
    }
}

fn identity_role(id: &AgentIdentity) -> &'static str {
    es_proto::Role::try_from(id.role).unwrap_or_default().name()
}

fn event(a: &mut Active, ev: job_event::Event) -> JobEvent {
    a.next_seq += 1;
    JobEvent {
        job_id: a.job.id.clone(),
        seq: a.next_seq,
        at_us: now_us(),
        event: Some(ev),
        attempt: a.job.attempt,
        agent: a.job.agent.clone(),
    }
}

fn busy(map: &mut HashMap<String, u32>, sb: Option<&str>, up: bool) {
    let Some(sb) = sb else { return };
    if up {
        *map.entry(sb.to_owned()).or_default() += 1;
    } else if let Some(n) = map.get_mut(sb) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(sb);
        }
    }
}

impl Core {
    fn session_agent(&self, session: &str) -> Res<String> {
        self.sessions
            .get(session)
            .cloned()
            .ok_or_else(|| DispatchError::UnknownSession(session.to_owned()))
    }

    fn counter(&mut self, agent: &str) -> &mut AgentCounters {
        self.counters.entry(agent.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests;
