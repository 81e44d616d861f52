//! The agent's Prometheus metrics (`metrics_addr`): jobs running and finished, heartbeats and
//! lease renewals, leases fenced, and every AWS call attempt by service, operation and
//! outcome (ok, error, throttled).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use es_proto::metrics::{labels, Labels};

/// Every metric of one agent (two agents in one process keep separate sets).
pub struct AgentMetrics {
    registry: Registry,
    jobs_running: Gauge,
    jobs_finished: Family<Labels, Counter>,
    heartbeats: Family<Labels, Counter>,
    lease_renewals: Counter,
    leases_fenced: Counter,
    aws_calls: Family<Labels, Counter>,
    aws_identity: Family<Labels, Gauge>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("es_agent");
        let m = AgentMetrics {
            registry: Registry::default(),
            jobs_running: Gauge::default(),
            jobs_finished: Family::default(),
            heartbeats: Family::default(),
            lease_renewals: Counter::default(),
            leases_fenced: Counter::default(),
            aws_calls: Family::default(),
            aws_identity: Family::default(),
        };
        registry.register(
            "jobs_running",
            "Jobs this agent holds a lease on now",
            m.jobs_running.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs this agent finished, by final state",
            m.jobs_finished.clone(),
        );
        registry.register(
            "heartbeats",
            "Heartbeats sent to the server, by outcome (ok, failed)",
            m.heartbeats.clone(),
        );
        registry.register(
            "lease_renewals",
            "Leases renewed by successful heartbeats",
            m.lease_renewals.clone(),
        );
        registry.register(
            "leases_fenced",
            "Jobs stopped because their lease was lost, revoked or not renewable in time",
            m.leases_fenced.clone(),
        );
        registry.register(
            "aws_calls",
            "AWS API call attempts, by service, operation and outcome (ok, error, throttled)",
            m.aws_calls.clone(),
        );
        registry.register(
            "aws_identity",
            "1 for the AWS identity this agent acts as (STS GetCallerIdentity: arn, account); 0 with arn=\"\" while it has none",
            m.aws_identity.clone(),
        );
        AgentMetrics { registry, ..m }
    }
}

impl AgentMetrics {
    pub fn running(&self, n: usize) {
        self.jobs_running.set(n as i64);
    }
    pub fn finished(&self, state: &str) {
        self.jobs_finished
            .get_or_create(&labels(&[("state", state)]))
            .inc();
    }
    pub fn heartbeat(&self, ok: bool, renewed: usize) {
        let outcome = if ok { "ok" } else { "failed" };
        self.heartbeats
            .get_or_create(&labels(&[("outcome", outcome)]))
            .inc();
        self.lease_renewals.inc_by(renewed as u64);
    }
    pub fn fenced(&self) {
        self.leases_fenced.inc();
    }
    pub fn aws_call(&self, service: &str, operation: &str, outcome: &str) {
        self.aws_calls
            .get_or_create(&labels(&[
                ("service", service),
                ("operation", operation),
                ("outcome", outcome),
            ]))
            .inc();
    }

    /// The identity found (`Some((arn, account))`), or none (no credentials, STS unreachable).
    pub fn aws_identity(&self, who: Option<(&str, &str)>) {
        self.aws_identity.clear();
        let (arn, account) = who.unwrap_or(("", ""));
        self.aws_identity
            .get_or_create(&labels(&[("arn", arn), ("account", account)]))
            .set(i64::from(who.is_some()));
    }

    pub fn render(&self) -> String {
        es_proto::metrics::encode(&self.registry)
    }
}

/// Binds `addr` and serves `/metrics` (spawned; ends with the process).
pub async fn start(addr: &str, m: Arc<AgentMetrics>) -> std::io::Result<std::net::SocketAddr> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    let render: es_proto::metrics::Render = Arc::new(move || m.render());
    tokio::spawn(es_proto::metrics::serve(l, render));
    Ok(bound)
}
