//! Retention: finished jobs (with their events) and audit entries older than `--retention` are
//! deleted in batches, each committed as one write among the others. A purge is one write in
//! the store's order, so a single large one (a minute of jobs at full load, or days of them
//! after an outage) would hold every submission and result behind it until it committed.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::dispatch;
use crate::store::{Purged, Result, Store};

/// Jobs per batch (with their events and audit entries; or, at the end, audit entries of no
/// job): the longest a write waits behind the purge is one batch (es-bench-store prints its
/// time on each store).
pub const BATCH: u32 = 1000;

/// Purges every `retention / 4` (between 1 s and 60 s) until `stop`.
pub async fn run(store: Store, retention: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval(
        (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
    );
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let before = dispatch::now_us() - retention.as_micros() as i64;
        if let Err(e) = purge_all(&store, before, BATCH, &stop).await {
            log::error!("retention: {e}");
        }
    }
}

/// Purges batch after batch until one is not full (or `stop`), and logs what it deleted.
pub async fn purge_all(
    store: &Store,
    before_us: i64,
    batch: u32,
    stop: &CancellationToken,
) -> Result<Purged> {
    let started = Instant::now();
    let (mut total, mut batches, mut told) = (Purged::default(), 0u64, Instant::now());
    loop {
        let p = store.purge(before_us, batch).await?;
        total.jobs += p.jobs;
        total.audit += p.audit;
        batches += 1;
        if !p.more || stop.is_cancelled() {
            break;
        }
        // A long purge (a backlog after an outage) says how far it got now and then.
        if told.elapsed() >= Duration::from_secs(10) {
            told = Instant::now();
            log::info!(
                "retention: deleting, {} finished jobs and {} audit entries so far",
                total.jobs,
                total.audit
            );
        }
    }
    if total != Purged::default() {
        log::info!(
            "retention: deleted {} finished jobs and {} audit entries in {} batches, {} ms",
            total.jobs,
            total.audit,
            batches,
            started.elapsed().as_millis()
        );
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store;
    use es_proto::v1::{Job, JobState};

    async fn finished_jobs(n: usize) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = store::sqlite::open(&dir.path().join("es.db"), store::Sync::Normal).unwrap();
        for i in 0..n {
            let job = Job {
                id: format!("j{i}"),
                state: JobState::Succeeded as i32,
                created_at_us: 1,
                finished_at_us: 2,
                ..Default::default()
            };
            s.insert(job, vec![]).await.unwrap();
        }
        (dir, s)
    }

    #[tokio::test]
    async fn purge_all_goes_batch_after_batch_until_one_is_not_full() {
        let (_dir, s) = finished_jobs(5).await;
        let stop = CancellationToken::new();
        let total = purge_all(&s, 10, 2, &stop).await.unwrap();
        assert_eq!(total.jobs, 5);
        assert_eq!(total.audit, 5, "the submit entries of the jobs");
        assert!(s.get("j4").await.unwrap().is_none());
        s.shutdown();
    }

    #[tokio::test]
    async fn purge_all_stops_after_the_batch_in_flight_when_the_server_stops() {
        let (_dir, s) = finished_jobs(5).await;
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(purge_all(&s, 10, 2, &stop).await.unwrap().jobs, 2);
        s.shutdown();
    }
}
