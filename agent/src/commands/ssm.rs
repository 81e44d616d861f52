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
use es_proto::v1::{CommandStatus, InstanceOutput, Job, RunCommand, Shell};
use tokio_util::sync::CancellationToken;

use super::{
    aws_err, cap_text, not_run, script, CommandsError, OutputCaps, Reporter, Target,
    DEFAULT_EXECUTION_TIMEOUT_S, DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_ERRORS,
    DEFAULT_SSM_DELIVERY_TIMEOUT_S,
};

/// Most instance ids per SendCommand (and per DescribeInstanceInformation filter).
pub const BATCH: usize = 50;
/// Output fetches (GetCommandInvocation or S3 reads) in flight at once per job.
const OUTPUT_FETCHES: usize = 4;
/// SSM's inline output limits in GetCommandInvocation.
const SSM_INLINE_STDOUT: usize = 24_000;
const SSM_INLINE_STDERR: usize = 8_000;

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

/// The S3 key SSM writes a stream to: `<prefix>/<command>/<instance>/<plugin>/0.<plugin>/<stream>`.
pub fn s3_key(rc: &RunCommand, cid: &str, instance: &str, stream: &str) -> String {
    let plugin = if rc.shell == Shell::Powershell as i32 {
        "awsrunPowerShellScript"
    } else {
        "awsrunShellScript"
    };
    let prefix = rc.output_s3_prefix.trim_end_matches('/');
    let key = format!("{cid}/{instance}/{plugin}/0.{plugin}/{stream}");
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}/{key}")
    }
}

/// Reads at most `cap` bytes of an S3 object; answers the text and whether it was cut. A
/// missing object (SSM writes nothing for an empty stream) is empty text.
async fn s3_text(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    cap: usize,
) -> Result<(String, bool), String> {
    let r = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .range(format!("bytes=0-{}", cap))
        .send()
        .await;
    match r {
        Ok(o) => {
            let total = o
                .content_range()
                .and_then(|r| r.rsplit('/').next())
                .and_then(|n| n.parse::<usize>().ok());
            let body = o
                .body
                .collect()
                .await
                .map_err(|e| format!("reading s3://{bucket}/{key}: {e}"))?
                .into_bytes();
            let mut text = String::from_utf8_lossy(&body).into_owned();
            let cut = cap_text(&mut text, cap) || total.is_some_and(|t| t > cap);
            Ok((text, cut))
        }
        Err(e) => {
            use aws_sdk_s3::error::ProvideErrorMetadata;
            if matches!(e.code(), Some("NoSuchKey") | Some("InvalidRange")) {
                Ok((String::new(), false))
            } else {
                Err(format!(
                    "reading s3://{bucket}/{key}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                ))
            }
        }
    }
}

async fn fetch_output(
    c: &SsmClients<'_>,
    rc: &RunCommand,
    cid: &str,
    f: Finished,
    t: Option<&Target>,
    caps: OutputCaps,
) -> InstanceOutput {
    let mut o = InstanceOutput {
        instance_id: f.instance_id.clone(),
        app: t.map(|t| t.app.clone()).unwrap_or_default(),
        status: f.status as i32,
        detail: f.detail.clone(),
        exit_code: f.exit_code,
        reason: reason_of(f.status, &f.detail),
        finished_at_us: super::now_us(),
        ..Default::default()
    };
    // Output exists only where the script ran.
    if !matches!(
        f.status,
        CommandStatus::Success
            | CommandStatus::Failed
            | CommandStatus::TimedOut
            | CommandStatus::Cancelled
    ) {
        o.exit_code = -1;
        return o;
    }
    if let (Some(s3), false) = (c.s3, rc.output_s3_bucket.is_empty()) {
        let bucket = &rc.output_s3_bucket;
        for (stream, url, cap) in [
            ("stdout", &f.stdout_url, caps.stdout),
            ("stderr", &f.stderr_url, caps.stderr),
        ] {
            let key = s3_key(rc, cid, &f.instance_id, stream);
            let shown = if url.is_empty() {
                format!("s3://{bucket}/{key}")
            } else {
                url.clone()
            };
            match s3_text(s3, bucket, &key, cap).await {
                Ok((text, cut)) => {
                    if stream == "stdout" {
                        (o.stdout, o.stdout_truncated, o.stdout_url) = (text, cut, shown);
                    } else {
                        (o.stderr, o.stderr_truncated, o.stderr_url) = (text, cut, shown);
                    }
                }
                Err(e) => {
                    o.reason = format!("output not fetched: {e}");
                }
            }
        }
        return o;
    }
    match c
        .ssm
        .get_command_invocation()
        .command_id(cid)
        .instance_id(&f.instance_id)
        .send()
        .await
    {
        Ok(g) => {
            o.stdout = g.standard_output_content().unwrap_or("").to_owned();
            o.stderr = g.standard_error_content().unwrap_or("").to_owned();
            // At SSM's limit the text was cut by SSM: set an output bucket for the full text.
            o.stdout_truncated = o.stdout.chars().count() >= SSM_INLINE_STDOUT;
            o.stderr_truncated = o.stderr.chars().count() >= SSM_INLINE_STDERR;
            o.stdout_truncated |= cap_text(&mut o.stdout, caps.stdout);
            o.stderr_truncated |= cap_text(&mut o.stderr, caps.stderr);
        }
        Err(e) => {
            o.reason = format!(
                "output not fetched: {}",
                aws_err("SSM GetCommandInvocation", e)
            );
        }
    }
    o
}

/// The SSM adapter against the SDK's own test utilities (`aws-smithy-mocks`): the moto server
/// answers HTTP 500 to DescribeInstanceInformation, ListCommandInvocations and CancelCommand,
/// and its SendCommand executes nothing, so these tests feed the real SDK client realistic
/// responses instead (shapes as documented in the SSM API reference).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Scrubber;
    use crate::executor::{JobCtx, JobEventOut};
    use aws_sdk_ssm::operation::cancel_command::CancelCommandOutput;
    use aws_sdk_ssm::operation::describe_instance_information::DescribeInstanceInformationOutput;
    use aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput;
    use aws_sdk_ssm::operation::list_command_invocations::ListCommandInvocationsOutput;
    use aws_sdk_ssm::operation::send_command::SendCommandOutput;
    use aws_sdk_ssm::types::{Command, CommandInvocation, CommandPlugin, InstanceInformation};
    use aws_sdk_ssm::Client;
    use aws_smithy_mocks::{mock, mock_client, Rule, RuleMode};
    use tokio::sync::mpsc;

    const FAST: PollPace = PollPace {
        first: Duration::from_millis(1),
        factor: 1.0,
        max: Duration::from_millis(1),
        cancel_wait: Duration::from_millis(200),
    };

    fn job(id: &str, attempt: u32) -> Job {
        Job {
            id: id.into(),
            attempt,
            created_at_us: 1_700_000_000_000_000,
            ..Default::default()
        }
    }

    fn targets(ids: &[&str]) -> Vec<Target> {
        ids.iter()
            .map(|id| Target {
                instance_id: id.to_string(),
                app: format!("app-{id}"),
                private_ip: "10.0.0.1".into(),
            })
            .collect()
    }

    fn info(id: &str, ping: PingStatus) -> InstanceInformation {
        InstanceInformation::builder()
            .instance_id(id)
            .ping_status(ping)
            .build()
    }

    fn inv(
        id: &str,
        status: CommandInvocationStatus,
        details: &str,
        code: i32,
    ) -> CommandInvocation {
        CommandInvocation::builder()
            .instance_id(id)
            .status(status)
            .status_details(details)
            .command_plugins(CommandPlugin::builder().response_code(code).build())
            .build()
    }

    fn ssm(rules: &[&Rule]) -> Client {
        mock_client!(aws_sdk_ssm, RuleMode::MatchAny, rules, |c| c.retry_config(
            aws_sdk_ssm::config::retry::RetryConfig::standard()
                .with_max_attempts(4)
                .with_initial_backoff(Duration::from_millis(1))
        ))
    }

    fn ctx() -> (JobCtx, mpsc::UnboundedReceiver<JobEventOut>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (JobCtx::new(tx), rx)
    }

    fn describe_all_online() -> Rule {
        mock!(Client::describe_instance_information).then_compute_output(|req| {
            let ids = req
                .filters()
                .first()
                .map(|f| f.values().to_vec())
                .unwrap_or_default();
            DescribeInstanceInformationOutput::builder()
                .set_instance_information_list(Some(
                    ids.iter().map(|id| info(id, PingStatus::Online)).collect(),
                ))
                .build()
        })
    }

    #[tokio::test]
    async fn statuses_outputs_and_undeliverable_targets() {
        let rc = RunCommand {
            script: "echo hello".into(),
            ..Default::default()
        };
        let describe = mock!(Client::describe_instance_information).then_output(|| {
            DescribeInstanceInformationOutput::builder()
                .instance_information_list(info("i-1", PingStatus::Online))
                .instance_information_list(info("i-2", PingStatus::ConnectionLost))
                .instance_information_list(info("i-4", PingStatus::Online))
                .instance_information_list(info("i-5", PingStatus::Online))
                .instance_information_list(info("i-6", PingStatus::Online))
                .instance_information_list(info("i-7", PingStatus::Online))
                .build()
        });
        let send = mock!(Client::send_command)
            .match_requests(|r| {
                r.document_name() == Some("AWS-RunShellScript")
                    && r.instance_ids() == ["i-1", "i-4", "i-5", "i-6", "i-7"]
                    && r.parameters().unwrap()["commands"] == ["echo hello"]
                    && r.timeout_seconds() == Some(600)
                    && r.max_errors() == Some("100%")
            })
            .then_output(|| {
                SendCommandOutput::builder()
                    .command(Command::builder().command_id("cmd-1").build())
                    .build()
            });
        use CommandInvocationStatus as S;
        let list = mock!(Client::list_command_invocations)
            .match_requests(|r| r.command_id() == Some("cmd-1") && r.details() == Some(true))
            .sequence()
            .output(|| {
                ListCommandInvocationsOutput::builder()
                    .command_invocations(inv("i-1", S::InProgress, "InProgress", -1))
                    .command_invocations(inv("i-4", S::Pending, "Pending", -1))
                    .command_invocations(inv("i-5", S::Delayed, "Delayed", -1))
                    .build()
            })
            .output(|| {
                ListCommandInvocationsOutput::builder()
                    .command_invocations(inv("i-1", S::Success, "Success", 0))
                    .command_invocations(inv("i-4", S::Failed, "Failed", 2))
                    .command_invocations(inv("i-5", S::TimedOut, "ExecutionTimedOut", -1))
                    .command_invocations(inv("i-6", S::TimedOut, "DeliveryTimedOut", -1))
                    .command_invocations(inv("i-7", S::Failed, "Undeliverable", -1))
                    .build()
            })
            .build();
        let get = mock!(Client::get_command_invocation).then_compute_output(|r| {
            let b = GetCommandInvocationOutput::builder();
            match r.instance_id().unwrap() {
                "i-1" => b.standard_output_content("hello\n"),
                "i-4" => b
                    .standard_output_content("x".repeat(SSM_INLINE_STDOUT))
                    .standard_error_content("boom\n"),
                _ => b,
            }
            .build()
        });
        let client = ssm(&[&describe, &send, &list, &get]);
        let (c, mut events) = ctx();
        let scrub = Scrubber::new(&rc);
        let t = targets(&["i-1", "i-2", "i-3", "i-4", "i-5", "i-6", "i-7"]);
        let rep = Reporter::new(&c, &scrub, t.len());
        let (outs, ids) = run_ssm(
            &SsmClients {
                ssm: &client,
                s3: None,
            },
            &job("job-1", 1),
            &rc,
            &t,
            OutputCaps::new(7, false),
            &rep,
            &c.cancel,
            FAST,
        )
        .await
        .unwrap();
        assert_eq!(ids, ["cmd-1"]);
        let by: HashMap<&str, &InstanceOutput> =
            outs.iter().map(|o| (o.instance_id.as_str(), o)).collect();
        let st = |id: &str| CommandStatus::try_from(by[id].status).unwrap();
        assert_eq!(st("i-1"), CommandStatus::Success);
        assert_eq!(
            (by["i-1"].exit_code, by["i-1"].stdout.as_str()),
            (0, "hello\n")
        );
        assert_eq!(st("i-2"), CommandStatus::Undeliverable);
        assert!(
            by["i-2"].reason.contains("ConnectionLost"),
            "{}",
            by["i-2"].reason
        );
        assert_eq!(st("i-3"), CommandStatus::Undeliverable);
        assert!(by["i-3"].reason.contains("not a managed instance"));
        assert_eq!((st("i-4"), by["i-4"].exit_code), (CommandStatus::Failed, 2));
        assert!(by["i-4"].stdout_truncated && !by["i-4"].stderr_truncated);
        assert_eq!(by["i-4"].stderr, "boom\n");
        assert_eq!(st("i-5"), CommandStatus::TimedOut);
        assert_eq!(st("i-6"), CommandStatus::DeliveryTimedOut);
        assert_eq!(st("i-7"), CommandStatus::Undeliverable);
        // One send, two polling rounds, one output fetch per instance that ran.
        assert_eq!(
            (send.num_calls(), list.num_calls(), get.num_calls()),
            (1, 2, 3)
        );
        let mut progress = 0;
        while let Ok(JobEventOut::Progress(p)) = events.try_recv() {
            progress += 1;
            assert_eq!(p.total, 7);
        }
        assert_eq!(progress, 7, "each instance reported as it finished");
    }

    #[tokio::test]
    async fn batches_of_fifty_paged_polling_and_throttling_retried() {
        let ids: Vec<String> = (0..120).map(|i| format!("i-{i:03}")).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let t = targets(&id_refs);
        // A pre-flight call throttled once: the SDK retries it (a rule's sequence serves the
        // attempts of one call).
        let throttled = mock!(Client::describe_instance_information)
            .sequence()
            .http_status(
                400,
                Some(r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.into()),
            )
            .output(|| {
                DescribeInstanceInformationOutput::builder()
                    .instance_information_list(info("i-000", PingStatus::Online))
                    .build()
            })
            .build();
        let describe = describe_all_online();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
        let s2 = sent.clone();
        let send = mock!(Client::send_command).then_compute_output(move |r| {
            let mut s = s2.lock().unwrap();
            s.push(r.instance_ids().len());
            SendCommandOutput::builder()
                .command(
                    Command::builder()
                        .command_id(format!("cmd-{}", s.len()))
                        .instance_ids(r.instance_ids().join(","))
                        .build(),
                )
                .build()
        });
        // Every command answers in two pages of 25 (or fewer), all done.
        let by_cmd =
            std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, Vec<String>>::new()));
        let chunks: Vec<Vec<String>> = ids.chunks(50).map(|c| c.to_vec()).collect();
        for (i, c) in chunks.iter().enumerate() {
            by_cmd
                .lock()
                .unwrap()
                .insert(format!("cmd-{}", i + 1), c.clone());
        }
        let b2 = by_cmd.clone();
        let list = mock!(Client::list_command_invocations).then_compute_output(move |r| {
            let all = b2.lock().unwrap()[r.command_id().unwrap()].clone();
            let (page, next) = match r.next_token() {
                None if all.len() > 25 => (&all[..25], Some("p2")),
                None => (&all[..], None),
                Some(_) => (&all[25..], None),
            };
            ListCommandInvocationsOutput::builder()
                .set_command_invocations(Some(
                    page.iter()
                        .map(|id| inv(id, CommandInvocationStatus::Success, "Success", 0))
                        .collect(),
                ))
                .set_next_token(next.map(str::to_owned))
                .build()
        });
        let get = mock!(Client::get_command_invocation).then_output(|| {
            GetCommandInvocationOutput::builder()
                .standard_output_content("ok")
                .build()
        });
        let client = ssm(&[&describe, &send, &list, &get]);
        let preflight_retry = mock_client!(aws_sdk_ssm, RuleMode::Sequential, [&throttled], |c| c
            .retry_config(
                aws_sdk_ssm::config::retry::RetryConfig::standard()
                    .with_max_attempts(4)
                    .with_initial_backoff(Duration::from_millis(1))
            ));
        let r = preflight(&preflight_retry, &t[..1]).await.unwrap();
        assert_eq!(r["i-000"].0, PingStatus::Online);
        assert_eq!(throttled.num_calls(), 2, "the throttled answer was retried");

        let rc = RunCommand {
            script: "uptime".into(),
            ..Default::default()
        };
        let (c, _events) = ctx();
        let scrub = Scrubber::new(&rc);
        let rep = Reporter::new(&c, &scrub, t.len());
        let (outs, cmd_ids) = run_ssm(
            &SsmClients {
                ssm: &client,
                s3: None,
            },
            &job("job-2", 1),
            &rc,
            &t,
            OutputCaps::new(t.len(), false),
            &rep,
            &c.cancel,
            FAST,
        )
        .await
        .unwrap();
        assert_eq!(*sent.lock().unwrap(), [50, 50, 20]);
        assert_eq!(cmd_ids.len(), 3);
        assert_eq!(outs.len(), 120);
        assert!(outs
            .iter()
            .all(|o| o.status == CommandStatus::Success as i32 && o.stdout == "ok"));
        // Three pre-flight pages (50 ids per filter), and 2 + 2 + 1 list pages.
        assert_eq!(list.num_calls(), 5);
    }

    #[tokio::test]
    async fn cancel_sends_cancel_command_and_reports_cancelled() {
        let rc = RunCommand {
            script: "sleep 600".into(),
            ..Default::default()
        };
        let describe = describe_all_online();
        let send = mock!(Client::send_command).then_output(|| {
            SendCommandOutput::builder()
                .command(Command::builder().command_id("cmd-c").build())
                .build()
        });
        let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c2 = cancelled.clone();
        let list = mock!(Client::list_command_invocations).then_compute_output(move |_| {
            let (s, d) = if c2.load(std::sync::atomic::Ordering::SeqCst) {
                (CommandInvocationStatus::Cancelled, "Cancelled")
            } else {
                (CommandInvocationStatus::InProgress, "InProgress")
            };
            ListCommandInvocationsOutput::builder()
                .command_invocations(inv("i-1", s.clone(), d, -1))
                .command_invocations(inv(
                    "i-2",
                    CommandInvocationStatus::Cancelling,
                    "Cancelling",
                    -1,
                ))
                .build()
        });
        let c3 = cancelled.clone();
        let cancel = mock!(Client::cancel_command)
            .match_requests(|r| r.command_id() == Some("cmd-c"))
            .then_compute_output(move |_| {
                c3.store(true, std::sync::atomic::Ordering::SeqCst);
                CancelCommandOutput::builder().build()
            });
        let get = mock!(Client::get_command_invocation)
            .then_output(|| GetCommandInvocationOutput::builder().build());
        let client = ssm(&[&describe, &send, &list, &cancel, &get]);
        let (c, _events) = ctx();
        let scrub = Scrubber::new(&rc);
        let t = targets(&["i-1", "i-2"]);
        let rep = Reporter::new(&c, &scrub, 2);
        let token = c.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            token.cancel();
        });
        let (outs, _) = run_ssm(
            &SsmClients {
                ssm: &client,
                s3: None,
            },
            &job("job-3", 1),
            &rc,
            &t,
            OutputCaps::new(2, false),
            &rep,
            &c.cancel,
            FAST,
        )
        .await
        .unwrap();
        assert_eq!(cancel.num_calls(), 1);
        assert!(
            outs.iter()
                .all(|o| o.status == CommandStatus::Cancelled as i32),
            "{outs:?}"
        );
        // i-2 never confirmed: reported cancelled with the reason.
        let i2 = outs.iter().find(|o| o.instance_id == "i-2").unwrap();
        assert!(i2.reason.contains("had not confirmed"), "{}", i2.reason);
    }

    #[tokio::test]
    async fn a_later_attempt_follows_the_earlier_command_instead_of_sending_again() {
        use aws_sdk_ssm::operation::list_commands::ListCommandsOutput;
        let rc = RunCommand {
            script: "do-once".into(),
            ..Default::default()
        };
        // The lost attempt had sent to i-1 and i-2 (comment "es job job-r"); i-3 is new work.
        let earlier = mock!(Client::list_commands)
            .match_requests(|r| {
                r.filters().first().is_some_and(|f| {
                    f.key() == &aws_sdk_ssm::types::CommandFilterKey::InvokedAfter
                        && f.value() == "2023-11-14T22:12:20Z"
                })
            })
            .then_output(|| {
                ListCommandsOutput::builder()
                    .commands(
                        Command::builder()
                            .command_id("cmd-other")
                            .comment("es job someone-else")
                            .instance_ids("i-1")
                            .build(),
                    )
                    .commands(
                        Command::builder()
                            .command_id("cmd-old")
                            .comment("es job job-r")
                            .instance_ids("i-1")
                            .instance_ids("i-2")
                            .build(),
                    )
                    .build()
            });
        let describe = describe_all_online();
        let send = mock!(Client::send_command)
            .match_requests(|r| r.instance_ids() == ["i-3"])
            .then_output(|| {
                SendCommandOutput::builder()
                    .command(Command::builder().command_id("cmd-new").build())
                    .build()
            });
        let list = mock!(Client::list_command_invocations).then_compute_output(|r| {
            let ids: &[&str] = if r.command_id() == Some("cmd-old") {
                &["i-1", "i-2"]
            } else {
                &["i-3"]
            };
            ListCommandInvocationsOutput::builder()
                .set_command_invocations(Some(
                    ids.iter()
                        .map(|id| inv(id, CommandInvocationStatus::Success, "Success", 0))
                        .collect(),
                ))
                .build()
        });
        let get = mock!(Client::get_command_invocation)
            .then_output(|| GetCommandInvocationOutput::builder().build());
        let client = ssm(&[&earlier, &describe, &send, &list, &get]);
        let (c, _events) = ctx();
        let scrub = Scrubber::new(&rc);
        let t = targets(&["i-1", "i-2", "i-3"]);
        let rep = Reporter::new(&c, &scrub, 3);
        let (outs, ids) = run_ssm(
            &SsmClients {
                ssm: &client,
                s3: None,
            },
            &job("job-r", 2),
            &rc,
            &t,
            OutputCaps::new(3, false),
            &rep,
            &c.cancel,
            FAST,
        )
        .await
        .unwrap();
        assert_eq!(ids, ["cmd-old", "cmd-new"]);
        assert_eq!(send.num_calls(), 1, "only the instance not reached before");
        assert_eq!(outs.len(), 3);
        assert!(outs
            .iter()
            .all(|o| o.status == CommandStatus::Success as i32));
    }

    #[tokio::test]
    async fn with_an_output_bucket_the_full_text_comes_from_s3() {
        use aws_sdk_s3::operation::get_object::{GetObjectError, GetObjectOutput};
        let rc = RunCommand {
            script: "make-lots-of-output".into(),
            output_s3_bucket: "out-bucket".into(),
            output_s3_prefix: "runs".into(),
            ..Default::default()
        };
        let describe = describe_all_online();
        let send = mock!(Client::send_command)
            .match_requests(|r| {
                r.output_s3_bucket_name() == Some("out-bucket")
                    && r.output_s3_key_prefix() == Some("runs")
            })
            .then_output(|| {
                SendCommandOutput::builder()
                    .command(Command::builder().command_id("cmd-s3").build())
                    .build()
            });
        let list = mock!(Client::list_command_invocations).then_output(|| {
            ListCommandInvocationsOutput::builder()
                .command_invocations(
                    CommandInvocation::builder()
                        .instance_id("i-1")
                        .status(CommandInvocationStatus::Success)
                        .status_details("Success")
                        .command_plugins(
                            CommandPlugin::builder()
                                .response_code(0)
                                .standard_output_url("https://s3.us-east-1.amazonaws.com/out-bucket/runs/cmd-s3/i-1/awsrunShellScript/0.awsrunShellScript/stdout")
                                .build(),
                        )
                        .build(),
                )
                .build()
        });
        let client = ssm(&[&describe, &send, &list]);
        // S3 answers the first 256 KiB + 1 of a 3 MB stdout; there is no stderr object.
        let stdout = mock!(aws_sdk_s3::Client::get_object)
            .match_requests(|r| {
                r.key() == Some("runs/cmd-s3/i-1/awsrunShellScript/0.awsrunShellScript/stdout")
                    && r.range() == Some("bytes=0-262144")
            })
            .then_output(|| {
                GetObjectOutput::builder()
                    .content_range("bytes 0-262144/3000000")
                    .body(aws_sdk_s3::primitives::ByteStream::from(vec![
                        b'a';
                        262_145
                    ]))
                    .build()
            });
        let stderr = mock!(aws_sdk_s3::Client::get_object)
            .match_requests(|r| r.key().is_some_and(|k| k.ends_with("/stderr")))
            .then_error(|| {
                GetObjectError::NoSuchKey(aws_sdk_s3::types::error::NoSuchKey::builder().build())
            });
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::new()
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                .region(aws_sdk_s3::config::Region::new("us-east-1"))
                .credentials_provider(aws_sdk_s3::config::Credentials::new(
                    "t", "t", None, None, "test",
                ))
                .http_client(aws_smithy_mocks::create_mock_http_client())
                .interceptor(
                    aws_smithy_mocks::MockResponseInterceptor::new()
                        .rule_mode(RuleMode::MatchAny)
                        .with_rule(&stdout)
                        .with_rule(&stderr),
                )
                .build(),
        );
        let (c, _events) = ctx();
        let scrub = Scrubber::new(&rc);
        let t = targets(&["i-1"]);
        let rep = Reporter::new(&c, &scrub, 1);
        let (outs, _) = run_ssm(
            &SsmClients {
                ssm: &client,
                s3: Some(&s3),
            },
            &job("job-s3", 1),
            &rc,
            &t,
            OutputCaps::new(1, true),
            &rep,
            &c.cancel,
            FAST,
        )
        .await
        .unwrap();
        let o = &outs[0];
        assert_eq!(o.status, CommandStatus::Success as i32);
        assert_eq!(o.stdout.len(), 256 * 1024);
        assert!(o.stdout_truncated, "3 MB in S3, 256 KiB inline");
        assert!(o.stdout_url.ends_with("/stdout") && o.stdout_url.starts_with("https://"));
        assert_eq!((o.stderr.as_str(), o.stderr_truncated), ("", false));
        assert_eq!(stdout.num_calls(), 1);
    }

    #[test]
    fn every_ssm_status_maps() {
        use CommandStatus as C;
        for (s, d, want) in [
            ("Pending", "Pending", None),
            ("InProgress", "InProgress", None),
            ("Delayed", "Delayed", None),
            ("Cancelling", "Cancelling", None),
            ("Success", "Success", Some(C::Success)),
            ("Failed", "Failed", Some(C::Failed)),
            ("Cancelled", "Cancelled", Some(C::Cancelled)),
            ("TimedOut", "DeliveryTimedOut", Some(C::DeliveryTimedOut)),
            ("TimedOut", "ExecutionTimedOut", Some(C::TimedOut)),
            ("TimedOut", "", Some(C::TimedOut)),
            ("Failed", "Undeliverable", Some(C::Undeliverable)),
            ("Failed", "InvalidPlatform", Some(C::Undeliverable)),
            ("Failed", "Terminated", Some(C::Terminated)),
        ] {
            assert_eq!(map_status(s, d), want, "{s}/{d}");
        }
    }

    #[test]
    fn s3_keys_follow_ssm_layout() {
        let mut rc = RunCommand {
            output_s3_prefix: "runs/".into(),
            ..Default::default()
        };
        assert_eq!(
            s3_key(&rc, "c1", "i-1", "stdout"),
            "runs/c1/i-1/awsrunShellScript/0.awsrunShellScript/stdout"
        );
        rc.output_s3_prefix.clear();
        rc.shell = Shell::Powershell as i32;
        assert_eq!(
            s3_key(&rc, "c1", "i-1", "stderr"),
            "c1/i-1/awsrunPowerShellScript/0.awsrunPowerShellScript/stderr"
        );
    }
}
