//! The client subcommands of `es-server`, one function each (`serve` is in `mod.rs`); output
//! through `render.rs`, `--json` everywhere.

use std::process::ExitCode;
use std::time::Duration;

use es_proto::v1::*;
use serde_json::{json, Value};

use super::args::{ClientOpts, Command, SubmitArgs};
use super::conn::{connect, usage, CliError, Client};
use super::render::*;

/// Runs one client subcommand; answers the process exit code or the error to print.
pub async fn run(cmd: Command) -> Result<ExitCode, CliError> {
    match cmd {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Submit { job, wait, client } => submit(job, wait, client).await,
        Command::Jobs {
            state,
            role,
            sandbox,
            selector,
            limit,
            client,
        } => jobs(state, role, sandbox, selector, limit, client).await,
        Command::Get { job_id, client } => get(job_id, client).await,
        Command::Watch { job_id, client } => watch_job(job_id, client).await,
        Command::Cancel {
            job_id,
            reason,
            client,
        } => cancel(job_id, reason, client).await,
        Command::Sandbox { cmd, client } => sandbox(cmd, client).await,
        Command::Agents { client } => agents(client).await,
        Command::Audit {
            sandbox,
            job,
            all,
            client,
        } => audit(sandbox, job, all, client).await,
        Command::Drain {
            name,
            reason,
            no_wait,
            timeout,
            client,
        } => drain(name, reason, no_wait, timeout, client).await,
        Command::Token { name, scope } => token(name, scope).await,
    }
}

/// `submit`: sends the job, then follows it with `--wait`.
async fn submit(job: SubmitArgs, wait: bool, client: ClientOpts) -> Result<ExitCode, CliError> {
    let req = job.request().map_err(usage)?;
    let mut c = connect(&client).await?;
    let resp = c.submit(req).await?.into_inner();
    let j = resp.job.unwrap_or_default();
    // On stderr: the job is queued all the same, and stdout stays the job (or its JSON).
    for w in &resp.warnings {
        eprintln!("es-server: warning: {w}");
    }
    if client.json && !wait {
        print_json(
            &json!({"created": resp.created, "job": job_json(&j), "warnings": resp.warnings}),
        );
    } else if !client.json {
        let verb = if resp.created {
            "submitted"
        } else {
            "already submitted (same key)"
        };
        println!(
            "{verb} job {} ({} {})",
            j.id,
            role_name(j.role),
            es_proto::kinds::name(&j)
        );
    }
    if wait {
        return watch(&client, &mut c, &j.id).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `jobs`: pages through the list until `--limit`.
async fn jobs(
    state: Vec<String>,
    role: Option<String>,
    sandbox: Option<String>,
    selector: Option<String>,
    limit: u32,
    client: ClientOpts,
) -> Result<ExitCode, CliError> {
    let mut states = Vec::new();
    for s in &state {
        let st = es_proto::JobState::parse(s).ok_or_else(|| {
            usage(format!(
                "--state {s:?}: use queued, running, succeeded, failed, cancelled or timed_out"
            ))
        })?;
        states.push(st as i32);
    }
    let role = match role {
        None => 0,
        Some(r) => es_proto::Role::parse(&r)
            .ok_or_else(|| usage(format!("--role {r:?}: must be shells or commands")))?
            as i32,
    };
    let mut c = connect(&client).await?;
    // Pages until `limit` jobs (an answer stops early at the message size budget).
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list(ListRequest {
                states: states.clone(),
                role,
                sandbox_id: sandbox.clone().unwrap_or_default(),
                selector: selector.clone().unwrap_or_default(),
                limit: limit.saturating_sub(jobs.len() as u32).max(1),
                page_token,
            })
            .await?
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() || jobs.len() >= limit as usize {
            break;
        }
        page_token = page.next_page_token;
    }
    if client.json {
        print_json(&Value::Array(jobs.iter().map(job_json).collect()));
    } else {
        print!("{}", super::render::jobs_table(&jobs));
        println!("{} jobs", jobs.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// `get`: one job.
async fn get(job_id: String, client: ClientOpts) -> Result<ExitCode, CliError> {
    let mut c = connect(&client).await?;
    let j = c.get(GetRequest { job_id }).await?.into_inner();
    if client.json {
        print_json(&job_json(&j));
    } else {
        print_job(&j);
    }
    Ok(ExitCode::SUCCESS)
}

/// `watch`: a job's events until it finishes.
async fn watch_job(job_id: String, client: ClientOpts) -> Result<ExitCode, CliError> {
    let mut c = connect(&client).await?;
    watch(&client, &mut c, &job_id).await
}

/// `cancel`: asks for a cancel.
async fn cancel(job_id: String, reason: String, client: ClientOpts) -> Result<ExitCode, CliError> {
    let mut c = connect(&client).await?;
    let j = c
        .cancel(CancelRequest { job_id, reason })
        .await?
        .into_inner()
        .job
        .unwrap_or_default();
    if client.json {
        print_json(&job_json(&j));
    } else if j.cancel_requested && j.state == JobState::Running as i32 {
        println!("cancel requested for job {} (running on {})", j.id, j.agent);
    } else {
        println!("job {} is {}", j.id, state_name(j.state));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sandbox …`: see `sandbox.rs`.
async fn sandbox(
    cmd: super::sandbox_args::SandboxCmd,
    client: ClientOpts,
) -> Result<ExitCode, CliError> {
    let mut c = connect(&client).await?;
    super::sandbox::run(&client, &mut c, cmd)
        .await
        .map_err(|(code, message)| CliError { code, message })
}

/// `agents`: the connected agents as a table.
async fn agents(client: ClientOpts) -> Result<ExitCode, CliError> {
    let mut c = connect(&client).await?;
    let agents = c.agents(AgentsRequest {}).await?.into_inner().agents;
    if client.json {
        print_json(&Value::Array(agents.iter().map(agent_json).collect()));
    } else {
        print!("{}", agents_table(&agents));
        println!("{} agents", agents.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit`: every page of the trail, oldest first.
async fn audit(
    sandbox: Option<String>,
    job: Option<String>,
    all: bool,
    client: ClientOpts,
) -> Result<ExitCode, CliError> {
    let mut c = connect(&client).await?;
    let mut after_id = 0;
    if !client.json {
        println!(
            "{:<26}  {:<24}  {:<12}  {:<36}  DETAIL",
            "TIME", "ACTOR", "ACTION", "JOB"
        );
    }
    loop {
        let page = c
            .audit(AuditRequest {
                sandbox_id: sandbox.clone().unwrap_or_default(),
                job_id: job.clone().unwrap_or_default(),
                all,
                after_id,
                limit: 1000,
            })
            .await?
            .into_inner();
        let entries = page.entries;
        for e in &entries {
            if client.json {
                // One object per line: `> audit.jsonl` is the export.
                println!("{}", audit_json(e));
            } else {
                println!(
                    "{:<26}  {:<24}  {:<12}  {:<36}  {}",
                    time(e.at_us).as_str().unwrap_or("-"),
                    e.actor,
                    e.action,
                    e.job_id,
                    e.detail_json
                );
            }
        }
        match page.next_after_id {
            0 => break,
            next => after_id = next,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `drain`: asks the agent to drain, then waits until it has left (or came back under a new session).
async fn drain(
    name: String,
    reason: String,
    no_wait: bool,
    timeout: Duration,
    client: ClientOpts,
) -> Result<ExitCode, CliError> {
    let mut c = connect(&client).await?;
    let a = c
        .drain_agent(DrainAgentRequest {
            name: name.clone(),
            reason,
        })
        .await?
        .into_inner()
        .agent
        .unwrap_or_default();
    if !client.json {
        println!(
            "{name}: draining ({} jobs in flight); it takes no new work",
            a.slots_in_use
        );
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let session = a.registered_at_us;
    let mut last = a;
    // Gone, or back under a new session (systemd restarted it after the drain).
    loop {
        if no_wait {
            break;
        }
        let agents = c.agents(AgentsRequest {}).await?.into_inner().agents;
        let me = agents
            .into_iter()
            .find(|x| x.identity.as_ref().is_some_and(|i| i.name == name));
        match me {
            Some(x) if x.connected && x.registered_at_us == session => last = x,
            _ => {
                if !client.json {
                    println!("{name}: drained and gone");
                }
                break;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError {
                code: 1,
                message: format!(
                    "{name} is still draining after {} ({} jobs in flight)",
                    humantime::format_duration(timeout),
                    last.slots_in_use
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if client.json {
        print_json(&agent_json(&last));
    }
    Ok(ExitCode::SUCCESS)
}

/// `token`: a fresh token and its line for the tokens file (no server needed).
async fn token(name: String, scope: String) -> Result<ExitCode, CliError> {
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(usage(format!(
            "token name {name:?}: give a name without spaces"
        )));
    }
    let scope = crate::api::auth::Scope::parse(&scope)
        .ok_or_else(|| usage(format!("--scope {scope:?}: use read, submit or admin")))?;
    let (token, line) = crate::api::auth::new_token(&name, scope);
    println!("token for {name} (give it to the submitter as ES_TOKEN; it is not stored):");
    println!("  {token}");
    println!("line for the server's --tokens file:");
    println!("  {line}");
    Ok(ExitCode::SUCCESS)
}

/// A job's events until it finishes, across server restarts (see follow.rs); the exit status
/// follows the job's final state.
async fn watch(opts: &ClientOpts, c: &mut Client, job_id: &str) -> Result<ExitCode, CliError> {
    let mut final_state = JobState::Unspecified;
    super::follow::follow(opts, c, job_id, |ev| {
        if opts.json {
            println!("{}", event_json(ev));
        } else {
            println!("{}", event_line(ev));
        }
        if let Some(job_event::Event::Result(r)) = &ev.event {
            final_state = JobState::try_from(r.state).unwrap_or_default();
        }
    })
    .await?;
    Ok(match final_state {
        JobState::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}
