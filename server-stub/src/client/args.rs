//! The `es-server` command line as clap reads it: `serve` and the client subcommands.

use std::time::Duration;

use clap::{Parser, Subcommand};
use es_proto::v1::*;

use crate::ServerConfig;

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
    /// Server address; several, comma-separated (a server and its replicas), are tried in turn.
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
    /// How long watch, --wait and `sandbox up` keep reconnecting (a server restart, a failover
    /// to another of the --server addresses) before giving up with exit 69.
    #[arg(long, global = true, env = "ES_GIVE_UP_AFTER", default_value = "5m", value_parser = humantime::parse_duration)]
    pub give_up_after: Duration,
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
    /// A sandbox's jobs: up (a blueprint), down, power, reboot, ips, details, delete-app, run (a
    /// script, es-commands), tag, security, snapshots, console, access-key, sweep.
    Sandbox {
        #[command(subcommand)]
        cmd: super::sandbox_args::SandboxCmd,
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
