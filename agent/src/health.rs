//! The agent's own grpc.health.v1 server (optional, `health_addr`): SERVING while registered
//! and not draining. The es-server probes it to tell a hung agent from a live one.

use tokio::net::TcpListener;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::AgentConfig;
use crate::error::AgentError;

pub struct Health {
    /// Service "" is SERVING while registered and not draining; "es.aws" while the agent can
    /// use AWS (see runtime::watch_aws).
    pub reporter: HealthReporter,
    /// The address given to the server to probe.
    pub advertised: String,
}

impl Health {
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
    }
}

/// Starts the health server when `health_addr` is configured.
pub async fn start(cfg: &AgentConfig) -> Result<Option<Health>, AgentError> {
    let Some(addr) = &cfg.health_addr else {
        return Ok(None);
    };
    let err = |source| AgentError::Health {
        addr: addr.clone(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            log::error!("health server stopped: {e}");
        }
    });
    let advertised = cfg
        .advertise_health_addr
        .clone()
        .unwrap_or_else(|| bound.to_string());
    log::info!(agent = cfg.name.as_str(); "health (grpc.health.v1) on {bound}, advertised as {advertised}");
    Ok(Some(Health {
        reporter,
        advertised,
    }))
}
