//! Tests of the SSM transport, on the SDK's own test utilities (aws-smithy-mocks) with
//! realistic responses: moto's SSM executes nothing.

use super::*;
use crate::commands::Scrubber;
use crate::job::{JobCtx, JobEventOut};
use aws_sdk_ssm::operation::cancel_command::CancelCommandOutput;
use aws_sdk_ssm::operation::describe_instance_information::DescribeInstanceInformationOutput;
use aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput;
use aws_sdk_ssm::operation::list_command_invocations::ListCommandInvocationsOutput;
use aws_sdk_ssm::operation::send_command::SendCommandOutput;
use aws_sdk_ssm::types::{Command, CommandInvocation, CommandPlugin, InstanceInformation};
use aws_sdk_ssm::Client;
use aws_smithy_mocks::{mock, mock_client, Rule, RuleMode};
use es_proto::v1::Shell;
use tokio::sync::mpsc;

const FAST: PollPace = PollPace {
    first: Duration::from_millis(1),
    factor: 1.0,
    max: Duration::from_millis(1),
    cancel_wait: Duration::from_millis(200),
};

fn job(id: &str, attempt: u32) -> Job {
    Job {
        id: id.into(),
        attempt,
        created_at_us: 1_700_000_000_000_000,
        ..Default::default()
    }
}

fn targets(ids: &[&str]) -> Vec<Target> {
    ids.iter()
        .map(|id| Target {
            instance_id: id.to_string(),
            app: format!("app-{id}"),
            private_ip: "10.0.0.1".into(),
        })
        .collect()
}

fn info(id: &str, ping: PingStatus) -> InstanceInformation {
    InstanceInformation::builder()
        .instance_id(id)
        .ping_status(ping)
        .build()
}

fn inv(id: &str, status: CommandInvocationStatus, details: &str, code: i32) -> CommandInvocation {
    CommandInvocation::builder()
        .instance_id(id)
        .status(status)
        .status_details(details)
        .command_plugins(CommandPlugin::builder().response_code(code).build())
        .build()
}

fn ssm(rules: &[&Rule]) -> Client {
    mock_client!(aws_sdk_ssm, RuleMode::MatchAny, rules, |c| c.retry_config(
        aws_sdk_ssm::config::retry::RetryConfig::standard()
            .with_max_attempts(4)
            .with_initial_backoff(Duration::from_millis(1))
    ))
}

fn ctx() -> (JobCtx, mpsc::UnboundedReceiver<JobEventOut>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (JobCtx::new(tx), rx)
}

fn describe_all_online() -> Rule {
    mock!(Client::describe_instance_information).then_compute_output(|req| {
        let ids = req
            .filters()
            .first()
            .map(|f| f.values().to_vec())
            .unwrap_or_default();
        DescribeInstanceInformationOutput::builder()
            .set_instance_information_list(Some(
                ids.iter().map(|id| info(id, PingStatus::Online)).collect(),
            ))
            .build()
    })
}

#[tokio::test]
async fn statuses_outputs_and_undeliverable_targets() {
    let rc = RunCommand {
        script: "echo hello".into(),
        ..Default::default()
    };
    let describe = mock!(Client::describe_instance_information).then_output(|| {
        DescribeInstanceInformationOutput::builder()
            .instance_information_list(info("i-1", PingStatus::Online))
            .instance_information_list(info("i-2", PingStatus::ConnectionLost))
            .instance_information_list(info("i-4", PingStatus::Online))
            .instance_information_list(info("i-5", PingStatus::Online))
            .instance_information_list(info("i-6", PingStatus::Online))
            .instance_information_list(info("i-7", PingStatus::Online))
            .build()
    });
    let send = mock!(Client::send_command)
        .match_requests(|r| {
            r.document_name() == Some("AWS-RunShellScript")
                && r.instance_ids() == ["i-1", "i-4", "i-5", "i-6", "i-7"]
                && r.parameters().unwrap()["commands"] == ["echo hello"]
                && r.timeout_seconds() == Some(600)
                && r.max_errors() == Some("100%")
        })
        .then_output(|| {
            SendCommandOutput::builder()
                .command(Command::builder().command_id("cmd-1").build())
                .build()
        });
    use CommandInvocationStatus as S;
    let list = mock!(Client::list_command_invocations)
        .match_requests(|r| r.command_id() == Some("cmd-1") && r.details() == Some(true))
        .sequence()
        .output(|| {
            ListCommandInvocationsOutput::builder()
                .command_invocations(inv("i-1", S::InProgress, "InProgress", -1))
                .command_invocations(inv("i-4", S::Pending, "Pending", -1))
                .command_invocations(inv("i-5", S::Delayed, "Delayed", -1))
                .build()
        })
        .output(|| {
            ListCommandInvocationsOutput::builder()
                .command_invocations(inv("i-1", S::Success, "Success", 0))
                .command_invocations(inv("i-4", S::Failed, "Failed", 2))
                .command_invocations(inv("i-5", S::TimedOut, "ExecutionTimedOut", -1))
                .command_invocations(inv("i-6", S::TimedOut, "DeliveryTimedOut", -1))
                .command_invocations(inv("i-7", S::Failed, "Undeliverable", -1))
                .build()
        })
        .build();
    let get = mock!(Client::get_command_invocation).then_compute_output(|r| {
        let b = GetCommandInvocationOutput::builder();
        match r.instance_id().unwrap() {
            "i-1" => b.standard_output_content("hello\n"),
            "i-4" => b
                .standard_output_content("x".repeat(SSM_INLINE_STDOUT))
                .standard_error_content("boom\n"),
            _ => b,
        }
        .build()
    });
    let client = ssm(&[&describe, &send, &list, &get]);
    let (c, mut events) = ctx();
    let scrub = Scrubber::new(&rc);
    let t = targets(&["i-1", "i-2", "i-3", "i-4", "i-5", "i-6", "i-7"]);
    let rep = Reporter::new(&c, &scrub, t.len());
    let (outs, ids) = run_ssm(
        &SsmClients {
            ssm: &client,
            s3: None,
        },
        &job("job-1", 1),
        &rc,
        &t,
        OutputCaps::new(7, false),
        &rep,
        &c.cancel,
        FAST,
    )
    .await
    .unwrap();
    assert_eq!(ids, ["cmd-1"]);
    let by: HashMap<&str, &InstanceOutput> =
        outs.iter().map(|o| (o.instance_id.as_str(), o)).collect();
    let st = |id: &str| CommandStatus::try_from(by[id].status).unwrap();
    assert_eq!(st("i-1"), CommandStatus::Success);
    assert_eq!(
        (by["i-1"].exit_code, by["i-1"].stdout.as_str()),
        (0, "hello\n")
    );
    assert_eq!(st("i-2"), CommandStatus::Undeliverable);
    assert!(
        by["i-2"].reason.contains("ConnectionLost"),
        "{}",
        by["i-2"].reason
    );
    assert_eq!(st("i-3"), CommandStatus::Undeliverable);
    assert!(by["i-3"].reason.contains("not a managed instance"));
    assert_eq!((st("i-4"), by["i-4"].exit_code), (CommandStatus::Failed, 2));
    assert!(by["i-4"].stdout_truncated && !by["i-4"].stderr_truncated);
    assert_eq!(by["i-4"].stderr, "boom\n");
    assert_eq!(st("i-5"), CommandStatus::TimedOut);
    assert_eq!(st("i-6"), CommandStatus::DeliveryTimedOut);
    assert_eq!(st("i-7"), CommandStatus::Undeliverable);
    // One send, two polling rounds, one output fetch per instance that ran.
    assert_eq!(
        (send.num_calls(), list.num_calls(), get.num_calls()),
        (1, 2, 3)
    );
    let mut progress = 0;
    while let Ok(JobEventOut::Progress(p)) = events.try_recv() {
        progress += 1;
        assert_eq!(p.total, 7);
    }
    assert_eq!(progress, 7, "each instance reported as it finished");
}

#[tokio::test]
async fn batches_of_fifty_paged_polling_and_throttling_retried() {
    let ids: Vec<String> = (0..120).map(|i| format!("i-{i:03}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let t = targets(&id_refs);
    // A pre-flight call throttled once: the SDK retries it (a rule's sequence serves the
    // attempts of one call).
    let throttled = mock!(Client::describe_instance_information)
        .sequence()
        .http_status(
            400,
            Some(r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.into()),
        )
        .output(|| {
            DescribeInstanceInformationOutput::builder()
                .instance_information_list(info("i-000", PingStatus::Online))
                .build()
        })
        .build();
    let describe = describe_all_online();
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let s2 = sent.clone();
    let send = mock!(Client::send_command).then_compute_output(move |r| {
        let mut s = s2.lock().unwrap();
        s.push(r.instance_ids().len());
        SendCommandOutput::builder()
            .command(
                Command::builder()
                    .command_id(format!("cmd-{}", s.len()))
                    .instance_ids(r.instance_ids().join(","))
                    .build(),
            )
            .build()
    });
    // Every command answers in two pages of 25 (or fewer), all done.
    let by_cmd = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, Vec<String>>::new()));
    let chunks: Vec<Vec<String>> = ids.chunks(50).map(|c| c.to_vec()).collect();
    for (i, c) in chunks.iter().enumerate() {
        by_cmd
            .lock()
            .unwrap()
            .insert(format!("cmd-{}", i + 1), c.clone());
    }
    let b2 = by_cmd.clone();
    let list = mock!(Client::list_command_invocations).then_compute_output(move |r| {
        let all = b2.lock().unwrap()[r.command_id().unwrap()].clone();
        let (page, next) = match r.next_token() {
            None if all.len() > 25 => (&all[..25], Some("p2")),
            None => (&all[..], None),
            Some(_) => (&all[25..], None),
        };
        ListCommandInvocationsOutput::builder()
            .set_command_invocations(Some(
                page.iter()
                    .map(|id| inv(id, CommandInvocationStatus::Success, "Success", 0))
                    .collect(),
            ))
            .set_next_token(next.map(str::to_owned))
            .build()
    });
    let get = mock!(Client::get_command_invocation).then_output(|| {
        GetCommandInvocationOutput::builder()
            .standard_output_content("ok")
            .build()
    });
    let client = ssm(&[&describe, &send, &list, &get]);
    let preflight_retry = mock_client!(aws_sdk_ssm, RuleMode::Sequential, [&throttled], |c| c
        .retry_config(
            aws_sdk_ssm::config::retry::RetryConfig::standard()
                .with_max_attempts(4)
                .with_initial_backoff(Duration::from_millis(1))
        ));
    let r = preflight(&preflight_retry, &t[..1]).await.unwrap();
    assert_eq!(r["i-000"].0, PingStatus::Online);
    assert_eq!(throttled.num_calls(), 2, "the throttled answer was retried");

    let rc = RunCommand {
        script: "uptime".into(),
        ..Default::default()
    };
    let (c, _events) = ctx();
    let scrub = Scrubber::new(&rc);
    let rep = Reporter::new(&c, &scrub, t.len());
    let (outs, cmd_ids) = run_ssm(
        &SsmClients {
            ssm: &client,
            s3: None,
        },
        &job("job-2", 1),
        &rc,
        &t,
        OutputCaps::new(t.len(), false),
        &rep,
        &c.cancel,
        FAST,
    )
    .await
    .unwrap();
    assert_eq!(*sent.lock().unwrap(), [50, 50, 20]);
    assert_eq!(cmd_ids.len(), 3);
    assert_eq!(outs.len(), 120);
    assert!(outs
        .iter()
        .all(|o| o.status == CommandStatus::Success as i32 && o.stdout == "ok"));
    // Three pre-flight pages (50 ids per filter), and 2 + 2 + 1 list pages.
    assert_eq!(list.num_calls(), 5);
}

#[tokio::test]
async fn cancel_sends_cancel_command_and_reports_cancelled() {
    let rc = RunCommand {
        script: "sleep 600".into(),
        ..Default::default()
    };
    let describe = describe_all_online();
    let send = mock!(Client::send_command).then_output(|| {
        SendCommandOutput::builder()
            .command(Command::builder().command_id("cmd-c").build())
            .build()
    });
    let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c2 = cancelled.clone();
    let list = mock!(Client::list_command_invocations).then_compute_output(move |_| {
        let (s, d) = if c2.load(std::sync::atomic::Ordering::SeqCst) {
            (CommandInvocationStatus::Cancelled, "Cancelled")
        } else {
            (CommandInvocationStatus::InProgress, "InProgress")
        };
        ListCommandInvocationsOutput::builder()
            .command_invocations(inv("i-1", s.clone(), d, -1))
            .command_invocations(inv(
                "i-2",
                CommandInvocationStatus::Cancelling,
                "Cancelling",
                -1,
            ))
            .build()
    });
    let c3 = cancelled.clone();
    let cancel = mock!(Client::cancel_command)
        .match_requests(|r| r.command_id() == Some("cmd-c"))
        .then_compute_output(move |_| {
            c3.store(true, std::sync::atomic::Ordering::SeqCst);
            CancelCommandOutput::builder().build()
        });
    let get = mock!(Client::get_command_invocation)
        .then_output(|| GetCommandInvocationOutput::builder().build());
    let client = ssm(&[&describe, &send, &list, &cancel, &get]);
    let (c, _events) = ctx();
    let scrub = Scrubber::new(&rc);
    let t = targets(&["i-1", "i-2"]);
    let rep = Reporter::new(&c, &scrub, 2);
    let token = c.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        token.cancel();
    });
    let (outs, _) = run_ssm(
        &SsmClients {
            ssm: &client,
            s3: None,
        },
        &job("job-3", 1),
        &rc,
        &t,
        OutputCaps::new(2, false),
        &rep,
        &c.cancel,
        FAST,
    )
    .await
    .unwrap();
    assert_eq!(cancel.num_calls(), 1);
    assert!(
        outs.iter()
            .all(|o| o.status == CommandStatus::Cancelled as i32),
        "{outs:?}"
    );
    // i-2 never confirmed: reported cancelled with the reason.
    let i2 = outs.iter().find(|o| o.instance_id == "i-2").unwrap();
    assert!(i2.reason.contains("had not confirmed"), "{}", i2.reason);
}

#[tokio::test]
async fn a_later_attempt_follows_the_earlier_command_instead_of_sending_again() {
    use aws_sdk_ssm::operation::list_commands::ListCommandsOutput;
    let rc = RunCommand {
        script: "do-once".into(),
        ..Default::default()
    };
    // The lost attempt had sent to i-1 and i-2 (comment "es job job-r"); i-3 is new work.
    let earlier = mock!(Client::list_commands)
        .match_requests(|r| {
            r.filters().first().is_some_and(|f| {
                f.key() == &aws_sdk_ssm::types::CommandFilterKey::InvokedAfter
                    && f.value() == "2023-11-14T22:12:20Z"
            })
        })
        .then_output(|| {
            ListCommandsOutput::builder()
                .commands(
                    Command::builder()
                        .command_id("cmd-other")
                        .comment("es job someone-else")
                        .instance_ids("i-1")
                        .build(),
                )
                .commands(
                    Command::builder()
                        .command_id("cmd-old")
                        .comment("es job job-r")
                        .instance_ids("i-1")
                        .instance_ids("i-2")
                        .build(),
                )
                .build()
        });
    let describe = describe_all_online();
    let send = mock!(Client::send_command)
        .match_requests(|r| r.instance_ids() == ["i-3"])
        .then_output(|| {
            SendCommandOutput::builder()
                .command(Command::builder().command_id("cmd-new").build())
                .build()
        });
    let list = mock!(Client::list_command_invocations).then_compute_output(|r| {
        let ids: &[&str] = if r.command_id() == Some("cmd-old") {
            &["i-1", "i-2"]
        } else {
            &["i-3"]
        };
        ListCommandInvocationsOutput::builder()
            .set_command_invocations(Some(
                ids.iter()
                    .map(|id| inv(id, CommandInvocationStatus::Success, "Success", 0))
                    .collect(),
            ))
            .build()
    });
    let get = mock!(Client::get_command_invocation)
        .then_output(|| GetCommandInvocationOutput::builder().build());
    let client = ssm(&[&earlier, &describe, &send, &list, &get]);
    let (c, _events) = ctx();
    let scrub = Scrubber::new(&rc);
    let t = targets(&["i-1", "i-2", "i-3"]);
    let rep = Reporter::new(&c, &scrub, 3);
    let (outs, ids) = run_ssm(
        &SsmClients {
            ssm: &client,
            s3: None,
        },
        &job("job-r", 2),
        &rc,
        &t,
        OutputCaps::new(3, false),
        &rep,
        &c.cancel,
        FAST,
    )
    .await
    .unwrap();
    assert_eq!(ids, ["cmd-old", "cmd-new"]);
    assert_eq!(send.num_calls(), 1, "only the instance not reached before");
    assert_eq!(outs.len(), 3);
    assert!(outs
        .iter()
        .all(|o| o.status == CommandStatus::Success as i32));
}

#[tokio::test]
async fn with_an_output_bucket_the_full_text_comes_from_s3() {
    use aws_sdk_s3::operation::get_object::{GetObjectError, GetObjectOutput};
    let rc = RunCommand {
        script: "make-lots-of-output".into(),
        output_s3_bucket: "out-bucket".into(),
        output_s3_prefix: "runs".into(),
        ..Default::default()
    };
    let describe = describe_all_online();
    let send = mock!(Client::send_command)
        .match_requests(|r| {
            r.output_s3_bucket_name() == Some("out-bucket")
                && r.output_s3_key_prefix() == Some("runs")
        })
        .then_output(|| {
            SendCommandOutput::builder()
                .command(Command::builder().command_id("cmd-s3").build())
                .build()
        });
    let list = mock!(Client::list_command_invocations).then_output(|| {
        ListCommandInvocationsOutput::builder()
            .command_invocations(
                CommandInvocation::builder()
                    .instance_id("i-1")
                    .status(CommandInvocationStatus::Success)
                    .status_details("Success")
                    .command_plugins(
                        CommandPlugin::builder()
                            .response_code(0)
                            .standard_output_url("https://s3.us-east-1.amazonaws.com/out-bucket/runs/cmd-s3/i-1/awsrunShellScript/0.awsrunShellScript/stdout")
                            .build(),
                    )
                    .build(),
            )
            .build()
    });
    let client = ssm(&[&describe, &send, &list]);
    // S3 answers the first 256 KiB + 1 of a 3 MB stdout; there is no stderr object.
    let stdout = mock!(aws_sdk_s3::Client::get_object)
        .match_requests(|r| {
            r.key() == Some("runs/cmd-s3/i-1/awsrunShellScript/0.awsrunShellScript/stdout")
                && r.range() == Some("bytes=0-262144")
        })
        .then_output(|| {
            GetObjectOutput::builder()
                .content_range("bytes 0-262144/3000000")
                .body(aws_sdk_s3::primitives::ByteStream::from(vec![
                    b'a';
                    262_145
                ]))
                .build()
        });
    let stderr = mock!(aws_sdk_s3::Client::get_object)
        .match_requests(|r| r.key().is_some_and(|k| k.ends_with("/stderr")))
        .then_error(|| {
            GetObjectError::NoSuchKey(aws_sdk_s3::types::error::NoSuchKey::builder().build())
        });
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "t", "t", None, None, "test",
            ))
            .http_client(aws_smithy_mocks::create_mock_http_client())
            .interceptor(
                aws_smithy_mocks::MockResponseInterceptor::new()
                    .rule_mode(RuleMode::MatchAny)
                    .with_rule(&stdout)
                    .with_rule(&stderr),
            )
            .build(),
    );
    let (c, _events) = ctx();
    let scrub = Scrubber::new(&rc);
    let t = targets(&["i-1"]);
    let rep = Reporter::new(&c, &scrub, 1);
    let (outs, _) = run_ssm(
        &SsmClients {
            ssm: &client,
            s3: Some(&s3),
        },
        &job("job-s3", 1),
        &rc,
        &t,
        OutputCaps::new(1, true),
        &rep,
        &c.cancel,
        FAST,
    )
    .await
    .unwrap();
    let o = &outs[0];
    assert_eq!(o.status, CommandStatus::Success as i32);
    assert_eq!(o.stdout.len(), 256 * 1024);
    assert!(o.stdout_truncated, "3 MB in S3, 256 KiB inline");
    assert!(o.stdout_url.ends_with("/stdout") && o.stdout_url.starts_with("https://"));
    assert_eq!((o.stderr.as_str(), o.stderr_truncated), ("", false));
    assert_eq!(stdout.num_calls(), 1);
}

#[test]
fn every_ssm_status_maps() {
    use CommandStatus as C;
    for (s, d, want) in [
        ("Pending", "Pending", None),
        ("InProgress", "InProgress", None),
        ("Delayed", "Delayed", None),
        ("Cancelling", "Cancelling", None),
        ("Success", "Success", Some(C::Success)),
        ("Failed", "Failed", Some(C::Failed)),
        ("Cancelled", "Cancelled", Some(C::Cancelled)),
        ("TimedOut", "DeliveryTimedOut", Some(C::DeliveryTimedOut)),
        ("TimedOut", "ExecutionTimedOut", Some(C::TimedOut)),
        ("TimedOut", "", Some(C::TimedOut)),
        ("Failed", "Undeliverable", Some(C::Undeliverable)),
        ("Failed", "InvalidPlatform", Some(C::Undeliverable)),
        ("Failed", "Terminated", Some(C::Terminated)),
    ] {
        assert_eq!(map_status(s, d), want, "{s}/{d}");
    }
}

#[test]
fn s3_keys_follow_ssm_layout() {
    let mut rc = RunCommand {
        output_s3_prefix: "runs/".into(),
        ..Default::default()
    };
    assert_eq!(
        s3_key(&rc, "c1", "i-1", "stdout"),
        "runs/c1/i-1/awsrunShellScript/0.awsrunShellScript/stdout"
    );
    rc.output_s3_prefix.clear();
    rc.shell = Shell::Powershell as i32;
    assert_eq!(
        s3_key(&rc, "c1", "i-1", "stderr"),
        "c1/i-1/awsrunPowerShellScript/0.awsrunPowerShellScript/stderr"
    );
}
