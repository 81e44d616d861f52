//! Primaries before fallbacks: a `-b` agent gets work only when no healthy primary of the role
//! and selector has room, and takes over when the primary dies or hangs.

use std::time::Duration;

use es_proto::v1::*;
use es_tests::*;

use crate::leases::SleepJobSpec;
use crate::{Env, LONG};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_gets_work_only_when_the_primary_is_full_or_gone() {
    let env = Env::start(&[]);
    let mut primary = env.agent(&AgentSpec::new("es-shells", "shells").slots(2).health());
    let _fallback = env.agent(
        &AgentSpec::new("es-shells-b", "shells")
            .slots(2)
            .fallback()
            .health(),
    );
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells", "es-shells-b"]).await;

    // Idle fallback, free primary: the primary gets everything.
    for i in 0..5 {
        let j = submit(&mut c, submission("shells", echo(&format!("p{i}")))).await;
        assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, "es-shells");
    }
    // Primary full (2 slots busy): the third job goes to the fallback.
    let p1 = submit(&mut c, submission("shells", SleepJobSpec::steps(3000, 3))).await;
    let p2 = submit(&mut c, submission("shells", SleepJobSpec::steps(3000, 3))).await;
    assert_eq!(
        wait_state(&mut c, &p1.id, JobState::Running, LONG)
            .await
            .agent,
        "es-shells"
    );
    assert_eq!(
        wait_state(&mut c, &p2.id, JobState::Running, LONG)
            .await
            .agent,
        "es-shells"
    );
    let overflow = submit(&mut c, submission("shells", echo("overflow"))).await;
    assert_eq!(
        wait_done(&mut c, &overflow.id, LONG).await.agent,
        "es-shells-b"
    );

    // The primary dies holding two jobs: they are re-leased to the fallback and finish there.
    primary.kill9();
    for id in [&p1.id, &p2.id] {
        let j = wait_done(&mut c, id, LONG).await;
        assert_eq!(
            (j.state, j.agent.as_str(), j.attempt),
            (JobState::Succeeded as i32, "es-shells-b", 2),
            "{j:?}"
        );
    }
    let cc = c.clone();
    wait_until("the dead primary to show as unhealthy", LONG, move || {
        let mut c = cc.clone();
        async move {
            agents(&mut c)
                .await
                .iter()
                .any(|a| a.identity.as_ref().unwrap().name == "es-shells" && !a.healthy)
        }
    })
    .await;
    let j = submit(&mut c, submission("shells", echo("while down"))).await;
    assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, "es-shells-b");

    // The primary comes back under the same name: new work goes to it again.
    let _primary = env.agent(&AgentSpec::new("es-shells", "shells").slots(2));
    wait_healthy(&mut c, &["es-shells"]).await;
    let j = submit(&mut c, submission("shells", echo("back"))).await;
    assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, "es-shells");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_primary_is_detected_by_heartbeat_and_health_probe() {
    let env = Env::start(&[]);
    let primary = env.agent(&AgentSpec::new("es-commands", "commands").slots(2).health());
    let _fallback = env.agent(
        &AgentSpec::new("es-commands-b", "commands")
            .slots(2)
            .fallback(),
    );
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-commands", "es-commands-b"]).await;
    primary.sigstop();
    let cc = c.clone();
    wait_until("the hung primary to show as unhealthy", LONG, move || {
        let mut c = cc.clone();
        async move {
            agents(&mut c).await.iter().any(|a| {
                a.identity.as_ref().unwrap().name == "es-commands"
                    && !a.healthy
                    && (a.health_detail.contains("no heartbeat")
                        || a.health_detail.contains("probe"))
            })
        }
    })
    .await;
    let j = submit(&mut c, submission("commands", echo("failover"))).await;
    assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, "es-commands-b");
    primary.sigcont();
    wait_healthy(&mut c, &["es-commands"]).await;
    let j = submit(&mut c, submission("commands", echo("recovered"))).await;
    assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, "es-commands");
    let _ = Duration::ZERO;
}

/// Probe-only detection: the primary's heartbeats go on, but its health endpoint stops
/// answering (the server reaches it through a TCP proxy the test partitions). The server marks
/// it unhealthy for the probe alone, sends new work to the fallback, and takes the primary back
/// once the probe answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failing_its_health_probe_gets_no_work_while_it_still_heartbeats() {
    let env = Env::start(&[]); // probes every 250 ms (the test kit's FAST settings)
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let health: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = es_tests::tcpproxy::start(health, Duration::from_secs(3600)).await;
    let advertised = proxy.url.trim_start_matches("http://").to_owned();
    let _primary = env.agent(
        &AgentSpec::new("es-commands", "commands")
            .slots(2)
            .env("ES_AGENT_HEALTH_ADDR", &health.to_string())
            .env("ES_AGENT_ADVERTISE_HEALTH_ADDR", &advertised),
    );
    let _fallback = env.agent(
        &AgentSpec::new("es-commands-b", "commands")
            .slots(2)
            .fallback(),
    );
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-commands", "es-commands-b"]).await;
    let j = submit(&mut c, submission("commands", echo("before"))).await;
    assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, "es-commands");

    proxy.partition();
    let cc = c.clone();
    wait_until("the primary to fail its probe", LONG, move || {
        let mut c = cc.clone();
        async move {
            agents(&mut c).await.iter().any(|a| {
                a.identity.as_ref().unwrap().name == "es-commands"
                    && !a.healthy
                    && a.health_detail.starts_with("health probe failing")
            })
        }
    })
    .await;
    // Still connected and heartbeating: the probe alone took it out.
    let me = agents(&mut c)
        .await
        .into_iter()
        .find(|a| a.identity.as_ref().unwrap().name == "es-commands")
        .unwrap();
    assert!(me.connected, "{me:?}");
    assert!(!me.health_detail.contains("no heartbeat"), "{me:?}");
    let j = submit(&mut c, submission("commands", echo("while probing fails"))).await;
    assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, "es-commands-b");

    proxy.heal();
    wait_healthy(&mut c, &["es-commands"]).await;
    let j = submit(&mut c, submission("commands", echo("after"))).await;
    assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, "es-commands");
    proxy.sever();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_values_keep_work_apart() {
    let env = Env::start(&[]);
    let mut east = AgentSpec::new("es-shells-east", "shells");
    east.selector = "us-east-1".into();
    let mut west = AgentSpec::new("es-shells-west", "shells");
    west.selector = "us-west-2".into();
    let _e = env.agent(&east);
    let _w = env.agent(&west);
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-east", "es-shells-west"]).await;
    for (sel, want) in [
        ("us-west-2", "es-shells-west"),
        ("us-east-1", "es-shells-east"),
        ("us-west-2", "es-shells-west"),
    ] {
        let mut r = submission("shells", echo(sel));
        r.selector = sel.into();
        let j = submit(&mut c, r).await;
        assert_eq!(wait_done(&mut c, &j.id, LONG).await.agent, want);
    }
    // No agent serves eu-west-1: the job waits.
    let mut r = submission("shells", echo("nobody"));
    r.selector = "eu-west-1".into();
    let j = submit(&mut c, r).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = get(&mut c, &j.id).await;
    assert_eq!(
        (waiting.state, waiting.attempt),
        (JobState::Queued as i32, 0),
        "never leased to an agent of another selector"
    );
    // It waited for an agent of its selector, not for nothing: one that comes runs it.
    let mut eu = AgentSpec::new("es-shells-eu", "shells");
    eu.selector = "eu-west-1".into();
    let _eu = env.agent(&eu);
    let done = wait_done(&mut c, &j.id, LONG).await;
    assert_eq!(
        (done.state, done.agent.as_str(), done.attempt),
        (JobState::Succeeded as i32, "es-shells-eu", 1)
    );
}
