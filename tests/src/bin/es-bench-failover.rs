//! Failover benchmark: how long a job held by a primary that dies (`kill -9`) or hangs
//! (`SIGSTOP`) takes to run again on its fallback, with the server's default timings unless
//! told otherwise. One es-server, one fallback (es-shells-b) for the whole run, and a fresh
//! primary (es-shells) per trial; the fault lands at a random moment of the heartbeat cycle.
//!
//! Build and run (release):
//!   cargo build --release --workspace --bins && target/release/es-bench-failover
//!
//! The time is from the fault (taken just before the signal) to the fallback's lease
//! (`started_at_us` of the job, set by the server when the fallback acquires it).
//!
//! Then the leader-kill trials: two es-server replicas on one PostgreSQL database (a throwaway
//! local cluster, or `--db postgres://…`), an agent given both addresses; the leader is killed
//! with -9 and timed until the standby serves and until a new job runs on it (the agent has
//! moved over); the killed replica comes back as the standby for the next trial.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use es_proto::v1::*;
use es_tests::*;

#[derive(Parser, Debug)]
#[command(about = "failover time of a job from a killed or hung primary to its fallback")]
struct Args {
    /// es-server binary (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// es-agent binary (default: next to this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Trials per fault kind.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Extra `es-server serve` arguments (e.g. "--lease-ttl 3s"); default: the server's defaults.
    #[arg(long, allow_hyphen_values = true, num_args = 0..)]
    server_args: Vec<String>,
    /// Leader-kill trials (replicas on PostgreSQL); 0 skips them.
    #[arg(long, default_value_t = 20)]
    leader_trials: usize,
    /// PostgreSQL of the leader-kill trials (an empty database); unset: a throwaway cluster.
    #[arg(long)]
    db: Option<String>,
}

async fn serving(addr: std::net::SocketAddr) -> bool {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| {
            r.into_inner().status()
                == tonic_health::pb::health_check_response::ServingStatus::Serving
        })
}

/// Kills the leading replica, times the takeover; answers (ms until the standby serves, ms
/// until a new job runs on it) per trial.
async fn leader_kills(args: &Args, bins: &Bins, extra: &[&str]) -> Vec<(f64, f64)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut _cluster = None;
    let url = match &args.db {
        Some(u) => u.clone(),
        None => {
            let c = pg::Cluster::start();
            let u = c.create_db("es");
            _cluster = Some(c);
            u
        }
    };
    let start = |name: &str, leads: bool| {
        let s = start_server_on(
            bins,
            dir.path(),
            &url,
            &dir.path().join(name),
            "127.0.0.1:0",
            extra,
        );
        s.proc.wait_log(
            if leads {
                "leading the job store"
            } else {
                "standby: the leader is"
            },
            Duration::from_secs(30),
        );
        s
    };
    let mut replicas = [start("a", true), start("b", false)];
    // The agent is given both addresses for the whole run: each killed replica comes back on
    // its own address.
    let (addr_a, addr_b) = (replicas[0].addr, replicas[1].addr);
    let servers = format!("{},{}", replicas[0].url(), replicas[1].url());
    let _agent = start_agent(
        bins,
        dir.path(),
        &servers,
        &AgentSpec::new("es-commands-l", "commands"),
    );
    let mut leader = 0;
    let mut out = Vec::new();
    for trial in 0..args.leader_trials {
        let mut c = replicas[leader].client().await;
        wait_healthy(&mut c, &["es-commands-l"]).await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..1000))).await;
        let t0 = Instant::now();
        replicas[leader].proc.kill9();
        let next = 1 - leader;
        let until = Instant::now() + Duration::from_secs(60);
        while !serving(replicas[next].addr).await {
            assert!(Instant::now() < until, "no replica led within 60 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let serves = t0.elapsed().as_secs_f64() * 1000.0;
        let mut c = replicas[next].client().await;
        let job = submit(&mut c, submission("commands", echo("after the failover"))).await;
        let done = wait_done(&mut c, &job.id, Duration::from_secs(60)).await;
        assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
        let runs = t0.elapsed().as_secs_f64() * 1000.0;
        println!("leader kill trial {:>2}: serving after {serves:>6.0} ms, a new job done after {runs:>6.0} ms", trial + 1);
        out.push((serves, runs));
        // The killed one comes back, on its address, as the standby.
        let addr = if leader == 0 { addr_a } else { addr_b };
        let name = if leader == 0 { "a" } else { "b" };
        let back = start_server_on(
            bins,
            dir.path(),
            &url,
            &dir.path().join(name),
            &addr.to_string(),
            extra,
        );
        back.proc
            .wait_log("standby: the leader is", Duration::from_secs(30));
        replicas[leader] = back;
        leader = next;
    }
    out
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Hang,
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let bins = Bins::beside_current_exe(args.server_bin.clone(), args.agent_bin.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let extra: Vec<&str> = args.server_args.iter().map(String::as_str).collect();
    let server = start_server(
        &bins,
        dir.path(),
        &dir.path().join("es.db"),
        "127.0.0.1:0",
        &extra,
    );
    let url = server.url();
    let _fallback = start_agent(
        &bins,
        dir.path(),
        &url,
        &AgentSpec::new("es-shells-b", "shells").slots(4).fallback(),
    );
    let mut c = server.client().await;
    wait_healthy(&mut c, &["es-shells-b"]).await;
    // The timings in force, as the server itself logs them at start (not assumed defaults).
    let log = server.proc.log();
    let timings = log
        .lines()
        .find_map(|l| {
            l.split_once("; heartbeat ")
                .map(|(_, t)| format!("heartbeat {t}"))
        })
        .expect("the server logs its timings at start");
    println!(
        "server settings: {timings}{}",
        if extra.is_empty() {
            String::new()
        } else {
            format!(" (from {})", extra.join(" "))
        }
    );

    let faults: &[Fault] = if args.trials == 0 {
        &[]
    } else {
        &[Fault::Kill, Fault::Hang]
    };
    for &fault in faults {
        let mut times = Vec::new();
        for trial in 0..args.trials {
            let mut primary = start_agent(
                &bins,
                dir.path(),
                &url,
                &AgentSpec::new("es-shells", "shells").slots(4),
            );
            wait_healthy(&mut c, &["es-shells"]).await;
            let mut req = submission(
                "shells",
                JobSpec {
                    target: None,
                    kind: Some(job_spec::Kind::Sleep(SleepJob {
                        duration_ms: 120_000,
                        steps: 120,
                        ..Default::default()
                    })),
                },
            );
            req.max_attempts = 3;
            let job = submit(&mut c, req).await;
            let running =
                wait_state(&mut c, &job.id, JobState::Running, Duration::from_secs(30)).await;
            assert_eq!(running.agent, "es-shells", "the primary took the job");
            // A random moment of the heartbeat cycle.
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..1000))).await;
            let t0 = now_us();
            match fault {
                Fault::Kill => primary.kill9(),
                Fault::Hang => primary.sigstop(),
            }
            let until = Instant::now() + Duration::from_secs(60);
            let moved = loop {
                let j = get(&mut c, &job.id).await;
                if j.agent == "es-shells-b" && j.state == JobState::Running as i32 {
                    break j;
                }
                assert!(Instant::now() < until, "no failover within 60 s: {j:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let ms = (moved.started_at_us - t0) as f64 / 1000.0;
            println!("{fault:?} trial {:>2}: {ms:>7.0} ms", trial + 1);
            times.push(ms);
            let _ = c
                .cancel(CancelRequest {
                    job_id: job.id.clone(),
                    reason: "benchmark trial over".into(),
                })
                .await;
            wait_done(&mut c, &job.id, Duration::from_secs(60)).await;
            primary.kill9();
            // The killed primary's session must look gone before the next one registers.
            let cc = c.clone();
            wait_until(
                "the old primary unhealthy",
                Duration::from_secs(30),
                move || {
                    let mut c = cc.clone();
                    async move {
                        agents(&mut c)
                            .await
                            .iter()
                            .all(|a| a.identity.as_ref().unwrap().name != "es-shells" || !a.healthy)
                    }
                },
            )
            .await;
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{fault:?}: {} trials, failover p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
            times.len(),
            percentile(&times, 50.0),
            percentile(&times, 95.0),
            times.last().copied().unwrap_or(f64::NAN)
        );
    }
    drop(server);
    if args.leader_trials > 0 {
        let trials = leader_kills(&args, &bins, &extra).await;
        let (mut serves, mut runs): (Vec<f64>, Vec<f64>) = trials.into_iter().unzip();
        serves.sort_by(|a, b| a.partial_cmp(b).unwrap());
        runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "Leader kill: {} trials, standby serving p50 {:.0} ms, p95 {:.0} ms; a new job done p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
            serves.len(),
            percentile(&serves, 50.0),
            percentile(&serves, 95.0),
            percentile(&runs, 50.0),
            percentile(&runs, 95.0),
            runs.last().copied().unwrap_or(f64::NAN)
        );
    }
}
