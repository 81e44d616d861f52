//! Retention: finished jobs, their events and audit entries older than `--retention` are
//! deleted, in batches; unfinished jobs and young ones stay. Both stores (`ES_TEST_STORE`).

use es_proto::v1::*;
use es_server::store::Store;
use es_tests::*;

use crate::{Env, LONG};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_deleted_after_the_retention() {
    let env = Env::start(&["--retention", "2s"]);
    let _a = env.agent(&AgentSpec::new("es-shells-r", "shells"));
    let mut c = env.server.client().await;
    let old = submit(&mut c, submission("shells", echo("old"))).await;
    wait_done(&mut c, &old.id, LONG).await;
    let queued = submit(
        &mut c,
        SubmitRequest {
            selector: "nobody-serves-this".into(),
            ..submission("shells", echo("waiting"))
        },
    )
    .await;
    let cc = c.clone();
    let id = old.id.clone();
    wait_until("the finished job to be purged", LONG, move || {
        let (mut c, id) = (cc.clone(), id.clone());
        async move {
            matches!(c.get(GetRequest { job_id: id }).await, Err(s) if s.code() == tonic::Code::NotFound)
        }
    })
    .await;
    // Unfinished jobs are never purged.
    assert_eq!(get(&mut c, &queued.id).await.state, JobState::Queued as i32);
    env.server
        .proc
        .wait_log("retention: deleted 1 finished jobs", LONG);
}

const DAY_US: i64 = 86_400_000_000;

fn event(job: &Job, seq: u64, event: job_event::Event) -> JobEvent {
    JobEvent {
        job_id: job.id.clone(),
        seq,
        at_us: job.created_at_us + seq as i64,
        attempt: job.attempt,
        agent: job.agent.clone(),
        event: Some(event),
    }
}

/// A job written as the server writes one (submitted, leased, and finished unless `finish` is
/// false) at `at_us`: its events and audit entries carry that time.
async fn job_at(store: &Store, id: &str, at_us: i64, finish: bool) -> Job {
    let mut job = Job {
        id: id.into(),
        role: Role::Commands as i32,
        spec: Some(echo(id)),
        state: JobState::Queued as i32,
        max_attempts: 3,
        created_at_us: at_us,
        submitted_by: "test".into(),
        ..Default::default()
    };
    let queued = event(&job, 1, job_event::Event::State(JobState::Queued as i32));
    store.insert(job.clone(), vec![queued]).await.unwrap();
    if !finish {
        return job;
    }
    (job.state, job.attempt, job.epoch) = (JobState::Running as i32, 1, 1);
    job.agent = "es-commands-1".into();
    job.started_at_us = at_us + 1;
    let running = event(&job, 2, job_event::Event::State(JobState::Running as i32));
    store.update(&job, vec![running]).await.unwrap();
    let result = JobResult {
        state: JobState::Succeeded as i32,
        output: id.into(),
        ..Default::default()
    };
    job.state = JobState::Succeeded as i32;
    job.result = Some(result.clone());
    job.finished_at_us = at_us + 2;
    let done = event(&job, 3, job_event::Event::Result(result));
    store.update(&job, vec![done]).await.unwrap();
    job
}

async fn trail(store: &Store, job_id: Option<&str>) -> Vec<AuditEntry> {
    store
        .audit_trail(None, job_id.map(str::to_owned), 0, 1000)
        .await
        .unwrap()
}

/// A purge deletes at most a batch of jobs (oldest first, with their events and audit
/// entries), then the old entries of no job, says when more may be left, and leaves unfinished
/// and young jobs with their events and audit entries: on the store itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_goes_in_batches_oldest_first_and_keeps_young_and_unfinished_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _cluster) = open_store(dir.path()).await;
    let now = es_server::dispatch::now_us();
    let long_ago = now - 10 * DAY_US;
    let mut old = Vec::new();
    for i in 0..5 {
        old.push(job_at(&store, &format!("old-{i}"), long_ago + 10 * i, true).await);
    }
    let waiting = job_at(&store, "waiting", long_ago, false).await;
    let young = job_at(&store, "young", now, true).await;
    // An entry of no job (a drain) from long ago.
    let drain = AuditEntry {
        at_us: long_ago,
        actor: "operator".into(),
        action: "drain".into(),
        detail_json: "{}".into(),
        ..Default::default()
    };
    store.audit(vec![drain]).await.unwrap();
    let mut old_entries = 1;
    for job in &old {
        let n = trail(&store, Some(&job.id)).await.len();
        assert_eq!(n, 3, "submit, lease and result of {}", job.id);
        old_entries += n as u64;
    }

    let cutoff = now - DAY_US;
    let first = store.purge(cutoff, 2).await.unwrap();
    assert_eq!(first.jobs, 2, "{first:?}");
    assert_eq!(first.audit, 6, "their own entries go with them");
    assert!(first.more, "a full batch: more may be left");
    assert!(store.get("old-0").await.unwrap().is_none());
    assert!(store.get("old-1").await.unwrap().is_none());
    assert!(store.get("old-2").await.unwrap().is_some(), "oldest first");
    let (mut total, mut batches) = (first, 1);
    loop {
        let p = store.purge(cutoff, 2).await.unwrap();
        (total.jobs, total.audit, batches) =
            (total.jobs + p.jobs, total.audit + p.audit, batches + 1);
        assert!(batches <= 20, "the purge never ends: {total:?}");
        if !p.more {
            break;
        }
    }
    assert_eq!(total.jobs, 5);
    assert_eq!(
        total.audit, old_entries,
        "every old job's entries and the drain's"
    );
    for job in &old {
        assert!(store.get(&job.id).await.unwrap().is_none());
        assert!(store.events_after(&job.id, 0).await.unwrap().is_empty());
        assert!(trail(&store, Some(&job.id)).await.is_empty());
    }
    assert!(trail(&store, None)
        .await
        .iter()
        .all(|e| e.action != "drain"));
    // The unfinished job and the young one stay whole.
    for (job, entries) in [(&waiting, 1), (&young, 3)] {
        assert!(store.get(&job.id).await.unwrap().is_some());
        assert_eq!(store.events_after(&job.id, 0).await.unwrap().len(), entries);
        assert_eq!(trail(&store, Some(&job.id)).await.len(), entries);
    }
    // Nothing left to delete: an empty batch, and no more.
    let p = store.purge(cutoff, 2).await.unwrap();
    assert_eq!((p.jobs, p.audit, p.more), (0, 0, false));
    let store2 = store.clone();
    tokio::task::spawn_blocking(move || store2.shutdown())
        .await
        .unwrap();
}
