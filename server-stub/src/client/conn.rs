//! The submitter's connection to the server: connecting (to the first of several addresses
//! that answers), the client type, the interceptor that adds the token, the CLI's exit codes and
//! its error (shared by every client command).

use std::time::Duration;

use es_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

use super::args::ClientOpts;

/// EX_USAGE: bad command line or configuration, or input the server refused as invalid.
pub const EXIT_USAGE: u8 = 64;
/// EX_UNAVAILABLE: the server cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Adds the submitter's token to every call.
#[derive(Clone)]
pub struct Credentials(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The CLI's connection to the server's JobService.
pub type Client =
    JobServiceClient<tonic::service::interceptor::InterceptedService<Channel, Credentials>>;

/// A failed client command: the exit code and what to print.
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> CliError {
        let code = match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::AlreadyExists => EXIT_USAGE,
            tonic::Code::Unavailable => EXIT_UNAVAILABLE,
            _ => 1,
        };
        CliError {
            code,
            message: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

/// Bad input of the user (exit 64).
pub fn usage(message: String) -> CliError {
    CliError {
        code: EXIT_USAGE,
        message,
    }
}

/// Connects to the first of the comma-separated `--server` addresses (ES_SERVER) that answers
/// and leads: a server and its replicas, tried in turn. With several addresses, one that
/// reports NOT_SERVING on grpc.health.v1 (a standby) is passed over.
pub async fn connect(opts: &ClientOpts) -> Result<Client, CliError> {
    let mut unreachable = None;
    let servers: Vec<&str> = opts
        .server
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for server in &servers {
        match connect_one(opts, server).await {
            Ok((c, _)) if servers.len() == 1 => return Ok(c),
            Ok((c, channel)) => match leads(channel).await {
                Ok(()) => return Ok(c),
                Err(why) => {
                    unreachable = Some(CliError {
                        code: EXIT_UNAVAILABLE,
                        message: format!("{server} {why}"),
                    })
                }
            },
            Err(e) if e.code == EXIT_UNAVAILABLE => unreachable = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(unreachable.unwrap_or_else(|| usage("--server (ES_SERVER) names no address".into())))
}

/// Whether the server behind `channel` serves jobs (a standby reports NOT_SERVING).
async fn leads(channel: Channel) -> Result<(), String> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: "es.v1.JobService".into(),
    });
    req.set_timeout(Duration::from_secs(5));
    match HealthClient::new(channel).check(req).await {
        Ok(r) if r.get_ref().status() == tonic_health::ServingStatus::Serving.into() => Ok(()),
        Ok(_) => Err("is a standby (NOT_SERVING)".into()),
        Err(s) => Err(format!("does not answer its health check: {}", s.message())),
    }
}

async fn connect_one(opts: &ClientOpts, server: &str) -> Result<(Client, Channel), CliError> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(server.to_owned())
        .map_err(|e| usage(format!("--server {server:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| usage(format!("{flag} {}: {e}", p.display())))
    };
    if server.starts_with("https://") {
        let ca = opts.ca.as_ref().ok_or_else(|| {
            usage(
                "--ca (ES_CA) is needed for an https:// server: the CA that signed its certificate"
                    .into(),
            )
        })?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read("--ca", ca)?));
        if let (Some(cert), Some(key)) = (&opts.cert, &opts.cert_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read("--cert", cert)?,
                read("--cert-key", key)?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| usage(format!("--ca/--cert/--cert-key: {e}")))?;
    } else if opts.cert.is_some() || opts.ca.is_some() {
        return Err(usage(format!(
            "--ca/--cert need an https:// --server (got {server})"
        )));
    }
    let token = match &opts.token {
        None => None,
        Some(t) => {
            if server.starts_with("http://") {
                eprintln!("es-server: warning: sending the token in plaintext to {server}");
            }
            let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {}", t.trim()).parse().map_err(|_| {
                    usage("--token (ES_TOKEN) holds characters not allowed in a header".into())
                })?;
            v.set_sensitive(true);
            Some(v)
        }
    };
    let channel = endpoint.connect().await.map_err(|e| CliError {
        code: EXIT_UNAVAILABLE,
        message: format!("cannot reach {server}: {}", es_proto::error_chain(&e)),
    })?;
    Ok((
        JobServiceClient::with_interceptor(channel.clone(), Credentials(token))
            .max_decoding_message_size(es_proto::limits::MAX_MESSAGE)
            .max_encoding_message_size(es_proto::limits::MAX_MESSAGE),
        channel,
    ))
}
