//! The submitter's connection to the server: the client type, the interceptor that adds the
//! token, the CLI's exit codes and its error (shared by every client command).

use es_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

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
