//! The SSM Run Command transport.
//!
//! 1. Pre-flight: `DescribeInstanceInformation` (paged, 50 ids per filter); a target whose SSM
//!    agent is not `Online` is reported undeliverable with the reason and not sent.
//! 2. `SendCommand` in batches of at most 50 instance ids (AWS-RunShellScript or
//!    AWS-RunPowerShellScript; the script is the `commands` parameter).
//! 3. Polling: one paged `ListCommandInvocations` (with details) per command per round, rounds
//!    spaced by a growing interval (1 s, x1.5, up to 10 s), never one call per instance per
//!    round. As an invocation finishes, its output is fetched once (4 fetches at a time): from S3 when an output
//!    bucket is set (full text, up to the inline cap), else with one `GetCommandInvocation`
//!    (SSM's inline 24,000/8,000 characters); truncation is marked.
//! 4. Cancel: `CancelCommand` for each command still running, then a short wait for SSM to
//!    confirm; whatever is still open is reported cancelled.
//!
//! Throttling and 5xx are retried by the SDK (standard mode, backoff with jitter).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aws_sdk_ssm::types::{CommandInvocationStatus, InstanceInformationStringFilter, PingStatus};
use es_proto::v1::{CommandStatus, InstanceOutput, Job, RunCommand};
use tokio_util::sync::CancellationToken;

mod output;

use output::fetch_output;
#[cfg(test)]
use output::{s3_key, SSM_INLINE_STDOUT};

use super::{
    aws_err, not_run, script, CommandsError, OutputCaps, Reporter, Target,
    DEFAULT_EXECUTION_TIMEOUT_S, DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_ERRORS,
    DEFAULT_SSM_DELIVERY_TIMEOUT_S,
};

/// Most instance ids per SendCommand (and per DescribeInstanceInformation filter).
pub const BATCH: usize = 50;
/// Output fetches (GetCommandInvocation or S3 reads) in flight at once per job.
const OUTPUT_FETCHES: usize = 4;

pub struct SsmClients<'a> {
    pub ssm: &'a aws_sdk_ssm::Client,
    pub s3: Option<&'a aws_sdk_s3::Client>,
}

/// Spacing of the polling rounds.
#[derive(Debug, Clone, Copy)]
pub struct PollPace {
    pub first: Duration,
    pub factor: f64,
    pub max: Duration,
    /// After a cancel: how long to wait for SSM to confirm.
    pub cancel_wait: Duration,
}

impl Default for PollPace {
    fn default() -> PollPace {
        PollPace {
            first: Duration::from_secs(1),
            factor: 1.5,
            max: Duration::from_secs(10),
            cancel_wait: Duration::from_secs(5),
        }
    }
}

impl PollPace {
    fn next(&self, d: Duration) -> Duration {
        d.mul_f64(self.factor).min(self.max)
    }
}

/// Our status for an SSM invocation status (and its details); None while it is still open.
pub fn map_status(status: &str, details: &str) -> Option<CommandStatus> {
    // StatusDetails is the finer of the two (e.g. TimedOut -> DeliveryTimedOut or
    // ExecutionTimedOut).
    let s = match details {
        "Success" => CommandStatus::Success,
        "Failed" => CommandStatus::Failed,
        "Cancelled" => CommandStatus::Cancelled,
        "ExecutionTimedOut" | "CommandTimedOut" => CommandStatus::TimedOut,
        "DeliveryTimedOut" => CommandStatus::DeliveryTimedOut,
        "Undeliverable" | "InvalidPlatform" | "AccessDenied" => CommandStatus::Undeliverable,
        "Terminated" => CommandStatus::Terminated,
        "Pending" | "InProgress" | "Delayed" | "Cancelling" => return None,
        _ => match status {
            "Success" => CommandStatus::Success,
            "Failed" => CommandStatus::Failed,
            "Cancelled" => CommandStatus::Cancelled,
            "TimedOut" => CommandStatus::TimedOut,
            "Pending" | "InProgress" | "Delayed" | "Cancelling" => return None,
            // An unknown word: treat as finished and unsuccessful, keep the word in `detail`.
            _ => CommandStatus::Failed,
        },
    };
    Some(s)
}

fn reason_of(status: CommandStatus, details: &str) -> String {
    match status {
        CommandStatus::Undeliverable if details == "InvalidPlatform" => {
            "the document does not run on this platform (bash vs powershell)".into()
        }
        CommandStatus::Undeliverable if details == "AccessDenied" => {
            "the instance's SSM agent was denied (instance profile permissions)".into()
        }
        CommandStatus::Undeliverable => {
            "SSM could not deliver the command (instance stopped, terminated or unreachable)".into()
        }
        CommandStatus::DeliveryTimedOut => {
            "the instance did not pick the command up within the delivery timeout".into()
        }
        CommandStatus::TimedOut => "the script ran past its execution timeout".into(),
        CommandStatus::Terminated => "the instance was terminated while the script ran".into(),
        CommandStatus::Cancelled => "cancelled".into(),
        _ => String::new(),
    }
}

/// Runs `rc` on `targets` through SSM. Answers the per-instance outputs and the command ids.
#[allow(clippy::too_many_arguments)]
pub async fn run_ssm(
    c: &SsmClients<'_>,
    job: &Job,
    rc: &RunCommand,
    targets: &[Target],
    caps: OutputCaps,
    report: &Reporter<'_>,
    cancel: &CancellationToken,
    pace: PollPace,
) -> Result<(Vec<InstanceOutput>, Vec<String>), CommandsError> {
    let by_id: HashMap<&str, &Target> = targets
        .iter()
        .map(|t| (t.instance_id.as_str(), t))
        .collect();
    let mut outs: Vec<InstanceOutput> = Vec::new();

    // 0. A later attempt (the agent that ran the job was lost) takes over the commands the
    //    earlier attempt sent, found by their comment, instead of running the script twice.
    let comment = format!("es job {}", job.id);
    let mut command_ids: Vec<(String, Vec<&Target>)> = Vec::new();
    if job.attempt > 1 {
        for (cid, ids) in earlier_commands(c.ssm, &comment, job.created_at_us).await? {
            let ts: Vec<&Target> = targets
                .iter()
                .filter(|t| ids.contains(&t.instance_id))
                .collect();
            if !ts.is_empty() {
                log::info!(job_id = job.id.as_str(); "job {}: following SSM command {cid} of an earlier attempt ({} instances)", job.id, ts.len());
                command_ids.push((cid, ts));
            }
        }
    }
    let adopted = |t: &Target| {
        command_ids
            .iter()
            .any(|(_, ts)| ts.iter().any(|x| x.instance_id == t.instance_id))
    };
    let rest: Vec<Target> = targets.iter().filter(|t| !adopted(t)).cloned().collect();

    // 1. Pre-flight.
    let online = preflight(c.ssm, &rest).await?;
    let mut send: Vec<&Target> = Vec::new();
    for t in targets.iter().filter(|t| !adopted(t)) {
        match online.get(t.instance_id.as_str()) {
            Some((PingStatus::Online, _)) => send.push(t),
            Some((ping, last)) => {
                let mut o = not_run(
                    t,
                    CommandStatus::Undeliverable,
                    format!(
                        "SSM agent is {} (last ping {last}); check the instance and its SSM agent",
                        ping.as_str()
                    ),
                );
                report.finished(&mut o);
                outs.push(o);
            }
            None => {
                let mut o = not_run(
                    t,
                    CommandStatus::Undeliverable,
                    "not a managed instance: no SSM agent registered (agent installed and running? instance profile with AmazonSSMManagedInstanceCore?)",
                );
                report.finished(&mut o);
                outs.push(o);
            }
        }
    }
    if send.is_empty() && command_ids.is_empty() {
        return Ok((outs, vec![]));
    }
    if cancel.is_cancelled() && command_ids.is_empty() {
        for t in send {
            let mut o = not_run(t, CommandStatus::Cancelled, "cancelled before it was sent");
            report.finished(&mut o);
            outs.push(o);
        }
        return Ok((outs, vec![]));
    }

    // 2. Send, in batches.
    let (doc, commands) = script::ssm_commands(rc);
    let exec = if rc.execution_timeout_s == 0 {
        DEFAULT_EXECUTION_TIMEOUT_S
    } else {
        rc.execution_timeout_s
    };
    let delivery = if rc.delivery_timeout_s == 0 {
        DEFAULT_SSM_DELIVERY_TIMEOUT_S
    } else {
        rc.delivery_timeout_s
    };
    let max_conc = if rc.max_concurrency.is_empty() {
        DEFAULT_MAX_CONCURRENCY
    } else {
        &rc.max_concurrency
    };
    let max_err = if rc.max_errors.is_empty() {
        DEFAULT_MAX_ERRORS
    } else {
        &rc.max_errors
    };
    for batch in send.chunks(BATCH) {
        let mut req = c
            .ssm
            .send_command()
            .document_name(doc)
            .set_instance_ids(Some(batch.iter().map(|t| t.instance_id.clone()).collect()))
            .parameters("commands", commands.clone())
            .parameters("executionTimeout", vec![exec.to_string()])
            .timeout_seconds(delivery as i32)
            .max_concurrency(max_conc)
            .max_errors(max_err)
            .comment(&comment);
        if !rc.working_directory.is_empty() {
            req = req.parameters("workingDirectory", vec![rc.working_directory.clone()]);
        }
        if !rc.output_s3_bucket.is_empty() {
            req = req.output_s3_bucket_name(&rc.output_s3_bucket);
            if !rc.output_s3_prefix.is_empty() {
                req = req.output_s3_key_prefix(&rc.output_s3_prefix);
            }
        }
        match req.send().await {
            Ok(r) => {
                let id = r
                    .command()
                    .and_then(|c| c.command_id())
                    .unwrap_or_default()
                    .to_owned();
                command_ids.push((id, batch.to_vec()));
            }
            Err(e) => {
                // Batches already sent keep running; the rest are reported with the reason.
                let err = aws_err("SSM SendCommand", e);
                if command_ids.is_empty() {
                    return Err(err);
                }
                for t in batch {
                    let mut o = not_run(t, CommandStatus::Undeliverable, err.to_string());
                    report.finished(&mut o);
                    outs.push(o);
                }
            }
        }
    }

    // 3. Poll until every invocation is final (or cancel).
    let mut open: HashSet<(String, String)> = command_ids
        .iter()
        .flat_map(|(cid, ts)| ts.iter().map(move |t| (cid.clone(), t.instance_id.clone())))
        .collect();
    let mut wait = pace.first;
    let mut cancel_deadline: Option<tokio::time::Instant> = None;
    while !open.is_empty() {
        let sleep = match cancel_deadline {
            Some(_) => pace.first.min(Duration::from_millis(500)),
            None => wait,
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = cancel.cancelled(), if cancel_deadline.is_none() => {
                for (cid, _) in &command_ids {
                    if open.iter().any(|(c, _)| c == cid) {
                        // Best effort: an error here leaves the final poll to say what ran.
                        if let Err(e) = c.ssm.cancel_command().command_id(cid).send().await {
                            log::warn!("CancelCommand {cid}: {}", aws_err("SSM CancelCommand", e));
                        }
                    }
                }
                cancel_deadline = Some(tokio::time::Instant::now() + pace.cancel_wait);
                continue;
            }
        }
        wait = pace.next(wait);
        for (cid, _) in &command_ids {
            if !open.iter().any(|(c, _)| c == cid) {
                continue;
            }
            let finished = poll_command(c.ssm, cid, &open).await?;
            // One output fetch per finished instance, a few at a time.
            use futures::StreamExt;
            let fetched: Vec<InstanceOutput> = futures::stream::iter(finished)
                .map(|f| async {
                    let t = by_id.get(f.instance_id.as_str()).copied();
                    fetch_output(c, rc, cid, f, t, caps).await
                })
                .buffer_unordered(OUTPUT_FETCHES)
                .collect()
                .await;
            for mut o in fetched {
                open.remove(&(cid.clone(), o.instance_id.clone()));
                report.finished(&mut o);
                outs.push(o);
            }
        }
        if cancel_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
    }
    for (_, id) in open {
        if let Some(t) = by_id.get(id.as_str()) {
            let mut o = not_run(
                t,
                CommandStatus::Cancelled,
                "cancel requested; SSM had not confirmed the stop when the job ended",
            );
            report.finished(&mut o);
            outs.push(o);
        }
    }
    Ok((outs, command_ids.into_iter().map(|(c, _)| c).collect()))
}

/// Commands an earlier attempt of the job sent (matched by `comment`, listed since the job was
/// created): their ids and instance ids.
async fn earlier_commands(
    ssm: &aws_sdk_ssm::Client,
    comment: &str,
    created_at_us: i64,
) -> Result<Vec<(String, Vec<String>)>, CommandsError> {
    use aws_sdk_ssm::types::{CommandFilter, CommandFilterKey};
    let since = aws_smithy_types::DateTime::from_secs(created_at_us / 1_000_000 - 60)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .map_err(|e| CommandsError::Other(e.to_string()))?;
    let filter = CommandFilter::builder()
        .key(CommandFilterKey::InvokedAfter)
        .value(since)
        .build()
        .map_err(|e| CommandsError::Other(e.to_string()))?;
    let mut out = Vec::new();
    let mut pages = ssm
        .list_commands()
        .filters(filter)
        .max_results(50)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| aws_err("SSM ListCommands", e))?;
        for cmd in page.commands() {
            if cmd.comment() == Some(comment) {
                out.push((
                    cmd.command_id().unwrap_or_default().to_owned(),
                    cmd.instance_ids().to_vec(),
                ));
            }
        }
    }
    Ok(out)
}

/// Ping status (and last ping time) of each target registered with SSM.
async fn preflight(
    ssm: &aws_sdk_ssm::Client,
    targets: &[Target],
) -> Result<HashMap<String, (PingStatus, String)>, CommandsError> {
    let mut out = HashMap::new();
    for batch in targets.chunks(BATCH) {
        let filter = InstanceInformationStringFilter::builder()
            .key("InstanceIds")
            .set_values(Some(batch.iter().map(|t| t.instance_id.clone()).collect()))
            .build()
            .map_err(|e| CommandsError::Other(e.to_string()))?;
        let mut pages = ssm
            .describe_instance_information()
            .filters(filter)
            .max_results(50)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| aws_err("SSM DescribeInstanceInformation", e))?;
            for i in page.instance_information_list() {
                let last = i
                    .last_ping_date_time()
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "never".into());
                out.insert(
                    i.instance_id().unwrap_or_default().to_owned(),
                    (
                        i.ping_status().cloned().unwrap_or(PingStatus::Inactive),
                        last,
                    ),
                );
            }
        }
    }
    Ok(out)
}

/// An invocation that finished, as seen in ListCommandInvocations.
struct Finished {
    instance_id: String,
    status: CommandStatus,
    detail: String,
    exit_code: i32,
    stdout_url: String,
    stderr_url: String,
}

/// One paged ListCommandInvocations (with details) of `cid`: the invocations that are final
/// now and still `open` here.
async fn poll_command(
    ssm: &aws_sdk_ssm::Client,
    cid: &str,
    open: &HashSet<(String, String)>,
) -> Result<Vec<Finished>, CommandsError> {
    let mut out = Vec::new();
    let mut pages = ssm
        .list_command_invocations()
        .command_id(cid)
        .details(true)
        .max_results(50)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| aws_err("SSM ListCommandInvocations", e))?;
        for inv in page.command_invocations() {
            let id = inv.instance_id().unwrap_or_default().to_owned();
            if !open.contains(&(cid.to_owned(), id.clone())) {
                continue;
            }
            let status = inv
                .status()
                .map(CommandInvocationStatus::as_str)
                .unwrap_or("");
            let details = inv.status_details().unwrap_or("");
            let Some(st) = map_status(status, details) else {
                continue;
            };
            let plugin = inv.command_plugins().first();
            out.push(Finished {
                instance_id: id,
                status: st,
                detail: if details.is_empty() { status } else { details }.to_owned(),
                exit_code: plugin.map(|p| p.response_code()).unwrap_or(-1),
                stdout_url: plugin
                    .and_then(|p| p.standard_output_url())
                    .unwrap_or("")
                    .to_owned(),
                stderr_url: plugin
                    .and_then(|p| p.standard_error_url())
                    .unwrap_or("")
                    .to_owned(),
            });
        }
    }
    Ok(out)
}

/// The SSM adapter against the SDK's own test utilities (`aws-smithy-mocks`): the moto server
/// answers HTTP 500 to DescribeInstanceInformation, ListCommandInvocations and CancelCommand,
/// and its SendCommand executes nothing, so these tests feed the real SDK client realistic
/// responses instead (shapes as documented in the SSM API reference).
#[cfg(test)]
mod tests;
