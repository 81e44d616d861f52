//! es-shells benchmark: a real es-server and es-shells agent, with moto behind a proxy that
//! adds a fixed latency per EC2 call and enforces EC2-style token buckets (tests/src/ec2proxy.rs),
//! so the run behaves like a region. Dedicated mode, two subnets (one public), N apps (10, 50,
//! 255) with inbound ports 80 and 443. For each of prepare, deploy and cleanup it reports the
//! time, the calls, and the time against its critical path: the longest chain of calls that
//! followed one another (measured at the proxy) x latency; the chains of the first run are
//! printed call by call.
//!
//!   cargo build --release --workspace --bins && target/release/es-bench-shells

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use es_proto::v1::*;
use es_tests::*;

#[derive(Parser, Debug)]
#[command(about = "es-shells benchmark against moto behind a latency + token-bucket proxy")]
struct Args {
    #[arg(long)]
    server_bin: Option<PathBuf>,
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Latency added to every EC2 call (ms).
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// App counts to deploy.
    #[arg(long, value_delimiter = ',', default_value = "10,50,255")]
    apps: Vec<usize>,
    /// Concurrent EC2 calls per job (agent's aws_concurrency).
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
}

/// The calls a job reports it made (attempts, by operation).
fn calls(j: &Job) -> (u64, std::collections::HashMap<String, u64>) {
    let m = j
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .map(|s| s.api_calls.clone())
        .unwrap_or_default();
    (m.values().sum(), m)
}

fn secs(j: &Job) -> f64 {
    (j.finished_at_us - j.started_at_us) as f64 / 1e6
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bins = Bins::beside_current_exe(args.server_bin.clone(), args.agent_bin.clone());
    let dir = tempfile::tempdir().unwrap();
    let moto = start_moto(dir.path());
    let latency = Duration::from_millis(args.latency_ms);
    let (proxy_url, stats) = ec2proxy::start(
        &moto.url,
        ec2proxy::ProxyConfig {
            latency,
            buckets: true,
            ..Default::default()
        },
    )
    .await;
    let ec2 = moto.ec2().await;
    let (mgmt_vpc, mgmt_rt) = moto.management_vpc().await;

    let server = start_server(
        &bins,
        dir.path(),
        &dir.path().join("es.db"),
        "127.0.0.1:0",
        &[],
    );
    let spec = AgentSpec::new("es-shells", "shells")
        .slots(4)
        .env("ES_AGENT_AWS_CONCURRENCY", &args.concurrency.to_string());
    let mut spec = moto.agent_env(spec);
    // The agent talks to the proxy, not to moto.
    spec.env.retain(|(k, _)| k != "ES_AGENT_AWS_ENDPOINT_URL");
    spec.env
        .push(("ES_AGENT_AWS_ENDPOINT_URL".into(), proxy_url.clone()));
    let _agent = start_agent(&bins, dir.path(), &server.url(), &spec);
    let mut c = server.client().await;
    wait_healthy(&mut c, &["es-shells"]).await;

    println!(
        "es-bench-shells: moto behind a proxy adding {} ms per EC2 call, EC2 token buckets on; agent aws_concurrency={}",
        args.latency_ms, args.concurrency
    );
    println!();
    println!(
        "{:>5}  {:>28} {:>28} {:>28}  {:>13}  {:>9}  {:>5} {:>6}  {:>9}",
        "apps",
        "prepare s/chain",
        "deploy s/chain",
        "cleanup s/chain",
        "total s",
        "calls/app",
        "prep.",
        "clean.",
        "throttled"
    );
    let mut first_chains: Vec<(&str, Vec<String>)> = Vec::new();
    let b = Bench {
        c: &c,
        stats: &stats,
        mgmt_vpc: &mgmt_vpc,
        mgmt_rt: &mgmt_rt,
        ec2: &ec2,
    };
    for (i, &n) in args.apps.iter().enumerate() {
        let throttled_before = stats.throttled_total();
        // The same lifecycle with no added latency first: the emulator's own time, which the
        // ratios subtract (it serves calls one at a time; EC2 does not).
        *stats.latency_override.lock().unwrap() = Some(Duration::ZERO);
        let base = b.lifecycle(n, &format!("base-{n}"), 200 - 2 * i).await;
        *stats.latency_override.lock().unwrap() = None;
        let run = b.lifecycle(n, &format!("bench-{n}"), 100 + i).await;
        let cell = |k: usize| {
            let (t, t0, chain) = (run.secs[k], base.secs[k], run.chains[k].len() as f64);
            let path = chain * latency.as_secs_f64();
            format!(
                "{t:.2}/{chain} ({:.2}x; {t0:.2}; {:.2}x)",
                t / path,
                t / path.max(t0)
            )
        };
        let total: f64 = run.secs.iter().sum();
        let total0: f64 = base.secs.iter().sum();
        println!(
            "{:>5}  {:>28} {:>28} {:>28}  {:>13}  {:>9.2}  {:>5} {:>6}  {:>9}",
            n,
            cell(0),
            cell(1),
            cell(2),
            format!("{total:.2} ({total0:.2})"),
            run.calls[1] as f64 / n as f64,
            run.calls[0],
            run.calls[2],
            stats.throttled_total() - throttled_before
        );
        if first_chains.is_empty() {
            first_chains = ["prepare", "deploy", "cleanup"]
                .into_iter()
                .zip(run.chains)
                .collect();
        }
    }
    println!();
    for (what, chain) in &first_chains {
        println!(
            "{what} chain ({} calls): {}",
            chain.len(),
            chain.join(" → ")
        );
    }
    println!(
        "s/chain (r; t0; b) = the job's time in s / the longest run of its calls that followed one \
         another (each sent after the previous was answered, at the proxy); r = time / (chain x {} \
         ms); t0 = the same job with no added latency (the emulator's own time: it serves calls \
         one at a time); b = time / the larger of the two. prep., clean. = calls of prepare and \
         cleanup; calls through the proxy: {}",
        args.latency_ms,
        stats.calls().values().sum::<u64>()
    );
}

struct Bench<'a> {
    c: &'a es_proto::v1::job_service_client::JobServiceClient<tonic::transport::Channel>,
    stats: &'a ec2proxy::ProxyStats,
    mgmt_vpc: &'a str,
    mgmt_rt: &'a str,
    ec2: &'a aws_sdk_ec2::Client,
}

/// One lifecycle's figures, in the order prepare, deploy, cleanup.
struct Run {
    secs: [f64; 3],
    chains: [Vec<String>; 3],
    calls: [u64; 3],
}

impl Bench<'_> {
    async fn submit_wait(&self, sb: &str, kind: job_spec::Kind) -> Job {
        let mut c = self.c.clone();
        let req = SubmitRequest {
            role: role("shells"),
            sandbox_id: sb.into(),
            spec: Some(JobSpec {
                kind: Some(kind),
                target: None,
            }),
            ..Default::default()
        };
        let j = submit(&mut c, req).await;
        let j = wait_done(&mut c, &j.id, Duration::from_secs(1800)).await;
        assert_eq!(j.state, JobState::Succeeded as i32, "{:?}", j.result);
        j
    }

    /// Prepare (dedicated, a public and a private subnet), deploy `n` apps with ports 80 and
    /// 443, clean up; checks the proxy's call counts against the agent's and that nothing
    /// tagged is left.
    async fn lifecycle(&self, n: usize, sb: &str, octet: usize) -> Run {
        let stats = self.stats;
        let proxied = || stats.calls().values().sum::<u64>();
        let spans_at = || stats.spans.lock().unwrap().len();
        let subnet = |name: &str, cidr: String, public: bool| SubnetRequest {
            name: name.into(),
            cidr,
            public,
            availability_zone: String::new(),
        };
        let prepare = job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
            mode: NetworkMode::Dedicated as i32,
            vpc_cidr: format!("10.{octet}.0.0/16"),
            subnets: vec![
                subnet("web", format!("10.{octet}.0.0/24"), true),
                subnet("app", format!("10.{octet}.4.0/22"), false),
            ],
            management: Some(ManagementNetwork {
                vpc_id: self.mgmt_vpc.into(),
                cidr: "10.0.0.0/16".into(),
                route_table_ids: vec![self.mgmt_rt.into()],
            }),
            ..Default::default()
        });
        let port = |p: u32| PortRule {
            protocol: "tcp".into(),
            from_port: p,
            to_port: p,
            cidr: String::new(),
        };
        let apps: Vec<AppSpec> = (0..n)
            .map(|k| AppSpec {
                name: format!("app-{k:03}"),
                ami: MOTO_AMI.into(),
                instance_type: "t3.micro".into(),
                subnets: vec!["app".into()],
                inbound: vec![port(80), port(443)],
                ..Default::default()
            })
            .collect();
        let kinds = [
            prepare,
            job_spec::Kind::DeploySandbox(DeploySandbox {
                recipient: vec![],
                apps,
            }),
            job_spec::Kind::CleanupSandbox(CleanupSandbox {}),
        ];
        let mut run = Run {
            secs: [0.0; 3],
            chains: Default::default(),
            calls: [0; 3],
        };
        for (k, kind) in kinds.into_iter().enumerate() {
            let (p0, s0) = (proxied(), spans_at());
            let j = self.submit_wait(sb, kind).await;
            run.secs[k] = secs(&j);
            run.chains[k] = ec2proxy::longest_chain(&stats.spans.lock().unwrap()[s0..]);
            run.calls[k] = proxied() - p0;
            let (agent, per_op) = calls(&j);
            // The agent counts attempts; one that timed out while waiting in its own pacing
            // (a large sandbox's burst of mutating calls) never reaches EC2.
            assert!(
                run.calls[k] <= agent,
                "job {k} of {sb}: the proxy saw {} calls, more than the {agent} the agent counted",
                run.calls[k]
            );
            if run.calls[k] < agent {
                println!(
                    "note: job {k} of {sb}: the agent counted {agent} attempts, EC2 saw {} (the rest timed out while paced)",
                    run.calls[k]
                );
            }
            let mut ops: Vec<_> = per_op.into_iter().collect();
            ops.sort();
            eprintln!("  {sb} job {k}: {ops:?}");
        }
        let left = tagged_resources(self.ec2, sb).await;
        assert!(left.is_empty(), "left behind by the cleanup: {left:?}");
        run
    }
}
