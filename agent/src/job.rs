//! What a running job is handed (cancellation, an event sink, the agent's metrics) and what it
//! reports besides its result. Used by the runtime and by every executor (diagnostic, es-shells,
//! es-commands), so they need not import each other.

use es_proto::v1::{Job, JobResult, JobState, Progress};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a running job can report besides its result.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEventOut {
    Progress(Progress),
    Log(String),
    /// A mutating AWS call (for the server's audit trail).
    AwsCall(es_proto::v1::AwsCall),
}

/// Handed to an executor: cancellation and an event sink.
#[derive(Clone)]
pub struct JobCtx {
    pub cancel: CancellationToken,
    pub events: mpsc::UnboundedSender<JobEventOut>,
    /// The agent's metrics (AWS calls are counted into them).
    pub metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
}

impl JobCtx {
    /// A context with a fresh cancel token and its own metrics (tests, benchmarks).
    pub fn new(events: mpsc::UnboundedSender<JobEventOut>) -> JobCtx {
        JobCtx {
            cancel: CancellationToken::new(),
            events,
            metrics: Default::default(),
        }
    }

    pub fn progress(&self, done: u32, total: u32, message: impl Into<String>) {
        let _ = self.events.send(JobEventOut::Progress(Progress {
            done,
            total,
            message: message.into(),
        }));
    }

    pub fn log(&self, line: impl Into<String>) {
        let _ = self.events.send(JobEventOut::Log(line.into()));
    }
}

pub fn result(state: JobState, output: impl Into<String>, error: impl Into<String>) -> JobResult {
    JobResult {
        state: state as i32,
        output: output.into(),
        error: error.into(),
        shells: None,
        commands: None,
    }
}

/// The executor of one family of job kinds (`es_proto::kinds::Family`: diagnostic, es-shells,
/// es-commands). The agent's executor hands each job to its family's; a job of another family is
/// answered with a failed result, never a panic.
pub trait JobFamily {
    fn execute(
        &self,
        job: &Job,
        ctx: &JobCtx,
    ) -> impl std::future::Future<Output = JobResult> + Send;
}

/// The result of a job that reached an executor not made for its kind.
pub fn wrong_family(job: &Job, family: &str) -> JobResult {
    result(
        JobState::Failed,
        "",
        format!(
            "{} is not an {family} job kind; this executor cannot run it",
            es_proto::kinds::name(job)
        ),
    )
}
