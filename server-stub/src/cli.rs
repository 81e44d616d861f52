//! The `es-server` command line: `serve`, and the submitter/operator commands that talk to a
//! running server (`submit`, `jobs`, `get`, `watch`, `cancel`, `agents`), each with human output
//! and `--json`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use es_proto::v1::job_service_client::JobServiceClient;
use es_proto::v1::*;
use serde_json::{json, Value};

use crate::ServerConfig;
use es_proto::error_chain;

pub use crate::client_conn::{Client, Credentials, EXIT_UNAVAILABLE, EXIT_USAGE};
use crate::render::*;

#[derive(Parser, Debug)]
#[command(
    name = "es-server",
    version,
    about = "Job server for execution-server agents (es-shells, es-commands)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ClientOpts {
    /// Server address.
    #[arg(
        long,
        global = true,
        env = "ES_SERVER",
        default_value = "http://127.0.0.1:7700"
    )]
    pub server: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Submitter token (see `es-server token NAME`).
    #[arg(long, global = true, env = "ES_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate (for an https:// server).
    #[arg(long, global = true, env = "ES_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// Submitter client certificate (PEM, subject OU=submitter) instead of a token.
    #[arg(long, global = true, env = "ES_CERT", requires = "cert_key")]
    pub cert: Option<std::path::PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, global = true, env = "ES_CERT_KEY", requires = "cert")]
    pub cert_key: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(ServerConfig),
    /// Submit a job.
    Submit {
        #[command(flatten)]
        job: SubmitArgs,
        /// Watch the job until it finishes (exit status follows the job).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List jobs, newest first.
    Jobs {
        /// Only these states (queued, running, succeeded, failed, cancelled, timed_out).
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        sandbox: Option<String>,
        #[arg(long)]
        selector: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show one job.
    Get {
        job_id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Follow a job's events until it finishes (exit status follows the job).
    Watch {
        job_id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cancel a job (graceful, then forced after the server's cancel grace).
    Cancel {
        job_id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Connected agents, their health and slots in use.
    Agents {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// The audit trail of a sandbox or a job, oldest first (`--json`: JSON lines, for export).
    Audit {
        /// Entries of this sandbox.
        #[arg(long, required_unless_present_any = ["job", "all"])]
        sandbox: Option<String>,
        /// Entries of this job.
        #[arg(long)]
        job: Option<String>,
        /// Every entry (export).
        #[arg(long, conflicts_with_all = ["sandbox", "job"])]
        all: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Ask an agent to drain (finish its jobs, take no new ones, then exit), e.g. before an
    /// upgrade; waits until it has left unless --no-wait.
    Drain {
        /// Agent name as shown by `es-server agents`.
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Return at once instead of waiting for the agent to leave.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for the agent to leave.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Make a submitter token: prints the token (give it to the submitter) and the line to
    /// append to the server's --tokens file (only the token's SHA-256 is stored).
    Token {
        /// Submitter name, recorded in the audit trail (e.g. quali-server, alice).
        name: String,
        /// read (look only), submit (also submit and cancel its own jobs) or admin (also drain,
        /// sweep, cancel anyone's jobs).
        #[arg(long, default_value = "submit")]
        scope: String,
    },
    /// es-shells jobs on a sandbox: up (blueprint), power, ips, details, delete-app, down, sweep.
    Sandbox {
        #[command(subcommand)]
        cmd: crate::sandbox_cli::SandboxCmd,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct SubmitArgs {
    /// Agent role: shells or commands.
    #[arg(long)]
    pub role: String,
    /// Execution-server selector value (e.g. the region).
    #[arg(long, default_value = "")]
    pub selector: String,
    #[arg(long, default_value = "")]
    pub sandbox: String,
    /// Idempotency key: submitting the same key again returns the same job.
    #[arg(long, default_value = "")]
    pub key: String,
    /// Job timeout (e.g. 30s, 10m); server default when omitted.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
    /// Diagnostic Echo job with this message.
    #[arg(long, conflicts_with = "sleep")]
    pub echo: Option<String>,
    /// Diagnostic Sleep job of this duration (e.g. 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub sleep: Option<Duration>,
    /// Progress events of a Sleep job.
    #[arg(long, default_value_t = 0)]
    pub steps: u32,
    /// Make a Sleep job fail with this message.
    #[arg(long, default_value = "")]
    pub fail: String,
    /// Make a Sleep job ignore cooperative cancellation.
    #[arg(long)]
    pub ignore_cancel: bool,
}

impl SubmitArgs {
    /// The request, or an error naming the flag.
    pub fn request(&self) -> Result<SubmitRequest, String> {
        let role = es_proto::Role::parse(&self.role)
            .ok_or_else(|| format!("--role {:?}: must be shells or commands", self.role))?;
        let kind = match (&self.echo, self.sleep) {
            (Some(m), _) => job_spec::Kind::Echo(EchoJob { message: m.clone() }),
            (None, Some(d)) => job_spec::Kind::Sleep(SleepJob {
                duration_ms: d.as_millis() as u64,
                steps: self.steps,
                fail_message: self.fail.clone(),
                ignore_cancel: self.ignore_cancel,
            }),
            (None, None) => {
                return Err("give a job kind: --echo MESSAGE or --sleep DURATION".into())
            }
        };
        Ok(SubmitRequest {
            idempotency_key: self.key.clone(),
            role: role as i32,
            selector: self.selector.clone(),
            sandbox_id: self.sandbox.clone(),
            spec: Some(JobSpec {
                kind: Some(kind),
                target: None,
            }),
            timeout_ms: self.timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
            max_attempts: self.max_attempts,
            submitted_by: std::env::var("USER").unwrap_or_default(),
        })
    }
}

/// Runs a client command; answers the process exit code.
pub async fn run_client(cmd: Command) -> ExitCode {
    match client_command(cmd).await {
        Ok(code) => code,
        Err(CliError { code, message }) => {
            eprintln!("es-server: {message}");
            ExitCode::from(code)
        }
    }
}

struct CliError {
    code: u8,
    message: String,
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

fn usage(message: String) -> CliError {
    CliError {
        code: EXIT_USAGE,
        message,
    }
}

async fn connect(opts: &ClientOpts) -> Result<Client, CliError> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(opts.server.clone())
        .map_err(|e| usage(format!("--server {:?}: {e}", opts.server)))?
        .connect_timeout(Duration::from_secs(5));
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| usage(format!("{flag} {}: {e}", p.display())))
    };
    if opts.server.starts_with("https://") {
        let ca = opts.ca.as_ref().ok_or_else(|| {
            usage(
                "--ca (ES_CA) is needed for an https:// server: the CA that signed its certificate"
                    .into(),
            )
        })?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read("--ca", ca)?));
        if let (Some(cert), Some(key)) = (&opts.cert, &opts.cert_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read("--cert", cert)?,
                read("--cert-key", key)?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| usage(format!("--ca/--cert/--cert-key: {e}")))?;
    } else if opts.cert.is_some() || opts.ca.is_some() {
        return Err(usage(format!(
            "--ca/--cert need an https:// --server (got {})",
            opts.server
        )));
    }
    let token = match &opts.token {
        None => None,
        Some(t) => {
            if opts.server.starts_with("http://") {
                eprintln!(
                    "es-server: warning: sending the token in plaintext to {}",
                    opts.server
                );
            }
            let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {}", t.trim()).parse().map_err(|_| {
                    usage("--token (ES_TOKEN) holds characters not allowed in a header".into())
                })?;
            v.set_sensitive(true);
            Some(v)
        }
    };
    let channel = endpoint.connect().await.map_err(|e| CliError {
        code: EXIT_UNAVAILABLE,
        message: format!("cannot reach {}: {}", opts.server, error_chain(&e)),
    })?;
    Ok(
        JobServiceClient::with_interceptor(channel, Credentials(token))
            .max_decoding_message_size(es_proto::limits::MAX_MESSAGE)
            .max_encoding_message_size(es_proto::limits::MAX_MESSAGE),
    )
}

async fn client_command(cmd: Command) -> Result<ExitCode, CliError> {
    match cmd {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Submit { job, wait, client } => {
            let req = job.request().map_err(usage)?;
            let mut c = connect(&client).await?;
            let resp = c.submit(req).await?.into_inner();
            let j = resp.job.unwrap_or_default();
            if client.json && !wait {
                print_json(&json!({"created": resp.created, "job": job_json(&j)}));
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
                return watch(&mut c, &j.id, client.json).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs {
            state,
            role,
            sandbox,
            selector,
            limit,
            client,
        } => {
            let mut states = Vec::new();
            for s in &state {
                let st = es_proto::JobState::parse(s).ok_or_else(|| {
                    usage(format!("--state {s:?}: use queued, running, succeeded, failed, cancelled or timed_out"))
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
                println!(
                    "{:<36}  {:<9}  {:<8}  {:<12}  {:>7}  {:<24}  SANDBOX",
                    "JOB", "STATE", "ROLE", "KIND", "ATTEMPT", "AGENT"
                );
                for j in &jobs {
                    println!(
                        "{:<36}  {:<9}  {:<8}  {:<12}  {:>7}  {:<24}  {}",
                        j.id,
                        state_name(j.state),
                        role_name(j.role),
                        es_proto::kinds::name(j),
                        format!("{}/{}", j.attempt, j.max_attempts),
                        j.agent,
                        j.sandbox_id
                    );
                }
                println!("{} jobs", jobs.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get { job_id, client } => {
            let mut c = connect(&client).await?;
            let j = c.get(GetRequest { job_id }).await?.into_inner();
            if client.json {
                print_json(&job_json(&j));
            } else {
                print_job(&j);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { job_id, client } => {
            let mut c = connect(&client).await?;
            watch(&mut c, &job_id, client.json).await
        }
        Command::Cancel {
            job_id,
            reason,
            client,
        } => {
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
        Command::Sandbox { cmd, client } => {
            let mut c = connect(&client).await?;
            crate::sandbox_cli::run(&mut c, cmd, client.json)
                .await
                .map_err(|(code, message)| CliError { code, message })
        }
        Command::Agents { client } => {
            let mut c = connect(&client).await?;
            let agents = c.agents(AgentsRequest {}).await?.into_inner().agents;
            if client.json {
                print_json(&Value::Array(agents.iter().map(agent_json).collect()));
            } else {
                println!(
                    "{:<28}  {:<8}  {:<12}  {:<8}  {:<9}  {:>9}  {:>8}  {:>8}  {:>7}  {:>7}  DETAIL",
                    "AGENT", "ROLE", "SELECTOR", "KIND", "HEALTH", "SLOTS", "LEASED", "DONE",
                    "REFUSED", "EXPIRED"
                );
                for a in &agents {
                    let id = a.identity.clone().unwrap_or_default();
                    let health = if a.draining {
                        "draining"
                    } else if a.healthy {
                        "healthy"
                    } else {
                        "unhealthy"
                    };
                    let n = a.counters.unwrap_or_default();
                    println!(
                        "{:<28}  {:<8}  {:<12}  {:<8}  {:<9}  {:>9}  {:>8}  {:>8}  {:>7}  {:>7}  {}",
                        id.name,
                        role_name(id.role),
                        id.selector,
                        if id.fallback { "fallback" } else { "primary" },
                        health,
                        format!("{}/{}", a.slots_in_use, id.slots),
                        n.leases_granted,
                        n.results_accepted,
                        n.writes_refused,
                        n.leases_expired,
                        a.health_detail
                    );
                }
                println!("{} agents", agents.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            sandbox,
            job,
            all,
            client,
        } => {
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
        Command::Drain {
            name,
            reason,
            no_wait,
            timeout,
            client,
        } => {
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
        Command::Token { name, scope } => {
            if name.is_empty() || name.chars().any(char::is_whitespace) {
                return Err(usage(format!(
                    "token name {name:?}: give a name without spaces"
                )));
            }
            let scope = crate::auth::Scope::parse(&scope)
                .ok_or_else(|| usage(format!("--scope {scope:?}: use read, submit or admin")))?;
            let (token, line) = crate::auth::new_token(&name, scope);
            println!("token for {name} (give it to the submitter as ES_TOKEN; it is not stored):");
            println!("  {token}");
            println!("line for the server's --tokens file:");
            println!("  {line}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn watch(c: &mut Client, job_id: &str, as_json: bool) -> Result<ExitCode, CliError> {
    let mut stream = c
        .watch(WatchRequest {
            job_id: job_id.to_owned(),
            after_seq: 0,
        })
        .await?
        .into_inner();
    let mut final_state = JobState::Unspecified;
    while let Some(ev) = stream.message().await? {
        if as_json {
            println!("{}", event_json(&ev));
        } else {
            println!("{}", event_line(&ev));
        }
        if let Some(job_event::Event::Result(r)) = &ev.event {
            final_state = JobState::try_from(r.state).unwrap_or_default();
        }
    }
    Ok(match final_state {
        JobState::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// Entry point of the `es-server` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("es-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(config) => {
            crate::logging::init("es-server", &[]);
            rt.block_on(serve(config))
        }
        other => rt.block_on(run_client(other)),
    }
}

async fn serve(config: crate::ServerConfig) -> ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("es-server: invalid configuration: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        log::info!("shutting down");
    };
    let running = match crate::start(config, shutdown).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("es-server: {e}");
            return match e {
                crate::ServerError::Config(_)
                | crate::ServerError::File { .. }
                | crate::ServerError::Auth(_) => ExitCode::from(EXIT_USAGE),
                _ => ExitCode::FAILURE,
            };
        }
    };
    // Tests and scripts read the bound address from this line (useful with port 0).
    println!("es-server listening on {}", running.addr);
    match running.task.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("es-server: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("es-server: {e}");
            ExitCode::FAILURE
        }
    }
}
