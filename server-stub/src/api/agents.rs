//! `AgentService`: registration, the listen stream of offers, acquire, heartbeats, reports and
//! results, each checked against the caller's certificate.

use std::sync::Arc;
use std::time::Duration;

use es_proto::v1::agent_service_server::AgentService;
use es_proto::v1::*;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::auth::Auth;
use super::{invalid, require, validate, BoxStream};
use crate::dispatch::Dispatcher;
use es_proto::limits::MAX_REASON;

pub struct AgentApi {
    pub d: Arc<Dispatcher>,
    pub auth: Arc<Auth>,
}

impl AgentApi {
    /// With TLS, a session may only be used by the certificate that registered it.
    fn check_session<T>(&self, req: &Request<T>, session: &str) -> Result<(), Status> {
        require("session_id", session)?;
        if let Some(cert) = self.auth.agent(req)? {
            let (owner, role) = self.d.session_owner(session)?;
            // Name and role: a CA that issued one name for two roles must not let the
            // commands certificate use the shells session.
            if owner != cert.name || cert.role().map(|r| r as i32) != Some(role) {
                return Err(Status::permission_denied(format!(
                    "session {session} belongs to agent {owner} ({}), not to {} ({})",
                    Role::try_from(role).unwrap_or_default().name(),
                    cert.name,
                    cert.unit
                )));
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let cert = self.auth.agent(&req)?;
        let mut identity = validate::identity(req.get_ref().identity.as_ref())
            .map_err(invalid)?
            .clone();
        self.auth
            .check_registration(&req, cert.as_ref(), &identity)?;
        if let Some(from) = req.remote_addr() {
            identity.health_addr = probe_addr(&identity.name, &identity.health_addr, from);
        }
        let req = req.into_inner();
        let (session_id, revoked) = self.d.register(identity, req.held).await?;
        let s = &self.d.settings;
        Ok(Response::new(RegisterResponse {
            session_id,
            heartbeat_interval_ms: s.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: s.lease_ttl.as_millis() as u64,
            poll_wait_ms: s.poll_wait.as_millis() as u64,
            revoked,
        }))
    }

    type ListenStream = BoxStream<ServerMessage>;

    async fn listen(
        &self,
        req: Request<ListenRequest>,
    ) -> Result<Response<Self::ListenStream>, Status> {
        self.check_session(&req, &req.get_ref().session_id)?;
        let session = req.into_inner().session_id;
        let (name, generation, rx) = self.d.listen(&session)?;
        // Withdraws the stream's offers when the agent goes (the stream is dropped).
        struct Closed {
            d: Arc<Dispatcher>,
            name: String,
            generation: u64,
        }
        impl Drop for Closed {
            fn drop(&mut self) {
                self.d.listen_closed(&self.name, self.generation);
            }
        }
        let guard = Closed {
            d: self.d.clone(),
            name,
            generation,
        };
        let stream = UnboundedReceiverStream::new(rx).map(move |m| {
            let _keep = &guard;
            Ok(m)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn poll(&self, req: Request<PollRequest>) -> Result<Response<PollResponse>, Status> {
        self.check_session(&req, &req.get_ref().session_id)?;
        let req = req.into_inner();
        let messages = self
            .d
            .poll(&req.session_id, Duration::from_millis(req.wait_ms))
            .await?;
        Ok(Response::new(PollResponse { messages }))
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        self.check_session(&req, &req.get_ref().session_id)?;
        let req = req.into_inner();
        require("job_id", &req.job_id)?;
        let lease = self.d.acquire(&req.session_id, &req.job_id).await?;
        Ok(Response::new(AcquireResponse { lease: Some(lease) }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.check_session(&req, &req.get_ref().session_id)?;
        let req = req.into_inner();
        let (lost, cancel, drain) = self
            .d
            .heartbeat(&req.session_id, &req.leases, req.draining)?;
        self.d
            .set_aws(&req.session_id, &req.aws_identity, &req.aws_problem)?;
        Ok(Response::new(HeartbeatResponse {
            lost,
            cancel,
            drain,
        }))
    }

    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        self.check_session(&req, &req.get_ref().session_id)?;
        let req = req.into_inner();
        require("job_id", &req.job_id)?;
        let acked_seq = self
            .d
            .report(&req.session_id, &req.job_id, req.epoch, req.events)
            .await?;
        Ok(Response::new(ReportResponse { acked_seq }))
    }

    async fn complete(
        &self,
        req: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        self.check_session(&req, &req.get_ref().session_id)?;
        let req = req.into_inner();
        require("job_id", &req.job_id)?;
        let result = req
            .result
            .ok_or_else(|| Status::invalid_argument("invalid `result`: missing"))?;
        self.d
            .complete(&req.session_id, &req.job_id, req.epoch, result)
            .await?;
        Ok(Response::new(CompleteResponse {}))
    }

    async fn going_away(
        &self,
        req: Request<GoingAwayRequest>,
    ) -> Result<Response<GoingAwayResponse>, Status> {
        self.check_session(&req, &req.get_ref().session_id)?;
        let req = req.into_inner();
        // An agent's own words: clipped, not refused (it must be able to leave).
        let reason = es_proto::limits::clip(&req.reason, MAX_REASON);
        self.d
            .going_away(&req.session_id, &req.released, &reason)
            .await?;
        Ok(Response::new(GoingAwayResponse {}))
    }
}

/// Where the server probes an agent's health: the address the agent connected from, with the
/// port it published. The server never connects to an address a caller merely names (that would
/// make it a port scanner for anyone holding an agent certificate).
pub fn probe_addr(agent: &str, published: &str, from: std::net::SocketAddr) -> String {
    let Ok(p) = published.parse::<std::net::SocketAddr>() else {
        return String::new();
    };
    let target = std::net::SocketAddr::new(from.ip(), p.port());
    if p.ip() != from.ip() && !p.ip().is_unspecified() {
        log::warn!(
            agent = agent;
            "agent {agent} published health address {published} but connected from {}: probing {target}",
            from.ip()
        );
    }
    target.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_probes_go_where_the_agent_connected_from() {
        let from: std::net::SocketAddr = "10.0.1.20:53211".parse().unwrap();
        let cases = [
            ("10.0.1.20:7701", "10.0.1.20:7701"),
            ("0.0.0.0:7701", "10.0.1.20:7701"),
            ("169.254.169.254:80", "10.0.1.20:80"),
            ("not an address", ""),
            ("", ""),
        ];
        for (published, want) in cases {
            assert_eq!(probe_addr("a", published, from), want, "{published}");
        }
    }
}
