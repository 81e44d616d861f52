//! Dispatch benchmark: one es-server and two es-agent processes on loopback, diagnostic Echo
//! jobs. Prints submit-to-start latency at a fixed rate, sustained end-to-end throughput
//! (submit -> result stored durably), and agent/server memory.
//!
//! Build and run (release):
//!   cargo build --release --workspace --bins && target/release/es-bench
//!
//! Timestamps come from the server's store (`created_at_us`, `started_at_us`,
//! `finished_at_us`, all taken by the server), read from the SQLite file (or, with `--db`, the
//! PostgreSQL database, through psql) after the run.
//!
//! On PostgreSQL: `--db postgres://USER:PASSWORD@HOST:PORT/DB` (an empty database), or
//! `--db postgres` for a throwaway cluster on this machine (Debian's postgresql; as root).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use es_tests::*;

#[derive(Parser, Debug)]
#[command(about = "es-server/es-agent dispatch benchmark (loopback, real processes)")]
struct Args {
    /// es-server binary (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// es-agent binary (default: next to this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Jobs of the latency phase.
    #[arg(long, default_value_t = 2000)]
    latency_jobs: usize,
    /// Submission rate of the latency phase (jobs/s).
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Jobs of the throughput phase.
    #[arg(long, default_value_t = 30_000)]
    jobs: usize,
    /// Concurrent submitters in the throughput phase.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Slots per agent.
    #[arg(long, default_value_t = 64)]
    slots: u32,
    /// Commit mode of the SQLite store (normal or full).
    #[arg(long, default_value = "normal")]
    db_sync: String,
    /// The job store: unset for SQLite, a postgres:// URL, or `postgres` for a throwaway
    /// local cluster.
    #[arg(long)]
    db: Option<String>,
}

/// Where the server keeps the jobs, as the benchmark reads them back.
enum Db {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Db {
    /// Rows of `sql` (`$1` = since_us), each as its columns' text.
    fn query(&self, sql: &str, since_us: i64) -> Vec<Vec<String>> {
        match self {
            Db::Sqlite(path) => {
                let c = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .expect("open store read-only");
                let mut st = c.prepare(&sql.replace("$1", "?1")).unwrap();
                let n = st.column_count();
                st.query_map([since_us], |r| {
                    (0..n)
                        .map(|i| r.get::<_, i64>(i).map(|v| v.to_string()))
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .unwrap()
                .map(|r| r.unwrap())
                .collect()
            }
            Db::Postgres(url) => {
                let out = std::process::Command::new("psql")
                    .args(["-X", "-q", "-A", "-t", "-F", "|", "-d", url, "-c"])
                    .arg(sql.replace("$1", &since_us.to_string()))
                    .output()
                    .expect("psql");
                assert!(
                    out.status.success(),
                    "psql: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| l.split('|').map(str::to_owned).collect())
                    .collect()
            }
        }
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (
        percentile(&v, 50.0),
        percentile(&v, 95.0),
        percentile(&v, 99.0),
        *v.last().unwrap_or(&f64::NAN),
    )
}

struct Row {
    created: i64,
    started: i64,
    finished: i64,
}

fn rows(db: &Db, since_us: i64) -> Vec<Row> {
    db.query(
        "SELECT created_at_us, started_at_us, finished_at_us FROM jobs WHERE state = 3 AND created_at_us >= $1",
        since_us,
    )
    .into_iter()
    .map(|r| Row {
        created: r[0].parse().unwrap(),
        started: r[1].parse().unwrap(),
        finished: r[2].parse().unwrap(),
    })
    .collect()
}

/// Fails loudly unless every one of the `n` jobs created since `since_us` succeeded: a figure
/// over the span of succeeded jobs means nothing if some failed.
fn require_all_succeeded(db: &Db, since_us: i64, n: usize) {
    let by: Vec<(i32, i64)> = db
        .query(
            "SELECT state, COUNT(*) FROM jobs WHERE created_at_us >= $1 GROUP BY state",
            since_us,
        )
        .into_iter()
        .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
        .collect();
    let succeeded = by.iter().find(|(s, _)| *s == 3).map_or(0, |(_, n)| *n) as usize;
    assert!(
        succeeded == n && by.len() == 1,
        "not every job succeeded: {n} submitted, by state {:?}",
        by.iter()
            .map(|(s, n)| format!(
                "{}: {n}",
                es_proto::v1::JobState::try_from(*s)
                    .unwrap_or_default()
                    .as_str_name()
            ))
            .collect::<Vec<_>>()
    );
}

fn count_done(db: &Db, since_us: i64) -> usize {
    db.query(
        "SELECT COUNT(*) FROM jobs WHERE finished_at_us > 0 AND created_at_us >= $1",
        since_us,
    )
    .first()
    .and_then(|r| r[0].parse().ok())
    .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

async fn wait_all(db: &Db, since: i64, n: usize, limit: Duration) {
    let until = Instant::now() + limit;
    let mut last_print = Instant::now();
    loop {
        let done = count_done(db, since);
        if done >= n {
            return;
        }
        if Instant::now() > until {
            panic!("only {done} of {n} jobs finished within {limit:?}");
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("  ... {done}/{n} finished");
            last_print = Instant::now();
        }
        // PostgreSQL is read through psql: a process per poll, so less often (its CPU would
        // come out of the measurement on a small machine).
        let every = match db {
            Db::Sqlite(_) => 50,
            Db::Postgres(_) => 500,
        };
        tokio::time::sleep(Duration::from_millis(
            std::env::var("POLL_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(every),
        ))
        .await;
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bins = Bins::beside_current_exe(args.server_bin.clone(), args.agent_bin.clone());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bench.db");
    let mut _cluster = None;
    let db = match args.db.as_deref() {
        None => Db::Sqlite(file.clone()),
        Some("postgres") => {
            let c = pg::Cluster::start();
            let url = c.create_db("bench");
            _cluster = Some(c);
            Db::Postgres(url)
        }
        Some(url) => Db::Postgres(url.to_owned()),
    };
    let store = match &db {
        Db::Sqlite(p) => p.display().to_string(),
        Db::Postgres(url) => url.clone(),
    };
    let server = start_server_on(
        &bins,
        dir.path(),
        &store,
        &file,
        "127.0.0.1:0",
        &["--db-sync", &args.db_sync],
    );
    if matches!(db, Db::Postgres(_)) {
        server
            .proc
            .wait_log("leading the job store", Duration::from_secs(30));
    }
    let mut agents_p = Vec::new();
    for name in ["es-commands-1", "es-commands-2"] {
        agents_p.push(start_agent(
            &bins,
            dir.path(),
            &server.url(),
            &AgentSpec::new(name, "commands").slots(args.slots),
        ));
    }
    let mut c = server.client().await;
    wait_healthy(&mut c, &["es-commands-1", "es-commands-2"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss: Vec<u64> = agents_p.iter().map(|p| p.rss_kib().unwrap_or(0)).collect();

    println!(
        "es-bench: 1 es-server + 2 es-agent x {} slots, loopback, store {}",
        args.slots,
        match &db {
            Db::Sqlite(_) => format!("SQLite synchronous={}", args.db_sync),
            Db::Postgres(_) => "PostgreSQL (loopback)".to_owned(),
        }
    );
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    // Warm-up: connections, SQLite pages, allocator.
    let warm = now_us();
    for _ in 0..200 {
        submit(&mut c, submission("commands", echo("warm"))).await;
    }
    wait_all(&db, warm, 200, Duration::from_secs(60)).await;

    // Phase 1: latency at a fixed rate.
    eprintln!(
        "latency phase: {} jobs at {} jobs/s",
        args.latency_jobs, args.rate
    );
    let since = now_us();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / args.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let rtts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for i in 0..args.latency_jobs {
        tick.tick().await;
        let mut c = c.clone();
        let rtts = rtts.clone();
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            submit(&mut c, submission("commands", echo(&format!("lat {i}")))).await;
            rtts.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e3);
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    wait_all(&db, since, args.latency_jobs, Duration::from_secs(120)).await;
    require_all_succeeded(&db, since, args.latency_jobs);
    let r = rows(&db, since);
    let start_lat: Vec<f64> = r
        .iter()
        .map(|r| (r.started - r.created) as f64 / 1e3)
        .collect();
    let e2e_lat: Vec<f64> = r
        .iter()
        .map(|r| (r.finished - r.created) as f64 / 1e3)
        .collect();
    let (s50, s95, s99, smax) = stats(start_lat);
    let (e50, e95, e99, emax) = stats(e2e_lat);
    let (r50, r95, r99, rmax) = stats(rtts.lock().unwrap().clone());
    println!();
    println!(
        "latency at {} jobs/s ({} jobs), milliseconds      p50     p95     p99     max",
        args.rate,
        r.len()
    );
    println!(
        "  submit -> start (lease granted)             {s50:7.3} {s95:7.3} {s99:7.3} {smax:7.3}"
    );
    println!(
        "  submit -> result stored                     {e50:7.3} {e95:7.3} {e99:7.3} {emax:7.3}"
    );
    println!(
        "  submit RPC round trip (client)              {r50:7.3} {r95:7.3} {r99:7.3} {rmax:7.3}"
    );

    // Phase 2: sustained throughput.
    eprintln!(
        "throughput phase: {} jobs, {} concurrent submitters",
        args.jobs, args.submitters
    );
    let since = now_us();
    let t0 = Instant::now();
    let pids: Vec<i32> = std::iter::once(server.proc.pid())
        .chain(agents_p.iter().map(|p| p.pid()))
        .chain(std::iter::once(std::process::id() as i32))
        .collect();
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let per = args.jobs / args.submitters;
    let total = per * args.submitters;
    // A few connections, so one HTTP/2 connection is not the bottleneck.
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(connect(&server.url()).await);
    }
    let mut handles = Vec::new();
    for s in 0..args.submitters {
        let mut c = conns[s % conns.len()].clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per {
                submit(&mut c, submission("commands", echo(&format!("t{s}-{i}")))).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let submit_secs = t0.elapsed().as_secs_f64();
    wait_all(&db, since, total, Duration::from_secs(600)).await;
    require_all_succeeded(&db, since, total);
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| cpu_secs(*p) - c0)
        .collect();
    let r = rows(&db, since);
    let first = r.iter().map(|r| r.created).min().unwrap();
    let last = r.iter().map(|r| r.finished).max().unwrap();
    let secs = (last - first) as f64 / 1e6;
    println!();
    println!(
        "throughput ({} jobs, {} submitters, 2 agents x {} slots)",
        total, args.submitters, args.slots
    );
    println!("  end to end (first submit -> last result stored): {:.0} jobs/s ({total} jobs in {secs:.2} s)", total as f64 / secs);
    println!(
        "  submissions accepted:                            {:.0} jobs/s",
        total as f64 / submit_secs
    );
    println!(
        "  CPU seconds used: server {:.2}, agents {:.2} + {:.2}, benchmark client {:.2} (per job: {:.0} us in all)",
        cpu[0], cpu[1], cpu[2], cpu[3], cpu.iter().sum::<f64>() / total as f64 * 1e6
    );

    let after_rss: Vec<u64> = agents_p.iter().map(|p| p.rss_kib().unwrap_or(0)).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_after: Vec<u64> = agents_p.iter().map(|p| p.rss_kib().unwrap_or(0)).collect();
    let peak: Vec<u64> = agents_p
        .iter()
        .map(|p| hwm_kib(p.pid()).unwrap_or(0))
        .collect();
    let mib = |k: u64| k as f64 / 1024.0;
    println!();
    println!("memory (MiB)                      agent 1   agent 2");
    println!(
        "  idle RSS before load           {:8.1}  {:8.1}",
        mib(idle_rss[0]),
        mib(idle_rss[1])
    );
    println!(
        "  RSS right after load           {:8.1}  {:8.1}",
        mib(after_rss[0]),
        mib(after_rss[1])
    );
    println!(
        "  idle RSS 3 s after load        {:8.1}  {:8.1}",
        mib(idle_after[0]),
        mib(idle_after[1])
    );
    println!(
        "  peak RSS (VmHWM)               {:8.1}  {:8.1}",
        mib(peak[0]),
        mib(peak[1])
    );
    println!(
        "  server: RSS {:.1} MiB, peak {:.1} MiB",
        mib(server.proc.rss_kib().unwrap_or(0)),
        mib(hwm_kib(server.proc.pid()).unwrap_or(0))
    );
}
