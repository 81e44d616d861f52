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
        "{:>5}  {:>16} {:>16} {:>16}  {:>7}  {:>9}  {:>7} {:>7}  {:>9}",
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
    for (i, &n) in args.apps.iter().enumerate() {
        let sb = format!("bench-{n}");
        let throttled_before = stats.throttled_total();
        let submit_wait = |kind: job_spec::Kind| {
            let mut c = c.clone();
            let sb = sb.clone();
            async move {
                let req = SubmitRequest {
                    role: role("shells"),
                    sandbox_id: sb,
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
        };
        let octet = 100 + i;
        // Call counts come from the proxy (the agent is its only client and jobs run one at a
        // time), checked against the agent's own counter; chains from the proxy's spans.
        let proxied = || stats.calls().values().sum::<u64>();
        let spans_at = || stats.spans.lock().unwrap().len();
        let chain_since = |at: usize| ec2proxy::longest_chain(&stats.spans.lock().unwrap()[at..]);
        let (p0, s0) = (proxied(), spans_at());
        let prepare = submit_wait(job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
            key_type: String::new(),
            amis: vec![],
            mode: NetworkMode::Dedicated as i32,
            vpc_cidr: format!("10.{octet}.0.0/16"),
            subnets: vec![
                SubnetRequest {
                    name: "web".into(),
                    cidr: format!("10.{octet}.0.0/24"),
                    public: true,
                    availability_zone: String::new(),
                },
                SubnetRequest {
                    name: "app".into(),
                    cidr: format!("10.{octet}.4.0/22"),
                    public: false,
                    availability_zone: String::new(),
                },
            ],
            management: Some(ManagementNetwork {
                vpc_id: mgmt_vpc.clone(),
                cidr: "10.0.0.0/16".into(),
                route_table_ids: vec![mgmt_rt.clone()],
            }),
            shared: None,
        }))
        .await;
        let prepare_chain = chain_since(s0);
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
        let (p1, s1) = (proxied(), spans_at());
        let deploy = submit_wait(job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps,
        }))
        .await;
        let deploy_chain = chain_since(s1);
        let (p2, s2) = (proxied(), spans_at());
        let cleanup = submit_wait(job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await;
        let cleanup_chain = chain_since(s2);
        let p3 = proxied();
        let (prepare_calls, deploy_calls, cleanup_calls) = (p1 - p0, p2 - p1, p3 - p2);
        let (agent_deploy_calls, per_op) = calls(&deploy);
        for (what, proxy, agent) in [
            ("prepare", prepare_calls, calls(&prepare).0),
            ("deploy", deploy_calls, agent_deploy_calls),
            ("cleanup", cleanup_calls, calls(&cleanup).0),
        ] {
            assert_eq!(
                proxy, agent,
                "{what} of {n}: the proxy saw {proxy} calls, the agent counted {agent}"
            );
        }
        let cell = |j: &Job, chain: &[String]| {
            let ratio = secs(j) / (chain.len() as f64 * latency.as_secs_f64());
            format!("{:.2}/{} ({:.2}x)", secs(j), chain.len(), ratio)
        };
        println!(
            "{:>5}  {:>16} {:>16} {:>16}  {:>7.2}  {:>9.2}  {:>7} {:>7}  {:>9}",
            n,
            cell(&prepare, &prepare_chain),
            cell(&deploy, &deploy_chain),
            cell(&cleanup, &cleanup_chain),
            secs(&prepare) + secs(&deploy) + secs(&cleanup),
            deploy_calls as f64 / n as f64,
            prepare_calls,
            cleanup_calls,
            stats.throttled_total() - throttled_before
        );
        if first_chains.is_empty() {
            first_chains = vec![
                ("prepare", prepare_chain),
                ("deploy", deploy_chain),
                ("cleanup", cleanup_chain),
            ];
        }
        let mut ops: Vec<_> = per_op.into_iter().collect();
        ops.sort();
        eprintln!("  deploy of {n}: {ops:?}");
        {
            // Where the time went: the span from the job's first call to its last, and the sum
            // of the calls' own durations at the proxy (latency included).
            let spans = stats.spans.lock().unwrap();
            for (what, range) in [
                ("prepare", s0..s1),
                ("deploy", s1..s2),
                ("cleanup", s2..spans.len()),
            ] {
                let v = &spans[range];
                let first = v.iter().map(|x| x.start).min();
                let last = v.iter().map(|x| x.end).max();
                let busy: f64 = v.iter().map(|x| (x.end - x.start).as_secs_f64()).sum();
                if let (Some(a), Some(b)) = (first, last) {
                    eprintln!(
                        "  {what} of {n}: first call to last answer {:.3} s, calls' own time {:.3} s over {} calls",
                        (b - a).as_secs_f64(),
                        busy,
                        v.len()
                    );
                }
            }
        }
        let left = tagged_resources(&ec2, &sb).await;
        assert!(left.is_empty(), "left behind by the cleanup: {left:?}");
    }
    println!();
    for (what, chain) in &first_chains {
        println!(
            "{what} chain ({} calls): {}",
            chain.len(),
            chain.join(" → ")
        );
    }
    println!();
    println!(
        "s/chain (ratio) = the job's time / the longest run of its calls that followed one another \
         (each sent after the previous was answered, at the proxy) (time / (chain x {} ms)); \
         prep., clean. = calls of prepare and cleanup; calls through the proxy: {}",
        args.latency_ms,
        stats.calls().values().sum::<u64>()
    );
}
