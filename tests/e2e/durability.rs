//! The server is killed with `kill -9` and restarted on the same SQLite file: no acknowledged
//! submission and no reported result is lost, and agents reconnect by themselves.

use std::collections::HashMap;
use std::time::Duration;

use es_proto::v1::*;
use es_tests::*;

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
