//! The server's Prometheus metrics (`--metrics-listen`): jobs by state, dispatch latency,
//! lease renewals, refusals and expiries, connected agents. Counters are updated where the
//! dispatch core decides; gauges are read from the core when scraped.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use es_proto::v1::AgentStatus;

use es_proto::metrics::{labels, Labels};

/// Every metric of the server; cheap to update from any thread.
pub struct ServerMetrics {
    registry: Registry,
    jobs_submitted: Counter,
    jobs_finished: Family<Labels, Counter>,
    jobs: Family<Labels, Gauge>,
    dispatch_latency: Histogram,
    lease_renewals: Counter,
    lease_renewals_refused: Counter,
    leases_expired: Counter,
    writes_refused: Counter,
    agents: Family<Labels, Gauge>,
    /// Refused credentials, by kind (agent, submitter) and reason; shared with `Auth`.
    pub auth_failures: Family<Labels, Counter>,
    /// Watch streams being served now (each ends when its client goes away).
    pub watch_streams: Gauge,
    leader: Gauge,
    /// Scrapes rebuild the gauge families; two at once must not interleave.
    scrape: std::sync::Mutex<()>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("es_server");
        let m = ServerMetrics {
            jobs_submitted: Counter::default(),
            jobs_finished: Family::default(),
            jobs: Family::default(),
            // 1 ms .. ~65 s
            dispatch_latency: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            lease_renewals: Counter::default(),
            lease_renewals_refused: Counter::default(),
            leases_expired: Counter::default(),
            writes_refused: Counter::default(),
            agents: Family::default(),
            auth_failures: Family::default(),
            watch_streams: Gauge::default(),
            leader: Gauge::default(),
            registry: Registry::default(),
            scrape: Default::default(),
        };
        registry.register(
            "jobs_submitted",
            "Jobs created by Submit",
            m.jobs_submitted.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs that reached a final state, by state",
            m.jobs_finished.clone(),
        );
        registry.register(
            "jobs",
            "Jobs queued or running now, by state and role",
            m.jobs.clone(),
        );
        registry.register(
            "dispatch_latency_seconds",
            "Time from a job (re)entering the queue to an agent acquiring its lease",
            m.dispatch_latency.clone(),
        );
        registry.register(
            "lease_renewals",
            "Leases renewed by agent heartbeats",
            m.lease_renewals.clone(),
        );
        registry.register(
            "lease_renewals_refused",
            "Renewals refused because the lease was no longer the agent's (the agent fences the job)",
            m.lease_renewals_refused.clone(),
        );
        registry.register(
            "leases_expired",
            "Leases that ran out without renewal (the job is offered again or failed)",
            m.leases_expired.clone(),
        );
        registry.register(
            "writes_refused",
            "Reports and results refused from an agent whose lease was fenced",
            m.writes_refused.clone(),
        );
        registry.register(
            "agents",
            "Agents known to the server, by role, kind (primary/fallback) and health",
            m.agents.clone(),
        );
        registry.register(
            "auth_failures",
            "Calls refused for their credentials (no, unknown, revoked or out-of-scope), by kind and reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "watch_streams",
            "Watch streams open now",
            m.watch_streams.clone(),
        );
        registry.register(
            "leader",
            "1 while this server leads (dispatches); 0 while it stands by",
            m.leader.clone(),
        );
        ServerMetrics { registry, ..m }
    }
}

impl ServerMetrics {
    pub fn submitted(&self) {
        self.jobs_submitted.inc();
    }
    pub fn finished(&self, state: &str) {
        self.jobs_finished
            .get_or_create(&labels(&[("state", state)]))
            .inc();
    }
    pub fn dispatched(&self, waited: std::time::Duration) {
        self.dispatch_latency.observe(waited.as_secs_f64());
    }
    pub fn renewals(&self, ok: u64, refused: u64) {
        self.lease_renewals.inc_by(ok);
        self.lease_renewals_refused.inc_by(refused);
    }
    pub fn expired(&self) {
        self.leases_expired.inc();
    }
    pub fn refused_write(&self) {
        self.writes_refused.inc();
    }

    /// The exposition text of a standby: counters so far, no jobs or agents, `leader 0`.
    pub fn render_standby(&self) -> String {
        self.render(&Snapshot::default())
    }

    /// The exposition text, with the gauges set from `now` (taken by the caller).
    pub fn render(&self, now: &Snapshot) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.leader.set(now.leading as i64);
        self.jobs.clear();
        for ((state, role), n) in &now.active {
            self.jobs
                .get_or_create(&labels(&[("state", state), ("role", role)]))
                .set(*n as i64);
        }
        // Both states always appear, so a dashboard shows 0 rather than nothing.
        for state in ["queued", "running"] {
            for role in ["shells", "commands"] {
                let _ = self
                    .jobs
                    .get_or_create(&labels(&[("state", state), ("role", role)]));
            }
        }
        self.agents.clear();
        for a in &now.agents {
            let id = a.identity.clone().unwrap_or_default();
            let health = if !a.connected {
                "disconnected"
            } else if a.draining {
                "draining"
            } else if a.healthy {
                "healthy"
            } else {
                "unhealthy"
            };
            self.agents
                .get_or_create(&labels(&[
                    (
                        "role",
                        es_proto::Role::try_from(id.role).unwrap_or_default().name(),
                    ),
                    ("kind", if id.fallback { "fallback" } else { "primary" }),
                    ("health", health),
                ]))
                .inc();
        }
        es_proto::metrics::encode(&self.registry)
    }
}

/// What the gauges show, read from the dispatch core at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Unfinished jobs by (state, role) name.
    pub active: std::collections::HashMap<(&'static str, &'static str), usize>,
    pub agents: Vec<AgentStatus>,
    /// Whether this server leads (false: a standby, whose other gauges are empty).
    pub leading: bool,
}
