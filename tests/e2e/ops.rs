//! What an operator uses: `es-server drain` (upgrade with a drain), Prometheus metrics on the
//! server and the agent, and the audit trail of cancels and drains.

use std::time::Duration;

use es_proto::v1::*;
use es_tests::*;

use crate::leases::SleepJobSpec;
use crate::{bins, Env, LONG};

/// The address a process logged as "metrics on http://ADDR/metrics".
pub(crate) fn metrics_addr(log: &str) -> Option<String> {
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
    // "Drained and gone" means the job in flight has finished (issue 17: it used to be said
    // as soon as the agent closed its stream, seconds before the job ended).
    assert_eq!(
        get(&mut c, &busy.id).await.state,
        JobState::Succeeded as i32,
        "drain returned before the job in flight finished: {text}"
    );
    let status = a.wait_exit(LONG).expect("the drained agent exits");
    assert!(status.success(), "{status:?}: {}", a.log());
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

/// A journald stand-in: a datagram socket at /run/systemd/journal/socket inside a private mount
/// namespace (tmpfs on /run; nothing on the host changes) that writes each entry it receives,
/// in journald's native protocol, to a file.
const JOURNAL_LISTENER: &str = r#"
import ctypes, json, socket, sys
ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG: SIGKILL when the shell that started it goes

def fields(d):
    # journald's native protocol: KEY=value lines, or KEY, a 64-bit LE length, the value, newline.
    out, i = {}, 0
    while i < len(d):
        nl = d.index(b"\n", i)
        line = d[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            n = int.from_bytes(d[nl + 1:nl + 9], "little")
            k, v = line, d[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        out[k.decode()] = v.decode(errors="replace")
    return out

s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
open(sys.argv[2] + ".ready", "w").close()
with open(sys.argv[2], "a", buffering=1) as out:
    while True:
        out.write(json.dumps(fields(s.recv(1 << 20))) + "\n")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_agent_logs_to_the_journal_with_job_fields() {
    if unsafe { libc::geteuid() } != 0 {
        skipped(
            "ops::under_systemd_the_agent_logs_to_the_journal_with_job_fields",
            "not root: no mount namespace for a journald stand-in (CI runs as root)",
        );
        return;
    }
    let env = Env::start(&[]);
    let dir = env.dir.path();
    std::fs::write(dir.join("journal.py"), JOURNAL_LISTENER).unwrap();
    let entries = dir.join("journal.entries");
    // stderr is a file whose device:inode is JOURNAL_STREAM: what systemd sets up.
    // The shell stays as the agent's parent (SIGTERM is passed on) so that the listener dies
    // with it.
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal; \
         python3 {py} /run/systemd/journal/socket {out} >/dev/null 2>&1 & \
         while [ ! -e {out}.ready ]; do sleep 0.05; done; \
         exec 2>>{log}; export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); \
         {agent} & A=$!; trap 'kill -TERM $A' TERM; \
         wait $A || wait $A || true",
        py = dir.join("journal.py").display(),
        out = entries.display(),
        log = dir.join("agent-stderr.log").display(),
        agent = bins().agent.display(),
    );
    let spec = AgentSpec::new("es-shells-j", "shells");
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("RUST_LOG", "info")
        .env("ES_AGENT_NAME", &spec.name)
        .env("ES_AGENT_ROLE", spec.role)
        .env("ES_AGENT_SERVER", env.server.url())
        .env("ES_AGENT_INSECURE", "true")
        .env("ES_AGENT_BACKOFF_CAP", "1s")
        .stdout(std::process::Stdio::null());
    let child = cmd.spawn().expect("unshare");
    let mut agent = Proc::adopt("es-shells-j".into(), child, dir.join("agent-stderr.log"));
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-j"]).await;
    let mut req = submission("shells", echo("journal"));
    req.sandbox_id = "sb-journal".into();
    let job = submit(&mut c, req).await;
    wait_done(&mut c, &job.id, LONG).await;
    agent.sigterm();
    agent.wait_exit(LONG).expect("agent exits");

    let text = std::fs::read_to_string(&entries).unwrap_or_default();
    let about_job: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("entry JSON"))
        .filter(|e| e["JOB_ID"] == job.id.as_str())
        .collect();
    assert!(about_job.len() >= 2, "running and done lines: {text}");
    for e in &about_job {
        for (k, v) in [
            ("AGENT", "es-shells-j"),
            ("ROLE", "shells"),
            ("SYSLOG_IDENTIFIER", "es-shells-j"),
            ("SANDBOX_ID", "sb-journal"),
        ] {
            assert_eq!(e[k], v, "{k} in {e}");
        }
        assert!(e["MESSAGE"].as_str().unwrap().contains(&job.id), "{e}");
    }
    // Nothing went to stderr while the journal was there.
    assert!(
        !agent.log().contains(&job.id),
        "job lines went to stderr: {}",
        agent.log()
    );
}

/// `es-server jobs | head -1` and the like: a CLI whose reader has gone ends as Unix tools do
/// (killed by SIGPIPE, nothing on stderr), not with a println! panic and exit 101. The pipe's
/// read end is closed before the command starts, so its first write fails, whatever the timing.
#[test]
fn cli_output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::start(&[]);
    let url = env.server.url();
    let runs: [(&str, Vec<&str>); 3] = [
        ("es-server token", vec!["token", "ci"]),
        ("es-server jobs", vec!["jobs", "--server", &url]),
        ("es-server --help", vec!["--help"]),
    ];
    for (what, args) in runs {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(bins().server)
            .args(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // clap writes --help before the command is known and ignores the error: exit 0.
        assert!(
            out.status.signal() == Some(13) || (what.ends_with("--help") && out.status.success()),
            "{what} into a closed pipe: {:?}, stderr: {stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "{what}: {stderr}");
    }
}

/// An agent without AWS credentials says so at start in one line with the fix, still runs
/// diagnostic jobs, and gets no job that needs AWS; one with credentials (moto) shows who it
/// acts as (STS GetCallerIdentity) in `es-server agents` and in its metrics, and takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_aws_credentials_says_so_and_gets_no_aws_job() {
    let env = Env::start(&[]);
    let blind = env.agent(&AgentSpec::new("es-shells-blind", "shells"));
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells-blind"]).await;
    let url = env.server.url();
    wait_until("the agent to report its AWS problem", LONG, || {
        let mut c = c.clone();
        async move {
            agents(&mut c)
                .await
                .iter()
                .any(|a| a.aws_problem.starts_with("no AWS credentials"))
        }
    })
    .await;
    let log = blind.log();
    let line = log
        .lines()
        .find(|l| l.contains("cannot use AWS"))
        .expect("the problem is logged");
    assert!(
        line.contains("no AWS credentials") && line.contains("instance profile"),
        "{line}"
    );
    assert!(!log.contains("ProviderAttempt"), "{log}");

    // Diagnostic jobs still run on it; an AWS job waits.
    let echo = submit(&mut c, submission("shells", echo("still here"))).await;
    wait_done(&mut c, &echo.id, LONG).await;
    let mut cleanup = submission(
        "shells",
        JobSpec {
            kind: Some(job_spec::Kind::CleanupSandbox(CleanupSandbox {})),
            ..Default::default()
        },
    );
    cleanup.sandbox_id = "sb-creds".into();
    let cleanup = submit(&mut c, cleanup).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        get(&mut c, &cleanup.id).await.state,
        JobState::Queued as i32
    );
    let table = std::process::Command::new(bins().server)
        .args(["agents", "--server", &url])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("AWS jobs held back: no AWS credentials"),
        "{table}"
    );

    // An agent with credentials takes it, and says who it is.
    let moto = start_moto(env.dir.path());
    let _seeing = env.agent(&moto.agent_env(
        AgentSpec::new("es-shells-seeing", "shells").env("ES_AGENT_METRICS_ADDR", "127.0.0.1:0"),
    ));
    let done = wait_done(&mut c, &cleanup.id, LONG).await;
    assert_eq!(done.agent, "es-shells-seeing");
    let seeing = agents(&mut c)
        .await
        .into_iter()
        .find(|a| a.identity.as_ref().unwrap().name == "es-shells-seeing")
        .unwrap();
    assert_eq!(
        seeing.aws_identity,
        "arn:aws:sts::123456789012:user/moto (account 123456789012)"
    );
    assert!(seeing.aws_problem.is_empty());
    let metrics = wait_metrics_addr("es-shells-seeing", || _seeing.log());
    let m = scrape(&metrics);
    assert_eq!(
        sample(
            &m,
            r#"es_agent_aws_identity{arn="arn:aws:sts::123456789012:user/moto",account="123456789012"}"#
        ),
        Some(1.0),
        "{m}"
    );
    blind.sigterm();
}
