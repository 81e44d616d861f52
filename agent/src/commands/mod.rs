//! es-commands: runs one script on sandbox instances and brings back, per instance, status, exit
//! code, stdout and stderr, as they finish.
//!
//! - Targets are instance ids, or the running apps of the job's sandbox found by the
//!   `ReservationId` (and `AppName`) tags.
//! - Transports: SSM Run Command (`ssm.rs`, the default) and SSH with a fresh key per job pushed by
//!   EC2 Instance Connect (`ssh.rs`). Both give the same result shape and honour the same
//!   timeouts and cancel.
//! - Scripts travel as data (the document's `commands` parameter, or the remote shell's standard
//!   input); nothing is ever run through a shell on the agent.
//! - Secret variables are masked (`***`) in everything the job reports: outputs, reasons, errors,
//!   progress. Inline output is capped (see [`OutputCaps`]) and truncation is marked.

mod output;
mod script;
mod ssh;
mod ssm;

use std::sync::Arc;

use aws_sdk_ec2::types::Filter;
use es_proto::v1::{
    CommandStatus, CommandTransport, InstanceOutput, Job, JobResult, JobState, RunCommand,
};

use crate::aws::{Aws, Count};
use crate::aws::{AwsSettings, CallCounter};
use crate::job::JobCtx;
use crate::shells::{TAG_APP, TAG_SANDBOX};

use output::display_target;
pub use output::{cap_text, status_word, summarize, OutputCaps, Reporter, Scrubber, MASK};
pub use script::{render_ssh, shell_quote, ssm_commands};
pub use ssh::SshSettings;
pub use ssm::{run_ssm, PollPace, SsmClients, BATCH as SSM_BATCH};

/// Defaults of a RunCommand when the submitter gives none.
pub const DEFAULT_EXECUTION_TIMEOUT_S: u32 = 3600;
pub const DEFAULT_SSM_DELIVERY_TIMEOUT_S: u32 = 600;
pub const DEFAULT_SSH_CONNECT_TIMEOUT_S: u32 = 30;
pub const DEFAULT_MAX_CONCURRENCY: &str = "50";
pub const DEFAULT_MAX_ERRORS: &str = "100%";

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A resolved target.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    pub instance_id: String,
    pub app: String,
    pub private_ip: String,
}

/// An instance that was not run, with the reason.
pub fn not_run(t: &Target, status: CommandStatus, reason: impl Into<String>) -> InstanceOutput {
    InstanceOutput {
        instance_id: t.instance_id.clone(),
        app: t.app.clone(),
        status: status as i32,
        exit_code: -1,
        reason: reason.into(),
        ..Default::default()
    }
}

/// `"50"` or `"10%"` of `n` targets, at least 1.
pub fn resolve_count(spec: &str, n: usize, default: &str) -> usize {
    let spec = if spec.is_empty() { default } else { spec };
    match spec.strip_suffix('%') {
        Some(p) => {
            let p: usize = p.parse().unwrap_or(100);
            (n * p).div_ceil(100)
        }
        None => spec.parse().unwrap_or(n),
    }
}

/// Why a RunCommand job could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum CommandsError {
    #[error("{op} failed: {code}: {message}{hint}")]
    Aws {
        op: &'static str,
        code: String,
        message: String,
        hint: String,
    },
    #[error("no targets: {0}")]
    NoTargets(String),
    #[error("{0}")]
    Other(String),
}

pub fn aws_err<E, R>(op: &'static str, e: aws_sdk_ec2::error::SdkError<E, R>) -> CommandsError
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = crate::aws::error_code(&e);
    let message = crate::aws::one_line(&e);
    let hint = match code.as_str() {
        "AccessDeniedException" | "AccessDenied" | "UnauthorizedOperation" => {
            " (the agent's IAM role lacks this permission)"
        }
        "InvalidDocument" => " (the SSM document is not available in this region)",
        "NoSuchBucket" => " (the output bucket does not exist)",
        _ => "",
    };
    CommandsError::Aws {
        op,
        code,
        message,
        hint: hint.into(),
    }
}

/// The es-commands executor: AWS configuration shared by its jobs.
pub struct Commands {
    aws: Aws,
    ssh: SshSettings,
}

impl crate::job::JobFamily for Commands {
    async fn execute(&self, job: &Job, ctx: &JobCtx) -> JobResult {
        match job.spec.as_ref().and_then(|s| s.kind.as_ref()) {
            Some(es_proto::v1::job_spec::Kind::RunCommand(rc)) => self.run(job, rc, ctx).await,
            _ => crate::job::wrong_family(job, "es-commands"),
        }
    }
}

impl Commands {
    pub async fn new(settings: AwsSettings, ssh: SshSettings) -> Commands {
        Commands {
            aws: Aws::new(settings).await,
            ssh,
        }
    }

    /// Runs one RunCommand job (`rc` is the job's own).
    pub async fn run(&self, job: &Job, rc: &RunCommand, ctx: &JobCtx) -> JobResult {
        let calls = CallCounter::for_job(ctx);
        let scrub = Scrubber::new(rc);
        let sdk = match self.aws.sdk_config(job) {
            Ok(s) => s,
            Err(e) => {
                return JobResult {
                    state: JobState::Failed as i32,
                    error: e.to_string(),
                    ..Default::default()
                }
            }
        };
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(&sdk)
                .interceptor(Count(calls.clone()))
                .build(),
        );
        // The transports watch the cancel token themselves and finish their own cancel
        // (CancelCommand, closing SSH channels), so the outcome is awaited, not raced.
        let outcome = self
            .run_inner(job, rc, ctx, &sdk, &ec2, &calls, &scrub)
            .await;
        let mut res = match outcome {
            Ok((instances, command_ids)) => summarize(instances, command_ids, ctx),
            Err(e) => JobResult {
                state: if ctx.cancel.is_cancelled() {
                    JobState::Cancelled as i32
                } else {
                    JobState::Failed as i32
                },
                error: scrub.text(&e.to_string()),
                ..Default::default()
            },
        };
        res.commands.get_or_insert_with(Default::default).api_calls = calls.snapshot();
        res
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_inner(
        &self,
        job: &Job,
        rc: &RunCommand,
        ctx: &JobCtx,
        sdk: &aws_config::SdkConfig,
        ec2: &aws_sdk_ec2::Client,
        calls: &Arc<CallCounter>,
        scrub: &Scrubber,
    ) -> Result<(Vec<InstanceOutput>, Vec<String>), CommandsError> {
        let (targets, mut missing) = tokio::select! {
            r = resolve_targets(ec2, &job.sandbox_id, rc) => r?,
            _ = ctx.cancel.cancelled() => return Err(CommandsError::Other("cancelled before any target was reached".into())),
        };
        if targets.is_empty() {
            let why = missing
                .iter()
                .map(|m| format!("{}: {}", display_target(m), m.reason))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(CommandsError::NoTargets(if why.is_empty() {
                format!("no running instance in sandbox {:?}", job.sandbox_id)
            } else {
                why
            }));
        }
        let n = targets.len() + missing.len();
        let reporter = Reporter::new(ctx, scrub, n);
        for m in &mut missing {
            reporter.finished(m);
        }
        let full = !rc.output_s3_bucket.is_empty();
        let caps = OutputCaps::new(n, full);
        let s3 = full.then(|| {
            aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(sdk)
                    .interceptor(Count(calls.clone()))
                    .force_path_style(true)
                    .build(),
            )
        });
        let transport = CommandTransport::try_from(rc.transport).unwrap_or_default();
        let (mut outs, ids) = if transport == CommandTransport::Ssh {
            let eic = aws_sdk_ec2instanceconnect::Client::from_conf(
                aws_sdk_ec2instanceconnect::config::Builder::from(sdk)
                    .interceptor(Count(calls.clone()))
                    .build(),
            );
            let outs = ssh::run_ssh(
                &eic,
                s3.as_ref(),
                &self.ssh,
                job,
                rc,
                &targets,
                caps,
                &reporter,
                &ctx.cancel,
            )
            .await;
            (outs, vec![])
        } else {
            let ssm = aws_sdk_ssm::Client::from_conf(
                aws_sdk_ssm::config::Builder::from(sdk)
                    .interceptor(Count(calls.clone()))
                    .build(),
            );
            run_ssm(
                &SsmClients {
                    ssm: &ssm,
                    s3: s3.as_ref(),
                },
                job,
                rc,
                &targets,
                caps,
                &reporter,
                &ctx.cancel,
                ssm::PollPace::default(),
            )
            .await?
        };
        outs.extend(missing);
        Ok((outs, ids))
    }
}

/// Finds the targets: the given instance ids, or the running apps of the sandbox. Answers the
/// running targets, and the ones that cannot be run (not found, not running) with the reason.
async fn resolve_targets(
    ec2: &aws_sdk_ec2::Client,
    sandbox: &str,
    rc: &RunCommand,
) -> Result<(Vec<Target>, Vec<InstanceOutput>), CommandsError> {
    let mut req = ec2.describe_instances();
    if rc.instance_ids.is_empty() {
        req = req.filters(
            Filter::builder()
                .name(format!("tag:{TAG_SANDBOX}"))
                .values(sandbox)
                .build(),
        );
        if !rc.apps.is_empty() {
            req = req.filters(
                Filter::builder()
                    .name(format!("tag:{TAG_APP}"))
                    .set_values(Some(rc.apps.clone()))
                    .build(),
            );
        }
    } else {
        // A filter, not InstanceIds: an unknown id is reported per instance, not a failed call.
        req = req.filters(
            Filter::builder()
                .name("instance-id")
                .set_values(Some(rc.instance_ids.clone()))
                .build(),
        );
    }
    let mut found: Vec<(Target, String)> = Vec::new();
    let mut pages = req.into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| aws_err("EC2 DescribeInstances", e))?;
        for i in page.reservations().iter().flat_map(|r| r.instances()) {
            let state = i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned())
                .unwrap_or_default();
            let app = i
                .tags()
                .iter()
                .find(|t| t.key() == Some(TAG_APP))
                .and_then(|t| t.value())
                .unwrap_or("")
                .to_owned();
            found.push((
                Target {
                    instance_id: i.instance_id().unwrap_or_default().to_owned(),
                    app,
                    private_ip: i.private_ip_address().unwrap_or_default().to_owned(),
                },
                state,
            ));
        }
    }
    let mut targets = Vec::new();
    let mut missing = Vec::new();
    for (t, state) in &found {
        if state == "running" {
            targets.push(t.clone());
        } else if state != "terminated" || !rc.instance_ids.is_empty() {
            missing.push(not_run(
                t,
                CommandStatus::Undeliverable,
                format!("instance is {state}, not running"),
            ));
        }
    }
    for id in &rc.instance_ids {
        if !found.iter().any(|(t, _)| &t.instance_id == id) {
            missing.push(not_run(
                &Target {
                    instance_id: id.clone(),
                    ..Default::default()
                },
                CommandStatus::Undeliverable,
                "instance not found in this account and region",
            ));
        }
    }
    for app in &rc.apps {
        if !found.iter().any(|(t, _)| &t.app == app) {
            missing.push(not_run(
                &Target {
                    app: app.clone(),
                    ..Default::default()
                },
                CommandStatus::Undeliverable,
                format!("no instance of app {app} in sandbox {sandbox}"),
            ));
        }
    }
    Ok((targets, missing))
}

#[cfg(test)]
mod tests {
    use super::output::RESULT_BUDGET;
    use super::*;
    use es_proto::v1::CommandVariable;

    #[test]
    fn caps_keep_a_job_result_within_its_budget() {
        assert_eq!(
            OutputCaps::new(10, false),
            OutputCaps {
                stdout: 24_000,
                stderr: 8_000
            }
        );
        let c = OutputCaps::new(255, false);
        assert!(255 * (c.stdout + c.stderr) <= RESULT_BUDGET, "{c:?}");
        assert!(c.stdout > c.stderr);
        assert_eq!(OutputCaps::new(1, true).stdout, 256 * 1024);
    }

    #[test]
    fn cap_text_cuts_on_a_char_boundary() {
        let mut s = "héllo".to_string();
        assert!(cap_text(&mut s, 2));
        assert_eq!(s, "h");
        let mut s = "ok".to_string();
        assert!(!cap_text(&mut s, 2));
    }

    #[test]
    fn secrets_are_masked_longest_first() {
        let rc = RunCommand {
            env: vec![
                CommandVariable {
                    name: "A".into(),
                    value: "pass".into(),
                    secret: true,
                },
                CommandVariable {
                    name: "B".into(),
                    value: "password123".into(),
                    secret: true,
                },
                CommandVariable {
                    name: "C".into(),
                    value: "public".into(),
                    secret: false,
                },
            ],
            ..Default::default()
        };
        let s = Scrubber::new(&rc);
        assert_eq!(
            s.text("password123 pass public"),
            "*** *** public".to_string()
        );
        assert_eq!(s.bytes(b"x\xffpassword123\xfe"), b"x\xff***\xfe".to_vec());
    }

    #[test]
    fn a_secret_cut_at_the_output_limit_leaves_nothing_of_itself() {
        let rc = RunCommand {
            env: vec![CommandVariable {
                name: "TOKEN".into(),
                value: "hunter2secret".into(),
                secret: true,
            }],
            ..Default::default()
        };
        let s = Scrubber::new(&rc);
        // The output as SSM cut it inline: the secret's first 6 characters at the very end.
        let mut o = InstanceOutput {
            stdout: "token is hunter2secret, again: hunter".into(),
            stdout_truncated: true,
            stderr: "ends in h but is whole".into(),
            ..Default::default()
        };
        s.output(&mut o);
        assert_eq!(o.stdout, "token is ***, again: ***");
        assert!(!o.stdout.contains("hunter"));
        // Not cut: an ordinary last letter stays.
        assert_eq!(o.stderr, "ends in h but is whole");
    }

    #[test]
    fn counts_and_percentages() {
        assert_eq!(resolve_count("", 255, "50"), 50);
        assert_eq!(resolve_count("10%", 255, "50"), 26);
        assert_eq!(resolve_count("100%", 7, "50"), 7);
        assert_eq!(resolve_count("0", 7, "50"), 0);
    }
}
