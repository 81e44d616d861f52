//! The server is killed with `kill -9` and restarted on the same SQLite file: no acknowledged
//! submission and no reported result is lost, and agents reconnect by themselves.

use std::collections::HashMap;
use std::time::Duration;

use es_proto::v1::*;
use es_tests::*;

use crate::leases::SleepJobSpec;
use crate::{bins, LONG};

async fn all_jobs(
    c: &mut job_service_client::JobServiceClient<tonic::transport::Channel>,
) -> Vec<Job> {
    c.list(ListRequest {
        limit: 10_000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_submissions_survive_kill_9() {
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("es.db");
    let mut server = start_server(&bins(), dir.path(), &db, "127.0.0.1:0", FAST);
    let mut c = server.client().await;
    let mut acked = Vec::new();
    for i in 0..200 {
        let mut r = submission("commands", echo(&format!("job {i}")));
        r.idempotency_key = format!("k{i}");
        acked.push(submit(&mut c, r).await.id);
    }
    server.proc.kill9();
    let server = start_server(&bins(), dir.path(), &db, &server.addr.to_string(), FAST);
    let mut c = server.client().await;
    let jobs = all_jobs(&mut c).await;
    assert_eq!(jobs.len(), 200);
    for j in &jobs {
        assert_eq!(j.state, JobState::Queued as i32);
    }
    // Resubmitting with the same keys finds the same jobs.
    let again = c
        .submit(SubmitRequest {
            idempotency_key: "k7".into(),
            ..submission("commands", echo("job 7"))
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.job.unwrap().id, acked[7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_flow_loses_nothing_and_agents_reconnect() {
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("es.db");
    let mut server = start_server(&bins(), dir.path(), &db, "127.0.0.1:0", FAST);
    let addr = server.addr.to_string();
    let url = server.url();
    let _a = start_agent(
        &bins(),
        dir.path(),
        &url,
        &AgentSpec::new("es-commands-1", "commands").slots(8),
    );
    let _b = start_agent(
        &bins(),
        dir.path(),
        &url,
        &AgentSpec::new("es-commands-2", "commands").slots(8),
    );
    let mut c = server.client().await;
    wait_healthy(&mut c, &["es-commands-1", "es-commands-2"]).await;

    let total = 300;
    let mut ids = Vec::new();
    for i in 0..total {
        let spec = JobSpec {
            kind: Some(job_spec::Kind::Sleep(SleepJob {
                duration_ms: 30,
                steps: 1,
                ..Default::default()
            })),
            target: None,
        };
        let mut r = submission("commands", spec);
        r.sandbox_id = format!("sb-{}", i % 7);
        ids.push(submit(&mut c, r).await.id);
    }
    // Let part of the work finish, then record every result the server has acknowledged.
    let cc = c.clone();
    wait_until("a third of the jobs done", LONG, move || {
        let mut c = cc.clone();
        async move {
            c.list(ListRequest {
                states: vec![JobState::Succeeded as i32],
                limit: 10_000,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().jobs.len() >= total / 3)
            .unwrap_or(false)
        }
    })
    .await;
    let before: HashMap<String, Job> = all_jobs(&mut c)
        .await
        .into_iter()
        .filter(|j| j.state == JobState::Succeeded as i32)
        .map(|j| (j.id.clone(), j))
        .collect();
    server.proc.kill9();
    assert!(!before.is_empty());

    // Down for a moment: agents keep retrying with backoff.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = start_server(&bins(), dir.path(), &db, &addr, FAST);
    let restarted = std::time::Instant::now();
    let mut c = server.client().await;
    wait_healthy(&mut c, &["es-commands-1", "es-commands-2"]).await;
    // The agents' reconnect backoff is capped at 1 s (ES_AGENT_BACKOFF_CAP in the test kit): they
    // are back within the cap plus a registration, with a wide margin for a loaded machine.
    let back = restarted.elapsed();
    assert!(
        back < Duration::from_secs(10),
        "agents took {back:?} to reconnect"
    );
    // The cap itself, from the agents' own logs: they did retry while the server was down, and
    // never waited longer than the 1 s cap between attempts.
    for agent in [&_a, &_b] {
        let delays: Vec<u64> = agent
            .log()
            .lines()
            .filter_map(|l| l.split_once("retrying in ")?.1.split_once(" ms"))
            .filter_map(|(ms, _)| ms.parse().ok())
            .collect();
        assert!(
            !delays.is_empty(),
            "no retry logged while the server was down"
        );
        assert!(
            delays.iter().all(|&ms| ms <= 1000),
            "a retry waited past the 1 s cap: {delays:?}"
        );
    }
    let cc = c.clone();
    wait_until(
        "every job finished after the restart",
        Duration::from_secs(60),
        move || {
            let mut c = cc.clone();
            async move {
                all_jobs(&mut c).await.iter().all(|j| {
                    JobState::try_from(j.state)
                        .unwrap_or_default()
                        .is_terminal()
                })
            }
        },
    )
    .await;
    let after: HashMap<String, Job> = all_jobs(&mut c)
        .await
        .into_iter()
        .map(|j| (j.id.clone(), j))
        .collect();
    assert_eq!(after.len(), total, "no submission lost");
    for id in &ids {
        let j = &after[id];
        assert_eq!(j.state, JobState::Succeeded as i32, "{j:?}");
    }
    for (id, j) in &before {
        let now = &after[id];
        assert_eq!(
            (now.epoch, now.attempt, &now.agent, &now.result),
            (j.epoch, j.attempt, &j.agent, &j.result),
            "acknowledged result of {id} changed"
        );
        assert_eq!(now.finished_at_us, j.finished_at_us);
    }
}

/// `submit --wait` (and so `watch` and `sandbox up`, which follow jobs the same way) carries on
/// across a `kill -9` and restart of the server: it reconnects, resumes after the last event it
/// saw (each event printed once), and exits with the job's status. The first of its two
/// `--server` addresses answers nothing: the next one is tried. With no server at all it gives
/// up after `--give-up-after`, with exit 69, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_cli_resumes_across_a_server_restart() {
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("es.db");
    let mut server = start_server(&bins(), dir.path(), &db, "127.0.0.1:0", FAST);
    let addr = server.addr.to_string();
    let _agent = start_agent(
        &bins(),
        dir.path(),
        &server.url(),
        &AgentSpec::new("es-commands-w", "commands"),
    );
    let mut c = server.client().await;
    wait_healthy(&mut c, &["es-commands-w"]).await;
    let servers = format!("http://127.0.0.1:1,{}", server.url());
    let cli = std::process::Command::new(bins().server)
        .args([
            "submit", "--role", "commands", "--sleep", "6s", "--steps", "6", "--wait",
        ])
        .env("ES_SERVER", &servers)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let job = {
        let until = std::time::Instant::now() + LONG;
        loop {
            let jobs = all_jobs(&mut c).await;
            if let Some(j) = jobs
                .into_iter()
                .find(|j| j.state == JobState::Running as i32)
            {
                break j;
            }
            assert!(std::time::Instant::now() < until, "the job never ran");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.proc.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = start_server(&bins(), dir.path(), &db, &addr, FAST);
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("lost the server") && stderr.contains("resumed after event #"),
        "{stderr}"
    );
    // Each event once: seq numbers strictly increase, and the result is there.
    let seqs: Vec<u64> = stdout
        .lines()
        .filter_map(|l| {
            l.split_once("  #")
                .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{stdout}");
    assert!(stdout.contains("succeeded"), "{stdout}");
    let mut c = server.client().await;
    assert_eq!(get(&mut c, &job.id).await.state, JobState::Succeeded as i32);

    // The server goes for good while a watch follows a job: it gives up after
    // --give-up-after, with exit 69, saying the job goes on.
    let long = submit(
        &mut c,
        submission("commands", SleepJobSpec::steps(30_000, 30)),
    )
    .await;
    wait_state(&mut c, &long.id, JobState::Running, LONG).await;
    let watcher = std::process::Command::new(bins().server)
        .args(["watch", &long.id, "--give-up-after", "2s"])
        .env("ES_SERVER", format!("http://{addr}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(server);
    let out = tokio::task::spawn_blocking(move || watcher.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("no server answered for 2s")
            && stderr.contains(&format!("es-server watch {}", long.id)),
        "{stderr}"
    );
}
