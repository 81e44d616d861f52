//! `es-server sandbox ...`: the es-shells jobs from the command line. `up` takes a blueprint
//! (YAML or JSON), prepares the network and deploys the apps, showing per-app progress and a
//! summary table; `power`, `ips`, `details`, `delete-app`, `down` and `sweep` act on a sandbox.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use es_proto::v1::job_service_client::JobServiceClient;
use es_proto::v1::*;
use tonic::transport::Channel;

use crate::blueprint::Blueprint;
use crate::cli::{job_json, state_name};

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
    /// Delete resources tagged with any sandbox not in --live (--dry-run lists them).
    Sweep {
        #[arg(long, value_delimiter = ',')]
        live: Vec<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "")]
        selector: String,
    },
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
pub async fn run(
    c: &mut JobServiceClient<Channel>,
    cmd: SandboxCmd,
    json: bool,
) -> Result<ExitCode, (u8, String)> {
    let usage = |m: String| (crate::cli::EXIT_USAGE, m);
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
        SandboxCmd::Sweep {
            live,
            dry_run,
            selector,
        } => jobs.push(req(
            "",
            &selector,
            job_spec::Kind::SweepOrphans(SweepOrphans {
                live_sandbox_ids: live,
                dry_run,
            }),
            None,
        )),
    }
    for r in jobs {
        let job = c
            .submit(r)
            .await
            .map_err(|s| {
                (
                    if s.code() == tonic::Code::InvalidArgument {
                        crate::cli::EXIT_USAGE
                    } else {
                        1
                    },
                    s.message().to_owned(),
                )
            })?
            .into_inner()
            .job
            .unwrap_or_default();
        let kind = crate::cli::kind_name(&job);
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
