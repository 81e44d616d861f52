//! SIGTERM drains: in-flight jobs finish, no new work is taken, exit 0; a second SIGTERM
//! cancels what is left and hands it back to the server.

use std::time::Duration;

use es_proto::v1::*;
use es_tests::*;

use crate::leases::SleepJobSpec;
use crate::{Env, LONG};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_jobs_takes_no_new_work_and_exits_zero() {
    let env = Env::start(&[]);
    let mut a = env.agent(&AgentSpec::new("es-shells-d", "shells").slots(2).health());
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-d"]).await;
    let job = submit(&mut c, submission("shells", SleepJobSpec::steps(2000, 4))).await;
    wait_state(&mut c, &job.id, JobState::Running, LONG).await;
    let health_addr = agents(&mut c).await[0]
        .identity
        .clone()
        .unwrap()
        .health_addr;
    assert!(es_server::probe(&health_addr, Duration::from_secs(2))
        .await
        .is_ok());

    a.sigterm();
    let cc = c.clone();
    wait_until("server to see the agent draining", LONG, move || {
        let mut c = cc.clone();
        async move { agents(&mut c).await.iter().any(|a| a.draining) }
    })
    .await;
    // The health server now says NOT_SERVING.
    let probe = es_server::probe(&health_addr, Duration::from_secs(2)).await;
    assert!(probe.is_err_and(|e| e.contains("NOT_SERVING")));
    // New work is not given to a draining agent.
    let late = submit(&mut c, submission("shells", echo("late"))).await;

    let status = a.wait_exit(LONG).expect("agent exits after its drain");
    assert!(status.success(), "exit status {status:?}");
    let j = get(&mut c, &job.id).await;
    assert_eq!(
        j.state,
        JobState::Succeeded as i32,
        "in-flight job finished: {j:?}"
    );
    assert_eq!(j.agent, "es-shells-d");
    let l = get(&mut c, &late.id).await;
    assert_eq!(
        l.state,
        JobState::Queued as i32,
        "late job untouched: {l:?}"
    );
    assert!(a.log().contains("told the server we are leaving"));

    // Another agent picks the late job up.
    let _b = env.agent(&AgentSpec::new("es-shells-e", "shells"));
    assert_eq!(wait_done(&mut c, &late.id, LONG).await.agent, "es-shells-e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_cancels_and_releases_in_flight_jobs() {
    let env = Env::start(&[]);
    let mut a = env.agent(
        &AgentSpec::new("es-shells-x", "shells")
            .slots(1)
            .env("ES_AGENT_CANCEL_GRACE", "500ms"),
    );
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-x"]).await;
    let job = submit(
        &mut c,
        submission("shells", SleepJobSpec::steps(60_000, 600)),
    )
    .await;
    wait_state(&mut c, &job.id, JobState::Running, LONG).await;
    a.sigterm();
    let cc = c.clone();
    wait_until("draining", LONG, move || {
        let mut c = cc.clone();
        async move { agents(&mut c).await.iter().any(|a| a.draining) }
    })
    .await;
    a.sigterm();
    let status = a
        .wait_exit(LONG)
        .expect("agent exits after the second signal");
    assert!(status.success(), "{status:?}");
    // The job was released, not finished: it waits for another agent.
    let j = wait_state(&mut c, &job.id, JobState::Queued, LONG).await;
    assert!(j.result.is_none());
    let _b = env.agent(&AgentSpec::new("es-shells-y", "shells"));
    let j = wait_state(&mut c, &job.id, JobState::Running, LONG).await;
    assert_eq!((j.agent.as_str(), j.attempt), ("es-shells-y", 2));
    c.cancel(CancelRequest {
        job_id: job.id.clone(),
        reason: "test over".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        wait_done(&mut c, &job.id, LONG).await.state,
        JobState::Cancelled as i32
    );
}
