//! Job execution: turns a job spec into a result. Each job kind has its own function; the
//! diagnostic kinds (Sleep, Echo) live here. Executors stop cooperatively when `cancel` fires;
//! the runtime forces them (aborts the task) after the cancel grace.

use std::time::Duration;

use es_proto::v1::{job_spec, Job, JobResult, JobState, SleepJob};

use crate::job::JobFamily;
pub use crate::job::{result, JobCtx, JobEventOut};

/// Runs jobs of every kind this agent knows. The AWS clients of es-shells and es-commands are
/// built on their first job, so an agent starts (and serves diagnostic jobs) without AWS
/// settings.
pub struct Executor {
    aws: crate::aws::AwsSettings,
    ssh: crate::commands::SshSettings,
    shells: tokio::sync::OnceCell<crate::shells::Shells>,
    commands: tokio::sync::OnceCell<crate::commands::Commands>,
}

impl Executor {
    pub fn new(aws: crate::aws::AwsSettings) -> Executor {
        Executor::with_ssh(aws, Default::default())
    }

    pub fn with_ssh(aws: crate::aws::AwsSettings, ssh: crate::commands::SshSettings) -> Executor {
        Executor {
            aws,
            ssh,
            shells: tokio::sync::OnceCell::new(),
            commands: tokio::sync::OnceCell::new(),
        }
    }

    /// Runs `job` to its result.
    pub async fn execute(&self, job: &Job, ctx: JobCtx) -> JobResult {
        use es_proto::kinds::Family;
        let Some(kind) = job.spec.as_ref().and_then(|s| s.kind.as_ref()) else {
            return result(
                JobState::Failed,
                "",
                "job has no kind (spec.kind missing); this agent cannot run it",
            );
        };
        // By family (es_proto::kinds holds which kind belongs to which).
        match es_proto::kinds::info(kind).family {
            Family::Diagnostic => Diagnostic.execute(job, &ctx).await,
            Family::Commands => {
                let commands = self
                    .commands
                    .get_or_init(|| {
                        crate::commands::Commands::new(self.aws.clone(), self.ssh.clone())
                    })
                    .await;
                commands.execute(job, &ctx).await
            }
            Family::Shells => {
                let shells = self
                    .shells
                    .get_or_init(|| crate::shells::Shells::new(self.aws.clone()))
                    .await;
                shells.execute(job, &ctx).await
            }
        }
    }
}

/// Runs a diagnostic job (tests and tools that need no AWS).
pub async fn execute(job: &Job, ctx: JobCtx) -> JobResult {
    Executor::new(Default::default()).execute(job, ctx).await
}

/// Sleep and Echo: the kinds every agent runs, with no cloud.
struct Diagnostic;

impl JobFamily for Diagnostic {
    async fn execute(&self, job: &Job, ctx: &JobCtx) -> JobResult {
        match job.spec.as_ref().and_then(|s| s.kind.as_ref()) {
            Some(job_spec::Kind::Echo(e)) => result(JobState::Succeeded, e.message.clone(), ""),
            Some(job_spec::Kind::Sleep(s)) => sleep(s, ctx.clone()).await,
            _ => crate::job::wrong_family(job, "diagnostic"),
        }
    }
}

async fn sleep(s: &SleepJob, ctx: JobCtx) -> JobResult {
    let total = Duration::from_millis(s.duration_ms);
    let steps = s.steps.max(1);
    let step = total / steps;
    for i in 1..=steps {
        if s.ignore_cancel {
            tokio::time::sleep(step).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(step) => {}
                _ = ctx.cancel.cancelled() => {
                    return result(JobState::Cancelled, "", format!("cancelled after step {} of {steps}", i - 1));
                }
            }
        }
        if s.steps > 0 {
            ctx.progress(i, steps, format!("slept {} ms", (step * i).as_millis()));
        }
    }
    if s.fail_message.is_empty() {
        result(
            JobState::Succeeded,
            format!("slept {} ms", total.as_millis()),
            "",
        )
    } else {
        result(JobState::Failed, "", s.fail_message.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::v1::{EchoJob, JobSpec};
    use tokio::sync::mpsc;

    fn job(kind: job_spec::Kind) -> Job {
        Job {
            spec: Some(JobSpec {
                kind: Some(kind),
                target: None,
            }),
            ..Default::default()
        }
    }

    fn ctx() -> (JobCtx, mpsc::UnboundedReceiver<JobEventOut>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (JobCtx::new(tx), rx)
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_reports_progress_and_honours_cancel() {
        let (c, mut rx) = ctx();
        let j = job(job_spec::Kind::Sleep(SleepJob {
            duration_ms: 1000,
            steps: 4,
            ..Default::default()
        }));
        let r = execute(&j, c).await;
        assert_eq!(r.state, JobState::Succeeded as i32);
        let mut n = 0;
        while let Ok(JobEventOut::Progress(p)) = rx.try_recv() {
            n += 1;
            assert_eq!(p.done, n);
            assert_eq!(p.total, 4);
        }
        assert_eq!(n, 4);

        let (c, _rx) = ctx();
        let cancel = c.cancel.clone();
        let j = job(job_spec::Kind::Sleep(SleepJob {
            duration_ms: 10_000,
            steps: 10,
            ..Default::default()
        }));
        let h = tokio::spawn(async move { execute(&j, c).await });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        cancel.cancel();
        let r = h.await.unwrap();
        assert_eq!(r.state, JobState::Cancelled as i32);
        assert!(r.error.contains("after step 2 of 10"), "{}", r.error);
    }

    #[tokio::test]
    async fn echo_and_failure() {
        let (c, _rx) = ctx();
        let r = execute(
            &job(job_spec::Kind::Echo(EchoJob {
                message: "hello".into(),
            })),
            c.clone(),
        )
        .await;
        assert_eq!(
            (r.state, r.output.as_str()),
            (JobState::Succeeded as i32, "hello")
        );
        let j = job(job_spec::Kind::Sleep(SleepJob {
            fail_message: "boom".into(),
            ..Default::default()
        }));
        let r = execute(&j, c.clone()).await;
        assert_eq!(
            (r.state, r.error.as_str()),
            (JobState::Failed as i32, "boom")
        );
        let r = execute(&Job::default(), c).await;
        assert_eq!(r.state, JobState::Failed as i32);
    }
}
