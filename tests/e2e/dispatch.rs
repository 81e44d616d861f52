//! Dispatch: a job reaches an agent and its result comes back; work is spread; both transports;
//! idempotent submit; health and reflection; the CLI.

use std::time::Duration;

use es_proto::v1::*;
use es_tests::*;

use crate::{bins, Env, LONG};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_job_runs_and_its_events_can_be_watched() {
    let env = Env::start(&[]);
    let _a = env.agent(&AgentSpec::new("es-shells-1", "shells").health());
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-1"]).await;

    let mut req = submission("shells", echo("hello sandbox"));
    req.sandbox_id = "sb-1".into();
    let job = submit(&mut c, req).await;
    assert_eq!(job.state, JobState::Queued as i32);

    let mut events = c
        .watch(WatchRequest {
            job_id: job.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(ev) = tokio::time::timeout(LONG, events.message())
        .await
        .expect("watch stalled")
        .unwrap()
    {
        seen.push(ev);
    }
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seen.len() as u64).collect::<Vec<_>>(),
        "gap-free seqs"
    );
    assert!(
        matches!(seen[0].event, Some(job_event::Event::State(s)) if s == JobState::Queued as i32)
    );
    assert!(seen.iter().any(
        |e| matches!(e.event, Some(job_event::Event::State(s)) if s == JobState::Running as i32)
            && e.agent == "es-shells-1"
    ));
    match &seen.last().unwrap().event {
        Some(job_event::Event::Result(r)) => {
            assert_eq!(r.state, JobState::Succeeded as i32);
            assert_eq!(r.output, "hello sandbox");
        }
        other => panic!("last event is not the result: {other:?}"),
    }

    let done = get(&mut c, &job.id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);
    assert_eq!(
        (done.attempt, done.epoch, done.agent.as_str()),
        (1, 1, "es-shells-1")
    );
    assert!(done.started_at_us >= done.created_at_us && done.finished_at_us >= done.started_at_us);

    // List filters.
    let list = |states: Vec<i32>, sandbox: &str, role: i32| ListRequest {
        states,
        role,
        sandbox_id: sandbox.into(),
        ..Default::default()
    };
    let got = c
        .list(list(
            vec![JobState::Succeeded as i32],
            "sb-1",
            role("shells"),
        ))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, job.id);
    assert!(c
        .list(list(vec![], "sb-2", 0))
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());
    assert!(c
        .list(list(vec![JobState::Failed as i32], "", 0))
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());
    assert!(c
        .list(list(vec![], "", role("commands")))
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());

    // A watch that starts after the end replays everything and ends.
    let mut replay = c
        .watch(WatchRequest {
            job_id: job.id.clone(),
            after_seq: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(ev) = replay.message().await.unwrap() {
        assert!(ev.seq > 1);
        n += 1;
    }
    assert_eq!(n, seen.len() - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_is_spread_over_agents_and_slots_bound_concurrency() {
    let env = Env::start(&[]);
    let _a = env.agent(&AgentSpec::new("es-commands-1", "commands").slots(3));
    let _b = env.agent(&AgentSpec::new("es-commands-2", "commands").slots(3));
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-commands-1", "es-commands-2"]).await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(submit(&mut c, submission("commands", sleep(1500))).await.id);
    }
    // Six slots in all: six run, two wait, and no agent runs more than its three.
    let cc = c.clone();
    wait_until("six jobs running", LONG, move || {
        let mut c = cc.clone();
        async move {
            let a = agents(&mut c).await;
            a.iter().map(|a| a.slots_in_use).sum::<u32>() == 6
        }
    })
    .await;
    for a in agents(&mut c).await {
        assert_eq!(a.slots_in_use, 3, "{a:?}");
    }
    let mut per_agent = std::collections::HashMap::new();
    for id in &ids {
        let j = wait_done(&mut c, id, LONG).await;
        assert_eq!(j.state, JobState::Succeeded as i32);
        *per_agent.entry(j.agent).or_insert(0) += 1;
    }
    assert_eq!(per_agent.len(), 2, "both agents got work: {per_agent:?}");
    assert!(per_agent.values().all(|n| *n >= 3), "{per_agent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_transport_runs_jobs() {
    let env = Env::start(&["--poll-wait", "2s"]);
    let _a = env.agent(&AgentSpec::new("es-shells-poll", "shells").poll());
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-poll"]).await;
    for i in 0..3 {
        let job = submit(&mut c, submission("shells", echo(&format!("poll {i}")))).await;
        let done = wait_done(&mut c, &job.id, LONG).await;
        assert_eq!(done.state, JobState::Succeeded as i32);
        assert_eq!(done.result.unwrap().output, format!("poll {i}"));
        assert_eq!(done.agent, "es-shells-poll");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_with_the_same_idempotency_key_returns_the_same_job() {
    let env = Env::start(&[]);
    let mut c = env.server.client().await;
    let mut req = submission("shells", echo("first"));
    req.idempotency_key = "sandbox-7/prepare".into();
    let first = c.submit(req.clone()).await.unwrap().into_inner();
    assert!(first.created);
    let again = c.submit(req.clone()).await.unwrap().into_inner();
    assert!(!again.created);
    let (a, b) = (first.job.unwrap(), again.job.unwrap());
    assert_eq!(a.id, b.id);
    // Another job under the same key is refused; the first one stays as it was.
    req.spec = Some(echo("second"));
    let e = c.submit(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains(&a.id), "{e:?}");
    assert_eq!(
        get(&mut c, &a.id).await.spec,
        Some(echo("first")),
        "the first submission wins"
    );
    let all = c
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(all.len(), 1);
    // Concurrent submissions with one key still make one job.
    let mut handles = Vec::new();
    for _ in 0..16 {
        let mut c = c.clone();
        handles.push(tokio::spawn(async move {
            let mut r = submission("shells", echo("race"));
            r.idempotency_key = "race".into();
            c.submit(r).await.unwrap().into_inner()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for h in handles {
        let r = h.await.unwrap();
        created += r.created as u32;
        ids.insert(r.job.unwrap().id);
    }
    assert_eq!((ids.len(), created), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_answers_health_and_reflection() {
    let env = Env::start(&[]);
    let ch = tonic::transport::Channel::from_shared(env.server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["", "es.v1.JobService", "es.v1.AgentService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(ch.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    // The older v1alpha protocol (grpcio-reflection, GUI clients) is served too.
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient as AlphaClient,
            server_reflection_request::MessageRequest as AlphaRequest,
            server_reflection_response::MessageResponse as AlphaResponse,
            ServerReflectionRequest as AlphaReq,
        };
        let mut alpha = AlphaClient::new(ch);
        let mut resp = alpha
            .server_reflection_info(tokio_stream::iter(vec![AlphaReq {
                host: String::new(),
                message_request: Some(AlphaRequest::ListServices(String::new())),
            }]))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(AlphaResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("{msg:?}")
        };
        assert!(
            list.service.iter().any(|s| s.name == "es.v1.JobService"),
            "{list:?}"
        );
    }
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "es.v1.JobService",
        "es.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

fn cli(url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bins().server)
        .args(args)
        .env("ES_SERVER", url)
        .output()
        .expect("run es-server CLI")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submits_lists_watches_and_cancels_with_json() {
    let env = Env::start(&[]);
    let _a = env.agent(&AgentSpec::new("es-shells-cli", "shells"));
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-cli"]).await;
    let url = env.server.url();

    let out = cli(
        &url,
        &[
            "submit",
            "--role",
            "shells",
            "--echo",
            "from the cli",
            "--sandbox",
            "sb-cli",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("submitted job") && text.contains("succeeded: from the cli"),
        "{text}"
    );

    let out = cli(&url, &["jobs", "--sandbox", "sb-cli", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs[0]["state"], "succeeded");
    assert_eq!(jobs[0]["agent"], "es-shells-cli");
    assert_eq!(jobs[0]["result"]["output"], "from the cli");
    let id = jobs[0]["id"].as_str().unwrap().to_owned();

    let out = cli(&url, &["get", &id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("state      succeeded"),
        "{out:?}"
    );

    let out = cli(&url, &["agents", "--json"]);
    let agents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(agents[0]["name"], "es-shells-cli");
    assert_eq!(agents[0]["healthy"], true);

    // A failing job makes `submit --wait` exit non-zero.
    let out = cli(
        &url,
        &[
            "submit",
            "--role",
            "shells",
            "--sleep",
            "10ms",
            "--fail",
            "broken on purpose",
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("broken on purpose"));

    // Cancel of a long job through the CLI.
    let out = cli(
        &url,
        &[
            "submit", "--role", "shells", "--sleep", "60s", "--steps", "60", "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let long = v["job"]["id"].as_str().unwrap().to_owned();
    wait_state(&mut c, &long, JobState::Running, LONG).await;
    let out = cli(&url, &["cancel", &long, "--reason", "operator said so"]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(&url, &["watch", &long]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cancelled"),
        "{out:?}"
    );

    // Unreachable server: exit 69 and a message naming it.
    let out = cli("http://127.0.0.1:1", &["jobs"]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach http://127.0.0.1:1"));
    let _ = Duration::ZERO;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_pings_keep_an_idle_stream_through_a_proxy_that_cuts_idle_connections() {
    // A proxy that closes connections idle for 1.5 s stands in for a load balancer's 350 s
    // idle cut; the server pings idle streams every 300 ms (in production: 30 s < 350 s).
    let env = Env::start(&["--stream-ping", "300ms"]);
    let proxy = es_tests::tcpproxy::start(env.server.addr, Duration::from_millis(1500)).await;
    let agent = es_tests::start_agent(
        &crate::bins(),
        env.dir.path(),
        &proxy.url,
        &AgentSpec::new("es-shells-idle", "shells"),
    );
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-idle"]).await;
    let session = agents(&mut c).await[0].registered_at_us;
    // Stay idle for three idle periods.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let j = submit(&mut c, submission("shells", echo("after idling"))).await;
    assert_eq!(
        wait_done(&mut c, &j.id, LONG).await.state,
        JobState::Succeeded as i32
    );
    assert_eq!(
        agents(&mut c).await[0].registered_at_us,
        session,
        "the agent never had to re-register"
    );
    assert!(
        !agent.log().contains("stream from the server ended"),
        "{}",
        agent.log()
    );
    // Seen from the proxy (the independent observer): no connection was ever idle long enough
    // to be cut.
    assert_eq!(
        proxy.idle_cuts.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the proxy cut an idle connection"
    );
    proxy.sever();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_app_pings_the_idle_cut_breaks_the_stream_and_the_agent_reconnects() {
    // The control for the test above: with pings slower than the cut, the proxy does cut the
    // stream, and the agent reconnects on its own (backoff) and still gets work.
    let env = Env::start(&["--stream-ping", "60s"]);
    let proxy = es_tests::tcpproxy::start(env.server.addr, Duration::from_millis(1500)).await;
    let agent = es_tests::start_agent(
        &crate::bins(),
        env.dir.path(),
        &proxy.url,
        &AgentSpec::new("es-shells-cut", "shells"),
    );
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-cut"]).await;
    let log_has_cut = || agent.log().contains("stream from the server ended");
    let mut waited = 0;
    while !log_has_cut() && waited < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert!(
        log_has_cut(),
        "the idle cut never happened: {}",
        agent.log()
    );
    assert!(proxy.idle_cuts.load(std::sync::atomic::Ordering::SeqCst) > 0);
    wait_healthy(&mut c, &["es-shells-cut"]).await;
    let j = submit(&mut c, submission("shells", echo("after the cut"))).await;
    assert_eq!(
        wait_done(&mut c, &j.id, LONG).await.state,
        JobState::Succeeded as i32
    );
    proxy.sever();
}

/// A job no connected agent can run (a typo in the selector) is queued all the same, and its
/// submitter is told why it will wait: in SubmitResponse.warnings and on the CLI's stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_warns_when_no_connected_agent_serves_the_role_and_selector() {
    let env = Env::start(&[]);
    let mut spec = AgentSpec::new("es-shells-east", "shells");
    spec.selector = "us-east-1".into();
    let _a = env.agent(&spec);
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-east"]).await;

    let served = |sel: &str, role: &str| SubmitRequest {
        selector: sel.into(),
        ..submission(role, echo("hi"))
    };
    let ok = c
        .submit(served("us-east-1", "shells"))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.warnings.is_empty(), "{:?}", ok.warnings);
    let typo = c
        .submit(served("us-east-l", "shells"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(typo.job.as_ref().unwrap().state, JobState::Queued as i32);
    assert_eq!(typo.warnings.len(), 1, "{:?}", typo.warnings);
    assert!(
        typo.warnings[0].contains("selector \"us-east-l\"")
            && typo.warnings[0].contains("serve \"us-east-1\""),
        "{:?}",
        typo.warnings
    );
    let nobody = c
        .submit(served("us-east-1", "commands"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        nobody.warnings[0].contains("no commands agent is connected at all"),
        "{:?}",
        nobody.warnings
    );

    let out = cli(
        &env.server.url(),
        &[
            "submit",
            "--role",
            "shells",
            "--selector",
            "us-east-l",
            "--echo",
            "x",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "es-server: warning: no connected shells agent serves selector \"us-east-l\""
        ),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("submitted job"));
}
