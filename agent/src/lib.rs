//! es-agent: the execution-server agent (es-shells, es-commands and their `-b` fallbacks).
//!
//! It dials out to the es-server, registers its identity, takes offered jobs through
//! idempotent `Acquire` calls that return fenced leases, runs them with bounded concurrency and
//! reports events and results. `main.rs` calls [`cli::main`], which only loads the configuration and installs signal
//! handlers; [`run`] is what tests call in-process.

pub mod aws;
pub mod backoff;
pub mod cli;
pub mod commands;
pub mod config;
mod config_tls;
mod error;
pub mod executor;
mod health;
mod heartbeat;
pub mod job;
mod job_task;
pub use es_proto::logging;
pub mod metrics;
mod rpc;
pub mod runtime;
mod session;
pub mod shells;

pub use config::AgentConfig;
pub use runtime::{run, AgentError, Signals};
