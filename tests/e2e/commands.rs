//! es-commands end to end, with real execution: RunCommand over SSH to real OpenSSH servers
//! (Debian's openssh-server), one per "instance" on its own loopback address 127.0.0.N. The
//! instances exist in the moto emulator with those private IPs (found by their sandbox and app
//! tags); EC2 Instance Connect is played by a hook in the proxy in front of moto, which writes
//! each pushed key into that sshd's authorized_keys for 60 s (`tests/src/sshd.rs`).
//!
//! The SSM transport is tested against the SDK's test utilities in `agent/src/commands/ssm.rs`
//! (moto's SSM executes nothing and answers 500 to the calls the adapter polls with).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use es_proto::v1::*;
use es_tests::sshd;
use es_tests::*;

use crate::Env;

const LONG: Duration = Duration::from_secs(60);

/// A server in a temporary directory and a fleet of sshd "instances" with an es-commands agent.
pub struct Fleet {
    pub env: Env,
    pub kit: sshd::Fleet,
}

impl std::ops::Deref for Fleet {
    type Target = sshd::Fleet;
    fn deref(&self) -> &sshd::Fleet {
        &self.kit
    }
}

/// `n` instances of sandbox `sb` (apps app-0..), each an sshd on 127.0.0.(base+i).
pub async fn fleet(sb: &str, n: usize, base: u8, slots: u32) -> Fleet {
    let env = Env::start(&[]);
    let kit = sshd::start_fleet(
        &crate::bins(),
        env.dir.path(),
        &env.server.url(),
        sb,
        n,
        base,
        slots,
    )
    .await;
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-commands"]).await;
    Fleet { env, kit }
}

impl Fleet {
    pub async fn run(&self, sb: &str, rc: RunCommand) -> Job {
        let mut c = self.env.server.client().await;
        let j = submit(&mut c, commands_req(sb, rc)).await;
        wait_done(&mut c, &j.id, LONG).await
    }
}

fn api_calls(j: &Job) -> &HashMap<String, u64> {
    &j.result
        .as_ref()
        .and_then(|r| r.commands.as_ref())
        .unwrap_or_else(|| panic!("no commands result: {j:?}"))
        .api_calls
}

fn outputs(j: &Job) -> HashMap<String, InstanceOutput> {
    j.result
        .as_ref()
        .and_then(|r| r.commands.as_ref())
        .unwrap_or_else(|| panic!("no commands result: {j:?}"))
        .instances
        .iter()
        .map(|o| (o.app.clone(), o.clone()))
        .collect()
}

fn status(o: &InstanceOutput) -> CommandStatus {
    CommandStatus::try_from(o.status).unwrap()
}

/// Processes whose command line starts with `name` (read from /proc: no procps needed).
fn processes_named(name: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
                .filter(|c| c.starts_with(name.as_bytes()))
                .count()
        })
        .unwrap_or(0)
}

/// No process of the test's scripts (marked by `marker`) is left on the machine.
async fn no_process_left(marker: &str) {
    let marker = marker.to_owned();
    wait_until(
        "the remote script to be stopped",
        Duration::from_secs(20),
        move || {
            let m = marker.clone();
            async move { processes_named(&m) == 0 }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_runs_on_several_instances_with_per_instance_results_and_masked_secrets() {
    let sb = "sb-ssh";
    let f = fleet(sb, 3, 11, 4).await;
    let mut rc = f.ssh_job(
        "echo \"out $GREETING $TOKEN\"\necho \"err as $(id -un)\" >&2\npwd\n\
         case \"$SSH_CONNECTION\" in *127.0.0.13*) exit 3;; esac\n",
    );
    rc.working_directory = "/tmp".into();
    rc.env = vec![
        CommandVariable {
            name: "GREETING".into(),
            value: "it's hello".into(),
            secret: false,
        },
        CommandVariable {
            name: "TOKEN".into(),
            value: "s3cr3t-v4lue".into(),
            secret: true,
        },
    ];
    // The host keys of app-0 and app-2 are pinned (and checked). app-1's is not: the job has a
    // secret variable, so the script (and the secret) never goes to it.
    for i in [0, 2] {
        rc.ssh
            .as_mut()
            .unwrap()
            .host_keys
            .insert(f.ids[i].clone(), f.sshds[i].host_key.clone());
    }
    let mut c = f.env.server.client().await;
    let job = submit(&mut c, commands_req(sb, rc.clone())).await;
    let j = wait_done(&mut c, &job.id, LONG).await;
    assert_eq!(j.state, JobState::Failed as i32, "one instance exits 3");
    let err = &j.result.as_ref().unwrap().error;
    assert!(
        err.contains("2 of 3") && err.contains("app-1") && err.contains("app-2"),
        "{err}"
    );
    let o = outputs(&j);
    assert_eq!(
        status(&o["app-1"]),
        CommandStatus::Undeliverable,
        "{:?}",
        o["app-1"]
    );
    assert!(
        o["app-1"]
            .reason
            .contains("not verified and the job has secret variables"),
        "{:?}",
        o["app-1"]
    );
    assert!(o["app-1"].stdout.is_empty());
    {
        let x = &o["app-0"];
        assert_eq!(
            (status(x), x.exit_code),
            (CommandStatus::Success, 0),
            "{x:?}"
        );
        assert_eq!(x.stdout, "out it's hello ***\n/tmp\n", "{x:?}");
        assert!(x.stderr.starts_with("err as "), "{x:?}");
        assert!(!x.stdout_truncated && !x.stderr_truncated);
    }
    assert_eq!(
        (status(&o["app-2"]), o["app-2"].exit_code),
        (CommandStatus::Failed, 3)
    );
    assert!(o["app-0"].reason.is_empty(), "known host key verified");
    assert_eq!(
        f.pushes.load(Ordering::SeqCst),
        3,
        "one key pushed per instance"
    );
    let calls = api_calls(&j);
    assert_eq!(calls.get("SendSSHPublicKey"), Some(&3), "{calls:?}");

    // The secret never shows: not in the job read back, its events, or the agent's log.
    let back = get(&mut c, &job.id).await;
    let Some(job_spec::Kind::RunCommand(rc)) = back.spec.unwrap().kind else {
        panic!()
    };
    assert_eq!(rc.env[1].value, "***");
    let events = job_events(&mut c, &job.id).await;
    for ev in &events {
        assert!(!format!("{ev:?}").contains("s3cr3t"), "{ev:?}");
    }
    let n = events.len();
    assert!(n >= 4, "a progress event per instance and the result");
    assert!(!f.agent.log().contains("s3cr3t"));
    assert!(!f.env.server.proc.log().contains("s3cr3t"));

    // Without secrets, a host whose key is not known is used and its fingerprint reported.
    let mut plain = f.ssh_job("echo plain\n");
    plain.apps = vec!["app-1".into()];
    let j = f.run(sb, plain).await;
    let x = &outputs(&j)["app-1"];
    assert_eq!(status(x), CommandStatus::Success, "{x:?}");
    assert!(x.reason.contains("host key not verified: SHA256:"), "{x:?}");

    // The same from the command line: a table per instance and each one's output.
    let out = std::process::Command::new(crate::bins().server)
        .args([
            "sandbox",
            "run",
            "--server",
            &f.env.server.url(),
            "--sandbox",
            sb,
        ])
        .args([
            "--app",
            "app-0",
            "--transport",
            "ssh",
            "--ssh-user",
            &f.user,
        ])
        .args([
            "--ssh-port",
            &f.port.to_string(),
            "--secret-env",
            "PW=hunter22",
            "--host-key",
            &format!("{}={}", f.ids[0], f.sshds[0].host_key),
        ])
        .args(["--script", "echo via-cli $PW"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("success") && text.contains("| via-cli ***"),
        "{text}"
    );
    assert!(!text.contains("hunter22"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_timeout_cancel_large_output_and_host_key_mismatch() {
    let sb = "sb-ssh2";
    let f = fleet(sb, 2, 21, 4).await;
    let mut c = f.env.server.client().await;

    // Execution timeout: stopped on the instance, reported per instance.
    let mut rc = f.ssh_job("echo started\nexec -a es-test-marker-timeout sleep 60\n");
    rc.execution_timeout_s = 2;
    rc.apps = vec!["app-0".into()];
    let j = f.run(sb, rc).await;
    let o = &outputs(&j)["app-0"];
    assert_eq!(status(o), CommandStatus::TimedOut, "{o:?}");
    assert_eq!(o.stdout, "started\n");
    assert!(o.reason.contains("execution timeout (2 s)"), "{}", o.reason);
    no_process_left("es-test-marker-timeout").await;

    // Cancel of the job: the script is stopped on the instance.
    let rc = f.ssh_job("exec -a es-test-marker-cancel sleep 60\n");
    let job = submit(&mut c, commands_req(sb, rc)).await;
    wait_state(&mut c, &job.id, JobState::Running, LONG).await;
    let m = "es-test-marker-cancel".to_owned();
    wait_until("the script running on the instances", LONG, move || {
        let m = m.clone();
        async move { processes_named(&m) == 2 }
    })
    .await;
    c.cancel(CancelRequest {
        job_id: job.id.clone(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    let j = wait_done(&mut c, &job.id, LONG).await;
    assert_eq!(j.state, JobState::Cancelled as i32, "{j:?}");
    no_process_left("es-test-marker-cancel").await;

    // A large output: the inline text is capped and marked truncated; with a bucket, the full
    // text goes to S3.
    let s3 = {
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&f.moto.url)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "testing", "testing", None, None, "es-tests",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    };
    s3.create_bucket().bucket("es-output").send().await.unwrap();
    // A secret variable in the output: masked in the S3 copy too (the host key is pinned, or
    // the job would not go to the host at all).
    let mut rc = f.ssh_job("head -c 3000000 /dev/zero | tr '\\0' a\necho \"tail $PW\" >&2\n");
    rc.apps = vec!["app-1".into()];
    rc.output_s3_bucket = "es-output".into();
    rc.output_s3_prefix = "runs".into();
    rc.env = vec![CommandVariable {
        name: "PW".into(),
        value: "s3-copy-s3cr3t".into(),
        secret: true,
    }];
    rc.ssh
        .as_mut()
        .unwrap()
        .host_keys
        .insert(f.ids[1].clone(), f.sshds[1].host_key.clone());
    let j = f.run(sb, rc.clone()).await;
    let o = &outputs(&j)["app-1"];
    assert_eq!(status(o), CommandStatus::Success, "{o:?}");
    assert!(
        o.stdout_truncated && o.stdout.len() == 256 * 1024,
        "{}",
        o.stdout.len()
    );
    assert_eq!(o.stderr, "tail ***\n");
    let err_key = o
        .stderr_url
        .strip_prefix("s3://es-output/")
        .expect("s3 url");
    let err_obj = s3
        .get_object()
        .bucket("es-output")
        .key(err_key)
        .send()
        .await
        .unwrap();
    let err_text = err_obj.body.collect().await.unwrap().into_bytes();
    assert_eq!(&err_text[..], b"tail ***\n", "the S3 copy is masked too");
    let key = o
        .stdout_url
        .strip_prefix("s3://es-output/")
        .expect("s3 url");
    let obj = s3
        .get_object()
        .bucket("es-output")
        .key(key)
        .send()
        .await
        .unwrap();
    let full = obj.body.collect().await.unwrap().into_bytes();
    assert_eq!(full.len(), 3_000_000, "the full output is in S3");
    // The es-commands IAM policy allows every call this job made, and the audit trail records
    // the mutating ones (key pushed to the instance, object written).
    let calls = api_calls(&j);
    for (prefix, op) in [
        ("ec2", "DescribeInstances"),
        ("ec2-instance-connect", "SendSSHPublicKey"),
        ("s3", "PutObject"),
    ] {
        assert!(calls.contains_key(op), "{calls:?}");
        assert_policy_allows("es-commands-policy.json", prefix, [&op.to_owned()]);
    }
    assert_eq!(
        calls.len(),
        3,
        "a call the policy test does not know: {calls:?}"
    );
    let mut c = f.env.server.client().await;
    let trail = c
        .audit(AuditRequest {
            job_id: j.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let audited: Vec<String> = trail
        .iter()
        .filter(|e| e.action == "aws_call")
        .map(|e| e.detail_json.clone())
        .collect();
    assert!(
        audited
            .iter()
            .any(|d| d.contains("SendSSHPublicKey") && d.contains("\"i-"))
            && audited
                .iter()
                .any(|d| d.contains("PutObject") && d.contains(&format!("s3://es-output/{key}"))),
        "{audited:?}"
    );
    // Without a bucket: SSM-like inline limits.
    rc.output_s3_bucket.clear();
    rc.output_s3_prefix.clear();
    let j = f.run(sb, rc).await;
    let o = &outputs(&j)["app-1"];
    assert!(
        o.stdout_truncated && o.stdout.len() == 24_000,
        "{}",
        o.stdout.len()
    );

    // A host presenting another key than the job expects is refused, nothing runs.
    let mut rc = f.ssh_job("touch /tmp/es-test-should-not-exist\n");
    rc.apps = vec!["app-0".into()];
    rc.ssh
        .as_mut()
        .unwrap()
        .host_keys
        .insert(f.ids[0].clone(), f.sshds[1].host_key.clone());
    let j = f.run(sb, rc).await;
    let o = &outputs(&j)["app-0"];
    assert_eq!(status(o), CommandStatus::Undeliverable);
    assert!(o.reason.contains("host key mismatch"), "{}", o.reason);
    assert!(!std::path::Path::new("/tmp/es-test-should-not-exist").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_run_commands_are_refused_with_the_field_named() {
    let env = Env::start(&[]);
    let mut c = env.server.client().await;
    let base = RunCommand {
        script: "true".into(),
        ..Default::default()
    };
    let cases: Vec<(SubmitRequest, &str)> = vec![
        (
            commands_req(
                "sb-1",
                RunCommand {
                    script: "".into(),
                    ..base.clone()
                },
            ),
            "spec.run_command.script",
        ),
        (
            commands_req("", base.clone()),
            "spec.run_command.instance_ids",
        ),
        (
            commands_req(
                "",
                RunCommand {
                    instance_ids: (0..501).map(|i| format!("i-{i:017x}")).collect(),
                    ..base.clone()
                },
            ),
            "spec.run_command.instance_ids",
        ),
        (
            commands_req(
                "sb-1",
                RunCommand {
                    shell: 9,
                    ..base.clone()
                },
            ),
            "spec.run_command.shell",
        ),
    ];
    for (req, field) in cases {
        let e = c.submit(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    // Nothing was stored.
    let all = c
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(all.is_empty());
}
