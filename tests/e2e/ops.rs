//! What an operator uses: `es-server drain` (upgrade with a drain), Prometheus metrics on the
//! server and the agent, and the audit trail of cancels and drains.

use std::time::Duration;

use es_proto::v1::*;
use es_tests::*;

use crate::leases::SleepJobSpec;
use crate::{bins, Env, LONG};

/// The address a process logged as "metrics on http://ADDR/metrics".
fn metrics_addr(log: &str) -> Option<String> {
    let rest = log.split("metrics on http://").nth(1)?;
    Some(rest.split("/metrics").next()?.to_owned())
}

fn wait_metrics_addr(what: &str, log: impl Fn() -> String) -> String {
    let until = std::time::Instant::now() + LONG;
    loop {
        if let Some(a) = metrics_addr(&log()) {
            return a;
        }
        assert!(
            std::time::Instant::now() < until,
            "{what} logged no metrics address"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_command_metrics_and_audit_of_operator_actions() {
    let env = Env::start(&["--metrics-listen", "127.0.0.1:0"]);
    let server_metrics = wait_metrics_addr("es-server", || env.server.proc.log());
    let mut a = env.agent(
        &AgentSpec::new("es-shells-m", "shells")
            .slots(2)
            .env("ES_AGENT_METRICS_ADDR", "127.0.0.1:0"),
    );
    let agent_metrics = wait_metrics_addr("es-agent", || a.log());
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-m"]).await;

    // Some work: one finishes, one is cancelled by a submitter, one runs during the drain.
    let done = submit(&mut c, submission("shells", echo("one"))).await;
    wait_done(&mut c, &done.id, LONG).await;
    let mut cancelled = submission("shells", SleepJobSpec::steps(60_000, 1));
    cancelled.sandbox_id = "sb-ops".into();
    let cancelled = submit(&mut c, cancelled).await;
    wait_state(&mut c, &cancelled.id, JobState::Running, LONG).await;
    c.cancel(CancelRequest {
        job_id: cancelled.id.clone(),
        reason: "not needed".into(),
    })
    .await
    .unwrap();
    wait_done(&mut c, &cancelled.id, LONG).await;
    let busy = submit(&mut c, submission("shells", SleepJobSpec::steps(3000, 3))).await;
    wait_state(&mut c, &busy.id, JobState::Running, LONG).await;

    // Metrics while the agent is busy.
    let m = scrape(&server_metrics);
    assert_eq!(
        sample(&m, "es_server_jobs_submitted_total"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"es_server_jobs{state="running",role="shells"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"es_server_jobs_finished_total{state="succeeded"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "es_server_dispatch_latency_seconds_count"),
        Some(3.0),
        "{m}"
    );
    // The busy job's lease is renewed by the next heartbeats.
    let sm = server_metrics.clone();
    wait_until("a lease renewal to be counted", LONG, move || {
        let sm = sm.clone();
        async move { sample(&scrape(&sm), "es_server_lease_renewals_total").unwrap_or(0.0) >= 1.0 }
    })
    .await;
    assert_eq!(
        sample(
            &m,
            r#"es_server_agents{role="shells",kind="primary",health="healthy"}"#
        ),
        Some(1.0),
        "{m}"
    );
    let am = scrape(&agent_metrics);
    assert_eq!(sample(&am, "es_agent_jobs_running"), Some(1.0), "{am}");
    assert!(
        sample(&am, r#"es_agent_heartbeats_total{outcome="ok"}"#).unwrap_or(0.0) >= 1.0,
        "{am}"
    );

    // The operator drains the agent: the running job finishes, the agent leaves with exit 0.
    let drain = std::process::Command::new(bins().server)
        .args(["drain", "es-shells-m", "--reason", "upgrade", "--server"])
        .arg(env.server.url())
        .output()
        .unwrap();
    assert!(drain.status.success(), "{drain:?}");
    let text = String::from_utf8_lossy(&drain.stdout);
    assert!(
        text.contains("draining") && text.contains("drained and gone"),
        "{text}"
    );
    let status = a.wait_exit(LONG).expect("the drained agent exits");
    assert!(status.success(), "{status:?}: {}", a.log());
    assert_eq!(
        get(&mut c, &busy.id).await.state,
        JobState::Succeeded as i32
    );
    let unknown = std::process::Command::new(bins().server)
        .args(["drain", "nobody", "--server"])
        .arg(env.server.url())
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no connected agent is named"));

    // The audit trail has the cancel and the drain with who asked.
    let trail = c
        .audit(AuditRequest {
            all: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let cancel = trail.iter().find(|e| e.action == "cancel").expect("cancel");
    assert_eq!(cancel.job_id, cancelled.id);
    assert_eq!(cancel.sandbox_id, "sb-ops");
    assert!(cancel.detail_json.contains("not needed"));
    let drained = trail.iter().find(|e| e.action == "drain").expect("drain");
    assert!(drained.detail_json.contains("es-shells-m") && drained.detail_json.contains("upgrade"));
    assert!(drained.actor.starts_with("anonymous:"));
    // Entries are in order and ids only grow.
    assert!(trail.windows(2).all(|w| w[0].id < w[1].id));
    let e = c
        .audit(AuditRequest::default())
        .await
        .expect_err("a filter is required");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}
