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

use crate::selector::{self, Candidate};
use crate::store::{Store, StoreError};

/// Timing settings of the dispatch core.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often agents heartbeat (and renew their leases).
    pub heartbeat_interval: Duration,
    /// A lease not renewed for this long expires.
    pub lease_ttl: Duration,
    /// An agent without a heartbeat for this long is unhealthy (gets no new work).
    pub heartbeat_timeout: Duration,
    /// Longest a long-poll is held open.
    pub poll_wait: Duration,
    /// An offer not acquired within this time goes to another agent.
    pub offer_timeout: Duration,
    /// After a cancel (or timeout) the agent has this long to stop before the job is fenced.
    pub cancel_grace: Duration,
    pub default_timeout: Duration,
    pub default_max_attempts: u32,
    /// Interval of the reaper (expiry, timeouts, offers).
    pub tick: Duration,
    /// Application keepalive on idle Listen streams.
    pub stream_ping: Duration,
    /// Unfinished (queued or running) jobs one submitter may have at once.
    pub max_queued_per_submitter: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(4),
            heartbeat_timeout: Duration::from_secs(3),
            poll_wait: Duration::from_secs(20),
            offer_timeout: Duration::from_secs(3),
            cancel_grace: Duration::from_secs(10),
            default_timeout: Duration::from_secs(3600),
            default_max_attempts: 3,
            tick: Duration::from_millis(100),
            stream_ping: Duration::from_secs(30),
            max_queued_per_submitter: es_proto::limits::DEFAULT_MAX_QUEUED_PER_SUBMITTER,
        }
    }
}

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
    /// The sandbox this job must have to itself: es-shells jobs of one sandbox run one at a
    /// time (two provisioning runs at once could each create what the other is creating).
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
}

impl AgentEntry {
    fn connected(&self, s: &Settings, now: Instant) -> bool {
        !self.gone
            && (self.streaming
                || self.last_poll.is_some_and(|t| {
                    now.duration_since(t) <= s.poll_wait * 2 + s.heartbeat_timeout
                }))
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
    commit: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>,
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
            metrics: Arc::default(),
            unfinished_by: HashMap::new(),
            alive: HashMap::new(),
        };
        for (sb, at, cleanup, state) in store.sandbox_history().await? {
            note_sandbox(
                &mut core.alive,
                &sb,
                at,
                cleanup,
                state == JobState::Succeeded as i32,
            );
        }
        let (mut queued, mut running) = (0, 0);
        for (job, seq) in active {
            let state = JobState::try_from(job.state).unwrap_or(JobState::Queued);
            let key = (job.role, job.selector.clone());
            let mut a = Active {
                offered: None,
                lease_expires: None,
                deadline: None,
                cancel_hard_at: None,
                cancel_final: JobState::Cancelled,
                cancel_reason: String::new(),
                next_seq: seq,
                agent_seq: u64::MAX, // unknown after restart: accept only seq we have not stored
                queued_at: now,
                job,
            };
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
            // The agent seq is unknown after a restart; the agent resends from its own seq and
            // duplicates are dropped by the (job, seq) key in the store.
            a.agent_seq = 0;
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
                store.path().display()
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

    // ------------------------------------------------------------------ submitters

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
                Active {
                    job: stored.clone(),
                    offered: None,
                    lease_expires: None,
                    deadline: None,
                    cancel_hard_at: None,
                    cancel_final: JobState::Cancelled,
                    cancel_reason: String::new(),
                    next_seq: 1,
                    agent_seq: 0,
                    queued_at: Instant::now(),
                },
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

    /// Connected agents (and recently seen ones) with their health.
    pub fn agents(&self) -> Vec<AgentStatus> {
        let core = self.lock();
        let now = Instant::now();
        let mut out: Vec<AgentStatus> = core
            .agents
            .values()
            .map(|a| {
                let health = a.health(&self.settings, now);
                AgentStatus {
                    identity: Some(a.identity.clone()),
                    connected: a.connected(&self.settings, now),
                    healthy: health.is_ok(),
                    draining: a.draining,
                    slots_in_use: a.leased.len() as u32,
                    last_heartbeat_us: a.last_heartbeat_us,
                    health_detail: health.err().unwrap_or_default(),
                    registered_at_us: a.registered_at_us,
                    counters: Some(
                        core.counters
                            .get(&a.identity.name)
                            .cloned()
                            .unwrap_or_default(),
                    ),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            let (x, y) = (a.identity.as_ref().unwrap(), b.identity.as_ref().unwrap());
            (x.role, x.fallback, &x.name).cmp(&(y.role, y.fallback, &y.name))
        });
        out
    }

    // ------------------------------------------------------------------ agents

    /// Registers (or re-registers) an agent. Answers its session and the held leases that the
    /// server no longer recognises.
    pub async fn register(
        &self,
        identity: AgentIdentity,
        held: Vec<HeldLease>,
    ) -> Res<(String, Vec<HeldLease>)> {
        let session = uuid::Uuid::new_v4().to_string();
        let (revoked, pending) = {
            let mut core = self.lock();
            let now = Instant::now();
            let name = identity.name.clone();
            let mut pending = Vec::new();
            // Whatever the old session had offered goes back to the queue.
            if let Some(old) = core.agents.remove(&name) {
                core.sessions.remove(&old.session);
                for id in old.offered {
                    core.unoffer(&id);
                }
            }
            let held_map: HashMap<&str, u64> =
                held.iter().map(|h| (h.job_id.as_str(), h.epoch)).collect();
            let mut kept = HashSet::new();
            let mut revoked = Vec::new();
            for h in &held {
                match core.jobs.get(&h.job_id) {
                    Some(a)
                        if a.job.state == JobState::Running as i32
                            && a.job.agent == name
                            && a.job.epoch == h.epoch =>
                    {
                        kept.insert(h.job_id.clone());
                    }
                    _ => revoked.push(h.clone()),
                }
            }
            for id in &kept {
                if let Some(a) = core.jobs.get_mut(id) {
                    a.lease_expires = Some(now + self.settings.lease_ttl);
                }
            }
            // Leases recorded for this name but not claimed: the agent restarted and lost them.
            let lost: Vec<String> = core
                .jobs
                .values()
                .filter(|a| {
                    a.job.state == JobState::Running as i32
                        && a.job.agent == name
                        && !held_map.contains_key(a.job.id.as_str())
                })
                .map(|a| a.job.id.clone())
                .collect();
            for id in lost {
                pending.push(core.lease_lost(&self.store, &id, "agent restarted", now));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            core.agents.insert(
                name.clone(),
                AgentEntry {
                    identity: identity.clone(),
                    session: session.clone(),
                    outbox: tx,
                    poll_rx: Some(Arc::new(tokio::sync::Mutex::new(rx))),
                    listen_gen: 0,
                    streaming: false,
                    last_poll: None,
                    last_heartbeat: now,
                    last_heartbeat_us: now_us(),
                    registered_at_us: now_us(),
                    probe: Probe::Unknown,
                    probe_detail: String::new(),
                    draining: false,
                    drain_requested: false,
                    gone: false,
                    leased: kept,
                    offered: HashSet::new(),
                    last_pick: 0,
                },
            );
            core.sessions.insert(session.clone(), name.clone());
            log::info!(
                agent = name.as_str(),
                role = identity_role(&identity),
                fallback = identity.fallback;
                "agent {name} registered (session {session}, {} slots, {} leases kept, {} revoked)",
                identity.slots,
                held.len() - revoked.len(),
                revoked.len()
            );
            (revoked, pending)
        };
        self.finish(pending).await?;
        Ok((session, revoked))
    }

    /// Opens the server-to-agent stream of a session: a fresh channel (replacing any older stream
    /// or poll channel), with every outstanding offer sent again.
    pub fn listen(
        &self,
        session: &str,
    ) -> Res<(String, u64, mpsc::UnboundedReceiver<ServerMessage>)> {
        let mut core = self.lock();
        let name = core.session_agent(session)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let key;
        let generation;
        {
            let entry = core.agents.get_mut(&name).expect("session maps to agent");
            entry.outbox = tx;
            entry.poll_rx = None;
            entry.listen_gen += 1;
            entry.streaming = true;
            generation = entry.listen_gen;
            for id in &entry.offered {
                entry.send(server_message::Msg::Offer(Offer { job_id: id.clone() }));
            }
            key = (entry.identity.role, entry.identity.selector.clone());
        }
        core.dispatch(&self.settings, &key, Instant::now());
        Ok((name, generation, rx))
    }

    /// The Listen stream of generation `generation` ended: withdraw its offers.
    pub fn listen_closed(&self, name: &str, generation: u64) {
        let mut core = self.lock();
        let Some(entry) = core.agents.get_mut(name) else {
            return;
        };
        if entry.listen_gen != generation {
            return;
        }
        entry.streaming = false;
        let offered: Vec<String> = entry.offered.drain().collect();
        let key = (entry.identity.role, entry.identity.selector.clone());
        log::info!(agent = name; "listen stream of {name} closed; {} offers withdrawn", offered.len());
        for id in offered {
            core.unoffer(&id);
        }
        core.dispatch(&self.settings, &key, Instant::now());
    }

    /// Long-poll: waits up to `wait` for messages for this session.
    pub async fn poll(&self, session: &str, wait: Duration) -> Res<Vec<ServerMessage>> {
        let rx = {
            let mut core = self.lock();
            let name = core.session_agent(session)?;
            let now = Instant::now();
            let entry = core.agents.get_mut(&name).expect("session maps to agent");
            entry.last_poll = Some(now);
            if entry.poll_rx.is_none() {
                let (tx, rx) = mpsc::unbounded_channel();
                entry.outbox = tx;
                entry.listen_gen += 1;
                entry.streaming = false;
                entry.poll_rx = Some(Arc::new(tokio::sync::Mutex::new(rx)));
                for id in &entry.offered {
                    entry.send(server_message::Msg::Offer(Offer { job_id: id.clone() }));
                }
            }
            let rx = entry.poll_rx.clone().expect("set above");
            let key = (entry.identity.role, entry.identity.selector.clone());
            core.dispatch(&self.settings, &key, now);
            rx
        };
        let wait = wait.min(self.settings.poll_wait);
        let mut rx = rx.lock().await;
        let mut out = Vec::new();
        if let Ok(Some(first)) = tokio::time::timeout(wait, rx.recv()).await {
            out.push(first);
            while let Ok(m) = rx.try_recv() {
                out.push(m);
                if out.len() >= 1024 {
                    break;
                }
            }
        }
        drop(rx);
        let mut core = self.lock();
        if let Some(name) = core.sessions.get(session).cloned() {
            if let Some(entry) = core.agents.get_mut(&name) {
                entry.last_poll = Some(Instant::now());
            }
        }
        Ok(out)
    }

    /// Takes a job: idempotent for the agent that already holds it.
    pub async fn acquire(&self, session: &str, job_id: &str) -> Res<Lease> {
        let (lease, pending) = {
            let mut core = self.lock();
            let now = Instant::now();
            let name = core.session_agent(session)?;
            core.acquire(&self.store, &self.settings, &name, job_id, now)?
        };
        if let Some(p) = pending {
            self.finish(vec![p]).await?;
        }
        Ok(lease)
    }

    /// Records a heartbeat, renews the listed leases and answers the lost ones and the cancels.
    pub fn heartbeat(
        &self,
        session: &str,
        leases: &[HeldLease],
        draining: bool,
    ) -> Res<(Vec<HeldLease>, Vec<CancelJob>, bool)> {
        let mut core = self.lock();
        let now = Instant::now();
        let name = core.session_agent(session)?;
        let ttl = self.settings.lease_ttl;
        let mut lost = Vec::new();
        let mut cancels = Vec::new();
        for h in leases {
            match core.jobs.get_mut(&h.job_id) {
                Some(a)
                    if a.job.state == JobState::Running as i32
                        && a.job.agent == name
                        && a.job.epoch == h.epoch =>
                {
                    a.lease_expires = Some(now + ttl);
                    if a.job.cancel_requested {
                        cancels.push(CancelJob {
                            job_id: h.job_id.clone(),
                            epoch: h.epoch,
                            grace_ms: a
                                .cancel_hard_at
                                .map(|t| {
                                    t.saturating_duration_since(now)
                                        .saturating_sub(ttl)
                                        .as_millis() as u64
                                })
                                .unwrap_or(0),
                            reason: a.cancel_reason.clone(),
                        });
                    }
                }
                _ => lost.push(h.clone()),
            }
        }
        core.metrics
            .renewals((leases.len() - lost.len()) as u64, lost.len() as u64);
        let entry = core.agents.get_mut(&name).expect("session maps to agent");
        let was_healthy = entry.health(&self.settings, now).is_ok();
        entry.last_heartbeat = now;
        entry.last_heartbeat_us = now_us();
        let draining = draining || entry.drain_requested;
        let drain = entry.drain_requested;
        let newly_draining = draining && !entry.draining;
        entry.draining = draining;
        let key = (entry.identity.role, entry.identity.selector.clone());
        let mut withdrawn = Vec::new();
        if newly_draining {
            withdrawn = entry.offered.drain().collect();
            log::info!(agent = name.as_str(); "agent {name} is draining");
        }
        for id in withdrawn {
            core.unoffer(&id);
        }
        if !was_healthy || newly_draining {
            core.dispatch(&self.settings, &key, now);
        }
        Ok((lost, cancels, drain))
    }

    /// The agent (name, role) a session belongs to.
    pub fn session_owner(&self, session: &str) -> Res<(String, i32)> {
        let core = self.lock();
        let name = core.session_agent(session)?;
        let role = core
            .agents
            .get(&name)
            .map(|a| a.identity.role)
            .unwrap_or_default();
        Ok((name, role))
    }

    /// Asks a connected agent to drain: it gets no new offers from now on and is told to drain
    /// at its next heartbeat (it finishes its jobs, then leaves).
    pub fn drain_agent(&self, name: &str, reason: &str) -> Res<AgentStatus> {
        {
            let mut core = self.lock();
            let now = Instant::now();
            let Some(entry) = core.agents.get_mut(name).filter(|e| !e.gone) else {
                return Err(DispatchError::AgentNotFound(name.to_owned()));
            };
            let first = !entry.drain_requested;
            entry.drain_requested = true;
            entry.draining = true;
            // At once on its stream (or next poll); the heartbeat answer repeats it. Only once:
            // a poll-mode agent's queue must not grow with repeated requests.
            if first {
                entry.send(server_message::Msg::Drain(es_proto::v1::Drain {
                    reason: if reason.is_empty() {
                        "operator request".into()
                    } else {
                        reason.to_owned()
                    },
                }));
            }
            let key = (entry.identity.role, entry.identity.selector.clone());
            let withdrawn: Vec<String> = entry.offered.drain().collect();
            for id in withdrawn {
                core.unoffer(&id);
            }
            log::info!(agent = name; "operator asked agent {name} to drain");
            core.dispatch(&self.settings, &key, now);
        }
        self.agents()
            .into_iter()
            .find(|a| a.identity.as_ref().is_some_and(|i| i.name == name))
            .ok_or_else(|| DispatchError::AgentNotFound(name.to_owned()))
    }

    /// Stores progress/log events of a lease; resends (seq already stored) are dropped.
    pub async fn report(
        &self,
        session: &str,
        job_id: &str,
        epoch: u64,
        events: Vec<AgentEvent>,
    ) -> Res<u64> {
        let (acked, pending) = {
            let mut core = self.lock();
            let name = core.session_agent(session)?;
            let a = core.fenced(job_id, epoch, &name)?;
            let now = now_us();
            let mut out = Vec::new();
            for ev in events {
                if ev.seq <= a.agent_seq {
                    continue;
                }
                a.agent_seq = ev.seq;
                let event = match ev.event {
                    Some(es_proto::v1::agent_event::Event::Progress(p)) => {
                        job_event::Event::Progress(p)
                    }
                    Some(es_proto::v1::agent_event::Event::Log(l)) => job_event::Event::Log(l),
                    Some(es_proto::v1::agent_event::Event::AwsCall(c)) => {
                        job_event::Event::AwsCall(c)
                    }
                    None => continue,
                };
                a.next_seq += 1;
                out.push(JobEvent {
                    job_id: job_id.to_owned(),
                    seq: a.next_seq,
                    at_us: now,
                    event: Some(event),
                    attempt: a.job.attempt,
                    agent: name.clone(),
                });
            }
            let acked = a.agent_seq;
            let pending = (!out.is_empty()).then(|| Pending {
                commit: Box::pin(self.store.events(out.clone())),
                events: out,
            });
            (acked, pending)
        };
        if let Some(p) = pending {
            self.finish(vec![p]).await?;
        }
        Ok(acked)
    }

    /// Stores the final result of a lease. A resend of an accepted result is acknowledged.
    pub async fn complete(
        &self,
        session: &str,
        job_id: &str,
        epoch: u64,
        mut result: JobResult,
    ) -> Res<()> {
        let pending = {
            let mut core = self.lock();
            let now = Instant::now();
            let name = core.session_agent(session)?;
            if let Some((final_epoch, _)) = core.finished.get(job_id) {
                if *final_epoch == epoch {
                    return Ok(());
                }
            }
            let a = core.fenced(job_id, epoch, &name)?;
            let state = JobState::try_from(result.state).unwrap_or(JobState::Unspecified);
            if !state.is_terminal() {
                return Err(DispatchError::Invalid {
                    field: "result.state",
                    reason: format!(
                        "{} is not a final state; use succeeded, failed, cancelled or timed_out",
                        state.name()
                    ),
                });
            }
            if a.job.cancel_requested && state == JobState::Cancelled {
                result.state = a.cancel_final as i32;
                result.error = if result.error.is_empty() {
                    a.cancel_reason.clone()
                } else {
                    format!("{} ({})", a.cancel_reason, result.error)
                };
            }
            let key = (a.job.role, a.job.selector.clone());
            core.counter(&name).results_accepted += 1;
            let pending = core.terminate(&self.store, job_id, result, false, now);
            // A slot is free: hand out the next queued job now, not at the next tick.
            core.dispatch(&self.settings, &key, now);
            pending
        };
        self.finish(vec![pending]).await
    }

    /// The agent leaves: its offers and released jobs go back to the queue at once.
    pub async fn going_away(&self, session: &str, released: &[HeldLease], reason: &str) -> Res<()> {
        let pending = {
            let mut core = self.lock();
            let now = Instant::now();
            let name = core.session_agent(session)?;
            let entry = core.agents.get_mut(&name).expect("session maps to agent");
            entry.gone = true;
            entry.draining = true;
            entry.streaming = false;
            let offered: Vec<String> = entry.offered.drain().collect();
            let key = (entry.identity.role, entry.identity.selector.clone());
            for id in offered {
                core.unoffer(&id);
            }
            let mut pending = Vec::new();
            for h in released {
                if core.fenced(&h.job_id, h.epoch, &name).is_ok() {
                    pending.push(core.lease_lost(
                        &self.store,
                        &h.job_id,
                        "released by agent going away",
                        now,
                    ));
                }
            }
            core.sessions.remove(session);
            log::info!(agent = name.as_str(); "agent {name} went away ({reason}); {} jobs released", released.len());
            core.dispatch(&self.settings, &key, now);
            pending
        };
        self.finish(pending).await
    }

    /// Records the outcome of a grpc.health.v1 probe of an agent.
    pub fn set_probe(&self, name: &str, session: &str, result: Result<(), String>) {
        let mut core = self.lock();
        let now = Instant::now();
        let Some(entry) = core.agents.get_mut(name) else {
            return;
        };
        if entry.session != session {
            return;
        }
        let was = entry.probe;
        match result {
            Ok(()) => {
                entry.probe = Probe::Serving;
                entry.probe_detail.clear();
            }
            Err(e) => {
                if was != Probe::Failing {
                    log::warn!(agent = name; "health probe of {name} failed: {e}");
                }
                entry.probe = Probe::Failing;
                entry.probe_detail = e;
            }
        }
        if was == Probe::Failing && entry.probe == Probe::Serving {
            let key = (entry.identity.role, entry.identity.selector.clone());
            core.dispatch(&self.settings, &key, now);
        }
    }

    /// Agents that publish a health address: (name, session, address).
    pub fn probe_targets(&self) -> Vec<(String, String, String)> {
        self.lock()
            .agents
            .values()
            .filter(|a| !a.gone && !a.identity.health_addr.is_empty())
            .map(|a| {
                (
                    a.identity.name.clone(),
                    a.session.clone(),
                    a.identity.health_addr.clone(),
                )
            })
            .collect()
    }

    /// Sends an application ping on every Listen stream.
    pub fn ping_streams(&self) {
        let core = self.lock();
        for a in core.agents.values().filter(|a| a.streaming) {
            a.send(server_message::Msg::Ping(Ping { at_us: now_us() }));
        }
    }

    /// One pass of the reaper: expired offers and leases, timeouts, hard cancels.
    pub async fn tick(&self) {
        self.tick_at(Instant::now()).await
    }

    /// The reaper pass as of `now` (tests pass a time in the future instead of waiting).
    pub async fn tick_at(&self, now: Instant) {
        let pending = {
            let mut core = self.lock();
            core.tick(&self.store, &self.settings, now)
        };
        if let Err(e) = self.finish(pending).await {
            log::error!("reaper: {e}");
        }
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

    /// The active job if `epoch` is its current lease and `agent` holds it; a refusal is
    /// counted against the agent.
    fn fenced(&mut self, job_id: &str, epoch: u64, agent: &str) -> Res<&mut Active> {
        let stale = match self.jobs.get(job_id) {
            None => true,
            Some(a) => {
                a.job.state != JobState::Running as i32
                    || a.job.epoch != epoch
                    || a.job.agent != agent
            }
        };
        if stale {
            self.counter(agent).writes_refused += 1;
            self.metrics.refused_write();
        }
        let Some(a) = self.jobs.get_mut(job_id) else {
            return Err(DispatchError::StaleEpoch {
                job_id: job_id.to_owned(),
                got: epoch,
                current: self.finished.get(job_id).map(|f| f.0).unwrap_or(0),
                holder: String::new(),
            });
        };
        if a.job.state != JobState::Running as i32 || a.job.epoch != epoch || a.job.agent != agent {
            return Err(DispatchError::StaleEpoch {
                job_id: job_id.to_owned(),
                got: epoch,
                current: a.job.epoch,
                holder: a.job.agent.clone(),
            });
        }
        Ok(a)
    }

    /// Puts an offered job back at the head of its queue.
    fn unoffer(&mut self, id: &str) {
        if let Some(a) = self.jobs.get_mut(id) {
            if let Some((agent, _)) = a.offered.take() {
                busy(&mut self.busy_sandboxes, a.exclusive_sandbox(), false);
                if let Some(e) = self.agents.get_mut(&agent) {
                    e.offered.remove(id);
                }
                if a.job.state == JobState::Queued as i32 {
                    self.queues
                        .entry((a.job.role, a.job.selector.clone()))
                        .or_default()
                        .push_front(id.to_owned());
                }
            }
        }
    }

    /// Offers queued jobs of `key` to agents until the queue or the capacity runs out.
    fn dispatch(&mut self, s: &Settings, key: &QueueKey, now: Instant) {
        let Some(queue) = self.queues.get_mut(key) else {
            return;
        };
        if queue.is_empty() {
            return;
        }
        let mut names: Vec<&String> = Vec::new();
        let mut cands: Vec<Candidate> = Vec::new();
        for (name, a) in &self.agents {
            if a.identity.role == key.0 && a.identity.selector == key.1 {
                names.push(name);
                cands.push(Candidate {
                    fallback: a.identity.fallback,
                    available: !a.draining && a.health(s, now).is_ok(),
                    slots: a.identity.slots,
                    busy: (a.leased.len() + a.offered.len()) as u32,
                    last_pick: a.last_pick,
                });
            }
        }
        let names: Vec<String> = names.into_iter().cloned().collect();
        while let Some(i) = selector::choose(&cands) {
            // The first job whose sandbox is not busy with another es-shells job (usually the
            // head of the queue).
            let jobs = &self.jobs;
            let busy_now = &self.busy_sandboxes;
            let Some(pos) = queue.iter().position(|id| {
                jobs.get(id)
                    .and_then(|j| j.exclusive_sandbox())
                    .is_none_or(|sb| !busy_now.contains_key(sb))
            }) else {
                break;
            };
            let Some(id) = queue.remove(pos) else { break };
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if job.job.state != JobState::Queued as i32 || job.offered.is_some() {
                continue;
            }
            busy(&mut self.busy_sandboxes, job.exclusive_sandbox(), true);
            self.picks += 1;
            cands[i].busy += 1;
            cands[i].last_pick = self.picks;
            let agent = self.agents.get_mut(&names[i]).expect("candidate exists");
            agent.last_pick = self.picks;
            agent.offered.insert(id.clone());
            job.offered = Some((names[i].clone(), now + s.offer_timeout));
            agent.send(server_message::Msg::Offer(Offer { job_id: id }));
        }
    }

    fn dispatch_all(&mut self, s: &Settings, now: Instant) {
        let keys: Vec<QueueKey> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.dispatch(s, &k, now);
        }
    }

    fn acquire(
        &mut self,
        store: &Store,
        s: &Settings,
        name: &str,
        job_id: &str,
        now: Instant,
    ) -> Res<(Lease, Option<Pending>)> {
        let agent = self.agents.get(name).expect("session maps to agent");
        let (agent_role, agent_sel) = (agent.identity.role, agent.identity.selector.clone());
        let (slots, busy_count, draining) = (
            agent.identity.slots as usize,
            agent.leased.len(),
            agent.draining || agent.gone,
        );
        let Some(a) = self.jobs.get_mut(job_id) else {
            if let Some((epoch, _)) = self.finished.get(job_id) {
                return Err(DispatchError::StaleEpoch {
                    job_id: job_id.to_owned(),
                    got: 0,
                    current: *epoch,
                    holder: String::new(),
                });
            }
            return Err(DispatchError::JobNotFound(job_id.to_owned()));
        };
        // A sweep's agent gets every sandbox the server knows is alive (or has a job now)
        // added to the live list, as of this moment; the stored job keeps the caller's list.
        let alive: Option<Vec<String>> = matches!(
            kind_of(&a.job),
            Some(es_proto::v1::job_spec::Kind::SweepOrphans(_))
        )
        .then(|| {
            let mut v: std::collections::BTreeSet<String> = self.alive.keys().cloned().collect();
            v.extend(
                self.jobs
                    .values()
                    .filter(|x| !x.job.sandbox_id.is_empty())
                    .map(|x| x.job.sandbox_id.clone()),
            );
            v.into_iter().collect()
        });
        let a = self.jobs.get_mut(job_id).expect("looked up above");
        let lease = |a: &Active| {
            let mut job = a.job.clone();
            if let (Some(extra), Some(es_proto::v1::job_spec::Kind::SweepOrphans(sw))) =
                (&alive, job.spec.as_mut().and_then(|s| s.kind.as_mut()))
            {
                for sb in extra {
                    if !sw.live_sandbox_ids.contains(sb) {
                        sw.live_sandbox_ids.push(sb.clone());
                    }
                }
            }
            Lease {
                job_id: job_id.to_owned(),
                epoch: a.job.epoch,
                attempt: a.job.attempt,
                ttl_ms: s.lease_ttl.as_millis() as u64,
                job: Some(job),
            }
        };
        let state = JobState::try_from(a.job.state).unwrap_or_default();
        if state == JobState::Running && a.job.agent == name {
            // A retried Acquire whose first answer was lost.
            return Ok((lease(a), None));
        }
        if state != JobState::Queued {
            return Err(DispatchError::NotAcquirable {
                job_id: job_id.to_owned(),
                state: state.name(),
            });
        }
        if a.job.role != agent_role {
            return Err(DispatchError::WrongRole {
                job_id: job_id.to_owned(),
                job_role: es_proto::Role::try_from(a.job.role)
                    .unwrap_or_default()
                    .name(),
                agent: name.to_owned(),
                agent_role: es_proto::Role::try_from(agent_role)
                    .unwrap_or_default()
                    .name(),
            });
        }
        if a.job.selector != agent_sel {
            return Err(DispatchError::OfferedElsewhere {
                job_id: job_id.to_owned(),
            });
        }
        match &a.offered {
            Some((to, _)) if to != name => {
                return Err(DispatchError::OfferedElsewhere {
                    job_id: job_id.to_owned(),
                })
            }
            Some(_) => {}
            None => {
                // Not offered (e.g. a poll-mode agent racing the queue): allowed with room,
                // and when its sandbox is not busy with another es-shells job.
                if draining || busy_count >= slots {
                    return Err(DispatchError::NoCapacity(name.to_owned()));
                }
                if a.exclusive_sandbox()
                    .is_some_and(|sb| self.busy_sandboxes.contains_key(sb))
                {
                    return Err(DispatchError::OfferedElsewhere {
                        job_id: job_id.to_owned(),
                    });
                }
                busy(&mut self.busy_sandboxes, a.exclusive_sandbox(), true);
                if let Some(q) = self.queues.get_mut(&(a.job.role, a.job.selector.clone())) {
                    q.retain(|x| x != job_id);
                }
            }
        }
        a.offered = None;
        a.job.state = JobState::Running as i32;
        a.job.attempt += 1;
        a.job.epoch += 1;
        a.job.agent = name.to_owned();
        a.job.started_at_us = now_us();
        a.lease_expires = Some(now + s.lease_ttl);
        a.deadline = Some(now + Duration::from_millis(a.job.timeout_ms));
        a.agent_seq = 0;
        self.metrics
            .dispatched(now.saturating_duration_since(a.queued_at));
        let ev = event(a, job_event::Event::State(JobState::Running as i32));
        let commit = Box::pin(store.update(&a.job, vec![ev.clone()]));
        let lease = lease(a);
        let agent = self.agents.get_mut(name).expect("session maps to agent");
        agent.offered.remove(job_id);
        agent.leased.insert(job_id.to_owned());
        self.counter(name).leases_granted += 1;
        Ok((
            lease,
            Some(Pending {
                commit,
                events: vec![ev],
            }),
        ))
    }

    /// Moves a job to a final state and forgets it. `fence` bumps the epoch so that the old
    /// holder's late writes are refused.
    fn terminate(
        &mut self,
        store: &Store,
        id: &str,
        result: JobResult,
        fence: bool,
        now: Instant,
    ) -> Pending {
        let mut a = self.jobs.remove(id).expect("terminate of an active job");
        if let Some(n) = self.unfinished_by.get_mut(&a.job.submitted_by) {
            *n -= 1;
            if *n == 0 {
                self.unfinished_by.remove(&a.job.submitted_by);
            }
        }
        note_sandbox(
            &mut self.alive,
            &a.job.sandbox_id,
            a.job.created_at_us,
            is_cleanup(&a.job),
            result.state == JobState::Succeeded as i32,
        );
        if a.offered.is_some() || a.job.state == JobState::Running as i32 {
            busy(&mut self.busy_sandboxes, a.exclusive_sandbox(), false);
        }
        if let Some(q) = self.queues.get_mut(&(a.job.role, a.job.selector.clone())) {
            if a.job.state == JobState::Queued as i32 {
                q.retain(|x| x != id);
            }
        }
        if let Some((agent, _)) = a.offered.take() {
            if let Some(e) = self.agents.get_mut(&agent) {
                e.offered.remove(id);
            }
        }
        let holder = a.job.agent.clone();
        if let Some(e) = self.agents.get_mut(&holder) {
            e.leased.remove(id);
        }
        if fence {
            a.job.epoch += 1;
        }
        a.job.state = result.state;
        a.job.finished_at_us = now_us();
        a.job.result = Some(result.clone());
        let ev = event(&mut a, job_event::Event::Result(result));
        let commit = Box::pin(store.update(&a.job, vec![ev.clone()]));
        self.finished.insert(id.to_owned(), (a.job.epoch, now));
        let st = JobState::try_from(a.job.state).unwrap_or_default();
        self.metrics.finished(st.name());
        log::info!(
            job_id = id,
            sandbox_id = a.job.sandbox_id.as_str(),
            agent = holder.as_str();
            "job {id} {} (attempt {}, agent {holder:?})",
            st.name(),
            a.job.attempt
        );
        Pending {
            commit,
            events: vec![ev],
        }
    }

    /// A lease ended without a result: queue the job again, or fail it when attempts are spent.
    fn lease_lost(&mut self, store: &Store, id: &str, why: &str, now: Instant) -> Pending {
        let a = self.jobs.get_mut(id).expect("lease_lost of an active job");
        let holder = a.job.agent.clone();
        if let Some(e) = self.agents.get_mut(&holder) {
            e.leased.remove(id);
        }
        let a = self.jobs.get_mut(id).expect("checked above");
        if a.job.cancel_requested {
            let result = JobResult {
                state: a.cancel_final as i32,
                output: String::new(),
                error: format!("{}; lease of {holder} ended: {why}", a.cancel_reason),
                ..Default::default()
            };
            return self.terminate(store, id, result, true, now);
        }
        if a.job.attempt >= a.job.max_attempts {
            let result = JobResult {
                state: JobState::Failed as i32,
                output: String::new(),
                error: format!(
                    "lease lost on attempt {} of {} (agent {holder}: {why}); no attempts left",
                    a.job.attempt, a.job.max_attempts
                ),
                ..Default::default()
            };
            return self.terminate(store, id, result, true, now);
        }
        log::warn!(job_id = id, agent = holder.as_str(); "lease of job {id} on {holder} lost ({why}); offering it again");
        a.job.state = JobState::Queued as i32;
        a.queued_at = now;
        a.lease_expires = None;
        a.deadline = None;
        busy(&mut self.busy_sandboxes, a.exclusive_sandbox(), false);
        // The epoch is bumped by the next Acquire; bump it now too so the old holder is fenced
        // even before anyone acquires.
        a.job.epoch += 1;
        let log_ev = event(
            a,
            job_event::Event::Log(format!("lease of {holder} lost: {why}")),
        );
        let st_ev = event(a, job_event::Event::State(JobState::Queued as i32));
        let commit = Box::pin(store.update(&a.job, vec![log_ev.clone(), st_ev.clone()]));
        self.queues
            .entry((a.job.role, a.job.selector.clone()))
            .or_default()
            .push_front(id.to_owned());
        Pending {
            commit,
            events: vec![log_ev, st_ev],
        }
    }

    fn request_cancel(
        &mut self,
        store: &Store,
        s: &Settings,
        id: &str,
        final_state: JobState,
        reason: &str,
        now: Instant,
    ) -> Pending {
        let a = self.jobs.get_mut(id).expect("cancel of an active job");
        a.job.cancel_requested = true;
        a.cancel_final = final_state;
        a.cancel_reason = reason.to_owned();
        // The agent forces the job after `cancel_grace`; the server fences it only a lease TTL
        // later, so a live agent's own (forced) result arrives first.
        a.cancel_hard_at = Some(now + s.cancel_grace + s.lease_ttl);
        let ev = event(
            a,
            job_event::Event::Log(format!("cancel requested: {reason}")),
        );
        let commit = Box::pin(store.update(&a.job, vec![ev.clone()]));
        let msg = CancelJob {
            job_id: id.to_owned(),
            epoch: a.job.epoch,
            grace_ms: s.cancel_grace.as_millis() as u64,
            reason: reason.to_owned(),
        };
        if let Some(agent) = self.agents.get(&a.job.agent) {
            agent.send(server_message::Msg::Cancel(msg));
        }
        Pending {
            commit,
            events: vec![ev],
        }
    }

    fn tick(&mut self, store: &Store, s: &Settings, now: Instant) -> Vec<Pending> {
        let mut expired_offers = Vec::new();
        let mut lost = Vec::new();
        let mut timed_out = Vec::new();
        let mut hard = Vec::new();
        for (id, a) in &self.jobs {
            if let Some((_, until)) = &a.offered {
                if *until <= now {
                    expired_offers.push(id.clone());
                }
            }
            if a.job.state != JobState::Running as i32 {
                continue;
            }
            if a.cancel_hard_at.is_some_and(|t| t <= now) {
                hard.push(id.clone());
            } else if a.lease_expires.is_some_and(|t| t <= now) {
                lost.push(id.clone());
            } else if !a.job.cancel_requested && a.deadline.is_some_and(|t| t <= now) {
                timed_out.push(id.clone());
            }
        }
        for id in expired_offers {
            self.unoffer(&id);
        }
        let mut pending = Vec::new();
        for id in lost {
            let holder = self.jobs[&id].job.agent.clone();
            self.counter(&holder).leases_expired += 1;
            self.metrics.expired();
            let why = format!("not renewed within {} ms", s.lease_ttl.as_millis());
            log::warn!(job_id = id.as_str(), agent = holder.as_str(); "lease of job {id} expired");
            pending.push(self.lease_lost(store, &id, &why, now));
        }
        for id in timed_out {
            let ms = self.jobs[&id].job.timeout_ms;
            pending.push(self.request_cancel(
                store,
                s,
                &id,
                JobState::TimedOut,
                &format!("timed out after {ms} ms"),
                now,
            ));
        }
        for id in hard {
            let a = &self.jobs[&id];
            let result = JobResult {
                state: a.cancel_final as i32,
                output: String::new(),
                error: format!(
                    "{}; agent {} did not stop within the grace, job fenced",
                    a.cancel_reason, a.job.agent
                ),
                ..Default::default()
            };
            pending.push(self.terminate(store, &id, result, true, now));
        }
        let keep = Duration::from_secs(120);
        self.finished
            .retain(|_, (_, at)| now.duration_since(*at) < keep);
        self.dispatch_all(s, now);
        pending
    }
}

#[cfg(test)]
mod tests {
    //! The lease state machine with injected time: expiry, fencing, attempts, cancel, selector
    //! wiring. The end-to-end tests cover the same rules through real processes.
    use super::*;
    use crate::store::Sync;
    use es_proto::v1::{job_spec, EchoJob, JobSpec, Role};

    async fn setup() -> (tempfile::TempDir, Arc<Dispatcher>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("es.db"), Sync::Normal).unwrap();
        (
            dir,
            Dispatcher::recover(store, Settings::default())
                .await
                .unwrap(),
        )
    }

    fn job(id: &str, max_attempts: u32) -> Job {
        Job {
            id: id.into(),
            role: Role::Shells as i32,
            selector: "r".into(),
            spec: Some(JobSpec {
                kind: Some(job_spec::Kind::Echo(EchoJob {
                    message: "m".into(),
                })),
                target: None,
            }),
            max_attempts,
            ..Default::default()
        }
    }

    async fn agent(d: &Dispatcher, name: &str, fallback: bool, slots: u32) -> String {
        let id = AgentIdentity {
            name: name.into(),
            role: Role::Shells as i32,
            selector: "r".into(),
            slots,
            fallback,
            ..Default::default()
        };
        let (session, _) = d.register(id, vec![]).await.unwrap();
        // Marks the agent as streaming; offers sent to the dropped receiver are simply lost,
        // which the tests do not need.
        d.listen(&session).unwrap();
        session
    }

    fn ok() -> JobResult {
        JobResult {
            state: JobState::Succeeded as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn expired_lease_requeues_with_a_new_epoch_and_fences_the_old_holder() {
        let (_dir, d) = setup().await;
        let a = agent(&d, "a", false, 1).await;
        d.submit(job("j", 3)).await.unwrap();
        let lease = d.acquire(&a, "j").await.unwrap();
        assert_eq!((lease.epoch, lease.attempt), (1, 1));
        // Renewed within the TTL: still held.
        d.tick_at(Instant::now() + d.settings.lease_ttl / 2).await;
        assert_eq!(d.get("j").await.unwrap().state, JobState::Running as i32);
        // Past the TTL without renewal: queued again, epoch bumped.
        d.tick_at(Instant::now() + d.settings.lease_ttl * 2).await;
        let j = d.get("j").await.unwrap();
        assert_eq!(j.state, JobState::Queued as i32);
        assert!(j.epoch > lease.epoch);
        let err = d.complete(&a, "j", lease.epoch, ok()).await.unwrap_err();
        assert!(matches!(err, DispatchError::StaleEpoch { .. }), "{err}");
        let (lost, _, _) = d
            .heartbeat(
                &a,
                &[HeldLease {
                    job_id: "j".into(),
                    epoch: lease.epoch,
                }],
                false,
            )
            .unwrap();
        assert_eq!(lost.len(), 1);
        // The next lease is attempt 2 with a higher epoch still.
        let again = d.acquire(&a, "j").await.unwrap();
        assert_eq!(again.attempt, 2);
        assert!(again.epoch > j.epoch);
        d.complete(&a, "j", again.epoch, ok()).await.unwrap();
        d.complete(&a, "j", again.epoch, ok()).await.unwrap(); // resend: acknowledged
        assert_eq!(d.get("j").await.unwrap().state, JobState::Succeeded as i32);
    }

    #[tokio::test]
    async fn spent_attempts_fail_the_job_and_hard_cancel_fences_it() {
        let (_dir, d) = setup().await;
        let a = agent(&d, "a", false, 2).await;
        d.submit(job("once", 1)).await.unwrap();
        d.acquire(&a, "once").await.unwrap();
        d.tick_at(Instant::now() + d.settings.lease_ttl * 2).await;
        let j = d.get("once").await.unwrap();
        assert_eq!(j.state, JobState::Failed as i32);
        assert!(j.result.unwrap().error.contains("attempt 1 of 1"));

        d.submit(job("c", 3)).await.unwrap();
        let lease = d.acquire(&a, "c").await.unwrap();
        d.cancel("c", "stop").await.unwrap();
        // The agent keeps renewing but never stops: fenced after grace + TTL.
        let later = Instant::now() + d.settings.cancel_grace + d.settings.lease_ttl * 2;
        d.heartbeat(
            &a,
            &[HeldLease {
                job_id: "c".into(),
                epoch: lease.epoch,
            }],
            false,
        )
        .unwrap();
        d.tick_at(later).await;
        let j = d.get("c").await.unwrap();
        assert_eq!(j.state, JobState::Cancelled as i32);
        assert!(j.epoch > lease.epoch);
        assert!(d.complete(&a, "c", lease.epoch, ok()).await.is_err());
    }

    #[tokio::test]
    async fn offers_go_to_primaries_first_and_expire_to_the_fallback() {
        let (_dir, d) = setup().await;
        let _fb = agent(&d, "fb", true, 4).await;
        let p = agent(&d, "p", false, 1).await;
        d.submit(job("j1", 3)).await.unwrap();
        d.submit(job("j2", 3)).await.unwrap();
        // j1 is offered to the primary (its one slot); j2 overflows to the fallback.
        let err = d.acquire(&p, "j2").await.unwrap_err();
        assert!(
            matches!(err, DispatchError::OfferedElsewhere { .. }),
            "{err}"
        );
        d.acquire(&p, "j1").await.unwrap();
        // An offer that is never acquired goes back to the queue and out again.
        d.tick_at(Instant::now() + d.settings.offer_timeout * 2)
            .await;
        assert_eq!(d.get("j2").await.unwrap().state, JobState::Queued as i32);
    }

    #[tokio::test]
    async fn shells_jobs_of_one_sandbox_run_one_at_a_time() {
        let (_dir, d) = setup().await;
        let a = agent(&d, "a", false, 5).await;
        let shells_job = |id: &str, sb: &str| Job {
            sandbox_id: sb.into(),
            spec: Some(JobSpec {
                kind: Some(job_spec::Kind::CleanupSandbox(Default::default())),
                target: None,
            }),
            ..job(id, 3)
        };
        d.submit(shells_job("first", "sb-1")).await.unwrap();
        d.submit(shells_job("second", "sb-1")).await.unwrap();
        d.submit(shells_job("other", "sb-2")).await.unwrap();
        d.submit(job("diag", 3)).await.unwrap();
        // A RunCommand on the same sandbox is not a provisioning job: it is not held back.
        d.submit(Job {
            sandbox_id: "sb-1".into(),
            spec: Some(JobSpec {
                kind: Some(job_spec::Kind::RunCommand(Default::default())),
                target: None,
            }),
            ..job("script", 3)
        })
        .await
        .unwrap();
        // first, other, diag and script are offered; second waits for first.
        let l1 = d.acquire(&a, "first").await.unwrap();
        d.acquire(&a, "other").await.unwrap();
        d.acquire(&a, "diag").await.unwrap();
        d.acquire(&a, "script").await.unwrap();
        let err = d.acquire(&a, "second").await.unwrap_err();
        assert!(
            matches!(err, DispatchError::OfferedElsewhere { .. }),
            "{err}"
        );
        d.complete(&a, "first", l1.epoch, ok()).await.unwrap();
        // Now it is offered and can be taken.
        let l2 = d.acquire(&a, "second").await.unwrap();
        assert_eq!(l2.attempt, 1);
    }
}
