//! Mutual TLS and submitter authentication against a real server and real agent processes:
//! certificates from a throwaway CA (rcgen), tokens from `es-server token`.
//!
//! Refusals checked: a certificate from another CA, an expired certificate, an agent whose
//! certificate is for another role or another name, an agent trusting the wrong server CA,
//! a submitter without a token, with a wrong token, or with an agent's certificate. Each is
//! refused with a reason that names the problem, and nothing is dispatched to the refused.

use std::path::Path;
use std::time::Duration;

use es_proto::v1::agent_service_client::AgentServiceClient;
use es_proto::v1::*;
use es_tests::pki::{CertFiles, Pki};
use es_tests::*;
use tonic::Code;

use crate::{bins, LONG};

struct TlsEnv {
    server: Server,
    pki: Pki,
    token: String,
    dir: tempfile::TempDir,
    _turn: crate::Turn,
}

impl TlsEnv {
    fn start() -> TlsEnv {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "es");
        let server_cert = pki.server();
        // A token made the way an operator makes one.
        let out = std::process::Command::new(bins().server)
            .args(["token", "ci"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let token = lines[1].to_owned();
        assert!(token.starts_with("es_"), "{text}");
        assert!(!lines[3].contains(&token), "only the digest is stored");
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, format!("# submitters\n{}\n", lines[3])).unwrap();

        let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
        for (flag, path) in [
            ("--tls-cert", &server_cert.cert),
            ("--tls-key", &server_cert.key),
            ("--client-ca", &pki.ca_file),
            ("--tokens", &tokens),
        ] {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = start_server(
            &bins(),
            dir.path(),
            &dir.path().join("es.db"),
            "127.0.0.1:0",
            &args,
        );
        TlsEnv {
            server,
            pki,
            token,
            dir,
            _turn: crate::shared_turn(),
        }
    }

    fn agent(&self, name: &str, role: &'static str, ca: &Path, cert: &CertFiles) -> Proc {
        let spec = AgentSpec::new(name, role)
            .env("ES_AGENT_TLS_CA", ca.to_str().unwrap())
            .env("ES_AGENT_TLS_CERT", cert.cert.to_str().unwrap())
            .env("ES_AGENT_TLS_KEY", cert.key.to_str().unwrap());
        start_agent(
            &bins(),
            self.dir.path(),
            &format!("https://{}", self.server.addr),
            &spec,
        )
    }

    async fn client(&self) -> es_server::client::Client {
        tls_client(self.server.addr, &self.pki.ca_file, None, Some(&self.token))
            .await
            .expect("submitter client")
    }
}

async fn agent_names(c: &mut es_server::client::Client) -> Vec<String> {
    c.agents(AgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .map(|a| a.identity.unwrap_or_default().name)
        .collect()
}

/// Waits until the agent's log contains `what` (one exact reason, not a choice of several).
fn wait_log(p: &Proc, what: &str) -> String {
    let until = std::time::Instant::now() + LONG;
    loop {
        let log = p.log();
        if log.contains(what) {
            return log;
        }
        assert!(
            std::time::Instant::now() < until,
            "{} never logged {what:?}: {log}",
            p.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_known_by_their_certificate_and_refused_with_a_reason() {
    let env = TlsEnv::start();
    let mut c = env.client().await;
    let ca = env.pki.ca_file.clone();

    // The good agent: certificate CN=es-shells-1, OU=shells.
    let good = env.pki.client("es-shells-1", "shells");
    let _a = env.agent("es-shells-1", "shells", &ca, &good);

    // An agent configured under another name or role than its certificate's refuses to start
    // (exit 64, which systemd does not restart), naming the certificate's CN or OU.
    let cmd_cert = env.pki.client("es-commands-1", "commands");
    let mut wrong_role = env.agent("es-commands-1", "shells", &ca, &cmd_cert);
    let status = wrong_role
        .wait_exit(LONG)
        .expect("misconfigured agent exits");
    assert_eq!(status.code(), Some(64), "{}", wrong_role.log());
    let log = wrong_role.log();
    assert!(
        log.contains("`role`") && log.contains("the certificate is for role \"commands\""),
        "{log}"
    );
    let mut poser = env.agent("es-shells-2", "shells", &ca, &good);
    let status = poser.wait_exit(LONG).expect("misconfigured agent exits");
    assert_eq!(status.code(), Some(64), "{}", poser.log());
    assert!(
        poser
            .log()
            .contains("differs from the CN \"es-shells-1\" of tls_cert"),
        "{}",
        poser.log()
    );

    // The server refuses the same on its own (an agent that does not check, or an older one):
    // a Register under another role, or another name, than the certificate's.
    let register = |cert: CertFiles, name: &'static str, role: &'static str| {
        let (addr, ca) = (env.server.addr, ca.clone());
        async move {
            let ch = tls_channel(addr, &ca, Some(&cert)).await.unwrap();
            AgentServiceClient::new(ch)
                .register(RegisterRequest {
                    identity: Some(AgentIdentity {
                        name: name.into(),
                        role: es_tests::role(role),
                        slots: 1,
                        ..Default::default()
                    }),
                    held: vec![],
                })
                .await
                .expect_err("refused")
        }
    };
    let e = register(cmd_cert.clone(), "es-commands-1", "shells").await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("is for role commands")
            && e.message().contains("registers as role shells"),
        "{e:?}"
    );
    let e = register(good.clone(), "es-shells-2", "shells").await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("certificate is for agent es-shells-1, but it registers as es-shells-2"),
        "{e:?}"
    );

    // A certificate from another CA, and an expired one: the handshake fails; the agent keeps
    // retrying (the operator may fix the files) and says why.
    let other = Pki::new(env.dir.path(), "other");
    let foreign = other.client("es-shells-3", "shells");
    let stranger = env.agent("es-shells-3", "shells", &ca, &foreign);
    let expired_cert = env.pki.expired_client("es-shells-4", "shells");
    let expired = env.agent("es-shells-4", "shells", &ca, &expired_cert);
    // An agent that does not trust the server's CA.
    let fifth = env.pki.client("es-shells-5", "shells");
    let distrust = env.agent("es-shells-5", "shells", &other.ca_file, &fifth);
    // Each refusal for its own reason: the server's alert to a client certificate from another
    // CA, its alert to an expired one, and the agent's own refusal of a server it cannot verify.
    wait_log(&stranger, "received fatal alert: UnknownCA");
    wait_log(&expired, "received fatal alert: CertificateExpired");
    // Whatever the handshake left the agent to see, its log names its own expired certificate.
    let log = wait_log(&expired, "this agent's certificate");
    assert!(
        log.lines()
            .filter(|l| l.contains("cannot register with"))
            .all(|l| l.contains("expired at") && l.contains("renew it")),
        "{log}"
    );
    wait_log(&distrust, "invalid peer certificate: UnknownIssuer");
    // The server says so too: each refused handshake, with the client's address and the reason
    // (tonic alone drops them in silence), counted by reason.
    let log = env.server.proc.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused TLS handshake from 127.0.0.1:"))
        .collect();
    assert!(
        refused.iter().any(|l| l.contains("UnknownIssuer"))
            && refused
                .iter()
                .any(|l| l.to_ascii_lowercase().contains("expired")),
        "{log}"
    );

    // Only the good agent is known, and only it runs work.
    wait_until("good agent to register", LONG, || {
        let mut c = c.clone();
        async move { agent_names(&mut c).await == ["es-shells-1"] }
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let j = c
            .submit(submission("shells", echo(&format!("job {i}"))))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        ids.push(j.id);
    }
    for id in &ids {
        let until = std::time::Instant::now() + LONG;
        loop {
            let j = c
                .get(GetRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if j.state == JobState::Succeeded as i32 {
                assert_eq!(j.agent, "es-shells-1");
                assert_eq!(j.submitted_by, "submitter:ci");
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "job {id} not done: {j:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(agent_names(&mut c).await, ["es-shells-1"]);
    for p in [&stranger, &expired, &distrust] {
        assert!(!p.log().contains("registered with"), "{}", p.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitters_need_a_token_or_a_submitter_certificate() {
    let env = TlsEnv::start();
    let addr = env.server.addr;
    let ca = env.pki.ca_file.clone();
    let req = || submission("shells", echo("hi"));

    // No credentials at all.
    let mut anon = tls_client(addr, &ca, None, None).await.unwrap();
    let e = anon.submit(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("missing credentials"), "{e:?}");
    let e = anon
        .list(ListRequest::default())
        .await
        .expect_err("reading needs credentials too");
    assert_eq!(e.code(), Code::Unauthenticated);

    // A wrong token.
    let mut wrong = tls_client(addr, &ca, None, Some("es_not-a-token"))
        .await
        .unwrap();
    let e = wrong.submit(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("not valid"), "{e:?}");

    // An agent's certificate cannot submit.
    let agent_cert = env.pki.client("es-shells-1", "shells");
    let mut as_agent = tls_client(addr, &ca, Some(&agent_cert), None)
        .await
        .unwrap();
    let e = as_agent.submit(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Plaintext to a TLS server does not get through.
    let plain = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let e = job_service_client::JobServiceClient::new(ch)
            .submit(req())
            .await
            .expect_err("plaintext refused");
        assert_ne!(e.code(), Code::Ok);
    }

    // Nothing was created by the refused calls.
    let mut c = env.client().await;
    assert!(c
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());

    // A submitter certificate works, and is who the job says submitted it.
    let sub = env.pki.client("alice", "submitter");
    let mut alice = tls_client(addr, &ca, Some(&sub), None).await.unwrap();
    let j = alice
        .submit(SubmitRequest {
            submitted_by: "someone-else".into(),
            ..req()
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(j.submitted_by, "submitter:alice", "the claim is ignored");

    // The CLI with the token: lists the job; without it: exit 1 with the reason.
    let cli = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(bins().server);
        cmd.env_clear()
            .args(["jobs", "--server", &format!("https://{addr}"), "--ca"])
            .arg(&ca);
        if let Some(t) = token {
            cmd.env("ES_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = cli(Some(&env.token));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&j.id));
    let out = cli(None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing credentials"));
}

#[test]
fn server_refuses_plaintext_without_insecure_and_half_tls_settings() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(bins().server)
            .env_clear()
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(dir.path().join("x.db"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"));
    let out = run(&["--tls-cert", "/x.pem"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tls-key, --client-ca missing"),
        "{out:?}"
    );
    let out = run(&[
        "--tls-cert",
        "/nonexistent/s.pem",
        "--tls-key",
        "/nonexistent/s.key",
        "--client-ca",
        "/nonexistent/ca.pem",
    ]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert /nonexistent/s.pem"));
    // A tokens file holding a token instead of its digest.
    let t = dir.path().join("tokens");
    std::fs::write(&t, "ci es_0123\n").unwrap();
    let out = run(&["--insecure", "--tokens", t.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"));
}
