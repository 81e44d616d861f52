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

    for fault in [Fault::Kill, Fault::Hang] {
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
}
