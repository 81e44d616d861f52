//! The lease state machine with injected time: expiry, fencing, attempts, cancel, selector
//! wiring. The end-to-end tests cover the same rules through real processes.
use super::*;
use crate::store::Sync;
use es_proto::v1::{job_spec, EchoJob, JobSpec, Role};

async fn setup() -> (tempfile::TempDir, Arc<Dispatcher>) {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::sqlite::open(&dir.path().join("es.db"), Sync::Normal).unwrap();
    (
        dir,
        Dispatcher::recover(store, Settings::default())
            .await
            .unwrap(),
    )
}

fn job(id: &str, max_attempts: u32) -> Job {
    Job {
        id: id.into(),
        role: Role::Shells as i32,
        selector: "r".into(),
        spec: Some(JobSpec {
            kind: Some(job_spec::Kind::Echo(EchoJob {
                message: "m".into(),
            })),
            target: None,
        }),
        max_attempts,
        ..Default::default()
    }
}

async fn agent(d: &Dispatcher, name: &str, fallback: bool, slots: u32) -> String {
    let id = AgentIdentity {
        name: name.into(),
        role: Role::Shells as i32,
        selector: "r".into(),
        slots,
        fallback,
        ..Default::default()
    };
    let (session, _) = d.register(id, vec![]).await.unwrap();
    // Marks the agent as streaming; offers sent to the dropped receiver are simply lost,
    // which the tests do not need.
    d.listen(&session).unwrap();
    session
}

fn ok() -> JobResult {
    JobResult {
        state: JobState::Succeeded as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn expired_lease_requeues_with_a_new_epoch_and_fences_the_old_holder() {
    let (_dir, d) = setup().await;
    let a = agent(&d, "a", false, 1).await;
    d.submit(job("j", 3)).await.unwrap();
    let lease = d.acquire(&a, "j").await.unwrap();
    assert_eq!((lease.epoch, lease.attempt), (1, 1));
    // Renewed within the TTL: still held.
    d.tick_at(Instant::now() + d.settings.lease_ttl / 2).await;
    assert_eq!(d.get("j").await.unwrap().state, JobState::Running as i32);
    // Past the TTL without renewal: queued again, epoch bumped.
    d.tick_at(Instant::now() + d.settings.lease_ttl * 2).await;
    let j = d.get("j").await.unwrap();
    assert_eq!(j.state, JobState::Queued as i32);
    assert!(j.epoch > lease.epoch);
    let err = d.complete(&a, "j", lease.epoch, ok()).await.unwrap_err();
    assert!(matches!(err, DispatchError::StaleEpoch { .. }), "{err}");
    let (lost, _, _) = d
        .heartbeat(
            &a,
            &[HeldLease {
                job_id: "j".into(),
                epoch: lease.epoch,
            }],
            false,
        )
        .unwrap();
    assert_eq!(lost.len(), 1);
    // The next lease is attempt 2 with a higher epoch still.
    let again = d.acquire(&a, "j").await.unwrap();
    assert_eq!(again.attempt, 2);
    assert!(again.epoch > j.epoch);
    d.complete(&a, "j", again.epoch, ok()).await.unwrap();
    d.complete(&a, "j", again.epoch, ok()).await.unwrap(); // resend: acknowledged
    assert_eq!(d.get("j").await.unwrap().state, JobState::Succeeded as i32);
}

#[tokio::test]
async fn spent_attempts_fail_the_job_and_hard_cancel_fences_it() {
    let (_dir, d) = setup().await;
    let a = agent(&d, "a", false, 2).await;
    d.submit(job("once", 1)).await.unwrap();
    d.acquire(&a, "once").await.unwrap();
    d.tick_at(Instant::now() + d.settings.lease_ttl * 2).await;
    let j = d.get("once").await.unwrap();
    assert_eq!(j.state, JobState::Failed as i32);
    assert!(j.result.unwrap().error.contains("attempt 1 of 1"));

    d.submit(job("c", 3)).await.unwrap();
    let lease = d.acquire(&a, "c").await.unwrap();
    d.cancel("c", "stop").await.unwrap();
    // The agent keeps renewing but never stops: fenced after grace + TTL.
    let later = Instant::now() + d.settings.cancel_grace + d.settings.lease_ttl * 2;
    d.heartbeat(
        &a,
        &[HeldLease {
            job_id: "c".into(),
            epoch: lease.epoch,
        }],
        false,
    )
    .unwrap();
    d.tick_at(later).await;
    let j = d.get("c").await.unwrap();
    assert_eq!(j.state, JobState::Cancelled as i32);
    assert!(j.epoch > lease.epoch);
    assert!(d.complete(&a, "c", lease.epoch, ok()).await.is_err());
}

#[tokio::test]
async fn offers_go_to_primaries_first_and_expire_to_the_fallback() {
    let (_dir, d) = setup().await;
    let _fb = agent(&d, "fb", true, 4).await;
    let p = agent(&d, "p", false, 1).await;
    d.submit(job("j1", 3)).await.unwrap();
    d.submit(job("j2", 3)).await.unwrap();
    // j1 is offered to the primary (its one slot); j2 overflows to the fallback.
    let err = d.acquire(&p, "j2").await.unwrap_err();
    assert!(
        matches!(err, DispatchError::OfferedElsewhere { .. }),
        "{err}"
    );
    d.acquire(&p, "j1").await.unwrap();
    // An offer that is never acquired goes back to the queue and out again.
    d.tick_at(Instant::now() + d.settings.offer_timeout * 2)
        .await;
    assert_eq!(d.get("j2").await.unwrap().state, JobState::Queued as i32);
}

#[tokio::test]
async fn shells_jobs_of_one_sandbox_run_one_at_a_time() {
    let (_dir, d) = setup().await;
    let a = agent(&d, "a", false, 5).await;
    let shells_job = |id: &str, sb: &str| Job {
        sandbox_id: sb.into(),
        spec: Some(JobSpec {
            kind: Some(job_spec::Kind::CleanupSandbox(Default::default())),
            target: None,
        }),
        ..job(id, 3)
    };
    d.submit(shells_job("first", "sb-1")).await.unwrap();
    d.submit(shells_job("second", "sb-1")).await.unwrap();
    d.submit(shells_job("other", "sb-2")).await.unwrap();
    d.submit(job("diag", 3)).await.unwrap();
    // A RunCommand on the same sandbox is not a provisioning job: it is not held back.
    d.submit(Job {
        sandbox_id: "sb-1".into(),
        spec: Some(JobSpec {
            kind: Some(job_spec::Kind::RunCommand(Default::default())),
            target: None,
        }),
        ..job("script", 3)
    })
    .await
    .unwrap();
    // first, other, diag and script are offered; second waits for first.
    let l1 = d.acquire(&a, "first").await.unwrap();
    d.acquire(&a, "other").await.unwrap();
    d.acquire(&a, "diag").await.unwrap();
    d.acquire(&a, "script").await.unwrap();
    let err = d.acquire(&a, "second").await.unwrap_err();
    assert!(
        matches!(err, DispatchError::OfferedElsewhere { .. }),
        "{err}"
    );
    d.complete(&a, "first", l1.epoch, ok()).await.unwrap();
    // Now it is offered and can be taken.
    let l2 = d.acquire(&a, "second").await.unwrap();
    assert_eq!(l2.attempt, 1);
}

/// At shutdown or deposition the streams are closed; a Listen or poll that comes after (a
/// registration that raced the stop) is refused instead of opening a stream that would hold
/// the graceful stop until the agent ended it.
#[tokio::test]
async fn no_stream_opens_after_the_streams_are_closed() {
    let (_dir, d) = setup().await;
    let id = AgentIdentity {
        name: "late".into(),
        role: Role::Shells as i32,
        selector: "r".into(),
        slots: 1,
        ..Default::default()
    };
    let (session, _) = d.register(id, vec![]).await.unwrap();
    let mut open = d.listen(&session).unwrap().2;
    d.close_streams();
    assert!(open.recv().await.is_none(), "the open stream ends");
    assert!(matches!(d.listen(&session), Err(DispatchError::Stopping)));
    assert!(matches!(
        d.poll(&session, Duration::ZERO).await,
        Err(DispatchError::Stopping)
    ));
}
