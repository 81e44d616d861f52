//! A hostile or careless caller against real es-server and es-agent processes: each attack as
//! such a caller would try it, refused with an error that names the field or the rule, with
//! nothing deleted, stored, leaked or run.
//!
//! Covered: a sweep without a live list (CLI and gRPC) or by a non-admin; oversized fields and
//! messages (the server stays usable for everyone); paged List and Audit answers; the queued-job
//! cap per submitter; repeated cancels not growing the audit trail; token scopes; idempotency
//! keys per submitter; roles assumed only from the agent's allow-list (session name = job id,
//! source identity = submitter, checked on the wire); selectors bound to the agent's identity;
//! revocation by SIGHUP with refusals logged and counted; `--insecure` off loopback; no session
//! ids in the Agents answer; health probes only to where the agent connected from; the store
//! file private to its owner; Watch tasks ending with their client.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_proto::v1::agent_service_client::AgentServiceClient;
use es_proto::v1::*;
use es_tests::pki::Pki;
use es_tests::*;
use tonic::Code;

use crate::{bins, Env, LONG};

/// Makes a token with `es-server token NAME --scope SCOPE`: (token, tokens-file line).
fn token(name: &str, scope: &str) -> (String, String) {
    let out = std::process::Command::new(bins().server)
        .args(["token", name, "--scope", scope])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    (lines[1].to_owned(), lines[3].to_owned())
}

/// A mutual-TLS server with tokens for `reader` (read), `alice` and `bob` (submit) and `ops`
/// (admin), an agents file and a deny-list (both empty unless written), and metrics.
struct Secure {
    server: Server,
    pki: Pki,
    tokens: std::collections::HashMap<&'static str, String>,
    agents_file: PathBuf,
    deny_file: PathBuf,
    dir: tempfile::TempDir,
    _turn: crate::Turn,
}

impl Secure {
    fn start(agents: &str) -> Secure {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "es");
        let cert = pki.server();
        let mut lines = Vec::new();
        let mut tokens = std::collections::HashMap::new();
        for (name, scope) in [
            ("reader", "read"),
            ("alice", "submit"),
            ("bob", "submit"),
            ("ops", "admin"),
        ] {
            let (t, line) = token(name, scope);
            tokens.insert(name, t);
            lines.push(line);
        }
        let tokens_file = dir.path().join("tokens");
        std::fs::write(&tokens_file, lines.join("\n")).unwrap();
        let agents_file = dir.path().join("agents");
        std::fs::write(&agents_file, agents).unwrap();
        let deny_file = dir.path().join("deny");
        std::fs::write(&deny_file, "# revoked credentials\n").unwrap();
        let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
        for (flag, path) in [
            ("--tls-cert", &cert.cert),
            ("--tls-key", &cert.key),
            ("--client-ca", &pki.ca_file),
            ("--tokens", &tokens_file),
            ("--agents", &agents_file),
            ("--deny", &deny_file),
        ] {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
        args.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = start_server(
            &bins(),
            dir.path(),
            &dir.path().join("es.db"),
            "127.0.0.1:0",
            &args,
        );
        Secure {
            server,
            pki,
            tokens,
            agents_file,
            deny_file,
            dir,
            _turn: crate::shared_turn(),
        }
    }

    async fn client(&self, who: &str) -> es_server::client::Client {
        tls_client(
            self.server.addr,
            &self.pki.ca_file,
            None,
            Some(&self.tokens[who]),
        )
        .await
        .expect("submitter client")
    }

    fn agent(&self, name: &str, role: &'static str, selector: &str) -> Proc {
        let cert = self.pki.client(name, role);
        let mut spec = AgentSpec::new(name, role)
            .env("ES_AGENT_TLS_CA", self.pki.ca_file.to_str().unwrap())
            .env("ES_AGENT_TLS_CERT", cert.cert.to_str().unwrap())
            .env("ES_AGENT_TLS_KEY", cert.key.to_str().unwrap());
        spec.selector = selector.into();
        start_agent(
            &bins(),
            self.dir.path(),
            &format!("https://{}", self.server.addr),
            &spec,
        )
    }

    fn sighup(&self) {
        self.server.proc.signal(1); // SIGHUP
    }

    fn metrics(&self) -> String {
        let log = self.server.proc.log();
        let addr = crate::ops::metrics_addr(&log).expect("metrics address in the log");
        scrape(&addr)
    }
}

fn sweep(live: &[&str], no_live: bool) -> SubmitRequest {
    SubmitRequest {
        role: role("shells"),
        spec: Some(JobSpec {
            kind: Some(job_spec::Kind::SweepOrphans(SweepOrphans {
                live_sandbox_ids: live.iter().map(|s| s.to_string()).collect(),
                no_live_sandboxes: no_live,
                ..Default::default()
            })),
            target: None,
        }),
        ..Default::default()
    }
}

async fn job_count(c: &mut es_server::client::Client) -> usize {
    c.list(ListRequest {
        limit: 10_000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .jobs
    .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_needs_a_live_list_and_an_admin_and_scopes_bound_every_submitter() {
    let env = Secure::start("");
    let mut ops = env.client("ops").await;
    let mut alice = env.client("alice").await;
    let mut bob = env.client("bob").await;
    let mut reader = env.client("reader").await;

    // The CLI refuses a sweep without --live (or --all-except-known), and a list with a hole.
    let cli = |args: &[&str]| {
        std::process::Command::new(bins().server)
            .args(["sandbox", "sweep"])
            .args(args)
            .args(["--server", &format!("https://{}", env.server.addr)])
            .arg("--ca")
            .arg(&env.pki.ca_file)
            .env("ES_TOKEN", &env.tokens["ops"])
            .output()
            .unwrap()
    };
    for args in [&[][..], &["--live", "sb-1,,sb-2"][..]] {
        let out = cli(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
    }
    assert!(String::from_utf8_lossy(&cli(&[]).stderr).contains("--live"));

    // The server refuses an empty live list without the confirmation, naming the field.
    let e = ops.submit(sweep(&[], false)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("spec.sweep_orphans.live_sandbox_ids")
            && e.message().contains("no_live_sandboxes"),
        "{e:?}"
    );
    // A submitter (not an admin) may not sweep at all, live list or not.
    for req in [sweep(&["sb-1"], false), sweep(&[], true)] {
        let e = alice.submit(req).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("scope admin"), "{e:?}");
    }
    assert_eq!(job_count(&mut ops).await, 0, "nothing was stored");
    // An admin with a list (or the explicit confirmation) may.
    ops.submit(sweep(&["sb-1"], false)).await.unwrap();
    ops.submit(sweep(&[], true)).await.unwrap();

    // Scopes: read may only look; submit may submit and cancel its own jobs; admin may drain
    // and cancel anyone's.
    let e = reader
        .submit(submission("shells", echo("x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("--scope submit"), "{e:?}");
    assert_eq!(job_count(&mut reader).await, 2, "read scope reads");
    let mine = alice
        .submit(submission("shells", sleep(60_000)))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(mine.submitted_by, "submitter:alice");
    let e = bob
        .cancel(CancelRequest {
            job_id: mine.id.clone(),
            reason: "not yours".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = bob
        .drain_agent(DrainAgentRequest {
            name: "es-shells".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = ops
        .drain_agent(DrainAgentRequest {
            name: "es-shells".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "an admin gets past the scope: {e:?}"
    );
    let cancelled = ops
        .cancel(CancelRequest {
            job_id: mine.id.clone(),
            reason: "admin".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);

    // Idempotency keys belong to their submitter: bob's key does not return alice's job, and
    // another job under a used key is refused.
    let keyed = |who: &str, msg: &str| SubmitRequest {
        idempotency_key: "deploy-42".into(),
        submitted_by: who.into(),
        ..submission("shells", echo(msg))
    };
    let a1 = alice.submit(keyed("", "a")).await.unwrap().into_inner();
    let b1 = bob.submit(keyed("", "a")).await.unwrap().into_inner();
    assert!(a1.created && b1.created, "one job each");
    assert_ne!(a1.job.as_ref().unwrap().id, b1.job.as_ref().unwrap().id);
    let again = alice.submit(keyed("", "a")).await.unwrap().into_inner();
    assert!(!again.created);
    assert_eq!(again.job.unwrap().id, a1.job.as_ref().unwrap().id);
    let e = alice.submit(keyed("", "other")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("deploy-42") && e.message().contains("new key"));

    // Every refusal above is logged with the caller's address and counted.
    let m = env.metrics();
    assert!(
        m.contains("es_server_auth_failures_total{kind=\"submitter\""),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_is_bound_to_the_agent_identity_and_revocation_needs_no_restart() {
    let env = Secure::start("es-commands-staging commands staging\n");
    let mut ops = env.client("ops").await;
    // A staging certificate registering for prod: refused, told what it may serve; exit 64 (a
    // configuration error: systemd does not restart it).
    let mut rogue = env.agent("es-commands-staging", "commands", "prod");
    assert_eq!(
        rogue.wait_exit(LONG).and_then(|s| s.code()),
        Some(64),
        "{}",
        rogue.log()
    );
    assert!(
        rogue.log().contains("may serve selectors staging"),
        "{}",
        rogue.log()
    );
    // An agent the file does not list: refused.
    let mut unlisted = env.agent("es-commands-other", "commands", "staging");
    assert_eq!(unlisted.wait_exit(LONG).and_then(|s| s.code()), Some(64));
    assert!(unlisted.log().contains("not in the server's agents file"));
    // Prod jobs (and their secret variables) never reach it; staging ones do.
    let prod = ops
        .submit(SubmitRequest {
            selector: "prod".into(),
            ..submission("commands", echo("prod"))
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let agent = env.agent("es-commands-staging", "commands", "staging");
    wait_until("the staging agent registered", LONG, || {
        let mut c = ops.clone();
        async move {
            c.agents(AgentsRequest {})
                .await
                .unwrap()
                .into_inner()
                .agents
                .iter()
                .any(|a| a.healthy)
        }
    })
    .await;
    let staging = ops
        .submit(SubmitRequest {
            selector: "staging".into(),
            ..submission("commands", echo("staging"))
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(
        finished(&mut ops, &staging.id).await.state,
        JobState::Succeeded as i32
    );
    let p = ops
        .get(GetRequest {
            job_id: prod.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.state, JobState::Queued as i32, "no prod agent: it waits");
    assert!(p.agent.is_empty(), "{p:?}");
    let mut plain = ops.clone();

    // The operator lists a prod agent and sends SIGHUP: no restart, and the prod job runs there.
    std::fs::write(
        &env.agents_file,
        "es-commands-staging commands staging\nes-commands-prod commands prod\n",
    )
    .unwrap();
    env.sighup();
    wait_until("the server read the agents file again", LONG, || {
        let log = env.server.proc.log();
        async move { log.contains("SIGHUP: tokens, deny-list and agents files read again") }
    })
    .await;
    let _prod_agent = env.agent("es-commands-prod", "commands", "prod");
    let p = finished(&mut ops, &prod.id).await;
    assert_eq!(p.state, JobState::Succeeded as i32);
    assert_eq!(p.agent, "es-commands-prod");
    drop(_prod_agent);

    // The Agents answer carries no session id (a credential), but says when it registered.
    let listed = plain
        .agents(AgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(listed[0].registered_at_us > 0);

    // Revocation: the agent's certificate serial goes on the deny-list; SIGHUP; its next calls
    // are refused (logged, counted) and it gets no more work. The same for a token.
    let serial = std::process::Command::new("openssl")
        .args(["x509", "-serial", "-noout", "-in"])
        .arg(env.dir.path().join("es-commands-staging-commands.pem"))
        .output()
        .unwrap();
    assert!(serial.status.success(), "{serial:?}");
    let mut deny = String::from_utf8(serial.stdout).unwrap();
    let tokens = std::fs::read_to_string(env.dir.path().join("tokens")).unwrap();
    let line = tokens.lines().find(|l| l.starts_with("bob ")).unwrap();
    deny.push_str(&format!(
        "digest {}\n",
        line.split_whitespace().nth(1).unwrap()
    ));
    std::fs::write(&env.deny_file, deny).unwrap();
    env.sighup();
    wait_until("the revoked agent unhealthy", LONG, || {
        let mut c = plain.clone();
        async move {
            c.agents(AgentsRequest {})
                .await
                .unwrap()
                .into_inner()
                .agents
                .iter()
                .filter(|a| a.identity.as_ref().unwrap().name == "es-commands-staging")
                .all(|a| !a.healthy)
        }
    })
    .await;
    let mut bob = env.client("bob").await;
    let e = bob.list(ListRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
    let after = ops
        .submit(SubmitRequest {
            selector: "staging".into(),
            ..submission("commands", echo("after revocation"))
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = plain
        .get(GetRequest { job_id: after.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        a.state,
        JobState::Queued as i32,
        "the revoked agent got nothing"
    );
    let m = env.metrics();
    assert!(
        m.contains("es_server_auth_failures_total{kind=\"agent\",reason=\"revoked\"}"),
        "{m}"
    );
    let log = env.server.proc.log();
    assert!(log.contains("refused agent from 127.0.0.1"), "{log}");
    assert!(!log.contains(&env.tokens["bob"]), "tokens are never logged");
    drop(agent);
}

/// Polls `Get` until the job is final.
async fn finished(c: &mut es_server::client::Client, id: &str) -> Job {
    let until = std::time::Instant::now() + LONG;
    loop {
        let j = c
            .get(GetRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if JobState::try_from(j.state).is_ok_and(|s| s.is_terminal()) {
            return j;
        }
        assert!(
            std::time::Instant::now() < until,
            "job {id} not done: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_refused_and_the_server_stays_usable() {
    let env = Env::start(&["--max-queued-per-submitter", "80"]);
    let mut c = env.server.client().await;

    // A 3.9 MB role ARN (the attack that once took `es-server jobs` down for everyone).
    let mut req = submission("shells", echo("x"));
    req.spec.as_mut().unwrap().target = Some(AwsTarget {
        role_arn: format!("arn:aws:iam::123456789012:role/{}", "a".repeat(3_900_000)),
        ..Default::default()
    });
    let e = c.submit(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message().len());
    assert!(
        e.message().contains("spec.target.role_arn"),
        "{}",
        &e.message()[..200.min(e.message().len())]
    );
    assert!(
        e.message().len() < 2048,
        "the error does not echo the input back"
    );
    // An external id in a job: refused (it would be shown to every reader).
    let mut req = submission("shells", echo("x"));
    req.spec.as_mut().unwrap().target = Some(AwsTarget {
        role_arn: "arn:aws:iam::123456789012:role/x".into(),
        external_id: "s3cret-ext".into(),
        ..Default::default()
    });
    let e = c.submit(req).await.unwrap_err();
    assert!(e.message().contains("spec.target.external_id") && !e.message().contains("s3cret-ext"));
    // Over the message limit: refused by the transport, the server unharmed.
    let mut req = submission("shells", echo("x"));
    req.submitted_by = "x".repeat(5 * 1024 * 1024);
    let e = c.submit(req).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    // App tags, reasons, name lists.
    let mut big_tags = std::collections::HashMap::new();
    big_tags.insert("team".to_string(), "v".repeat(300));
    let deploy = SubmitRequest {
        role: role("shells"),
        sandbox_id: "sb-1".into(),
        spec: Some(JobSpec {
            kind: Some(job_spec::Kind::DeployApp(DeployApp {
                recipient: vec![],
                app: Some(AppSpec {
                    name: "web".into(),
                    ami: MOTO_AMI.into(),
                    instance_type: "t3.micro".into(),
                    subnets: vec!["app".into()],
                    tags: big_tags,
                    ..Default::default()
                }),
            })),
            target: None,
        }),
        ..Default::default()
    };
    let e = c.submit(deploy).await.unwrap_err();
    assert!(
        e.message().contains("spec.deploy_app.app.tags[team]"),
        "{e:?}"
    );
    let power = SubmitRequest {
        role: role("shells"),
        sandbox_id: "sb-1".into(),
        spec: Some(JobSpec {
            kind: Some(job_spec::Kind::Power(PowerApps {
                apps: (0..300).map(|i| format!("a{i}")).collect(),
                on: true,
            })),
            target: None,
        }),
        ..Default::default()
    };
    let e = c.submit(power).await.unwrap_err();
    assert!(e.message().contains("spec.power.apps"), "{e:?}");
    let stored = c
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(stored.is_empty(), "nothing was stored: {stored:?}");

    // Sixty jobs of 60 KB each: List answers in pages under the message limit, and together
    // the pages hold every job exactly once.
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..60 {
        let j = submit(
            &mut c,
            submission("shells", echo(&format!("{i:02}{}", "m".repeat(60_000)))),
        )
        .await;
        ids.insert(j.id);
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list(ListRequest {
                limit: 10_000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("every page fits the limit")
            .into_inner();
        pages += 1;
        for j in page.jobs {
            assert!(seen.insert(j.id), "a job listed twice");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 2, "3.6 MB of jobs take more than one page");
    assert_eq!(seen, ids);
    let e = c
        .list(ListRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("page_token"), "{e:?}");

    // The cap on unfinished jobs per submitter (80 here, no agent runs them).
    for i in 0..20 {
        submit(&mut c, submission("shells", echo(&format!("fill {i}")))).await;
    }
    let e = c
        .submit(submission("shells", echo("one too many")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("anonymous:"), "{e:?}");
    let other = SubmitRequest {
        submitted_by: "someone-else".into(),
        ..submission("shells", echo("another submitter"))
    };
    c.submit(other)
        .await
        .expect("another submitter is not held back");

    // Drains repeated against a poll-mode agent queue one message, not fifty.
    let ch = tonic::transport::Channel::from_shared(env.server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut a = AgentServiceClient::new(ch);
    let session = a
        .register(RegisterRequest {
            identity: Some(AgentIdentity {
                name: "es-shells-poll".into(),
                role: role("shells"),
                slots: 1,
                ..Default::default()
            }),
            held: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    for _ in 0..50 {
        c.drain_agent(DrainAgentRequest {
            name: "es-shells-poll".into(),
            reason: "again".into(),
        })
        .await
        .unwrap();
    }
    let e = c
        .drain_agent(DrainAgentRequest {
            name: "es-shells-poll".into(),
            reason: "r".repeat(2000),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("`reason`"), "{e:?}");
    let polled = a
        .poll(PollRequest {
            session_id: session,
            wait_ms: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    let drains = polled
        .iter()
        .filter(|m| matches!(m.msg, Some(server_message::Msg::Drain(_))))
        .count();
    assert_eq!(drains, 1, "{polled:?}");

    // Cancel: a long reason is refused; cancelling a finished job again adds no audit row.
    let victim = ids.iter().next().unwrap().clone();
    let e = c
        .cancel(CancelRequest {
            job_id: victim.clone(),
            reason: "r".repeat(2000),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("`reason`"), "{e:?}");
    for _ in 0..5 {
        c.cancel(CancelRequest {
            job_id: victim.clone(),
            reason: "again".into(),
        })
        .await
        .unwrap();
    }
    let trail = c
        .audit(AuditRequest {
            job_id: victim.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        trail
            .entries
            .iter()
            .filter(|e| e.action == "cancel")
            .count(),
        1,
        "{:?}",
        trail.entries
    );
    assert_eq!(trail.next_after_id, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_assumed_only_from_the_allow_list_under_the_job_and_submitter() {
    let env = Env::start(&[]);
    let moto = start_moto(env.dir.path());
    // Every STS AssumeRole request the agent sends, as the proxy sees it on the wire.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let hook = {
        let seen = seen.clone();
        es_tests::ec2proxy::Hook(Arc::new(move |_head: &str, body: &[u8]| {
            let body = String::from_utf8_lossy(body).into_owned();
            if body.contains("Action=AssumeRole") {
                seen.lock().unwrap().push(body);
            }
            None
        }))
    };
    let (proxy, _stats) = es_tests::ec2proxy::start(
        &moto.url,
        es_tests::ec2proxy::ProxyConfig {
            hook: Some(hook),
            ..Default::default()
        },
    )
    .await;
    let allowed = "arn:aws:iam::123456789012:role/es-shared";
    let _agent = env.agent(
        &moto
            .agent_env_via(AgentSpec::new("es-shells", "shells"), &proxy)
            .env("ES_AGENT_ASSUME_ROLES", allowed),
    );
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells"]).await;
    let details = |arn: &str, who: &str| SubmitRequest {
        role: role("shells"),
        sandbox_id: "sb-x".into(),
        submitted_by: who.into(),
        spec: Some(JobSpec {
            kind: Some(job_spec::Kind::GetVmDetails(GetVmDetails { apps: vec![] })),
            target: Some(AwsTarget {
                role_arn: arn.into(),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    // A role the agent does not list: the job fails before any AWS call.
    let j = submit(
        &mut c,
        details("arn:aws:iam::123456789012:role/admin", "mallory"),
    )
    .await;
    let j = wait_done(&mut c, &j.id, LONG).await;
    assert_eq!(j.state, JobState::Failed as i32);
    let err = &j.result.unwrap().error;
    assert!(
        err.contains("allow-list") && err.contains("assume_roles"),
        "{err}"
    );
    assert!(seen.lock().unwrap().is_empty(), "no AssumeRole was sent");
    // The listed role: assumed under the job's id and the submitter's name.
    let j = submit(&mut c, details(allowed, "quali-server")).await;
    let j = wait_done(&mut c, &j.id, LONG).await;
    assert_eq!(j.state, JobState::Succeeded as i32, "{:?}", j.result);
    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].contains(&format!("RoleSessionName={}", j.id)),
        "{}",
        calls[0]
    );
    assert!(
        calls[0].contains("SourceIdentity=quali-server"),
        "{}",
        calls[0]
    );
    assert!(!calls[0].contains("ExternalId"), "{}", calls[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_probes_only_where_the_agent_connected_from_and_keeps_its_store_private() {
    let env = Env::start(&[]);
    // Two listeners on one port: 127.0.0.1 (where the agent connects from) and 127.0.0.2 (the
    // address it claims). Only the first may ever be probed.
    let here = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = here.local_addr().unwrap().port();
    let Ok(elsewhere) = std::net::TcpListener::bind(("127.0.0.2", port)) else {
        panic!("127.0.0.2:{port} is taken; loopback aliases are needed for this test");
    };
    elsewhere.set_nonblocking(true).unwrap();
    here.set_nonblocking(true).unwrap();
    let ch = tonic::transport::Channel::from_shared(env.server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut a = AgentServiceClient::new(ch);
    a.register(RegisterRequest {
        identity: Some(AgentIdentity {
            name: "es-shells-claims".into(),
            role: role("shells"),
            slots: 1,
            health_addr: format!("127.0.0.2:{port}"),
            ..Default::default()
        }),
        held: vec![],
    })
    .await
    .unwrap();
    let mut c = env.server.client().await;
    let shown = agents(&mut c).await[0]
        .identity
        .clone()
        .unwrap()
        .health_addr;
    assert_eq!(shown, format!("127.0.0.1:{port}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut probed_here = false;
    while std::time::Instant::now() < deadline && !probed_here {
        probed_here = here.accept().is_ok();
        assert!(
            elsewhere.accept().is_err(),
            "the server connected to the address the agent merely named"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(probed_here, "the agent's own address is probed");

    // The job store holds secret variables: its files are the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    for f in ["es.db", "es.db-wal"] {
        let p = env.dir.path().join(f);
        if p.exists() {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
        }
    }
    assert!(env.dir.path().join("es.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_tasks_end_with_their_client_and_insecure_stays_on_loopback() {
    let env = Env::start(&["--metrics-listen", "127.0.0.1:0"]);
    let mut c = env.server.client().await;
    // A job no agent runs, watched by twenty clients that then go away.
    let j = submit(&mut c, submission("shells", echo("never runs"))).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut w = env.server.client().await;
        streams.push(
            w.watch(WatchRequest {
                job_id: j.id.clone(),
                after_seq: 0,
            })
            .await
            .unwrap()
            .into_inner(),
        );
    }
    let addr = wait_metrics(&env);
    let open = |text: &str| sample(text, "es_server_watch_streams").unwrap_or(-1.0);
    assert_eq!(open(&scrape(&addr)), 20.0);
    drop(streams);
    wait_until("every watch task ended", LONG, || {
        let addr = addr.clone();
        async move { open(&scrape(&addr)) == 0.0 }
    })
    .await;

    // --insecure on a non-loopback address is refused (before binding anything), naming the
    // flag that would allow it.
    let out = std::process::Command::new(bins().server)
        .args(["serve", "--insecure", "--listen", "0.0.0.0:0", "--db"])
        .arg(env.dir.path().join("other.db"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-on-network"), "{err}");
    assert!(
        !env.dir.path().join("other.db").exists(),
        "nothing was made"
    );
}

fn wait_metrics(env: &Env) -> String {
    let until = std::time::Instant::now() + LONG;
    loop {
        if let Some(a) = crate::ops::metrics_addr(&env.server.proc.log()) {
            return a;
        }
        assert!(
            std::time::Instant::now() < until,
            "no metrics address logged"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
