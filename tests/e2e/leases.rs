//! Leases and fencing: expiry and re-offer, stale epochs refused, attempts, timeouts, cancel.
//!
//! Some tests speak the agent protocol directly with a real gRPC client (a "bare agent") so they
//! can misbehave on purpose: stop renewing, write with an old epoch.

use std::time::Duration;

use es_proto::v1::agent_service_client::AgentServiceClient;
use es_proto::v1::*;
use es_tests::*;
use tonic::transport::Channel;
use tonic::Code;

use crate::{Env, LONG};

async fn bare_agent(url: &str, name: &str, r: &str) -> (AgentServiceClient<Channel>, String) {
    let ch = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = AgentServiceClient::new(ch);
    let reg = c
        .register(RegisterRequest {
            identity: Some(AgentIdentity {
                name: name.into(),
                role: role(r),
                slots: 2,
                ..Default::default()
            }),
            held: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    (c, reg.session_id)
}

fn ok_result() -> JobResult {
    JobResult {
        state: JobState::Succeeded as i32,
        output: "done".into(),
        error: String::new(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_with_a_stale_epoch_are_refused() {
    let env = Env::start(&[]);
    let mut c = env.server.client().await;
    let url = env.server.url();
    let job = submit(&mut c, submission("shells", echo("x"))).await;

    let (mut a, sa) = bare_agent(&url, "bare-a", "shells").await;
    let lease_a = a
        .acquire(AcquireRequest {
            session_id: sa.clone(),
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!((lease_a.attempt, lease_a.epoch), (1, 1));
    // Acquire is idempotent for the holder.
    let again = a
        .acquire(AcquireRequest {
            session_id: sa.clone(),
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(again.epoch, lease_a.epoch);
    // A report with the current epoch is stored; its resend is deduplicated.
    let ev = |seq| AgentEvent {
        seq,
        event: Some(agent_event::Event::Log(format!("line {seq}"))),
    };
    let r = a
        .report(ReportRequest {
            session_id: sa.clone(),
            job_id: job.id.clone(),
            epoch: 1,
            events: vec![ev(1), ev(2)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.acked_seq, 2);
    let r = a
        .report(ReportRequest {
            session_id: sa.clone(),
            job_id: job.id.clone(),
            epoch: 1,
            events: vec![ev(2), ev(3)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.acked_seq, 3);

    // Agent B (another role) may not take it; a second agent of the role may not while leased.
    let (mut x, sx) = bare_agent(&url, "bare-commands", "commands").await;
    let err = x
        .acquire(AcquireRequest {
            session_id: sx,
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let (mut b, sb) = bare_agent(&url, "bare-b", "shells").await;
    let err = b
        .acquire(AcquireRequest {
            session_id: sb.clone(),
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // A never renews: its lease expires (TTL 1.5 s) and B takes the job with a new epoch.
    let cc = c.clone();
    let id = job.id.clone();
    wait_until("lease of bare-a to expire", LONG, move || {
        let (mut c, id) = (cc.clone(), id.clone());
        async move { get(&mut c, &id).await.state == JobState::Queued as i32 }
    })
    .await;
    let lease_b = b
        .acquire(AcquireRequest {
            session_id: sb.clone(),
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(lease_b.attempt, 2);
    assert!(lease_b.epoch > lease_a.epoch);

    // Everything A writes with its old epoch is refused.
    let err = a
        .report(ReportRequest {
            session_id: sa.clone(),
            job_id: job.id.clone(),
            epoch: lease_a.epoch,
            events: vec![ev(4)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("stale lease"), "{}", err.message());
    let err = a
        .complete(CompleteRequest {
            session_id: sa.clone(),
            job_id: job.id.clone(),
            epoch: lease_a.epoch,
            result: Some(ok_result()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let hb = a
        .heartbeat(HeartbeatRequest {
            session_id: sa.clone(),
            leases: vec![HeldLease {
                job_id: job.id.clone(),
                epoch: lease_a.epoch,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.lost.len(), 1, "A learns its lease is gone");

    // B finishes; a resend of the same result is acknowledged, not applied twice.
    let done = CompleteRequest {
        session_id: sb.clone(),
        job_id: job.id.clone(),
        epoch: lease_b.epoch,
        result: Some(ok_result()),
    };
    b.complete(done.clone()).await.unwrap();
    b.complete(done).await.unwrap();
    let j = get(&mut c, &job.id).await;
    assert_eq!(
        (j.state, j.attempt, j.agent.as_str()),
        (JobState::Succeeded as i32, 2, "bare-b")
    );
    // A finished job cannot be acquired again.
    let err = a
        .acquire(AcquireRequest {
            session_id: sa,
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_attempts_are_spent_fails_with_the_reason() {
    let env = Env::start(&[]);
    let mut c = env.server.client().await;
    let mut req = submission("shells", echo("x"));
    req.max_attempts = 1;
    let job = submit(&mut c, req).await;
    let (mut a, sa) = bare_agent(&env.server.url(), "bare-a", "shells").await;
    a.acquire(AcquireRequest {
        session_id: sa,
        job_id: job.id.clone(),
    })
    .await
    .unwrap();
    let j = wait_done(&mut c, &job.id, LONG).await;
    assert_eq!(j.state, JobState::Failed as i32);
    let err = j.result.unwrap().error;
    assert!(err.contains("lease lost on attempt 1 of 1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_agent_loses_its_lease_and_fences_itself_after_it_wakes() {
    let env = Env::start(&[]);
    let a = env.agent(&AgentSpec::new("es-shells-a", "shells").slots(1));
    let b = env.agent(&AgentSpec::new("es-shells-b", "shells").slots(1));
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-a", "es-shells-b"]).await;
    let mut req = submission("shells", SleepJobSpec::steps(4000, 8));
    req.max_attempts = 3;
    let job = submit(&mut c, req).await;
    let first = wait_state(&mut c, &job.id, JobState::Running, LONG).await;
    let (hung, other) = if first.agent == "es-shells-a" {
        (&a, "es-shells-b")
    } else {
        (&b, "es-shells-a")
    };
    hung.sigstop();
    let cc = c.clone();
    let id = job.id.clone();
    let other_name = other.to_owned();
    wait_until("job re-leased to the other agent", LONG, move || {
        let (mut c, id, o) = (cc.clone(), id.clone(), other_name.clone());
        async move {
            let j = get(&mut c, &id).await;
            j.state == JobState::Running as i32 && j.agent == o
        }
    })
    .await;
    hung.sigcont();
    let done = wait_done(&mut c, &job.id, LONG).await;
    assert_eq!(done.state, JobState::Succeeded as i32);
    assert_eq!(done.attempt, 2);
    assert_eq!(done.agent, other, "only the new holder's result counts");
    // The woken agent stopped its copy on its own (lost lease reported or result refused).
    let log_has_fence =
        |p: &Proc| p.log().contains("stopping job") || p.log().contains("refused, lease lost");
    let mut waited = 0;
    while !log_has_fence(hung) && waited < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert!(
        log_has_fence(hung),
        "the old holder did not fence itself:\n{}",
        hung.log()
    );
}

/// Sleep specs with progress steps.
pub struct SleepJobSpec;
impl SleepJobSpec {
    pub fn steps(ms: u64, steps: u32) -> JobSpec {
        JobSpec {
            target: None,
            kind: Some(job_spec::Kind::Sleep(SleepJob {
                duration_ms: ms,
                steps,
                ..Default::default()
            })),
        }
    }
    pub fn stubborn(ms: u64) -> JobSpec {
        JobSpec {
            target: None,
            kind: Some(job_spec::Kind::Sleep(SleepJob {
                duration_ms: ms,
                steps: 1,
                ignore_cancel: true,
                ..Default::default()
            })),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_queued_running_and_stubborn_jobs() {
    let env = Env::start(&[]);
    let mut c = env.server.client().await;
    // Queued (no agent yet): cancelled at once.
    let queued = submit(&mut c, submission("commands", echo("never"))).await;
    let r = c
        .cancel(CancelRequest {
            job_id: queued.id.clone(),
            reason: "not needed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(r.state, JobState::Cancelled as i32);
    assert_eq!(r.result.unwrap().error, "not needed");

    let _a = env.agent(
        &AgentSpec::new("es-commands-1", "commands")
            .slots(2)
            .env("ES_AGENT_CANCEL_GRACE", "500ms"),
    );
    wait_healthy(&mut c, &["es-commands-1"]).await;
    // Running and cooperative.
    let coop = submit(
        &mut c,
        submission("commands", SleepJobSpec::steps(60_000, 600)),
    )
    .await;
    // Running and ignoring the cancel: forced after the grace.
    let stubborn = submit(
        &mut c,
        submission("commands", SleepJobSpec::stubborn(60_000)),
    )
    .await;
    wait_state(&mut c, &coop.id, JobState::Running, LONG).await;
    wait_state(&mut c, &stubborn.id, JobState::Running, LONG).await;
    for id in [&coop.id, &stubborn.id] {
        let j = c
            .cancel(CancelRequest {
                job_id: id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert!(j.cancel_requested);
    }
    let j = wait_done(&mut c, &coop.id, LONG).await;
    assert_eq!(j.state, JobState::Cancelled as i32);
    assert!(j.result.unwrap().error.contains("cancelled after step"));
    let j = wait_done(&mut c, &stubborn.id, LONG).await;
    assert_eq!(j.state, JobState::Cancelled as i32);
    assert!(j.result.unwrap().error.contains("forced"));
    // The agent's slots are free again.
    let after = submit(&mut c, submission("commands", echo("after"))).await;
    assert_eq!(
        wait_done(&mut c, &after.id, LONG).await.state,
        JobState::Succeeded as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_is_stopped_as_timed_out() {
    let env = Env::start(&[]);
    let _a = env.agent(&AgentSpec::new("es-shells-t", "shells"));
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-t"]).await;
    let mut req = submission("shells", SleepJobSpec::steps(60_000, 600));
    req.timeout_ms = 800;
    let job = submit(&mut c, req).await;
    let j = wait_done(&mut c, &job.id, LONG).await;
    assert_eq!(j.state, JobState::TimedOut as i32, "{j:?}");
    assert!(j.result.unwrap().error.contains("timed out after 800 ms"));
}
