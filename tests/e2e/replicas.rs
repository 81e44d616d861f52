//! es-server replicas on one PostgreSQL database (real clusters, tests/src/pg.rs): one leads,
//! the others stand by; a kill -9, a pause cut off by the database, and a database restart.

use std::time::{Duration, Instant};

use es_proto::v1::*;
use es_tests::*;

use crate::leases::SleepJobSpec;
use crate::{bins, LONG};

/// Timings of the failover tests: an agent keeps running its jobs while no server answers for
/// up to `lease-ttl - heartbeat/2`; the takeover (a few hundred ms) fits well within that.
const REPLICA: &[&str] = &[
    "--heartbeat-interval",
    "250ms",
    "--lease-ttl",
    "5s",
    "--heartbeat-timeout",
    "1s",
    "--offer-timeout",
    "1s",
    "--cancel-grace",
    "1s",
];

/// Starts a replica on `url` and waits until it leads or stands by, as told.
fn replica(dir: &std::path::Path, url: &str, name: &str, leads: bool) -> Server {
    let s = start_server_on(&bins(), dir, url, &dir.join(name), "127.0.0.1:0", REPLICA);
    let wait = if leads {
        "leading the job store"
    } else {
        "standby: the leader is"
    };
    s.proc.wait_log(wait, LONG);
    s
}

async fn health(addr: &str) -> tonic_health::pb::health_check_response::ServingStatus {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// How many times the agent's log says job `id` finished.
fn finished_in_log(log: &str, id: &str) -> usize {
    log.matches(&format!("job {id} succeeded")).count()
}

/// Two replicas: the standby answers NOT_SERVING and UNAVAILABLE naming the leader. The leader
/// is killed with -9 while jobs run: the standby leads within 5 s, the agent (given both
/// addresses) re-registers with the leases it holds and keeps running them, every acknowledged
/// job finishes once (attempt 1, one result in the agent's log), and a CLI watch given both
/// addresses carries on to the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_leads_after_kill_9_of_the_leader_and_nothing_runs_twice() {
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    let pg = pg::Cluster::start();
    let url = pg.create_db("es");
    let mut a = replica(dir.path(), &url, "a", true);
    let b = replica(dir.path(), &url, "b", false);

    assert_eq!(
        health(&b.addr.to_string()).await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    let refused = b
        .client()
        .await
        .list(ListRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("standby") && refused.message().contains(&a.addr.to_string()),
        "{}",
        refused.message()
    );

    let servers = format!("{},{}", a.url(), b.url());
    let agent = start_agent(
        &bins(),
        dir.path(),
        &servers,
        &AgentSpec::new("es-commands-r", "commands").slots(8),
    );
    let mut ca = a.client().await;
    wait_healthy(&mut ca, &["es-commands-r"]).await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        let job = submit(
            &mut ca,
            submission("commands", SleepJobSpec::steps(3000, 3)),
        )
        .await;
        ids.push(job.id);
    }
    wait_state(&mut ca, &ids[0], JobState::Running, LONG).await;
    let watcher = std::process::Command::new(bins().server)
        .args(["watch", &ids[0]])
        .env("ES_SERVER", &servers)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;

    let killed = Instant::now();
    a.proc.kill9();
    b.proc
        .wait_log("leading the job store", Duration::from_secs(10));
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the standby took {took:?} to lead"
    );
    assert_eq!(
        health(&b.addr.to_string()).await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let mut cb = b.client().await;
    for id in &ids {
        let job = wait_done(&mut cb, id, LONG).await;
        assert_eq!(job.state, JobState::Succeeded as i32, "{job:?}");
        assert_eq!(job.attempt, 1, "job {id} was leased again: {job:?}");
    }
    let log = agent.log();
    for id in &ids {
        assert_eq!(
            finished_in_log(&log, id),
            1,
            "job {id} in the agent's log:\n{log}"
        );
    }
    assert!(!log.contains("fenced"), "{log}");
    let out = tokio::task::spawn_blocking(move || watcher.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("succeeded"), "{stdout}\n{stderr}");
}

/// The leader is paused (SIGSTOP) and the database ends its session, as a partition would: the
/// standby leads, and the agent (given both addresses) moves to it with the lease it holds: the
/// job runs once. When the old leader wakes, its writes are refused (the epoch moved on) and
/// it steps down: exit 75, so systemd restarts it as a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_cut_off_by_the_database_steps_down_when_it_wakes() {
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    let pg = pg::Cluster::start();
    let url = pg.create_db("es");
    // A lease TTL well above what the agent takes to notice the pause and move (3 missed
    // heartbeats, then at most 2 s on the paused one): the lease it holds must still be
    // valid on the new leader when it arrives, on a loaded machine too.
    let args: Vec<&str> = REPLICA
        .iter()
        .map(|a| if *a == "5s" { "8s" } else { a })
        .collect();
    assert!(args.windows(2).any(|w| w == ["--lease-ttl", "8s"]));
    let start = |name: &str, wait: &str| {
        let s = start_server_on(
            &bins(),
            dir.path(),
            &url,
            &dir.path().join(name),
            "127.0.0.1:0",
            &args,
        );
        s.proc.wait_log(wait, LONG);
        s
    };
    let mut a = start("a", "leading the job store");
    let b = start("b", "standby: the leader is");
    let servers = format!("{},{}", a.url(), b.url());
    let agent = start_agent(
        &bins(),
        dir.path(),
        &servers,
        &AgentSpec::new("es-commands-p", "commands").slots(4),
    );
    let mut ca = a.client().await;
    wait_healthy(&mut ca, &["es-commands-p"]).await;
    let job = submit(
        &mut ca,
        submission("commands", SleepJobSpec::steps(8000, 8)),
    )
    .await;
    wait_state(&mut ca, &job.id, JobState::Running, LONG).await;
    // Running on the agent, not only leased on the server: the Acquire answer has reached it
    // (a pause in between would leave the lease unknown to the agent, and attempt 2 right).
    agent.wait_log(&format!("running job {}", job.id), LONG);

    a.proc.sigstop();
    let ended = pg.psql(
        "es",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
          WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()",
    );
    assert_eq!(ended, "1", "the leader's lock session");
    b.proc
        .wait_log("leading the job store", Duration::from_secs(5));
    // Paused past its lease TTL: at wake its reaper has leases to expire, and writes them.
    tokio::time::sleep(Duration::from_secs(9)).await;
    a.proc.sigcont();
    let status = a.proc.wait_exit(LONG).expect("the old leader exits");
    assert_eq!(status.code(), Some(75), "{}", a.proc.log());
    let log = a.proc.log();
    assert!(log.contains("deposed:"), "{log}");
    assert!(log.contains("writes refused"), "{log}");

    let mut cb = b.client().await;
    let done = wait_done(&mut cb, &job.id, LONG).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    // The agent reached the new leader before its lease expired there (registration gives
    // up on the paused one after 2 s) and kept its lease: the job ran once, attempt 1.
    let log = agent.log();
    assert_eq!(
        log.matches(&format!("running job {}", job.id)).count(),
        1,
        "{log}"
    );
    assert_eq!(finished_in_log(&log, &job.id), 1, "{log}");
    assert_eq!(done.attempt, 1, "{done:?}\n{log}");
    let leader = pg.psql("es", "SELECT epoch FROM leader");
    assert_eq!(leader, "2", "two takeovers in all");
}

/// PostgreSQL restarts under load: nothing is acknowledged while it is down, nothing
/// acknowledged is lost, and work resumes with the same leader (its epoch unchanged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_loses_nothing_acknowledged() {
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    let pg = pg::Cluster::start();
    let url = pg.create_db("es");
    let a = replica(dir.path(), &url, "a", true);
    let _agent = start_agent(
        &bins(),
        dir.path(),
        &a.url(),
        &AgentSpec::new("es-commands-d", "commands").slots(8),
    );
    let mut c = a.client().await;
    wait_healthy(&mut c, &["es-commands-d"]).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let submitter = {
        let (mut c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut req = submission("commands", SleepJobSpec::steps(200, 1));
                req.idempotency_key = uuid::Uuid::new_v4().to_string();
                let mut r = tonic::Request::new(req);
                r.set_timeout(Duration::from_secs(5));
                match c.submit(r).await {
                    Ok(r) => acked.push((Instant::now(), r.into_inner().job.unwrap().id)),
                    Err(_) => refused += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, refused)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (down, stopped, restarting) = tokio::task::spawn_blocking(move || {
        pg.stop();
        let stopped = Instant::now();
        std::thread::sleep(Duration::from_secs(3));
        let restarting = Instant::now();
        pg.restart();
        pg.wait_ready();
        (pg, stopped, restarting)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, refused) = submitter.await.unwrap();
    // Nothing acknowledged while the database was down (a submission waits, or times out).
    let while_down: Vec<_> = acked
        .iter()
        .filter(|(at, _)| *at > stopped && *at < restarting)
        .collect();
    assert!(
        while_down.is_empty(),
        "acknowledged while down: {while_down:?}"
    );
    assert!(
        acked.len() > 20,
        "{} acknowledged, {refused} refused",
        acked.len()
    );
    for (_, id) in &acked {
        let job = wait_done(&mut c, id, LONG).await;
        assert_eq!(job.state, JobState::Succeeded as i32, "{job:?}");
    }
    let stored: usize = down
        .psql("es", "SELECT count(*) FROM jobs")
        .parse()
        .unwrap();
    // A commit whose answer the database's stop cut off may be stored unacknowledged; never
    // the other way round.
    assert!(
        stored >= acked.len(),
        "{stored} stored, {} acknowledged",
        acked.len()
    );
    assert_eq!(down.psql("es", "SELECT epoch FROM leader"), "1");
    a.proc.wait_log("holding the lock again", LONG);
}

/// `sslmode=require`: the database's certificate is verified (refused without its CA, with
/// the fix named), the connections are encrypted, and the password never reaches the log. A
/// database whose schema is newer than the server knows is refused, naming both versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_is_verified_and_a_newer_schema_is_refused() {
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path(), "db");
    let cert = pki.server();
    let pg = pg::Cluster::start_tls(&cert.cert, &cert.key);
    let url = format!("{}?sslmode=require", pg.create_db("es"));
    let serve = |ca: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(bins().server);
        c.args(["serve", "--listen", "127.0.0.1:0", "--insecure"])
            .env("ES_SERVER_DB", &url)
            .env("RUST_LOG", "info");
        if let Some(ca) = ca {
            c.arg("--db-ca").arg(ca);
        }
        c
    };

    // Without the database's CA: refused, saying which setting fixes it.
    let out = serve(None).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--db-ca"), "{stderr}");
    assert!(!stderr.contains(pg::PASSWORD), "{stderr}");

    // With it: leads, over TLS.
    let log = dir.path().join("tls-server.log");
    let child = serve(Some(&pki.ca_file))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Proc::adopt("es-server".into(), child, log);
    server.wait_log("leading the job store", LONG);
    // The lock session and the reads' pool at least (the writer connects at its first write);
    // every one of them encrypted.
    let sessions = |filter: &str| -> u32 {
        pg.psql(
            "es",
            &format!(
                "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
                  WHERE application_name = 'es-server' AND {filter}"
            ),
        )
        .parse()
        .unwrap()
    };
    let until = Instant::now() + LONG;
    while sessions("ssl") < 2 {
        assert!(
            Instant::now() < until,
            "{} encrypted sessions",
            sessions("ssl")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sessions("NOT ssl"), 0, "a plaintext es-server session");
    let text = server.log();
    assert!(text.contains("postgres://es:***@127.0.0.1"), "{text}");
    assert!(!text.contains(pg::PASSWORD), "{text}");
    server.sigterm();
    assert!(server.wait_exit(LONG).is_some_and(|s| s.success()));

    // A newer schema (another replica was upgraded first): refused with both versions, exit 64.
    pg.psql("es", "UPDATE es_schema SET version = 99");
    let out = serve(Some(&pki.ca_file)).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("schema is version 99") && stderr.contains("knows (2)"),
        "{stderr}"
    );
}

/// A database left by an es-server of schema version 1 (rows written as that version wrote
/// them): a new es-server migrates it to the current version at start, runs the job that was
/// queued, and its retention deletes an old finished job with its events and audit entries
/// (since version 2 the purge deletes events itself: no foreign key cascades any more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_is_migrated_and_its_jobs_carry_on() {
    use prost::Message;
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    let pg = pg::Cluster::start();
    let url = pg.create_db("es");
    pg.psql("es", es_server::store::postgres::schema::MIGRATIONS[0]);
    pg.psql(
        "es",
        "CREATE TABLE es_schema (version INTEGER NOT NULL); INSERT INTO es_schema VALUES (1)",
    );
    let now = dispatch_now_us();
    let day = 86_400_000_000i64;
    let job = |id: &str, state: JobState, created: i64, finished: i64, message: &str| {
        format!(
            "INSERT INTO jobs VALUES ('{id}', NULL, {role}, '', '', decode('{spec}', 'hex'), {state},
               0, 3, 0, '', 60000, false, NULL, {created}, 0, {finished}, 'tester')",
            role = role("shells"),
            spec = hex(&echo(message).encode_to_vec()),
            state = state as i32,
        )
    };
    let event = |id: &str, seq: u64, at: i64, state: JobState| {
        let body = JobEvent {
            job_id: id.into(),
            seq,
            at_us: at,
            event: Some(job_event::Event::State(state as i32)),
            ..Default::default()
        };
        format!(
            "INSERT INTO events VALUES ('{id}', {seq}, {at}, decode('{}', 'hex'))",
            hex(&body.encode_to_vec())
        )
    };
    let old = "0190a000-0000-7000-8000-000000000001";
    let queued = "0190a000-0000-7000-8000-000000000002";
    for sql in [
        job(
            old,
            JobState::Succeeded,
            now - 3 * day,
            now - 2 * day,
            "old",
        ),
        event(old, 1, now - 3 * day, JobState::Queued),
        event(old, 2, now - 2 * day, JobState::Succeeded),
        format!(
            "INSERT INTO audit (at_us, sandbox_id, job_id, actor, action, detail)
             VALUES ({}, '', '{old}', 'tester', 'submit', '{{}}')",
            now - 3 * day
        ),
        job(
            queued,
            JobState::Queued,
            now - 1000,
            0,
            "queued before the upgrade",
        ),
        event(queued, 1, now - 1000, JobState::Queued),
    ] {
        pg.psql("es", &sql);
    }

    // A retention of one day: the job that finished two days ago goes at the first purge.
    let args: Vec<&str> = REPLICA
        .iter()
        .copied()
        .chain(["--retention", "24h"])
        .collect();
    let server = start_server_on(
        &bins(),
        dir.path(),
        &url,
        &dir.path().join("up"),
        "127.0.0.1:0",
        &args,
    );
    server.proc.wait_log("leading the job store", LONG);
    assert!(
        server
            .proc
            .log()
            .contains("migrating the schema to version 2"),
        "{}",
        server.proc.log()
    );
    assert_eq!(pg.psql("es", "SELECT version FROM es_schema"), "2");
    let _agent = start_agent(
        &bins(),
        dir.path(),
        &server.url(),
        &AgentSpec::new("es-shells-upgraded", "shells"),
    );
    let mut c = server.client().await;
    let done = wait_done(&mut c, queued, LONG).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempt, 1);
    let events = c
        .watch(WatchRequest {
            job_id: queued.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let seqs: Vec<u64> = tokio_stream::StreamExt::collect::<Vec<_>>(events)
        .await
        .into_iter()
        .map(|e| e.unwrap().seq)
        .collect();
    assert_eq!(
        seqs[0], 1,
        "the event written by version 1 is read back: {seqs:?}"
    );
    assert!(seqs.len() >= 3, "{seqs:?}");

    let count = |table: &str, column: &str| -> i64 {
        pg.psql(
            "es",
            &format!("SELECT count(*) FROM {table} WHERE {column} = '{old}'"),
        )
        .parse()
        .unwrap()
    };
    let until = Instant::now() + LONG;
    while count("jobs", "id") > 0 {
        assert!(Instant::now() < until, "the old job was never purged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        count("events", "job_id"),
        0,
        "the purged job's events are left"
    );
    assert_eq!(
        count("audit", "job_id"),
        0,
        "the purged job's audit entries are left"
    );
    assert_eq!(get(&mut c, queued).await.state, JobState::Succeeded as i32);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dispatch_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// What `systemctl status` shows of each replica (sd_notify STATUS, read here from the
/// NOTIFY_SOCKET systemd would give it): a standby names the leader; after the leader's kill
/// -9 the standby says it leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_status_names_the_leader_and_then_the_new_leader() {
    use std::os::unix::net::UnixDatagram;
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    let pg = pg::Cluster::start();
    let url = pg.create_db("es");
    let start = |name: &str| {
        let path = dir.path().join(format!("{name}.notify"));
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let server = start_server_env(
            &bins(),
            dir.path(),
            &url,
            &dir.path().join(name),
            "127.0.0.1:0",
            REPLICA,
            &[("NOTIFY_SOCKET", path.as_os_str())],
        );
        (server, socket)
    };
    // Waits for a STATUS line containing `want`, answering it.
    let status = |socket: &UnixDatagram, want: &str| -> String {
        let until = Instant::now() + LONG;
        let mut seen = Vec::new();
        loop {
            assert!(Instant::now() < until, "no STATUS with {want:?}: {seen:?}");
            let mut buf = [0u8; 4096];
            let Ok(n) = socket.recv(&mut buf) else {
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if let Some(line) = text.lines().find_map(|l| l.strip_prefix("STATUS=")) {
                if line.contains(want) {
                    return line.to_owned();
                }
            }
            seen.push(text);
        }
    };
    let (mut a, a_notify) = start("a");
    a.proc.wait_log("leading the job store", LONG);
    let leads = status(&a_notify, "leading the job store");
    assert!(leads.contains(&format!("serving on {}", a.addr)), "{leads}");
    assert!(!leads.contains(pg::PASSWORD), "{leads}");

    let (b, b_notify) = start("b");
    let standby = status(&b_notify, "the leader is");
    assert!(
        standby.starts_with(&format!("standby on {}", b.addr)),
        "{standby}"
    );
    assert!(
        standby.contains(&a.addr.to_string()),
        "names the leader's address: {standby}"
    );

    a.proc.kill9();
    let now = status(&b_notify, "leading the job store");
    assert!(now.contains("(epoch 2)"), "{now}");
}
