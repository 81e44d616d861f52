//! es-commands benchmark.
//!
//! 1. SSM fan-out of one command to 255 targets: the agent's SSM adapter (`run_ssm`) with the
//!    real SDK client answered by the SDK's own test utilities (`aws-smithy-mocks`; moto's SSM
//!    executes nothing). Each simulated instance finishes 2 to 20 s after SendCommand. Prints the
//!    calls made per API, the busiest second of ListCommandInvocations, and how long after the
//!    last instance finished its result was in.
//! 2. SSH fan-out to 50 real sshd servers (127.0.0.101..150, one agent, one job): the job's wall
//!    time against its slowest single target (key push + connect + auth + run).
//!
//! Build and run (release):
//!   cargo build --release --workspace --bins && target/release/es-bench-commands

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ssm::operation::describe_instance_information::DescribeInstanceInformationOutput;
use aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput;
use aws_sdk_ssm::operation::list_command_invocations::ListCommandInvocationsOutput;
use aws_sdk_ssm::operation::send_command::SendCommandOutput;
use aws_sdk_ssm::types::{
    Command, CommandInvocation, CommandInvocationStatus, CommandPlugin, InstanceInformation,
    PingStatus,
};
use aws_smithy_mocks::{mock, MockResponseInterceptor, RuleMode};
use clap::Parser;
use es_agent::commands::{run_ssm, OutputCaps, PollPace, Reporter, Scrubber, SsmClients, Target};
use es_agent::executor::JobCtx;
use es_proto::v1::*;
use es_tests::*;

#[derive(Parser, Debug)]
#[command(about = "es-commands fan-out benchmark: SSM API calls for 255 targets, SSH to 50 sshd")]
struct Args {
    #[arg(long)]
    server_bin: Option<PathBuf>,
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// SSM targets.
    #[arg(long, default_value_t = 255)]
    ssm_targets: usize,
    /// sshd targets.
    #[arg(long, default_value_t = 50)]
    ssh_targets: usize,
    /// SSH trials.
    #[arg(long, default_value_t = 3)]
    trials: usize,
}

#[derive(Default)]
struct Log {
    calls: HashMap<&'static str, u64>,
    list_at: Vec<Instant>,
}

async fn ssm_fanout(n: usize) {
    let log = Arc::new(Mutex::new(Log::default()));
    let sent_at = Arc::new(Mutex::new(HashMap::<String, (Instant, Vec<String>)>::new()));
    // Finish times: instance i finishes 2 + (i * 7919 % 180) / 10 s after its SendCommand.
    let finish = |id: &str| {
        let i: u64 = id.trim_start_matches("i-").parse().unwrap_or(0);
        Duration::from_millis(2000 + (i * 7919 % 180) * 100)
    };
    let l = log.clone();
    let describe =
        mock!(aws_sdk_ssm::Client::describe_instance_information).then_compute_output(move |r| {
            *l.lock()
                .unwrap()
                .calls
                .entry("DescribeInstanceInformation")
                .or_default() += 1;
            let ids = r
                .filters()
                .first()
                .map(|f| f.values().to_vec())
                .unwrap_or_default();
            DescribeInstanceInformationOutput::builder()
                .set_instance_information_list(Some(
                    ids.iter()
                        .map(|id| {
                            InstanceInformation::builder()
                                .instance_id(id)
                                .ping_status(PingStatus::Online)
                                .build()
                        })
                        .collect(),
                ))
                .build()
        });
    let (l, s) = (log.clone(), sent_at.clone());
    let send = mock!(aws_sdk_ssm::Client::send_command).then_compute_output(move |r| {
        *l.lock().unwrap().calls.entry("SendCommand").or_default() += 1;
        let mut s = s.lock().unwrap();
        let id = format!("cmd-{}", s.len() + 1);
        s.insert(id.clone(), (Instant::now(), r.instance_ids().to_vec()));
        SendCommandOutput::builder()
            .command(Command::builder().command_id(id).build())
            .build()
    });
    let (l, s) = (log.clone(), sent_at.clone());
    let list = mock!(aws_sdk_ssm::Client::list_command_invocations).then_compute_output(move |r| {
        {
            let mut l = l.lock().unwrap();
            *l.calls.entry("ListCommandInvocations").or_default() += 1;
            l.list_at.push(Instant::now());
        }
        let (at, ids) = s.lock().unwrap()[r.command_id().unwrap()].clone();
        let start: usize = r.next_token().and_then(|t| t.parse().ok()).unwrap_or(0);
        let page = &ids[start..(start + 50).min(ids.len())];
        let next = (start + 50 < ids.len()).then(|| (start + 50).to_string());
        ListCommandInvocationsOutput::builder()
            .set_command_invocations(Some(
                page.iter()
                    .map(|id| {
                        let done = at.elapsed() >= finish(id);
                        CommandInvocation::builder()
                            .instance_id(id)
                            .status(if done {
                                CommandInvocationStatus::Success
                            } else {
                                CommandInvocationStatus::InProgress
                            })
                            .status_details(if done { "Success" } else { "InProgress" })
                            .command_plugins(
                                CommandPlugin::builder()
                                    .response_code(if done { 0 } else { -1 })
                                    .build(),
                            )
                            .build()
                    })
                    .collect(),
            ))
            .set_next_token(next)
            .build()
    });
    let l = log.clone();
    let get = mock!(aws_sdk_ssm::Client::get_command_invocation).then_compute_output(move |_| {
        *l.lock()
            .unwrap()
            .calls
            .entry("GetCommandInvocation")
            .or_default() += 1;
        GetCommandInvocationOutput::builder()
            .standard_output_content("ok\n")
            .build()
    });
    let interceptor = MockResponseInterceptor::new()
        .rule_mode(RuleMode::MatchAny)
        .with_rule(&describe)
        .with_rule(&send)
        .with_rule(&list)
        .with_rule(&get);
    let conf = aws_sdk_ssm::config::Builder::new()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ssm::config::Credentials::new(
            "bench", "bench", None, None, "bench",
        ))
        .http_client(aws_smithy_mocks::create_mock_http_client())
        .interceptor(interceptor)
        .build();
    let ssm = aws_sdk_ssm::Client::from_conf(conf);
    let targets: Vec<Target> = (0..n)
        .map(|i| Target {
            instance_id: format!("i-{i:017}"),
            app: format!("app-{i}"),
            private_ip: String::new(),
        })
        .collect();
    let rc = RunCommand {
        script: "uptime".into(),
        ..Default::default()
    };
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = JobCtx::new(tx);
    let scrub = Scrubber::new(&rc);
    let rep = Reporter::new(&ctx, &scrub, n);
    let started = Instant::now();
    let (outs, cmds) = run_ssm(
        &SsmClients {
            ssm: &ssm,
            s3: None,
        },
        &Job {
            id: "bench".into(),
            attempt: 1,
            ..Default::default()
        },
        &rc,
        &targets,
        OutputCaps::new(n, false),
        &rep,
        &ctx.cancel,
        PollPace::default(),
    )
    .await
    .expect("run_ssm");
    let took = started.elapsed();
    assert_eq!(outs.len(), n);
    assert!(outs
        .iter()
        .all(|o| o.status == CommandStatus::Success as i32));
    let slowest = targets
        .iter()
        .map(|t| finish(&t.instance_id))
        .max()
        .unwrap();
    let log = log.lock().unwrap();
    // Busiest 1-second window of ListCommandInvocations.
    let mut busiest = 0;
    for (i, t) in log.list_at.iter().enumerate() {
        let n = log.list_at[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        busiest = busiest.max(n);
    }
    let mut calls: Vec<_> = log.calls.iter().collect();
    calls.sort();
    println!("SSM fan-out to {n} targets ({} commands):", cmds.len());
    for (op, c) in calls {
        println!("  {op:<28} {c:>5} calls");
    }
    println!(
        "  busiest second of ListCommandInvocations: {busiest} calls; polling rounds 1 s apart, growing x1.5 to 10 s"
    );
    println!(
        "  all results in {:.1} s after SendCommand; the slowest instance finished at {:.1} s (lag {:.1} s)",
        took.as_secs_f64(),
        slowest.as_secs_f64(),
        took.as_secs_f64() - slowest.as_secs_f64()
    );
}

async fn ssh_fanout(args: &Args) {
    let bins = Bins::beside_current_exe(args.server_bin.clone(), args.agent_bin.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(
        &bins,
        dir.path(),
        &dir.path().join("es.db"),
        "127.0.0.1:0",
        &[],
    );
    let n = args.ssh_targets;
    let sb = "sb-bench";
    let fleet = sshd::start_fleet(&bins, dir.path(), &server.url(), sb, n, 101, 1).await;
    let mut c = server.client().await;
    wait_healthy(&mut c, &["es-commands"]).await;
    let last = format!("127.0.0.{}", 100 + n);
    // Every target sleeps 1 s, the last one 2 s: the slowest single target is known.
    let script = format!(
        "case \"$SSH_CONNECTION\" in *\" {last} \"*) sleep 2;; *) sleep 1;; esac\necho done\n"
    );
    println!("SSH fan-out to {n} real sshd targets (one job, max_concurrency {n}):");
    let mut ratios = Vec::new();
    for trial in 1..=args.trials {
        let mut rc = fleet.ssh_job(&script);
        rc.max_concurrency = n.to_string();
        let j = submit(&mut c, commands_req(sb, rc)).await;
        let j = wait_done(&mut c, &j.id, Duration::from_secs(120)).await;
        assert_eq!(j.state, JobState::Succeeded as i32, "{:?}", j.result);
        let outs = &j
            .result
            .as_ref()
            .unwrap()
            .commands
            .as_ref()
            .unwrap()
            .instances;
        assert_eq!(outs.len(), n);
        let per: Vec<f64> = outs
            .iter()
            .map(|o| (o.finished_at_us - o.started_at_us) as f64 / 1e6)
            .collect();
        let slowest = per.iter().cloned().fold(0.0, f64::max);
        let fastest = per.iter().cloned().fold(f64::MAX, f64::min);
        let wall = (j.finished_at_us - j.started_at_us) as f64 / 1e6;
        println!(
            "  trial {trial}: wall {wall:.2} s, slowest target {slowest:.2} s (fastest {fastest:.2} s), ratio {:.2}",
            wall / slowest
        );
        ratios.push(wall / slowest);
    }
    // The slowest target alone (the 2 s one), for comparison: what 50 at once cost on this machine.
    let mut rc = fleet.ssh_job(&script);
    rc.apps = vec![format!("app-{}", n - 1)];
    let j = submit(&mut c, commands_req(sb, rc)).await;
    let j = wait_done(&mut c, &j.id, Duration::from_secs(60)).await;
    assert_eq!(j.state, JobState::Succeeded as i32, "{:?}", j.result);
    println!(
        "  the 2 s target alone: wall {:.2} s",
        (j.finished_at_us - j.started_at_us) as f64 / 1e6
    );
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "  median wall / slowest target: {:.2}",
        ratios[ratios.len() / 2]
    );
    drop(fleet);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    ssm_fanout(args.ssm_targets).await;
    ssh_fanout(&args).await;
}
