//! Job store benchmark: the writes of whole jobs straight into a store, with no gRPC, agents
//! or dispatch around it. Shows what the store itself sustains, apart from the rest of the
//! server (es-bench measures them together).
//!
//!   cargo build --release --workspace --bins && target/release/es-bench-store
//!   target/release/es-bench-store --db postgres        # a throwaway local cluster (root)
//!   target/release/es-bench-store --db postgres://USER:PASSWORD@HOST:5432/DB
//!
//! Each job is what the server writes for an Echo job: its row with the "queued" event (and
//! the submit audit entry), the lease (row update, "running" event, audit entry) and the
//! result (row update, result event, audit entry), each acknowledged (committed) before the
//! next, as the server does. `--flows` jobs are in flight at once, like a server with that
//! many submissions and agent slots busy; the store commits them in groups.
//!
//! Then the retention purge of those jobs: the first half in one write (what every other write
//! would wait behind), the rest in the batches the server uses (`es_server::retention`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use es_proto::v1::{job_event, EchoJob, Job, JobEvent, JobResult, JobSpec, JobState, Role};
use es_server::store::{self, Store};
use es_tests::pg;

#[derive(Parser, Debug)]
#[command(about = "job store benchmark: whole jobs written straight into the store")]
struct Args {
    /// The job store: unset for SQLite (a temporary file), a postgres:// URL (an empty
    /// database), or `postgres` for a throwaway local cluster.
    #[arg(long)]
    db: Option<String>,
    /// Jobs to write.
    #[arg(long, default_value_t = 50_000)]
    jobs: usize,
    /// Jobs in flight at once.
    #[arg(long, default_value_t = 192)]
    flows: usize,
}

fn now_us() -> i64 {
    es_server::dispatch::now_us()
}

fn event(job: &Job, seq: u64, event: job_event::Event) -> JobEvent {
    JobEvent {
        job_id: job.id.clone(),
        seq,
        at_us: now_us(),
        attempt: job.attempt,
        agent: job.agent.clone(),
        event: Some(event),
    }
}

/// One job's three writes, each awaited; answers the time its first commit took.
async fn one_job(store: &Store, n: usize) -> Duration {
    let mut job = Job {
        id: uuid::Uuid::now_v7().to_string(),
        role: Role::Commands as i32,
        selector: String::new(),
        spec: Some(JobSpec {
            target: None,
            kind: Some(es_proto::v1::job_spec::Kind::Echo(EchoJob {
                message: format!("bench {n}"),
            })),
        }),
        state: JobState::Queued as i32,
        max_attempts: 3,
        timeout_ms: 60_000,
        created_at_us: now_us(),
        submitted_by: "bench".into(),
        ..Default::default()
    };
    let queued = event(&job, 1, job_event::Event::State(JobState::Queued as i32));
    let t = Instant::now();
    let (stored, created) = store.insert(job.clone(), vec![queued]).await.unwrap();
    let submit = t.elapsed();
    assert!(created && stored.id == job.id);

    job.state = JobState::Running as i32;
    job.attempt = 1;
    job.epoch = 1;
    job.agent = "es-commands-1".into();
    job.started_at_us = now_us();
    let running = event(&job, 2, job_event::Event::State(JobState::Running as i32));
    store.update(&job, vec![running]).await.unwrap();

    let result = JobResult {
        state: JobState::Succeeded as i32,
        output: format!("bench {n}"),
        ..Default::default()
    };
    job.state = JobState::Succeeded as i32;
    job.result = Some(result.clone());
    job.finished_at_us = now_us();
    let done = event(&job, 3, job_event::Event::Result(result));
    store.update(&job, vec![done]).await.unwrap();
    submit
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let mut _cluster = None;
    let (store, shown): (Store, String) = match args.db.as_deref() {
        None => {
            let path = dir.path().join("bench.db");
            let s = store::sqlite::open(&path, store::Sync::Normal).unwrap();
            (s, "SQLite synchronous=normal".into())
        }
        Some(url) => {
            let url = if url == "postgres" {
                let c = pg::Cluster::start();
                let url = c.create_db("bench");
                _cluster = Some(c);
                url
            } else {
                url.to_owned()
            };
            (pg::open_store(&url).await, "PostgreSQL (loopback)".into())
        }
    };
    println!(
        "es-bench-store: {} jobs, {} in flight, store {shown}, {} cores",
        args.jobs,
        args.flows,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    // Warm-up: connections, caches, plans.
    for n in 0..200 {
        one_job(&store, n).await;
    }

    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // When the job in the middle started: jobs finished before it are about half of them.
    let middle = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let t = Instant::now();
    let mut flows = Vec::new();
    for _ in 0..args.flows {
        let (store, next, total, middle) = (store.clone(), next.clone(), args.jobs, middle.clone());
        flows.push(tokio::spawn(async move {
            let mut submits = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return submits;
                }
                if n == total / 2 {
                    middle.store(now_us(), std::sync::atomic::Ordering::Relaxed);
                }
                submits.push(one_job(&store, n).await);
            }
        }));
    }
    let mut submits = Vec::new();
    for f in flows {
        submits.extend(f.await.unwrap());
    }
    let elapsed = t.elapsed();
    submits.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  {} jobs in {:.2} s: {:.0} jobs/s ({:.0} commits of a write per second, 3 per job)",
        args.jobs,
        elapsed.as_secs_f64(),
        args.jobs as f64 / elapsed.as_secs_f64(),
        3.0 * args.jobs as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  insert acknowledged under that load, ms: p50 {:.3}  p99 {:.3}",
        ms(submits[submits.len() / 2]),
        ms(submits[submits.len() * 99 / 100])
    );

    // One job at a time: the commit latency of a lone write.
    let mut lone = Vec::new();
    for n in 0..500 {
        lone.push(one_job(&store, n).await);
    }
    lone.sort();
    println!(
        "  insert acknowledged, one job at a time, ms: p50 {:.3}  p99 {:.3}",
        ms(lone[lone.len() / 2]),
        ms(lone[lone.len() * 99 / 100])
    );

    // Retention: what a write waits behind a purge.
    let t = Instant::now();
    let whole = store
        .purge(middle.load(std::sync::atomic::Ordering::Relaxed), u32::MAX)
        .await
        .unwrap();
    println!(
        "  purge in one write: {} jobs and {} audit entries, {:.0} ms",
        whole.jobs,
        whole.audit,
        ms(t.elapsed())
    );
    let batch = es_server::retention::BATCH;
    let (mut batches, mut jobs) = (Vec::new(), 0);
    loop {
        let t = Instant::now();
        let p = store.purge(now_us(), batch).await.unwrap();
        batches.push(t.elapsed());
        jobs += p.jobs;
        if !p.more {
            break;
        }
    }
    let n = batches.len();
    batches.sort();
    println!(
        "  purge in batches of {batch}: {jobs} jobs in {n} batches, ms per batch: p50 {:.1}  max {:.1}",
        ms(batches[n / 2]),
        ms(batches[n - 1])
    );
    // Every job finished: the purges left nothing.
    let left = store::ListFilter {
        limit: 10,
        ..Default::default()
    };
    assert!(store.list(left).await.unwrap().is_empty());
    tokio::task::spawn_blocking(move || store.shutdown())
        .await
        .unwrap();
}
