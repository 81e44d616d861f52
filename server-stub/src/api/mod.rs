//! The gRPC API: `AgentService` for agents (`agents.rs`) and `JobService` for submitters
//! (`jobs.rs`), who may call what (`auth/`), and what a valid request is (`validate/`). Domain
//! errors become `tonic::Status` here and nowhere else.

pub mod agents;
pub mod auth;
pub mod jobs;
pub mod validate;

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::Status;

use crate::dispatch::DispatchError;
use validate::FieldError;

pub use agents::{probe_addr, AgentApi};
pub use jobs::{redact, JobApi, MASK};

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The one place where domain errors become gRPC codes (the retry table in ARCHITECTURE.md).
impl From<DispatchError> for Status {
    fn from(e: DispatchError) -> Status {
        let msg = e.to_string();
        match e {
            DispatchError::UnknownSession(_) => Status::unauthenticated(msg),
            DispatchError::JobNotFound(_) | DispatchError::AgentNotFound(_) => {
                Status::not_found(msg)
            }
            DispatchError::StaleEpoch { .. } | DispatchError::NotAcquirable { .. } => {
                Status::failed_precondition(msg)
            }
            DispatchError::WrongRole { .. } => Status::permission_denied(msg),
            DispatchError::OfferedElsewhere { .. } | DispatchError::NoCapacity(_) => {
                Status::aborted(msg)
            }
            DispatchError::Invalid { .. } => Status::invalid_argument(msg),
            DispatchError::TooManyQueued { .. } => Status::resource_exhausted(msg),
            DispatchError::Store(_) | DispatchError::Stopping => Status::unavailable(msg),
        }
    }
}

pub(crate) fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

pub(crate) fn require(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!(
            "invalid `{field}`: is empty"
        )))
    } else {
        Ok(())
    }
}
