//! The reaper: expired offers and leases, timeouts, hard cancels, as of a given time.

use super::*;

impl Dispatcher {
    /// One pass of the reaper: expired offers and leases, timeouts, hard cancels.
    pub async fn tick(&self) {
        self.tick_at(Instant::now()).await
    }

    /// The reaper pass as of `now` (tests pass a time in the future instead of waiting).
    pub async fn tick_at(&self, now: Instant) {
        let pending = {
            let mut core = self.lock();
            core.tick(&self.store, &self.settings, now)
        };
        if let Err(e) = self.finish(pending).await {
            log::error!("reaper: {e}");
        }
    }
}

impl Core {
    pub(super) fn tick(&mut self, store: &Store, s: &Settings, now: Instant) -> Vec<Pending> {
        let mut expired_offers = Vec::new();
        let mut lost = Vec::new();
        let mut timed_out = Vec::new();
        let mut hard = Vec::new();
        for (id, a) in &self.jobs {
            if let Some((_, until)) = &a.offered {
                if *until <= now {
                    expired_offers.push(id.clone());
                }
            }
            if a.job.state != JobState::Running as i32 {
                continue;
            }
            if a.cancel_hard_at.is_some_and(|t| t <= now) {
                hard.push(id.clone());
            } else if a.lease_expires.is_some_and(|t| t <= now) {
                lost.push(id.clone());
            } else if !a.job.cancel_requested && a.deadline.is_some_and(|t| t <= now) {
                timed_out.push(id.clone());
            }
        }
        for id in expired_offers {
            self.unoffer(&id);
        }
        let mut pending = Vec::new();
        for id in lost {
            let holder = self.jobs[&id].job.agent.clone();
            self.counter(&holder).leases_expired += 1;
            self.metrics.expired();
            let why = format!("not renewed within {} ms", s.lease_ttl.as_millis());
            log::warn!(job_id = id.as_str(), agent = holder.as_str(); "lease of job {id} expired");
            pending.push(self.lease_lost(store, &id, &why, now));
        }
        for id in timed_out {
            let ms = self.jobs[&id].job.timeout_ms;
            pending.push(self.request_cancel(
                store,
                s,
                &id,
                JobState::TimedOut,
                &format!("timed out after {ms} ms"),
                now,
            ));
        }
        for id in hard {
            let a = &self.jobs[&id];
            let result = JobResult {
                state: a.cancel_final as i32,
                output: String::new(),
                error: format!(
                    "{}; agent {} did not stop within the grace, job fenced",
                    a.cancel_reason, a.job.agent
                ),
                ..Default::default()
            };
            pending.push(self.terminate(store, &id, result, true, now));
        }
        let keep = Duration::from_secs(120);
        self.finished
            .retain(|_, (_, at)| now.duration_since(*at) < keep);
        self.dispatch_all(s, now);
        pending
    }
}
