//! Queues per (role, selector): offers to the agent the selector picks, withdrawn offers,
//! per-sandbox exclusivity of es-shells jobs.

use super::*;

impl Core {
    /// Puts an offered job back at the head of its queue.
    pub(super) fn unoffer(&mut self, id: &str) {
        if let Some(a) = self.jobs.get_mut(id) {
            if let Some((agent, _)) = a.offered.take() {
                busy(&mut self.busy_sandboxes, a.exclusive_sandbox(), false);
                if let Some(e) = self.agents.get_mut(&agent) {
                    e.offered.remove(id);
                }
                if a.job.state == JobState::Queued as i32 {
                    self.queues
                        .entry((a.job.role, a.job.selector.clone()))
                        .or_default()
                        .push_front(id.to_owned());
                }
            }
        }
    }

    /// Offers queued jobs of `key` to agents until the queue or the capacity runs out.
    pub(super) fn dispatch(&mut self, s: &Settings, key: &QueueKey, now: Instant) {
        let Some(queue) = self.queues.get_mut(key) else {
            return;
        };
        if queue.is_empty() {
            return;
        }
        let mut names: Vec<&String> = Vec::new();
        let mut cands: Vec<Candidate> = Vec::new();
        let mut aws_ok: Vec<bool> = Vec::new();
        for (name, a) in &self.agents {
            if a.identity.role == key.0 && a.identity.selector == key.1 {
                names.push(name);
                aws_ok.push(a.aws_problem.is_empty());
                cands.push(Candidate {
                    fallback: a.identity.fallback,
                    available: !a.draining && a.health(s, now).is_ok(),
                    slots: a.identity.slots,
                    busy: (a.leased.len() + a.offered.len()) as u32,
                    last_pick: a.last_pick,
                });
            }
        }
        let names: Vec<String> = names.into_iter().cloned().collect();
        while let Some(i) = selector::choose(&cands) {
            // The first job whose sandbox is not busy with another es-shells job (usually the
            // head of the queue), and that this agent can run: one that cannot use AWS now gets
            // only diagnostic jobs. None: this agent is done, the others may still take one.
            let jobs = &self.jobs;
            let busy_now = &self.busy_sandboxes;
            let Some(pos) = queue.iter().position(|id| {
                jobs.get(id).is_none_or(|j| {
                    (aws_ok[i] || !j.needs_aws())
                        && j.exclusive_sandbox()
                            .is_none_or(|sb| !busy_now.contains_key(sb))
                })
            }) else {
                cands[i].available = false;
                continue;
            };
            let Some(id) = queue.remove(pos) else { break };
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if job.job.state != JobState::Queued as i32 || job.offered.is_some() {
                continue;
            }
            busy(&mut self.busy_sandboxes, job.exclusive_sandbox(), true);
            self.picks += 1;
            cands[i].busy += 1;
            cands[i].last_pick = self.picks;
            let agent = self.agents.get_mut(&names[i]).expect("candidate exists");
            agent.last_pick = self.picks;
            agent.offered.insert(id.clone());
            job.offered = Some((names[i].clone(), now + s.offer_timeout));
            agent.send(server_message::Msg::Offer(Offer { job_id: id }));
        }
    }

    pub(super) fn dispatch_all(&mut self, s: &Settings, now: Instant) {
        let keys: Vec<QueueKey> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.dispatch(s, &k, now);
        }
    }
}
