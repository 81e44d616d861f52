//! `es-server sandbox ...`: the es-shells jobs from the command line. `up` takes a blueprint
//! (YAML or JSON), prepares the network and deploys the apps, showing per-app progress and a
//! summary table; `power`, `reboot`, `ips`, `details`, `delete-app`, `down` and `sweep` act on a sandbox;
//! `run` runs a script on its instances (es-commands, SSM or SSH) and prints each one's output.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use es_proto::v1::*;

use super::blueprint::Blueprint;
use super::conn::{Client, EXIT_USAGE};
use super::render::{job_json, state_name};

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Prepare the network and deploy the apps of a blueprint (YAML or JSON).
    Up {
        blueprint: PathBuf,
        #[arg(long)]
        sandbox: String,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Power apps on or off (all apps unless --app is given).
    Power {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        app: Vec<String>,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Reboot the running apps (all unless --app is given); --cycle powers them off, then on.
    Reboot {
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        app: Vec<String>,
        /// Off, then on (each app waits until stopped, then until running), instead of an OS
        /// reboot.
        #[arg(long)]
        cycle: bool,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Current IP addresses of the apps.
    Ips {
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        app: Vec<String>,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// State, type, image and addresses of the apps.
    Details {
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        app: Vec<String>,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Delete one app (instance, Elastic IP, its port group).
    DeleteApp {
        app: String,
        #[arg(long)]
        sandbox: String,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Delete everything the sandbox owns (found by its ReservationId tag).
    Down {
        #[arg(long)]
        sandbox: String,
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Run a script on the sandbox's apps (es-commands): per-instance status, exit code, output.
    Run(Box<RunArgs>),
    /// Delete resources tagged with any sandbox not in --live and not known alive to the server
    /// (--dry-run lists them). Needs an admin token. Sandboxes younger than the agent's
    /// sweep_min_age (default 1 h) or --min-age are always kept.
    Sweep {
        /// Sandboxes that are alive (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        live: Vec<String>,
        /// No --live list: every sandbox the server does not know of is an orphan.
        #[arg(long, conflicts_with = "live")]
        all_except_known: bool,
        /// Keep sandboxes younger than this (never below the agent's sweep_min_age).
        #[arg(long, value_parser = humantime::parse_duration)]
        min_age: Option<std::time::Duration>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "")]
        selector: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[arg(long)]
    sandbox: String,
    /// Only these apps (default: every running app of the sandbox).
    #[arg(long)]
    app: Vec<String>,
    /// These instances instead of the sandbox's apps.
    #[arg(long, conflicts_with = "app")]
    instance: Vec<String>,
    /// The script text.
    #[arg(
        long,
        required_unless_present = "script_file",
        conflicts_with = "script_file"
    )]
    script: Option<String>,
    /// A file holding the script.
    #[arg(long)]
    script_file: Option<PathBuf>,
    #[arg(long, value_parser = ["bash", "powershell"], default_value = "bash")]
    shell: String,
    #[arg(long, value_parser = ["ssm", "ssh"], default_value = "ssm")]
    transport: String,
    /// NAME=VALUE exported to the script (repeat).
    #[arg(long)]
    env: Vec<String>,
    /// NAME=VALUE exported to the script, never shown (repeat).
    #[arg(long)]
    secret_env: Vec<String>,
    #[arg(long, default_value = "")]
    workdir: String,
    /// Longest run on one instance (e.g. 10m); default 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    execution_timeout: Option<std::time::Duration>,
    /// SSM: longest wait for delivery; SSH: connect timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    delivery_timeout: Option<std::time::Duration>,
    /// Instances at once ("50" or "10%").
    #[arg(long, default_value = "")]
    max_concurrency: String,
    /// Errors after which no new instance starts ("0", "10%"); default: run everywhere.
    #[arg(long, default_value = "")]
    max_errors: String,
    /// S3 bucket (and --output-prefix) for the full output.
    #[arg(long, default_value = "")]
    output_bucket: String,
    #[arg(long, default_value = "")]
    output_prefix: String,
    /// SSH login user (default ec2-user).
    #[arg(long, default_value = "")]
    ssh_user: String,
    #[arg(long, default_value_t = 0)]
    ssh_port: u32,
    /// INSTANCE_OR_IP=PUBLIC_KEY: a known host key (repeat).
    #[arg(long)]
    host_key: Vec<String>,
    #[arg(long, default_value = "")]
    selector: String,
}

impl RunArgs {
    /// The RunCommand, or an error naming the flag.
    fn run_command(&self) -> Result<RunCommand, String> {
        let script = match (&self.script, &self.script_file) {
            (Some(s), _) => s.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| format!("--script-file {}: {e}", f.display()))?,
            (None, None) => return Err("give --script or --script-file".into()),
        };
        let mut env = Vec::new();
        for (flag, list, secret) in [
            ("--env", &self.env, false),
            ("--secret-env", &self.secret_env, true),
        ] {
            for kv in list {
                let (name, value) = kv.split_once('=').ok_or_else(|| {
                    format!(
                        "{flag}: expected NAME=VALUE, got {:?}",
                        kv.split('=').next().unwrap_or("")
                    )
                })?;
                env.push(CommandVariable {
                    name: name.to_owned(),
                    value: value.to_owned(),
                    secret,
                });
            }
        }
        let mut host_keys = std::collections::HashMap::new();
        for kv in &self.host_key {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--host-key: expected INSTANCE=KEY, got {kv:?}"))?;
            host_keys.insert(k.to_owned(), v.to_owned());
        }
        let ssh = self.transport == "ssh";
        Ok(RunCommand {
            instance_ids: self.instance.clone(),
            apps: self.app.clone(),
            script,
            shell: if self.shell == "powershell" {
                Shell::Powershell as i32
            } else {
                Shell::Bash as i32
            },
            working_directory: self.workdir.clone(),
            env,
            execution_timeout_s: self
                .execution_timeout
                .map(|d| d.as_secs() as u32)
                .unwrap_or(0),
            delivery_timeout_s: self
                .delivery_timeout
                .map(|d| d.as_secs() as u32)
                .unwrap_or(0),
            max_concurrency: self.max_concurrency.clone(),
            max_errors: self.max_errors.clone(),
            output_s3_bucket: self.output_bucket.clone(),
            output_s3_prefix: self.output_prefix.clone(),
            transport: if ssh {
                CommandTransport::Ssh as i32
            } else {
                CommandTransport::Ssm as i32
            },
            ssh: ssh.then(|| SshOptions {
                user: self.ssh_user.clone(),
                port: self.ssh_port,
                host_keys,
            }),
        })
    }
}

fn req(
    sandbox: &str,
    selector: &str,
    kind: job_spec::Kind,
    target: Option<AwsTarget>,
) -> SubmitRequest {
    SubmitRequest {
        role: Role::Shells as i32,
        selector: selector.to_owned(),
        sandbox_id: sandbox.to_owned(),
        spec: Some(JobSpec {
            kind: Some(kind),
            target,
        }),
        submitted_by: std::env::var("USER").unwrap_or_default(),
        ..Default::default()
    }
}

/// Runs a sandbox command; answers the exit code (1 when a job did not succeed).
pub async fn run(c: &mut Client, cmd: SandboxCmd, json: bool) -> Result<ExitCode, (u8, String)> {
    let usage = |m: String| (EXIT_USAGE, m);
    let mut jobs = Vec::new();
    match cmd {
        SandboxCmd::Up {
            blueprint,
            sandbox,
            selector,
        } => {
            let bp = Blueprint::load(&blueprint).map_err(usage)?;
            let prepare = bp.prepare().map_err(usage)?;
            let apps = bp.apps().map_err(usage)?;
            if prepare.is_none() && apps.is_empty() {
                return Err(usage(format!(
                    "{}: neither `network` nor `apps`",
                    blueprint.display()
                )));
            }
            if let Some(p) = prepare {
                jobs.push(req(
                    &sandbox,
                    &selector,
                    job_spec::Kind::PrepareNetwork(p),
                    bp.target(),
                ));
            }
            if !apps.is_empty() {
                jobs.push(req(
                    &sandbox,
                    &selector,
                    job_spec::Kind::DeploySandbox(DeploySandbox { apps }),
                    bp.target(),
                ));
            }
        }
        SandboxCmd::Power {
            state,
            sandbox,
            app,
            selector,
        } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::Power(PowerApps {
                apps: app,
                on: state == "on",
            }),
            None,
        )),
        SandboxCmd::Reboot {
            sandbox,
            app,
            cycle,
            selector,
        } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::Reboot(RebootApps {
                apps: app,
                power_cycle: cycle,
            }),
            None,
        )),
        SandboxCmd::Ips {
            sandbox,
            app,
            selector,
        } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::RefreshIp(RefreshIp { apps: app }),
            None,
        )),
        SandboxCmd::Details {
            sandbox,
            app,
            selector,
        } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::GetVmDetails(GetVmDetails { apps: app }),
            None,
        )),
        SandboxCmd::DeleteApp {
            app,
            sandbox,
            selector,
        } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::DeleteApp(DeleteApp { app }),
            None,
        )),
        SandboxCmd::Down { sandbox, selector } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::CleanupSandbox(CleanupSandbox {}),
            None,
        )),
        SandboxCmd::Run(args) => {
            let rc = args.run_command().map_err(usage)?;
            let mut r = req(
                &args.sandbox,
                &args.selector,
                job_spec::Kind::RunCommand(rc),
                None,
            );
            r.role = Role::Commands as i32;
            jobs.push(r);
        }
        SandboxCmd::Sweep {
            live,
            all_except_known,
            min_age,
            dry_run,
            selector,
        } => {
            if live.is_empty() && !all_except_known {
                return Err(usage(
                    "--live is missing: a sweep deletes every sandbox not named live. Name them (--live sb-1,sb-2), or give --all-except-known to keep only those the server knows are alive".into(),
                ));
            }
            if live.iter().any(|s| s.trim().is_empty()) {
                return Err(usage(
                    "--live holds an empty sandbox id (a stray comma?): a sweep deletes every sandbox not named, so the list must be exact".into(),
                ));
            }
            jobs.push(req(
                "",
                &selector,
                job_spec::Kind::SweepOrphans(SweepOrphans {
                    live_sandbox_ids: live,
                    dry_run,
                    no_live_sandboxes: all_except_known,
                    min_age_s: min_age.map(|d| d.as_secs()).unwrap_or(0),
                }),
                None,
            ))
        }
    }
    for r in jobs {
        let job = c
            .submit(r)
            .await
            .map_err(|s| {
                (
                    if s.code() == tonic::Code::InvalidArgument {
                        EXIT_USAGE
                    } else {
                        1
                    },
                    s.message().to_owned(),
                )
            })?
            .into_inner()
            .job
            .unwrap_or_default();
        let kind = es_proto::kinds::name(&job);
        if !json {
            println!("{kind} {}: job {}", job.sandbox_id, job.id);
        }
        let mut events = c
            .watch(WatchRequest {
                job_id: job.id.clone(),
                after_seq: 0,
            })
            .await
            .map_err(|s| (1, s.message().to_owned()))?
            .into_inner();
        while let Some(ev) = events
            .message()
            .await
            .map_err(|s| (1, s.message().to_owned()))?
        {
            if json {
                continue;
            }
            match ev.event {
                Some(job_event::Event::Progress(p)) => {
                    println!("  [{}/{}] {}", p.done, p.total, p.message)
                }
                Some(job_event::Event::Log(l)) => println!("  {l}"),
                _ => {}
            }
        }
        let done = c
            .get(GetRequest {
                job_id: job.id.clone(),
            })
            .await
            .map_err(|s| (1, s.message().to_owned()))?
            .into_inner();
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&job_json(&done)).unwrap_or_default()
            );
        } else {
            print_result(&done);
        }
        if done.state != JobState::Succeeded as i32 {
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_result(j: &Job) {
    let Some(r) = &j.result else { return };
    let st = state_name(j.state);
    if r.error.is_empty() {
        println!("  {st}: {}", r.output);
    } else {
        println!("  {st}: {}", r.error);
    }
    if let Some(cm) = &r.commands {
        print_commands(cm);
    }
    let Some(sh) = &r.shells else { return };
    match &sh.result {
        Some(shells_result::Result::Apps(a)) => {
            println!(
                "  {:<16} {:<10} {:<21} {:<32} {:<15} ERROR",
                "APP", "STATE", "INSTANCE", "PRIVATE IPS", "PUBLIC IP"
            );
            for x in &a.apps {
                println!(
                    "  {:<16} {:<10} {:<21} {:<32} {:<15} {}",
                    x.name,
                    x.state,
                    x.instance_id,
                    x.private_ips.join(","),
                    x.public_ip,
                    x.error
                );
            }
        }
        Some(shells_result::Result::Deleted(d)) if !d.resources.is_empty() => {
            println!(
                "  {:<24} {:<40} {:<14} {:<14} ERROR",
                "KIND", "ID", "SANDBOX", "OUTCOME"
            );
            for x in &d.resources {
                println!(
                    "  {:<24} {:<40} {:<14} {:<14} {}",
                    x.kind, x.id, x.sandbox_id, x.outcome, x.error
                );
            }
        }
        Some(shells_result::Result::Network(n)) => {
            println!(
                "  vpc {}  sandbox sg {}  isolated sg {}",
                n.vpc_id, n.sandbox_security_group_id, n.isolated_security_group_id
            );
            for s in &n.subnets {
                println!("  subnet {:<12} {:<26} {}", s.name, s.subnet_id, s.cidr);
            }
            if !n.peering_connection_id.is_empty() {
                println!(
                    "  peering {}  internet gateway {}",
                    n.peering_connection_id,
                    if n.internet_gateway_id.is_empty() {
                        "-"
                    } else {
                        &n.internet_gateway_id
                    }
                );
            }
        }
        _ => {}
    }
    if !sh.api_calls.is_empty() {
        let mut calls: Vec<(&String, &u64)> = sh.api_calls.iter().collect();
        calls.sort();
        let total: u64 = calls.iter().map(|(_, n)| **n).sum();
        let list: Vec<String> = calls.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("  EC2 calls: {total} ({})", list.join(", "));
    }
}

fn print_commands(cm: &CommandsResult) {
    println!(
        "  {:<16} {:<21} {:<20} {:>5}  REASON",
        "APP", "INSTANCE", "STATUS", "EXIT"
    );
    for o in &cm.instances {
        let status = CommandStatus::try_from(o.status)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("COMMAND_STATUS_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        println!(
            "  {:<16} {:<21} {:<20} {:>5}  {}",
            o.app,
            o.instance_id,
            status,
            if o.exit_code >= 0 {
                o.exit_code.to_string()
            } else {
                "-".into()
            },
            o.reason
        );
    }
    for o in &cm.instances {
        for (name, text, cut, url) in [
            ("stdout", &o.stdout, o.stdout_truncated, &o.stdout_url),
            ("stderr", &o.stderr, o.stderr_truncated, &o.stderr_url),
        ] {
            if text.is_empty() {
                continue;
            }
            println!("  ---- {} {} {name} ----", o.app, o.instance_id);
            for line in text.lines() {
                println!("  | {line}");
            }
            if cut {
                let full = if url.is_empty() {
                    "set an output bucket for the full text".to_owned()
                } else {
                    format!("full text: {url}")
                };
                println!("  (truncated; {full})");
            }
        }
    }
}
