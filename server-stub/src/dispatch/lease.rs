//! Leases: acquire (idempotent for the holder), reports and results fenced by epoch, the end
//! of a job (terminate), a lost lease (requeue or fail), cancel and timeout requests.

use super::*;

impl Dispatcher {
    /// Takes a job: idempotent for the agent that already holds it.
    pub async fn acquire(&self, session: &str, job_id: &str) -> Res<Lease> {
        let (lease, pending) = {
            let mut core = self.lock();
            let now = Instant::now();
            let name = core.session_agent(session)?;
            core.acquire(&self.store, &self.settings, &name, job_id, now)?
        };
        if let Some(p) = pending {
            self.finish(vec![p]).await?;
        }
        Ok(lease)
    }

    /// Stores progress/log events of a lease; resends (seq already stored) are dropped.
    pub async fn report(
        &self,
        session: &str,
        job_id: &str,
        epoch: u64,
        events: Vec<AgentEvent>,
    ) -> Res<u64> {
        let (acked, pending) = {
            let mut core = self.lock();
            let name = core.session_agent(session)?;
            let a = core.fenced(job_id, epoch, &name)?;
            let now = now_us();
            let mut out = Vec::new();
            for ev in events {
                if ev.seq <= a.agent_seq {
                    continue;
                }
                a.agent_seq = ev.seq;
                let event = match ev.event {
                    Some(es_proto::v1::agent_event::Event::Progress(p)) => {
                        job_event::Event::Progress(p)
                    }
                    Some(es_proto::v1::agent_event::Event::Log(l)) => job_event::Event::Log(l),
                    Some(es_proto::v1::agent_event::Event::AwsCall(c)) => {
                        job_event::Event::AwsCall(c)
                    }
                    None => continue,
                };
                a.next_seq += 1;
                out.push(JobEvent {
                    job_id: job_id.to_owned(),
                    seq: a.next_seq,
                    at_us: now,
                    event: Some(event),
                    attempt: a.job.attempt,
                    agent: name.clone(),
                });
            }
            let acked = a.agent_seq;
            let pending = (!out.is_empty()).then(|| Pending {
                commit: self.store.events(out.clone()),
                events: out,
            });
            (acked, pending)
        };
        if let Some(p) = pending {
            self.finish(vec![p]).await?;
        }
        Ok(acked)
    }

    /// Stores the final result of a lease. A resend of an accepted result is acknowledged.
    pub async fn complete(
        &self,
        session: &str,
        job_id: &str,
        epoch: u64,
        mut result: JobResult,
    ) -> Res<()> {
        let pending = {
            let mut core = self.lock();
            let now = Instant::now();
            let name = core.session_agent(session)?;
            if let Some((final_epoch, _)) = core.finished.get(job_id) {
                if *final_epoch == epoch {
                    return Ok(());
                }
            }
            let a = core.fenced(job_id, epoch, &name)?;
            let state = JobState::try_from(result.state).unwrap_or(JobState::Unspecified);
            if !state.is_terminal() {
                return Err(DispatchError::Invalid {
                    field: "result.state",
                    reason: format!(
                        "{} is not a final state; use succeeded, failed, cancelled or timed_out",
                        state.name()
                    ),
                });
            }
            if a.job.cancel_requested && state == JobState::Cancelled {
                result.state = a.cancel_final as i32;
                result.error = if result.error.is_empty() {
                    a.cancel_reason.clone()
                } else {
                    format!("{} ({})", a.cancel_reason, result.error)
                };
            }
            let key = (a.job.role, a.job.selector.clone());
            core.counter(&name).results_accepted += 1;
            let pending = core.terminate(&self.store, job_id, result, false, now);
            // A slot is free: hand out the next queued job now, not at the next tick.
            core.dispatch(&self.settings, &key, now);
            pending
        };
        self.finish(vec![pending]).await
    }
}

impl Core {
    /// The active job if `epoch` is its current lease and `agent` holds it; a refusal is
    /// counted against the agent.
    pub(super) fn fenced(&mut self, job_id: &str, epoch: u64, agent: &str) -> Res<&mut Active> {
        let stale = match self.jobs.get(job_id) {
            None => true,
            Some(a) => {
                a.job.state != JobState::Running as i32
                    || a.job.epoch != epoch
                    || a.job.agent != agent
            }
        };
        if stale {
            self.counter(agent).writes_refused += 1;
            self.metrics.refused_write();
        }
        let Some(a) = self.jobs.get_mut(job_id) else {
            return Err(DispatchError::StaleEpoch {
                job_id: job_id.to_owned(),
                got: epoch,
                current: self.finished.get(job_id).map(|f| f.0).unwrap_or(0),
                holder: String::new(),
            });
        };
        if a.job.state != JobState::Running as i32 || a.job.epoch != epoch || a.job.agent != agent {
            return Err(DispatchError::StaleEpoch {
                job_id: job_id.to_owned(),
                got: epoch,
                current: a.job.epoch,
                holder: a.job.agent.clone(),
            });
        }
        Ok(a)
    }

    pub(super) fn acquire(
        &mut self,
        store: &Store,
        s: &Settings,
        name: &str,
        job_id: &str,
        now: Instant,
    ) -> Res<(Lease, Option<Pending>)> {
        let agent = self.agents.get(name).expect("session maps to agent");
        let (agent_role, agent_sel) = (agent.identity.role, agent.identity.selector.clone());
        let (slots, busy_count, draining) = (
            agent.identity.slots as usize,
            agent.leased.len(),
            agent.draining || agent.gone,
        );
        let Some(a) = self.jobs.get_mut(job_id) else {
            if let Some((epoch, _)) = self.finished.get(job_id) {
                return Err(DispatchError::StaleEpoch {
                    job_id: job_id.to_owned(),
                    got: 0,
                    current: *epoch,
                    holder: String::new(),
                });
            }
            return Err(DispatchError::JobNotFound(job_id.to_owned()));
        };
        // A sweep's agent gets every sandbox the server knows is alive (or has a job now)
        // added to the live list, as of this moment; the stored job keeps the caller's list.
        let alive: Option<Vec<String>> = matches!(
            kind_of(&a.job),
            Some(es_proto::v1::job_spec::Kind::SweepOrphans(_))
        )
        .then(|| {
            let mut v: std::collections::BTreeSet<String> = self.alive.keys().cloned().collect();
            v.extend(
                self.jobs
                    .values()
                    .filter(|x| !x.job.sandbox_id.is_empty())
                    .map(|x| x.job.sandbox_id.clone()),
            );
            v.into_iter().collect()
        });
        let a = self.jobs.get_mut(job_id).expect("looked up above");
        let lease = |a: &Active| {
            let mut job = a.job.clone();
            if let (Some(extra), Some(es_proto::v1::job_spec::Kind::SweepOrphans(sw))) =
                (&alive, job.spec.as_mut().and_then(|s| s.kind.as_mut()))
            {
                for sb in extra {
                    if !sw.live_sandbox_ids.contains(sb) {
                        sw.live_sandbox_ids.push(sb.clone());
                    }
                }
            }
            Lease {
                job_id: job_id.to_owned(),
                epoch: a.job.epoch,
                attempt: a.job.attempt,
                ttl_ms: s.lease_ttl.as_millis() as u64,
                job: Some(job),
            }
        };
        let state = JobState::try_from(a.job.state).unwrap_or_default();
        if state == JobState::Running && a.job.agent == name {
            // A retried Acquire whose first answer was lost.
            return Ok((lease(a), None));
        }
        let Some(running) = super::state::next(state, super::state::Event::Acquire) else {
            return Err(DispatchError::NotAcquirable {
                job_id: job_id.to_owned(),
                state: state.name(),
            });
        };
        if a.job.role != agent_role {
            return Err(DispatchError::WrongRole {
                job_id: job_id.to_owned(),
                job_role: es_proto::Role::try_from(a.job.role)
                    .unwrap_or_default()
                    .name(),
                agent: name.to_owned(),
                agent_role: es_proto::Role::try_from(agent_role)
                    .unwrap_or_default()
                    .name(),
            });
        }
        if a.job.selector != agent_sel {
            return Err(DispatchError::OfferedElsewhere {
                job_id: job_id.to_owned(),
            });
        }
        match &a.offered {
            Some((to, _)) if to != name => {
                return Err(DispatchError::OfferedElsewhere {
                    job_id: job_id.to_owned(),
                })
            }
            Some(_) => {}
            None => {
                // Not offered (e.g. a poll-mode agent racing the queue): allowed with room,
                // and when its sandbox is not busy with another es-shells job.
                if draining || busy_count >= slots {
                    return Err(DispatchError::NoCapacity(name.to_owned()));
                }
                if a.exclusive_sandbox()
                    .is_some_and(|sb| self.busy_sandboxes.contains_key(sb))
                {
                    return Err(DispatchError::OfferedElsewhere {
                        job_id: job_id.to_owned(),
                    });
                }
                busy(&mut self.busy_sandboxes, a.exclusive_sandbox(), true);
                if let Some(q) = self.queues.get_mut(&(a.job.role, a.job.selector.clone())) {
                    q.retain(|x| x != job_id);
                }
            }
        }
        a.offered = None;
        a.job.state = running as i32;
        a.job.attempt += 1;
        a.job.epoch += 1;
        a.job.agent = name.to_owned();
        a.job.started_at_us = now_us();
        a.lease_expires = Some(now + s.lease_ttl);
        a.deadline = Some(now + Duration::from_millis(a.job.timeout_ms));
        a.agent_seq = 0;
        self.metrics
            .dispatched(now.saturating_duration_since(a.queued_at));
        let ev = event(a, job_event::Event::State(JobState::Running as i32));
        let commit = store.update(&a.job, vec![ev.clone()]);
        let lease = lease(a);
        let agent = self.agents.get_mut(name).expect("session maps to agent");
        agent.offered.remove(job_id);
        agent.leased.insert(job_id.to_owned());
        self.counter(name).leases_granted += 1;
        Ok((
            lease,
            Some(Pending {
                commit,
                events: vec![ev],
            }),
        ))
    }

    /// Moves a job to a final state and forgets it. `fence` bumps the epoch so that the old
    /// holder's late writes are refused.
    pub(super) fn terminate(
        &mut self,
        store: &Store,
        id: &str,
        result: JobResult,
        fence: bool,
        now: Instant,
    ) -> Pending {
        let mut a = self.jobs.remove(id).expect("terminate of an active job");
        if let Some(n) = self.unfinished_by.get_mut(&a.job.submitted_by) {
            *n -= 1;
            if *n == 0 {
                self.unfinished_by.remove(&a.job.submitted_by);
            }
        }
        note_sandbox(
            &mut self.alive,
            &a.job.sandbox_id,
            a.job.created_at_us,
            is_cleanup(&a.job),
            result.state == JobState::Succeeded as i32,
        );
        if a.offered.is_some() || a.job.state == JobState::Running as i32 {
            busy(&mut self.busy_sandboxes, a.exclusive_sandbox(), false);
        }
        if let Some(q) = self.queues.get_mut(&(a.job.role, a.job.selector.clone())) {
            if a.job.state == JobState::Queued as i32 {
                q.retain(|x| x != id);
            }
        }
        if let Some((agent, _)) = a.offered.take() {
            if let Some(e) = self.agents.get_mut(&agent) {
                e.offered.remove(id);
            }
        }
        let holder = a.job.agent.clone();
        if let Some(e) = self.agents.get_mut(&holder) {
            e.leased.remove(id);
        }
        if fence {
            a.job.epoch += 1;
        }
        let from = JobState::try_from(a.job.state).unwrap_or_default();
        let to = JobState::try_from(result.state).unwrap_or_default();
        if super::state::next(from, super::state::Event::Finish(to)).is_none() {
            // A bug, not an input: log it loudly and record what the caller decided.
            log::error!(job_id = id; "job {id}: {} -> {} is not a transition of the state machine", from.name(), to.name());
        }
        a.job.state = result.state;
        a.job.finished_at_us = now_us();
        a.job.result = Some(result.clone());
        let ev = event(&mut a, job_event::Event::Result(result));
        let commit = store.update(&a.job, vec![ev.clone()]);
        self.finished.insert(id.to_owned(), (a.job.epoch, now));
        let st = JobState::try_from(a.job.state).unwrap_or_default();
        self.metrics.finished(st.name());
        log::info!(
            job_id = id,
            sandbox_id = a.job.sandbox_id.as_str(),
            agent = holder.as_str();
            "job {id} {} (attempt {}, agent {holder:?})",
            st.name(),
            a.job.attempt
        );
        Pending {
            commit,
            events: vec![ev],
        }
    }

    /// A lease ended without a result: queue the job again, or fail it when attempts are spent.
    pub(super) fn lease_lost(
        &mut self,
        store: &Store,
        id: &str,
        why: &str,
        now: Instant,
    ) -> Pending {
        let a = self.jobs.get_mut(id).expect("lease_lost of an active job");
        let holder = a.job.agent.clone();
        if let Some(e) = self.agents.get_mut(&holder) {
            e.leased.remove(id);
        }
        let a = self.jobs.get_mut(id).expect("checked above");
        let to = super::state::next(
            JobState::Running,
            super::state::Event::LeaseLost {
                cancel: a.job.cancel_requested.then_some(a.cancel_final),
                attempts_left: a.job.attempt < a.job.max_attempts,
            },
        )
        .unwrap_or(JobState::Failed);
        if to != JobState::Queued {
            let error = if a.job.cancel_requested {
                format!("{}; lease of {holder} ended: {why}", a.cancel_reason)
            } else {
                format!(
                    "lease lost on attempt {} of {} (agent {holder}: {why}); no attempts left",
                    a.job.attempt, a.job.max_attempts
                )
            };
            let result = JobResult {
                state: to as i32,
                output: String::new(),
                error,
                ..Default::default()
            };
            return self.terminate(store, id, result, true, now);
        }
        log::warn!(job_id = id, agent = holder.as_str(); "lease of job {id} on {holder} lost ({why}); offering it again");
        a.job.state = to as i32;
        a.queued_at = now;
        a.lease_expires = None;
        a.deadline = None;
        busy(&mut self.busy_sandboxes, a.exclusive_sandbox(), false);
        // The epoch is bumped by the next Acquire; bump it now too so the old holder is fenced
        // even before anyone acquires.
        a.job.epoch += 1;
        let log_ev = event(
            a,
            job_event::Event::Log(format!("lease of {holder} lost: {why}")),
        );
        let st_ev = event(a, job_event::Event::State(JobState::Queued as i32));
        let commit = store.update(&a.job, vec![log_ev.clone(), st_ev.clone()]);
        self.queues
            .entry((a.job.role, a.job.selector.clone()))
            .or_default()
            .push_front(id.to_owned());
        Pending {
            commit,
            events: vec![log_ev, st_ev],
        }
    }

    pub(super) fn request_cancel(
        &mut self,
        store: &Store,
        s: &Settings,
        id: &str,
        final_state: JobState,
        reason: &str,
        now: Instant,
    ) -> Pending {
        let a = self.jobs.get_mut(id).expect("cancel of an active job");
        a.job.cancel_requested = true;
        a.cancel_final = final_state;
        a.cancel_reason = reason.to_owned();
        // The agent forces the job after `cancel_grace`; the server fences it only a lease TTL
        // later, so a live agent's own (forced) result arrives first.
        a.cancel_hard_at = Some(now + s.cancel_grace + s.lease_ttl);
        let ev = event(
            a,
            job_event::Event::Log(format!("cancel requested: {reason}")),
        );
        let commit = store.update(&a.job, vec![ev.clone()]);
        let msg = CancelJob {
            job_id: id.to_owned(),
            epoch: a.job.epoch,
            grace_ms: s.cancel_grace.as_millis() as u64,
            reason: reason.to_owned(),
        };
        if let Some(agent) = self.agents.get(&a.job.agent) {
            agent.send(server_message::Msg::Cancel(msg));
        }
        Pending {
            commit,
            events: vec![ev],
        }
    }
}
