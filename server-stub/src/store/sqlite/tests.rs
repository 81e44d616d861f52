//! The SQLite store against a real file: idempotency, reopen, events.

use super::*;
use es_proto::v1::{job_spec, EchoJob, JobResult, JobSpec, Role};

fn job(id: &str, key: &str) -> Job {
    Job {
        id: id.into(),
        idempotency_key: key.into(),
        role: Role::Shells as i32,
        selector: "us-east-1".into(),
        spec: Some(JobSpec {
            kind: Some(job_spec::Kind::Echo(EchoJob {
                message: "hi".into(),
            })),
            target: None,
        }),
        state: JobState::Queued as i32,
        max_attempts: 3,
        created_at_us: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn insert_is_idempotent_by_key_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("es.db");
    let store = SqliteStore::open(&path, Sync::Normal).unwrap();
    let (a, created) = store.insert(job("j1", "k"), vec![]).await.unwrap();
    assert!(created);
    let (b, created) = store.insert(job("j2", "k"), vec![]).await.unwrap();
    assert!(!created, "same key must return the first job");
    assert_eq!(b.id, a.id);
    let mut done = a.clone();
    done.state = JobState::Succeeded as i32;
    done.finished_at_us = 10;
    done.result = Some(JobResult {
        state: JobState::Succeeded as i32,
        output: "hi".into(),
        error: String::new(),
        ..Default::default()
    });
    store.update(&done, vec![]).await.unwrap();
    drop(store);

    let store = SqliteStore::open(&path, Sync::Full).unwrap();
    let got = store.get("j1").await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Succeeded as i32);
    assert_eq!(got.result.unwrap().output, "hi");
    assert!(store.get("j2").await.unwrap().is_none());
    assert!(store.load_active().await.unwrap().is_empty());
    assert_eq!(store.purge(11, 10).await.unwrap().jobs, 1);
    assert!(store.get("j1").await.unwrap().is_none());
}

#[tokio::test]
async fn events_are_deduplicated_by_seq_and_listed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("es.db"), Sync::Normal).unwrap();
    store.insert(job("j1", ""), vec![]).await.unwrap();
    let ev = |seq| JobEvent {
        job_id: "j1".into(),
        seq,
        at_us: seq as i64,
        ..Default::default()
    };
    store.events(vec![ev(1), ev(2)]).await.unwrap();
    store.events(vec![ev(2), ev(3)]).await.unwrap();
    let got: Vec<u64> = store
        .events_after("j1", 1)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(got, vec![2, 3]);
    let active = store.load_active().await.unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].1, 3);
}

/// A group whose first statement reads (here a submission with a key) waits for another
/// connection's write (the checkpointer's TRUNCATE blocks writers the same way) instead of
/// failing with "database is locked" once its read snapshot went stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_reads_first_waits_for_another_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("es.db");
    let store = SqliteStore::open(&path, Sync::Normal).unwrap();
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch(
            "BEGIN IMMEDIATE; INSERT INTO audit (at_us, sandbox_id, job_id, actor, action, detail)
               VALUES (1, '', '', 'test', 'hold', '{}');",
        )
        .unwrap();
    // Queued now: the writer starts on it while the other connection holds the write lock.
    let insert = store.insert(job("j1", "k1"), vec![]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    other.execute_batch("COMMIT").unwrap();
    let (stored, created) = insert.await.unwrap();
    assert!(created && stored.id == "j1");
    assert_eq!(store.audit_trail(None, None, 0, 10).await.unwrap().len(), 2);
}
