//! Bad input gets INVALID_ARGUMENT (or exit 64) naming the field, and creates nothing.

use es_proto::v1::agent_service_client::AgentServiceClient;
use es_proto::v1::*;
use es_tests::*;
use tonic::Code;

use crate::{bins, Env};

fn identity() -> AgentIdentity {
    AgentIdentity {
        name: "es-shells-1".into(),
        role: role("shells"),
        slots: 2,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_and_submissions_are_refused_with_the_field_named() {
    let env = Env::start(&[]);
    let ch = tonic::transport::Channel::from_shared(env.server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut a = AgentServiceClient::new(ch);
    let cases: Vec<(AgentIdentity, &str)> = vec![
        (
            AgentIdentity {
                role: 7,
                ..identity()
            },
            "identity.role",
        ),
        (
            AgentIdentity {
                role: 0,
                ..identity()
            },
            "identity.role",
        ),
        (
            AgentIdentity {
                name: String::new(),
                ..identity()
            },
            "identity.name",
        ),
        (
            AgentIdentity {
                slots: 0,
                ..identity()
            },
            "identity.slots",
        ),
        (
            AgentIdentity {
                health_addr: "not-an-address".into(),
                ..identity()
            },
            "identity.health_addr",
        ),
    ];
    for (id, field) in cases {
        let err = a
            .register(RegisterRequest {
                identity: Some(id),
                held: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let mut c = env.server.client().await;
    assert!(agents(&mut c).await.is_empty(), "no agent registered");

    let good = submission("shells", echo("x"));
    let cases: Vec<(SubmitRequest, &str)> = vec![
        (
            SubmitRequest {
                role: 0,
                ..good.clone()
            },
            "`role`",
        ),
        (
            SubmitRequest {
                role: 42,
                ..good.clone()
            },
            "`role`",
        ),
        (
            SubmitRequest {
                spec: None,
                ..good.clone()
            },
            "`spec`",
        ),
        (
            SubmitRequest {
                spec: Some(JobSpec {
                    kind: None,
                    target: None,
                }),
                ..good.clone()
            },
            "`spec.kind`",
        ),
        (
            SubmitRequest {
                spec: Some(JobSpec {
                    kind: Some(job_spec::Kind::Sleep(SleepJob {
                        duration_ms: u64::MAX,
                        ..Default::default()
                    })),
                    target: None,
                }),
                ..good.clone()
            },
            "`spec.sleep.duration_ms`",
        ),
        (
            SubmitRequest {
                max_attempts: 101,
                ..good.clone()
            },
            "`max_attempts`",
        ),
        (
            SubmitRequest {
                sandbox_id: "sb 1".into(),
                ..good.clone()
            },
            "`sandbox_id`",
        ),
    ];
    for (req, field) in cases {
        let err = c.submit(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let jobs = c
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "nothing half-made: {jobs:?}");
    let err = c
        .list(ListRequest {
            states: vec![99],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A registered agent: a non-final result state and a wrong-role acquire are refused.
    let reg = a
        .register(RegisterRequest {
            identity: Some(AgentIdentity {
                role: role("commands"),
                ..identity()
            }),
            held: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let job = submit(&mut c, good.clone()).await;
    let err = a
        .acquire(AcquireRequest {
            session_id: reg.session_id.clone(),
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = a
        .acquire(AcquireRequest {
            session_id: "no-such-session".into(),
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = a
        .complete(CompleteRequest {
            session_id: reg.session_id,
            job_id: job.id.clone(),
            epoch: 1,
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("`result`"));
    assert_eq!(get(&mut c, &job.id).await.state, JobState::Queued as i32);
}

#[test]
fn agent_with_bad_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        ("ES_AGENT_NAME", "a"),
        ("ES_AGENT_ROLE", "shells"),
        ("ES_AGENT_SERVER", "http://127.0.0.1:1"),
        ("ES_AGENT_INSECURE", "true"),
    ];
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("ES_AGENT_INSECURE", "false")], "insecure = true"),
        (
            vec![
                ("ES_AGENT_SERVER", "https://127.0.0.1:1"),
                ("ES_AGENT_INSECURE", "false"),
            ],
            "`tls_ca`",
        ),
        (vec![("ES_AGENT_SLOTS", "0")], "`slots`"),
        (vec![("ES_AGENT_ROLE", "shell")], "`role`"),
        (vec![("ES_AGENT_NAME", "")], "`name`"),
        (vec![("ES_AGENT_SERVER", "nowhere")], "`server`"),
        (vec![("ES_AGENT_DRAIN_GRACE", "soon")], "drain_grace"),
    ];
    for (overrides, key) in cases {
        let mut cmd = std::process::Command::new(bins().agent);
        cmd.env_clear();
        for (k, v) in base.iter().chain(overrides.iter()) {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{key}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(key),
            "{key}: {out:?}"
        );
    }
    // Unknown key in the file, and check-config of a good file.
    let f = dir.path().join("agent.toml");
    std::fs::write(
        &f,
        "name = \"a\"\nrole = \"shells\"\nserver = \"http://127.0.0.1:1\"\nslot = 3\n",
    )
    .unwrap();
    let out = std::process::Command::new(bins().agent)
        .env_clear()
        .arg("--config")
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("slot"),
        "{out:?}"
    );
    std::fs::write(
        &f,
        "name = \"a\"\nrole = \"shells\"\nserver = \"http://127.0.0.1:1\"\ninsecure = true\nslots = 3\n",
    )
    .unwrap();
    let out = std::process::Command::new(bins().agent)
        .env_clear()
        .arg("--config")
        .arg(&f)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("slots = 3"));
}

#[test]
fn server_with_bad_timings_and_cli_with_bad_flags_exit_64() {
    let out = std::process::Command::new(bins().server)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "/nonexistent/x.db",
            "--lease-ttl",
            "1s",
            "--heartbeat-interval",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lease-ttl"));
    let out = std::process::Command::new(bins().server)
        .args([
            "submit",
            "--role",
            "shells",
            "--server",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--echo"));
}
