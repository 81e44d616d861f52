//! Fallback replicas under fire: a primary killed, hung or cut off from the server while it holds
//! jobs, AWS faults, and a 10,000-job load. Each test checks that nothing is lost and nothing runs
//! twice, with the server's per-agent counters (leases granted, results accepted, writes
//! refused, leases expired) and, where the work has an effect, with the emulator's own state.
//! (The server killed and restarted mid-flow is `durability::server_killed_mid_flow_…`.)

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use es_proto::v1::job_service_client::JobServiceClient;
use es_proto::v1::*;
use es_tests::*;
use tonic::transport::Channel;

use crate::leases::SleepJobSpec;
use crate::{bins, Env, LONG};

async fn counters(c: &mut JobServiceClient<Channel>) -> HashMap<String, AgentCounters> {
    agents(c)
        .await
        .into_iter()
        .map(|a| {
            (
                a.identity.unwrap_or_default().name,
                a.counters.unwrap_or_default(),
            )
        })
        .collect()
}

/// After the job was re-leased to `new_holder`, every event (progress, log, result) came from it:
/// nothing of the old holder's copy was accepted.
fn nothing_accepted_after_the_re_lease(evs: &[JobEvent], new_holder: &str) {
    let relet = evs
        .iter()
        .position(|e| {
            e.event == Some(job_event::Event::State(JobState::Running as i32))
                && e.agent == new_holder
        })
        .unwrap_or_else(|| panic!("no re-lease to {new_holder}: {evs:#?}"));
    for e in &evs[relet..] {
        if e.event.is_some() && !matches!(e.event, Some(job_event::Event::State(_))) {
            assert_eq!(
                (e.agent.as_str(), e.attempt),
                (new_holder, evs[relet].attempt),
                "an event of the old holder was accepted after the re-lease: {e:?}"
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// SIGSTOP, later SIGCONT.
    Hang,
    /// A partition between the agent and the server (a TCP proxy that stops every byte), later
    /// healed. The test uses the proxy, not a network namespace, so it runs without root.
    Cut,
}

/// Whether an agent's log shows it started job `id` ("running job", logged as the work begins).
fn started(log: &str, id: &str) -> bool {
    log.contains(&format!("running job {id} "))
}

/// Whether an agent's log shows it stopped its copy of job `id` (positive evidence: a renamed
/// message fails the tests that wait for it instead of passing them).
fn stopped(log: &str, id: &str) -> bool {
    log.contains(&format!("stopping job {id} "))
}

/// When (µs since the epoch) the first line of `log` containing `needle` was logged, read from
/// the line's own timestamp (`[2026-11-30T05:29:39.123Z INFO ...`, milliseconds: the answer is
/// the start of that millisecond).
fn logged_at_us(log: &str, needle: &str) -> Option<i64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let ts = line.strip_prefix('[')?.split_whitespace().next()?;
    let t = humantime::parse_rfc3339_weak(ts.trim_end_matches('Z')).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros() as i64)
}

/// A primary holding two jobs hangs or is cut off; the jobs are re-leased to the fallback with a
/// new epoch and finish there; the old primary stops its copies on its own, none of its writes
/// is accepted, and it then rejoins as a primary for new work.
async fn lose_primary_holding_jobs(fault: Fault) {
    let env = Env::start(&[]);
    let proxy = tcpproxy::start(env.server.addr, Duration::from_secs(3600)).await;
    let primary_url = match fault {
        Fault::Cut => proxy.url.clone(),
        Fault::Hang => env.server.url(),
    };
    let primary = start_agent(
        &bins(),
        env.dir.path(),
        &primary_url,
        &AgentSpec::new("es-shells", "shells").slots(2),
    );
    let _fallback = env.agent(&AgentSpec::new("es-shells-b", "shells").slots(2).fallback());
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells", "es-shells-b"]).await;

    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut r = submission("shells", SleepJobSpec::steps(4000, 8));
        r.max_attempts = 3;
        ids.push(submit(&mut c, r).await.id);
    }
    for id in &ids {
        let j = wait_state(&mut c, id, JobState::Running, LONG).await;
        assert_eq!(j.agent, "es-shells", "the primary takes the work first");
        // Seen from the agent: it started the work (so it must stop it later).
        let p = &primary;
        wait_until("the primary to start the job", LONG, || {
            let hit = started(&p.log(), id);
            async move { hit }
        })
        .await;
    }
    match fault {
        Fault::Hang => primary.sigstop(),
        Fault::Cut => proxy.partition(),
    }
    for id in &ids {
        let cc = c.clone();
        let id2 = id.clone();
        wait_until("the job re-leased to the fallback", LONG, move || {
            let (mut c, id) = (cc.clone(), id2.clone());
            async move {
                let j = get(&mut c, &id).await;
                j.agent == "es-shells-b" && j.attempt == 2
            }
        })
        .await;
    }
    if fault == Fault::Cut {
        // Cut off, the agent cannot renew: it stops its copies before the server's TTL runs out
        // (checked against the fallback's lease below).
        for id in &ids {
            let p = &primary;
            wait_until("the cut-off primary to fence itself", LONG, || {
                let hit = stopped(&p.log(), id);
                async move { hit }
            })
            .await;
        }
        proxy.heal();
    } else {
        primary.sigcont();
    }
    for id in &ids {
        let j = wait_done(&mut c, id, LONG).await;
        assert_eq!(
            (j.state, j.agent.as_str(), j.attempt),
            (JobState::Succeeded as i32, "es-shells-b", 2),
            "{j:?}"
        );
        nothing_accepted_after_the_re_lease(&job_events(&mut c, id).await, "es-shells-b");
        // The woken or reconnected primary stopped its copy (fenced by its own clock, by the
        // heartbeat's lost-lease answer, or by a refused write).
        let p = &primary;
        wait_until("the old primary to stop its copy", LONG, || {
            let hit = stopped(&p.log(), id);
            async move { hit }
        })
        .await;
        if fault == Fault::Cut {
            // The safety property itself: the cut-off primary stopped its copy before the
            // fallback's lease began (the job's start time is the fallback's acquire).
            let stop = logged_at_us(&primary.log(), &format!("stopping job {id} "))
                .expect("the stop line has a timestamp");
            assert!(
                stop <= j.started_at_us,
                "job {id}: the cut-off primary stopped at {stop} us, after the fallback's lease \
                 began at {} us",
                j.started_at_us
            );
        }
    }
    let n = counters(&mut c).await;
    let (old, new) = (&n["es-shells"], &n["es-shells-b"]);
    assert_eq!(
        (old.leases_granted, old.results_accepted, old.leases_expired),
        (2, 0, 2),
        "old primary: {old:?}"
    );
    assert_eq!(
        (new.leases_granted, new.results_accepted),
        (2, 2),
        "fallback: {new:?}"
    );

    // Back on its feet, the primary gets new work before the fallback.
    wait_healthy(&mut c, &["es-shells"]).await;
    let j = submit(&mut c, submission("shells", echo("rejoined"))).await;
    assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, "es-shells");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_primary_fences_itself_and_nothing_of_it_is_accepted() {
    lose_primary_holding_jobs(Fault::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cut_primary_fences_itself_and_rejoins_after_the_heal() {
    lose_primary_holding_jobs(Fault::Cut).await;
}

// ------------------------------------------------------------------------------ AWS side

fn app(name: &str) -> AppSpec {
    AppSpec {
        name: name.into(),
        ami: MOTO_AMI.into(),
        instance_type: "t3.micro".into(),
        subnets: vec!["app".into()],
        ..Default::default()
    }
}

fn shells_req(sandbox: &str, kind: job_spec::Kind) -> SubmitRequest {
    SubmitRequest {
        role: role("shells"),
        sandbox_id: sandbox.into(),
        spec: Some(JobSpec {
            kind: Some(kind),
            target: None,
        }),
        ..Default::default()
    }
}

fn prepare(mgmt: &str, cidr: &str) -> job_spec::Kind {
    job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Single as i32,
        vpc_cidr: String::new(),
        subnets: vec![SubnetRequest {
            name: "app".into(),
            cidr: cidr.into(),
            public: false,
            availability_zone: String::new(),
        }],
        management: Some(ManagementNetwork {
            vpc_id: mgmt.into(),
            cidr: "10.0.0.0/16".into(),
            route_table_ids: vec![],
        }),
        shared: None,
    })
}

fn succeeded(j: &Job) {
    assert_eq!(j.state, JobState::Succeeded as i32, "{:?}", j.result);
}

/// Live instances of the sandbox by app name.
async fn instances_by_app(ec2: &aws_sdk_ec2::Client, sandbox: &str) -> HashMap<String, u32> {
    use aws_sdk_ec2::types::Filter;
    let mut out = HashMap::new();
    let mut pages = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:ReservationId")
                .values(sandbox)
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for i in page
            .unwrap()
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
        {
            if i.state().and_then(|s| s.name()).map(|n| n.as_str()) == Some("terminated") {
                continue;
            }
            let name = i
                .tags()
                .iter()
                .find(|t| t.key() == Some("AppName"))
                .and_then(|t| t.value())
                .unwrap_or("(no AppName tag)");
            *out.entry(name.to_owned()).or_default() += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_deploy_sandbox_completes_on_the_fallback_with_each_app_once() {
    let env = Env::start(&[]);
    let moto = start_moto(env.dir.path());
    let ec2 = moto.ec2().await;
    let (mgmt, _) = moto.management_vpc().await;
    // 150 ms per EC2 call and two calls at a time: the 20-app deploy takes seconds, so the kill
    // lands in its middle.
    let (slow, stats) = ec2proxy::start(
        &moto.url,
        ec2proxy::ProxyConfig {
            latency: Duration::from_millis(150),
            ..Default::default()
        },
    )
    .await;
    let via_proxy = |name: &str, fallback: bool| {
        let mut spec = moto.agent_env_via(AgentSpec::new(name, "shells").slots(2), &slow);
        spec.fallback = fallback;
        spec.env("ES_AGENT_AWS_CONCURRENCY", "2")
    };
    let mut primary = env.agent(&via_proxy("es-shells", false));
    let _fallback = env.agent(&via_proxy("es-shells-b", true));
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells", "es-shells-b"]).await;

    let sb = "sb-kill";
    let j = submit(&mut c, shells_req(sb, prepare(&mgmt, "10.0.70.0/24"))).await;
    succeeded(&wait_done(&mut c, &j.id, LONG).await);
    let apps: Vec<AppSpec> = (0..20).map(|i| app(&format!("app-{i:02}"))).collect();
    let mut req = shells_req(
        sb,
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps,
        }),
    );
    req.max_attempts = 3;
    let deploy = submit(&mut c, req).await;
    let running = wait_state(&mut c, &deploy.id, JobState::Running, LONG).await;
    assert_eq!(running.agent, "es-shells");
    let s = stats.clone();
    wait_until("a few apps launched", LONG, move || {
        let s = s.clone();
        async move { s.calls().get("RunInstances").copied().unwrap_or(0) >= 6 }
    })
    .await;
    primary.kill9();
    let launched_at_kill = stats.calls().get("RunInstances").copied().unwrap_or(0);
    assert!(launched_at_kill < 20, "the kill came after the deploy");

    let done = wait_done(&mut c, &deploy.id, Duration::from_secs(90)).await;
    succeeded(&done);
    assert_eq!((done.agent.as_str(), done.attempt), ("es-shells-b", 2));
    let by_app = instances_by_app(&ec2, sb).await;
    assert_eq!(by_app.len(), 20, "every app exists: {by_app:?}");
    assert!(
        by_app.values().all(|n| *n == 1),
        "every app exists exactly once: {by_app:?}"
    );
    let n = counters(&mut c).await;
    assert_eq!(n["es-shells"].results_accepted, 1, "only the prepare");
    let j = submit(
        &mut c,
        shells_req(sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})),
    )
    .await;
    succeeded(&wait_done(&mut c, &j.id, Duration::from_secs(90)).await);
    assert_eq!(tagged_resources(&ec2, sb).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_faults_fail_nothing_and_leak_nothing() {
    let env = Env::start(&[]);
    let moto = start_moto(env.dir.path());
    let ec2 = moto.ec2().await;
    let (mgmt, _) = moto.management_vpc().await;
    // 20 % throttled, a 600 ms burst of 500s every 4 s, and 10 % of calls delayed by 1.5 s.
    let (faulty, stats) = ec2proxy::start(
        &moto.url,
        ec2proxy::ProxyConfig {
            throttle_percent: 20,
            burst: Some((Duration::from_secs(4), Duration::from_millis(600))),
            spike: Some((10, Duration::from_millis(1500))),
            ..Default::default()
        },
    )
    .await;
    // About a third of attempts fail here (throttles plus bursts), far above a real region: with
    // the default 8 attempts one call in ~9,000 fails every attempt, which a loaded CI run of a
    // few hundred calls met once. 12 attempts put that at one call in ~800,000.
    let _agent = env.agent(
        &moto
            .agent_env_via(AgentSpec::new("es-shells", "shells").slots(2), &faulty)
            .env("ES_AGENT_AWS_MAX_ATTEMPTS", "12"),
    );
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells"]).await;

    let sb = "sb-faults";
    let apps: Vec<AppSpec> = (0..6).map(|i| app(&format!("app-{i}"))).collect();
    let steps = [
        prepare(&mgmt, "10.0.80.0/24"),
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps,
        }),
        job_spec::Kind::Power(PowerApps {
            apps: vec![],
            on: false,
        }),
        job_spec::Kind::Power(PowerApps {
            apps: vec![],
            on: true,
        }),
        job_spec::Kind::GetVmDetails(GetVmDetails { apps: vec![] }),
        job_spec::Kind::CleanupSandbox(CleanupSandbox {}),
    ];
    for kind in steps {
        let j = submit(&mut c, shells_req(sb, kind)).await;
        let j = wait_done(&mut c, &j.id, Duration::from_secs(120)).await;
        let r = j.result.clone().unwrap_or_default();
        // Each job succeeds through the faults, or fails with a reason that says what happened.
        assert!(
            j.state == JobState::Succeeded as i32 || !r.error.is_empty(),
            "{j:?}"
        );
        succeeded(&j);
    }
    assert_eq!(tagged_resources(&ec2, sb).await, Vec::<String>::new());
    let throttled = stats.throttled_total();
    let bursts = *stats.burst_errors.lock().unwrap();
    let spiked = *stats.spiked.lock().unwrap();
    eprintln!("faults injected: {throttled} throttled, {bursts} 500s in bursts, {spiked} spikes");
    assert!(
        throttled > 0 && spiked > 0 && bursts > 0,
        "the proxy injected too little: every kind of fault must have happened"
    );
}

/// `aws_call_timeout` exercised: the proxy holds every EC2 call 5 s; with a 1 s call timeout and
/// 2 attempts the job fails in about 2 s, saying the call timed out, instead of waiting for an
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_aws_call_is_cut_by_the_call_timeout() {
    let env = Env::start(&[]);
    let moto = start_moto(env.dir.path());
    let (slow, stats) = ec2proxy::start(
        &moto.url,
        ec2proxy::ProxyConfig {
            spike: Some((100, Duration::from_secs(5))),
            ..Default::default()
        },
    )
    .await;
    let _agent = env.agent(
        &moto
            .agent_env_via(AgentSpec::new("es-shells", "shells").slots(2), &slow)
            .env("ES_AGENT_AWS_CALL_TIMEOUT", "1s")
            .env("ES_AGENT_AWS_MAX_ATTEMPTS", "2"),
    );
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells"]).await;
    let mut r = shells_req(
        "sb-slow",
        job_spec::Kind::GetVmDetails(GetVmDetails { apps: vec![] }),
    );
    r.max_attempts = 1;
    let j = submit(&mut c, r).await;
    let j = wait_done(&mut c, &j.id, LONG).await;
    let err = j.result.clone().unwrap_or_default().error;
    let took = (j.finished_at_us - j.started_at_us) as f64 / 1e6;
    eprintln!("failed after {took:.1} s: {err}");
    assert_eq!(j.state, JobState::Failed as i32, "{j:?}");
    assert!(
        err.starts_with("EC2 DescribeInstances failed: Timeout: ")
            && err.contains("operation attempt timeout")
            && err.contains("after 1s"),
        "{err}"
    );
    assert!(
        took < 4.5,
        "two 1 s attempts took {took:.1} s: the 5 s answer was waited for"
    );
    assert!(
        *stats.spiked.lock().unwrap() >= 2,
        "both attempts reached the proxy"
    );
}

// ------------------------------------------------------------------------------ load

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_on_two_primaries_and_two_fallbacks_complete_exactly_once() {
    const JOBS: usize = 10_000;
    // Alone on the machine: it requires zero lease expiries with the 1.5 s test TTL.
    let env = Env::start_alone(&[]);
    let names = [
        ("es-commands-1", false),
        ("es-commands-2", false),
        ("es-commands-1-b", true),
        ("es-commands-2-b", true),
    ];
    // Queued at once (8 submitters in parallel) before any agent is up; 20 ms each, so the
    // primaries' 64 slots fill up and the fallbacks take the overflow.
    let mut c = env.server.client().await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (w..JOBS).step_by(8) {
                let _ = i;
                ids.push(submit(&mut c, submission("commands", sleep(20))).await.id);
            }
            ids
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    assert_eq!(ids.len(), JOBS);
    let started = Instant::now();
    let procs: Vec<Proc> = names
        .iter()
        .map(|(n, fb)| {
            let mut s = AgentSpec::new(n, "commands").slots(32);
            s.fallback = *fb;
            env.agent(&s)
        })
        .collect();
    wait_healthy(&mut c, &names.map(|(n, _)| n)).await;

    let cc = c.clone();
    wait_until("every job done", Duration::from_secs(300), move || {
        let mut c = cc.clone();
        async move {
            c.list(ListRequest {
                states: vec![JobState::Succeeded as i32],
                limit: 10_000,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().jobs.len() == JOBS)
            .unwrap_or(false)
        }
    })
    .await;
    let took = started.elapsed();
    let jobs = c
        .list(ListRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), JOBS);
    assert!(
        jobs.iter().all(|j| j.attempt == 1 && j.epoch == 1),
        "a job was leased twice"
    );
    // The server's view: one lease and one accepted result per job, nothing refused.
    let n = counters(&mut c).await;
    let sum = |f: fn(&AgentCounters) -> u64| n.values().map(f).sum::<u64>();
    assert_eq!(sum(|x| x.leases_granted), JOBS as u64, "{n:?}");
    assert_eq!(sum(|x| x.results_accepted), JOBS as u64, "{n:?}");
    assert_eq!(sum(|x| x.writes_refused + x.leases_expired), 0, "{n:?}");
    // The agents' view: each job reported done by exactly one agent, once.
    let mut seen = HashSet::new();
    for p in &procs {
        for line in p.log().lines() {
            let done = line
                .split_once("] job ")
                .and_then(|(_, r)| r.split_once(" succeeded job_id="));
            if let Some((id, _)) = done {
                assert!(seen.insert(id.to_owned()), "{id} completed twice");
            }
        }
    }
    assert_eq!(seen.len(), JOBS, "completions logged by the agents");
    assert!(
        seen == ids,
        "the agents' completions are not the submitted jobs"
    );
    // Nothing ran twice, from the agents' side and before any result: each job was started
    // ("running job", logged before the work begins, whether or not the server later takes
    // the result) by exactly one agent, once.
    let mut started_jobs = HashSet::new();
    for p in &procs {
        for line in p.log().lines() {
            let run = line
                .split_once("] running job ")
                .and_then(|(_, r)| r.split_once(' '));
            if let Some((id, _)) = run {
                assert!(started_jobs.insert(id.to_owned()), "{id} was started twice");
            }
        }
    }
    assert!(
        started_jobs == ids,
        "jobs started by the agents ({}) are not the submitted ones ({})",
        started_jobs.len(),
        ids.len()
    );
    let fallbacks = n["es-commands-1-b"].results_accepted + n["es-commands-2-b"].results_accepted;
    assert!(
        fallbacks > 0,
        "full primaries overflow to the fallbacks: {n:?}"
    );

    let server_peak = hwm_kib(env.server.proc.pid()).unwrap_or(0);
    let agent_peak = procs
        .iter()
        .filter_map(|p| hwm_kib(p.pid()))
        .max()
        .unwrap_or(0);
    let by_agent: Vec<String> = names
        .iter()
        .map(|(a, _)| format!("{a} {}", n[*a].results_accepted))
        .collect();
    eprintln!(
        "{JOBS} jobs in {:.1} s; per agent: {}; peak RSS: server {} MiB, largest agent {} MiB",
        took.as_secs_f64(),
        by_agent.join(", "),
        server_peak / 1024,
        agent_peak / 1024
    );
    assert!(server_peak > 0 && agent_peak > 0);
    assert!(
        server_peak < 512 * 1024,
        "server peak RSS {server_peak} KiB"
    );
    assert!(agent_peak < 128 * 1024, "agent peak RSS {agent_peak} KiB");
}
