//! Agents: registration and sessions, the Listen stream and long-polls, heartbeats (lease
//! renewal, lost leases, cancels), health and probes, drain, going away.

use super::*;

impl Dispatcher {
    /// Connected agents (and recently seen ones) with their health.
    pub fn agents(&self) -> Vec<AgentStatus> {
        let core = self.lock();
        let now = Instant::now();
        let mut out: Vec<AgentStatus> = core
            .agents
            .values()
            .map(|a| {
                let health = a.health(&self.settings, now);
                AgentStatus {
                    identity: Some(a.identity.clone()),
                    connected: a.connected(&self.settings, now),
                    healthy: health.is_ok(),
                    draining: a.draining,
                    slots_in_use: a.leased.len() as u32,
                    last_heartbeat_us: a.last_heartbeat_us,
                    health_detail: health.err().unwrap_or_default(),
                    registered_at_us: a.registered_at_us,
                    aws_identity: a.aws_identity.clone(),
                    aws_problem: a.aws_problem.clone(),
                    counters: Some(
                        core.counters
                            .get(&a.identity.name)
                            .cloned()
                            .unwrap_or_default(),
                    ),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            let (x, y) = (a.identity.as_ref().unwrap(), b.identity.as_ref().unwrap());
            (x.role, x.fallback, &x.name).cmp(&(y.role, y.fallback, &y.name))
        });
        out
    }

    /// A warning for the submitter of a job of `role` and `selector` when no connected agent
    /// can run it now (see `selector::no_server_warning`).
    pub fn no_server_warning(&self, role: i32, selector: &str) -> Option<String> {
        let core = self.lock();
        let now = Instant::now();
        let servers: Vec<selector::Server> = core
            .agents
            .values()
            .filter(|a| a.connected(&self.settings, now))
            .map(|a| selector::Server {
                role: es_proto::v1::Role::try_from(a.identity.role).unwrap_or_default(),
                selector: &a.identity.selector,
                available: !a.draining && a.health(&self.settings, now).is_ok(),
            })
            .collect();
        selector::no_server_warning(
            &servers,
            es_proto::v1::Role::try_from(role).unwrap_or_default(),
            selector,
        )
    }

    /// Registers (or re-registers) an agent. Answers its session and the held leases that the
    /// server no longer recognises.
    pub async fn register(
        &self,
        identity: AgentIdentity,
        held: Vec<HeldLease>,
    ) -> Res<(String, Vec<HeldLease>)> {
        let session = uuid::Uuid::new_v4().to_string();
        let (revoked, pending) = {
            let mut core = self.lock();
            let now = Instant::now();
            let name = identity.name.clone();
            let mut pending = Vec::new();
            // Whatever the old session had offered goes back to the queue.
            if let Some(old) = core.agents.remove(&name) {
                core.sessions.remove(&old.session);
                for id in old.offered {
                    core.unoffer(&id);
                }
            }
            let held_map: HashMap<&str, u64> =
                held.iter().map(|h| (h.job_id.as_str(), h.epoch)).collect();
            let mut kept = HashSet::new();
            let mut revoked = Vec::new();
            for h in &held {
                match core.jobs.get(&h.job_id) {
                    Some(a)
                        if a.job.state == JobState::Running as i32
                            && a.job.agent == name
                            && a.job.epoch == h.epoch =>
                    {
                        kept.insert(h.job_id.clone());
                    }
                    _ => revoked.push(h.clone()),
                }
            }
            for id in &kept {
                if let Some(a) = core.jobs.get_mut(id) {
                    a.lease_expires = Some(now + self.settings.lease_ttl);
                }
            }
            // Leases recorded for this name but not claimed: the agent restarted and lost them.
            let lost: Vec<String> = core
                .jobs
                .values()
                .filter(|a| {
                    a.job.state == JobState::Running as i32
                        && a.job.agent == name
                        && !held_map.contains_key(a.job.id.as_str())
                })
                .map(|a| a.job.id.clone())
                .collect();
            for id in lost {
                pending.push(core.lease_lost(&self.store, &id, "agent restarted", now));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            core.agents.insert(
                name.clone(),
                AgentEntry {
                    identity: identity.clone(),
                    session: session.clone(),
                    outbox: tx,
                    poll_rx: Some(Arc::new(tokio::sync::Mutex::new(rx))),
                    listen_gen: 0,
                    streaming: false,
                    last_poll: None,
                    last_heartbeat: now,
                    last_heartbeat_us: now_us(),
                    registered_at_us: now_us(),
                    probe: Probe::Unknown,
                    probe_detail: String::new(),
                    draining: false,
                    drain_requested: false,
                    gone: false,
                    leased: kept,
                    offered: HashSet::new(),
                    last_pick: 0,
                    aws_identity: String::new(),
                    aws_problem: String::new(),
                },
            );
            core.sessions.insert(session.clone(), name.clone());
            log::info!(
                agent = name.as_str(),
                role = identity_role(&identity),
                fallback = identity.fallback;
                "agent {name} registered (session {session}, {} slots, {} leases kept, {} revoked)",
                identity.slots,
                held.len() - revoked.len(),
                revoked.len()
            );
            (revoked, pending)
        };
        self.finish(pending).await?;
        Ok((session, revoked))
    }

    /// Opens the server-to-agent stream of a session: a fresh channel (replacing any older stream
    /// or poll channel), with every outstanding offer sent again.
    pub fn listen(
        &self,
        session: &str,
    ) -> Res<(String, u64, mpsc::UnboundedReceiver<ServerMessage>)> {
        let mut core = self.lock();
        if core.streams_closed {
            return Err(DispatchError::Stopping);
        }
        let name = core.session_agent(session)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let key;
        let generation;
        {
            let entry = core.agents.get_mut(&name).expect("session maps to agent");
            entry.outbox = tx;
            entry.poll_rx = None;
            entry.listen_gen += 1;
            entry.streaming = true;
            generation = entry.listen_gen;
            for id in &entry.offered {
                entry.send(server_message::Msg::Offer(Offer { job_id: id.clone() }));
            }
            key = (entry.identity.role, entry.identity.selector.clone());
        }
        core.dispatch(&self.settings, &key, Instant::now());
        Ok((name, generation, rx))
    }

    /// Ends every agent's Listen stream (at shutdown, or when another replica took the lead):
    /// the graceful stop does not wait on them, and the agents reconnect — to another replica
    /// when this one no longer serves.
    pub fn close_streams(&self) {
        let mut core = self.lock();
        core.streams_closed = true;
        for entry in core.agents.values_mut() {
            // Dropping the stream's only sender ends it; its guard withdraws the offers.
            entry.outbox = mpsc::unbounded_channel().0;
        }
    }

    /// The Listen stream of generation `generation` ended: withdraw its offers.
    pub fn listen_closed(&self, name: &str, generation: u64) {
        let mut core = self.lock();
        let Some(entry) = core.agents.get_mut(name) else {
            return;
        };
        if entry.listen_gen != generation {
            return;
        }
        entry.streaming = false;
        let offered: Vec<String> = entry.offered.drain().collect();
        let key = (entry.identity.role, entry.identity.selector.clone());
        log::info!(agent = name; "listen stream of {name} closed; {} offers withdrawn", offered.len());
        for id in offered {
            core.unoffer(&id);
        }
        core.dispatch(&self.settings, &key, Instant::now());
    }

    /// Long-poll: waits up to `wait` for messages for this session.
    pub async fn poll(&self, session: &str, wait: Duration) -> Res<Vec<ServerMessage>> {
        let rx = {
            let mut core = self.lock();
            if core.streams_closed {
                return Err(DispatchError::Stopping);
            }
            let name = core.session_agent(session)?;
            let now = Instant::now();
            let entry = core.agents.get_mut(&name).expect("session maps to agent");
            entry.last_poll = Some(now);
            if entry.poll_rx.is_none() {
                let (tx, rx) = mpsc::unbounded_channel();
                entry.outbox = tx;
                entry.listen_gen += 1;
                entry.streaming = false;
                entry.poll_rx = Some(Arc::new(tokio::sync::Mutex::new(rx)));
                for id in &entry.offered {
                    entry.send(server_message::Msg::Offer(Offer { job_id: id.clone() }));
                }
            }
            let rx = entry.poll_rx.clone().expect("set above");
            let key = (entry.identity.role, entry.identity.selector.clone());
            core.dispatch(&self.settings, &key, now);
            rx
        };
        let wait = wait.min(self.settings.poll_wait);
        let mut rx = rx.lock().await;
        let mut out = Vec::new();
        if let Ok(Some(first)) = tokio::time::timeout(wait, rx.recv()).await {
            out.push(first);
            while let Ok(m) = rx.try_recv() {
                out.push(m);
                if out.len() >= 1024 {
                    break;
                }
            }
        }
        drop(rx);
        let mut core = self.lock();
        if let Some(name) = core.sessions.get(session).cloned() {
            if let Some(entry) = core.agents.get_mut(&name) {
                entry.last_poll = Some(Instant::now());
            }
        }
        Ok(out)
    }

    /// Records a heartbeat, renews the listed leases and answers the lost ones and the cancels.
    pub fn heartbeat(
        &self,
        session: &str,
        leases: &[HeldLease],
        draining: bool,
    ) -> Res<(Vec<HeldLease>, Vec<CancelJob>, bool)> {
        let mut core = self.lock();
        let now = Instant::now();
        let name = core.session_agent(session)?;
        let ttl = self.settings.lease_ttl;
        let mut lost = Vec::new();
        let mut cancels = Vec::new();
        for h in leases {
            match core.jobs.get_mut(&h.job_id) {
                Some(a)
                    if a.job.state == JobState::Running as i32
                        && a.job.agent == name
                        && a.job.epoch == h.epoch =>
                {
                    a.lease_expires = Some(now + ttl);
                    if a.job.cancel_requested {
                        cancels.push(CancelJob {
                            job_id: h.job_id.clone(),
                            epoch: h.epoch,
                            grace_ms: a
                                .cancel_hard_at
                                .map(|t| {
                                    t.saturating_duration_since(now)
                                        .saturating_sub(ttl)
                                        .as_millis() as u64
                                })
                                .unwrap_or(0),
                            reason: a.cancel_reason.clone(),
                        });
                    }
                }
                _ => lost.push(h.clone()),
            }
        }
        core.metrics
            .renewals((leases.len() - lost.len()) as u64, lost.len() as u64);
        let entry = core.agents.get_mut(&name).expect("session maps to agent");
        let was_healthy = entry.health(&self.settings, now).is_ok();
        entry.last_heartbeat = now;
        entry.last_heartbeat_us = now_us();
        let draining = draining || entry.drain_requested;
        let drain = entry.drain_requested;
        let newly_draining = draining && !entry.draining;
        entry.draining = draining;
        let key = (entry.identity.role, entry.identity.selector.clone());
        let mut withdrawn = Vec::new();
        if newly_draining {
            withdrawn = entry.offered.drain().collect();
            log::info!(agent = name.as_str(); "agent {name} is draining");
        }
        for id in withdrawn {
            core.unoffer(&id);
        }
        if !was_healthy || newly_draining {
            core.dispatch(&self.settings, &key, now);
        }
        Ok((lost, cancels, drain))
    }

    /// Records what an agent's heartbeat says of its AWS access. While `problem` is set it is
    /// offered no job that needs AWS; when it clears, its queue is dispatched again.
    pub fn set_aws(&self, session: &str, identity: &str, problem: &str) -> Res<()> {
        let mut core = self.lock();
        let name = core.session_agent(session)?;
        let entry = core.agents.get_mut(&name).expect("session maps to agent");
        // Agent-supplied text shown to operators: bounded.
        let (identity, problem) = (
            es_proto::limits::clip(identity, 512),
            es_proto::limits::clip(problem, 512),
        );
        if entry.aws_problem != problem {
            if problem.is_empty() {
                log::info!(agent = name.as_str(); "agent {name} can use AWS as {identity}");
            } else {
                log::warn!(agent = name.as_str(); "agent {name} cannot use AWS: {problem}");
            }
        }
        let cleared = !entry.aws_problem.is_empty() && problem.is_empty();
        entry.aws_identity = identity;
        entry.aws_problem = problem;
        let key = (entry.identity.role, entry.identity.selector.clone());
        if cleared {
            core.dispatch(&self.settings, &key, Instant::now());
        }
        Ok(())
    }

    /// The agent (name, role) a session belongs to.
    pub fn session_owner(&self, session: &str) -> Res<(String, i32)> {
        let core = self.lock();
        let name = core.session_agent(session)?;
        let role = core
            .agents
            .get(&name)
            .map(|a| a.identity.role)
            .unwrap_or_default();
        Ok((name, role))
    }

    /// Asks a connected agent to drain: it gets no new offers from now on and is told to drain
    /// at its next heartbeat (it finishes its jobs, then leaves).
    pub fn drain_agent(&self, name: &str, reason: &str) -> Res<AgentStatus> {
        {
            let mut core = self.lock();
            let now = Instant::now();
            let Some(entry) = core.agents.get_mut(name).filter(|e| !e.gone) else {
                return Err(DispatchError::AgentNotFound(name.to_owned()));
            };
            let first = !entry.drain_requested;
            entry.drain_requested = true;
            entry.draining = true;
            // At once on its stream (or next poll); the heartbeat answer repeats it. Only once:
            // a poll-mode agent's queue must not grow with repeated requests.
            if first {
                entry.send(server_message::Msg::Drain(es_proto::v1::Drain {
                    reason: if reason.is_empty() {
                        "operator request".into()
                    } else {
                        reason.to_owned()
                    },
                }));
            }
            let key = (entry.identity.role, entry.identity.selector.clone());
            let withdrawn: Vec<String> = entry.offered.drain().collect();
            for id in withdrawn {
                core.unoffer(&id);
            }
            log::info!(agent = name; "operator asked agent {name} to drain");
            core.dispatch(&self.settings, &key, now);
        }
        self.agents()
            .into_iter()
            .find(|a| a.identity.as_ref().is_some_and(|i| i.name == name))
            .ok_or_else(|| DispatchError::AgentNotFound(name.to_owned()))
    }

    /// The agent leaves: its offers and released jobs go back to the queue at once.
    pub async fn going_away(&self, session: &str, released: &[HeldLease], reason: &str) -> Res<()> {
        let pending = {
            let mut core = self.lock();
            let now = Instant::now();
            let name = core.session_agent(session)?;
            let entry = core.agents.get_mut(&name).expect("session maps to agent");
            entry.gone = true;
            entry.draining = true;
            entry.streaming = false;
            let offered: Vec<String> = entry.offered.drain().collect();
            let key = (entry.identity.role, entry.identity.selector.clone());
            for id in offered {
                core.unoffer(&id);
            }
            let mut pending = Vec::new();
            for h in released {
                if core.fenced(&h.job_id, h.epoch, &name).is_ok() {
                    pending.push(core.lease_lost(
                        &self.store,
                        &h.job_id,
                        "released by agent going away",
                        now,
                    ));
                }
            }
            core.sessions.remove(session);
            log::info!(agent = name.as_str(); "agent {name} went away ({reason}); {} jobs released", released.len());
            core.dispatch(&self.settings, &key, now);
            pending
        };
        self.finish(pending).await
    }

    /// Records the outcome of a grpc.health.v1 probe of an agent.
    pub fn set_probe(&self, name: &str, session: &str, result: Result<(), String>) {
        let mut core = self.lock();
        let now = Instant::now();
        let Some(entry) = core.agents.get_mut(name) else {
            return;
        };
        if entry.session != session {
            return;
        }
        let was = entry.probe;
        match result {
            Ok(()) => {
                entry.probe = Probe::Serving;
                entry.probe_detail.clear();
            }
            Err(e) => {
                if was != Probe::Failing {
                    log::warn!(agent = name; "health probe of {name} failed: {e}");
                }
                entry.probe = Probe::Failing;
                entry.probe_detail = e;
            }
        }
        if was == Probe::Failing && entry.probe == Probe::Serving {
            let key = (entry.identity.role, entry.identity.selector.clone());
            core.dispatch(&self.settings, &key, now);
        }
    }

    /// Agents that publish a health address: (name, session, address).
    pub fn probe_targets(&self) -> Vec<(String, String, String)> {
        self.lock()
            .agents
            .values()
            .filter(|a| !a.gone && !a.identity.health_addr.is_empty())
            .map(|a| {
                (
                    a.identity.name.clone(),
                    a.session.clone(),
                    a.identity.health_addr.clone(),
                )
            })
            .collect()
    }

    /// Sends an application ping on every Listen stream.
    pub fn ping_streams(&self) {
        let core = self.lock();
        for a in core.agents.values().filter(|a| a.streaming) {
            a.send(server_message::Msg::Ping(Ping { at_us: now_us() }));
        }
    }
}
