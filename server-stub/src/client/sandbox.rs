//! `es-server sandbox ...`: the es-shells jobs from the command line. `up` takes a blueprint
//! (YAML or JSON), prepares the network and deploys the apps, showing per-app progress and a
//! summary table; `power`, `reboot`, `ips`, `details`, `delete-app`, `down` and `sweep` act on a
//! sandbox; `access-key` saves its key pair's private key (secrets.rs); `run` runs a script on
//! its instances (es-commands, SSM or SSH; flags in run_args.rs) and prints each one's output.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use es_proto::v1::*;

use super::args::ClientOpts;
use super::blueprint::Blueprint;
use super::conn::{Client, EXIT_USAGE};
use super::render::{job_json, state_name};
use super::sandbox_args::SandboxCmd;

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
    opts: &ClientOpts,
    c: &mut Client,
    cmd: SandboxCmd,
) -> Result<ExitCode, (u8, String)> {
    let json = opts.json;
    let usage = |m: String| (EXIT_USAGE, m);
    let mut jobs = Vec::new();
    // GetAccessKey: the one-time key its answer is sealed to, and where the key goes.
    let mut key_out: Option<(es_proto::sealed::Opener, PathBuf)> = None;
    let password_opener = es_proto::sealed::Opener::new();
    match cmd {
        SandboxCmd::Up {
            blueprint,
            sandbox,
            selector,
        } => {
            let bp = Blueprint::load(&blueprint).map_err(usage)?;
            let prepare = bp.prepare().map_err(usage)?;
            let apps = bp.apps().map_err(usage)?;
            // Windows passwords are sealed to this command and written next to it.
            let wait_password = apps.iter().any(|a| a.wait_password);
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
                    job_spec::Kind::DeploySandbox(DeploySandbox {
                        recipient: if wait_password {
                            password_opener.recipient()
                        } else {
                            Vec::new()
                        },
                        apps,
                    }),
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
        SandboxCmd::Tag {
            tags,
            sandbox,
            app,
            selector,
        } => {
            let mut map = std::collections::HashMap::new();
            for kv in tags {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| usage(format!("{kv:?}: expected KEY=VALUE")))?;
                map.insert(k.to_owned(), v.to_owned());
            }
            jobs.push(req(
                &sandbox,
                &selector,
                job_spec::Kind::AddTags(AddTags {
                    apps: app,
                    tags: map,
                }),
                None,
            ))
        }
        SandboxCmd::Security {
            app,
            sandbox,
            port,
            isolated,
            selector,
        } => {
            let inbound = port
                .iter()
                .map(|p| port_rule(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(usage)?;
            jobs.push(req(
                &sandbox,
                &selector,
                job_spec::Kind::UpdateAppSecurity(UpdateAppSecurity {
                    app,
                    inbound,
                    isolated,
                }),
                None,
            ))
        }
        SandboxCmd::Snapshot {
            app,
            sandbox,
            name,
            image,
            keep,
            selector,
        } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::Snapshot(Snapshot {
                app,
                name,
                image,
                keep,
            }),
            None,
        )),
        SandboxCmd::Snapshots {
            sandbox,
            app,
            selector,
        } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::ListSnapshots(ListSnapshots { apps: app }),
            None,
        )),
        SandboxCmd::Restore {
            app,
            sandbox,
            name,
            selector,
        } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::RestoreSnapshot(RestoreSnapshot { app, name }),
            None,
        )),
        SandboxCmd::Console {
            app,
            sandbox,
            latest,
            selector,
        } => jobs.push(req(
            &sandbox,
            &selector,
            job_spec::Kind::ConsoleOutput(GetConsoleOutput { app, latest }),
            None,
        )),
        SandboxCmd::AccessKey {
            sandbox,
            out,
            selector,
        } => {
            let opener = es_proto::sealed::Opener::new();
            jobs.push(req(
                &sandbox,
                &selector,
                job_spec::Kind::GetAccessKey(GetAccessKey {
                    recipient: opener.recipient(),
                }),
                None,
            ));
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{sandbox}.key")));
            if out.exists() {
                return Err(usage(format!(
                    "{} exists; a key file is never overwritten: remove it, or give --out",
                    out.display()
                )));
            }
            key_out = Some((opener, out));
        }
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
            .into_inner();
        for w in &job.warnings {
            eprintln!("es-server: warning: {w}");
        }
        let job = job.job.unwrap_or_default();
        let kind = es_proto::kinds::name(&job);
        if !json {
            println!("{kind} {}: job {}", job.sandbox_id, job.id);
        }
        // Its progress, across server restarts (follow.rs).
        super::follow::follow(opts, c, &job.id, |ev| {
            if json {
                return;
            }
            match &ev.event {
                Some(job_event::Event::Progress(p)) => {
                    println!("  [{}/{}] {}", p.done, p.total, p.message)
                }
                Some(job_event::Event::Log(l)) => println!("  {l}"),
                _ => {}
            }
        })
        .await
        .map_err(|e| (e.code, e.message))?;
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
        for line in super::secrets::save_passwords(&done, &password_opener, Path::new("."))? {
            if !json {
                println!("  {line}");
            }
        }
        if let Some((opener, out)) = &key_out {
            let line = super::secrets::save(&done, opener, out)?;
            if !json {
                println!("  {line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--port PROTO:PORT[-PORT][:CIDR]` (icmp takes no port: `icmp` or `icmp:CIDR`).
fn port_rule(spec: &str) -> Result<PortRule, String> {
    let bad = || {
        format!("--port {spec:?}: expected PROTO:PORT[-PORT][:CIDR], e.g. tcp:443, udp:8000-8100:10.0.0.0/8, icmp")
    };
    let mut parts = spec.splitn(3, ':');
    let protocol = parts.next().unwrap_or_default().to_ascii_lowercase();
    if protocol == "icmp" {
        let cidr = parts.collect::<Vec<_>>().join(":");
        return Ok(PortRule {
            protocol,
            from_port: 0,
            to_port: 0,
            cidr,
        });
    }
    let ports = parts.next().ok_or_else(bad)?;
    let (from, to) = ports.split_once('-').unwrap_or((ports, ports));
    Ok(PortRule {
        protocol,
        from_port: from.parse().map_err(|_| bad())?,
        to_port: to.parse().map_err(|_| bad())?,
        cidr: parts.next().unwrap_or_default().to_owned(),
    })
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
                    if x.lifecycle == "spot" {
                        format!("{} spot", x.state)
                    } else {
                        x.state.clone()
                    },
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
        Some(shells_result::Result::Snapshots(l)) => {
            println!(
                "  {:<24} {:<12} {:<28} {:<9} {:<12} {:<10} KEPT",
                "ID", "APP", "SET", "KIND", "DEVICE", "STATE"
            );
            for x in &l.snapshots {
                println!(
                    "  {:<24} {:<12} {:<28} {:<9} {:<12} {:<10} {}",
                    x.id,
                    x.app,
                    x.name,
                    x.kind,
                    x.device,
                    x.state,
                    if x.kept { "yes" } else { "" }
                );
            }
        }
        Some(shells_result::Result::Console(c)) => {
            if c.truncated {
                println!("  (the newest 64 KiB)");
            }
            for line in c.output.lines() {
                println!("  | {line}");
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
            if !n.key_pair_name.is_empty() {
                println!(
                    "  key pair {} (private key in SSM {}; `sandbox access-key` saves it)",
                    n.key_pair_name, n.key_parameter
                );
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
        println!("  AWS calls: {total} ({})", list.join(", "));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_flags() {
        let r = port_rule("tcp:443").unwrap();
        assert_eq!(
            (r.protocol.as_str(), r.from_port, r.to_port, r.cidr.as_str()),
            ("tcp", 443, 443, "")
        );
        let r = port_rule("udp:8000-8100:10.0.0.0/8").unwrap();
        assert_eq!(
            (r.from_port, r.to_port, r.cidr.as_str()),
            (8000, 8100, "10.0.0.0/8")
        );
        assert_eq!(port_rule("icmp").unwrap().protocol, "icmp");
        assert_eq!(port_rule("icmp:10.0.0.0/16").unwrap().cidr, "10.0.0.0/16");
        for bad in ["tcp", "tcp:https", "tcp:1-x"] {
            assert!(port_rule(bad).unwrap_err().contains("PROTO:PORT"), "{bad}");
        }
    }
}
