//! How the agent calls the server: the endpoint it dials (TLS, keepalives), a deadline on every
//! unary call, and the text of a failed call.

use std::time::Duration;

use es_proto::error_chain;
use es_proto::v1::agent_service_client::AgentServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::config::AgentConfig;
use crate::error::AgentError;

/// Time limit of a unary call to the server.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a registration waits for its answer when another server address could be tried:
/// a replica that is paused or cut off behind a connection that still accepts (a partition, a
/// frozen host) never answers, and the agent must reach the new leader before the leases it
/// holds expire there (default TTL 4 s), or those jobs run again. Registration answers in
/// milliseconds otherwise.
pub(crate) const REGISTER_AMONG_SEVERAL: Duration = Duration::from_secs(2);

/// The deadline of a registration with `servers` addresses to choose from.
pub(crate) fn register_timeout(servers: usize) -> Duration {
    if servers > 1 {
        REGISTER_AMONG_SEVERAL
    } else {
        CALL_TIMEOUT
    }
}

#[cfg(test)]
#[test]
fn registration_waits_less_when_another_server_can_be_tried() {
    assert_eq!(register_timeout(1), CALL_TIMEOUT);
    assert_eq!(register_timeout(2), REGISTER_AMONG_SEVERAL);
    assert!(
        REGISTER_AMONG_SEVERAL < Duration::from_secs(4),
        "below the default lease TTL"
    );
}

/// A unary request with a deadline.
pub(crate) fn call<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// The endpoints the agent dials (one per server address, in the order tried), with HTTP/2
/// keepalives so an idle connection survives load balancers (AWS NLB idle cut: 350 s) and a
/// dead peer is noticed.
pub fn endpoints(cfg: &AgentConfig) -> Result<Vec<Endpoint>, AgentError> {
    cfg.servers().iter().map(|s| endpoint(cfg, s)).collect()
}

/// One server's clients, one per address of `endpoints` (lazy: connected at first use, on the
/// runtime that makes them).
pub(crate) fn clients(endpoints: &[Endpoint]) -> Vec<AgentServiceClient<Channel>> {
    endpoints
        .iter()
        .map(|e| {
            AgentServiceClient::new(e.connect_lazy())
                .max_decoding_message_size(es_proto::limits::MAX_MESSAGE)
                .max_encoding_message_size(es_proto::limits::MAX_MESSAGE)
        })
        .collect()
}

fn endpoint(cfg: &AgentConfig, server: &str) -> Result<Endpoint, AgentError> {
    let mut ep = Endpoint::from_shared(server.to_owned())
        .map_err(|e| AgentError::Server(server.to_owned(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    match cfg
        .client_tls()
        .map_err(|e| AgentError::Server(server.to_owned(), e.to_string()))?
    {
        Some(tls) => {
            ep = ep
                .tls_config(tls)
                .map_err(|e| AgentError::Server(server.to_owned(), error_chain(&e)))?;
        }
        None => {
            log::warn!(agent = cfg.name.as_str(); "INSECURE: talking plaintext to {server} without a client certificate (insecure = true)");
        }
    }
    Ok(ep)
}

/// A gRPC status with the causes of a transport failure (TLS refusals are named there, e.g.
/// "invalid peer certificate: UnknownIssuer" or "received fatal alert: CertificateExpired").
pub(crate) fn status_text(s: &tonic::Status) -> String {
    let mut out = s.message().to_owned();
    if let Some(src) = std::error::Error::source(s) {
        let chain = error_chain(src);
        if !out.contains(&chain) {
            out = format!("{out}: {chain}");
        }
    }
    out
}
