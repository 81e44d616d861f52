//! The submitter's connection to the server: the client type, the interceptor that adds the
//! token, and the CLI's exit codes (shared by cli.rs and sandbox_cli.rs).

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
