//! es-shells: sandbox networks and apps on EC2 through `aws-sdk-ec2`.
//!
//! Principles (see ARCHITECTURE.md):
//! - every resource is tagged `ReservationId=<sandbox>`, `Name`, `CreatedBy=es-shells` at
//!   creation (TagSpecifications), so a crash leaves nothing a cleanup cannot find;
//! - every job looks up before it creates and treats "already exists" as success, so it is safe
//!   to run again after a crash or on the fallback;
//! - throttling and 5xx are retried by the SDK (standard mode: exponential backoff with full
//!   jitter, a retry quota); concurrency per job is bounded (`aws_concurrency`);
//!   `*.NotFound` right after a create (eventual consistency) is retried here; real errors fail
//!   fast with what to fix.
//! - each job counts its EC2 calls by operation (reported in the result).

mod apps;
pub(crate) mod ec2;
mod keys;
mod network;
mod teardown;

use std::collections::BTreeMap;

use es_proto::v1::{job_spec::Kind, shells_result, Job, JobResult, JobState, ShellsResult};

use crate::aws::{self, AwsSettings, CallCounter};

use crate::job::JobCtx;
use es_proto::kinds;

pub const TAG_SANDBOX: &str = "ReservationId";
pub const TAG_CREATED_BY: &str = "CreatedBy";
pub const CREATED_BY: &str = "es-shells";
/// Role of a resource within the sandbox (sandbox-vpc, subnet, sandbox-sg, isolated-sg, ...).
pub const TAG_ROLE: &str = "es:role";
pub const TAG_SUBNET: &str = "es:subnet";
pub const TAG_APP: &str = "AppName";
/// Creation time (Unix seconds) of a resource: a sweep keeps sandboxes younger than its
/// minimum age, and some EC2 resources (VPCs, subnets, groups) carry no creation time of their own.
pub const TAG_CREATED_AT: &str = "es:created-at";

/// Why an es-shells job failed.
#[derive(Debug, thiserror::Error)]
pub enum ShellsError {
    /// Input that only the cloud can refute (e.g. a subnet outside an existing VPC).
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    /// An EC2 error that retrying will not fix, with a hint of what to fix.
    #[error("EC2 {op} failed: {code}: {message}{hint}")]
    Aws {
        op: &'static str,
        code: String,
        message: String,
        hint: String,
    },
    #[error("the sandbox network is missing: {0}; run PrepareSandboxNetwork first")]
    NoNetwork(String),
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, ShellsError>;

/// The es-shells executor: AWS configuration shared by its jobs.
pub struct Shells {
    aws: aws::Aws,
}

impl crate::job::JobFamily for Shells {
    async fn execute(&self, job: &Job, ctx: &JobCtx) -> JobResult {
        match job.spec.as_ref().and_then(|s| s.kind.as_ref()) {
            Some(kind) if kinds::info(kind).family == kinds::Family::Shells => {
                self.run(job, kind, ctx).await
            }
            _ => crate::job::wrong_family(job, "es-shells"),
        }
    }
}

impl Shells {
    pub async fn new(settings: AwsSettings) -> Shells {
        Shells {
            aws: aws::Aws::new(settings).await,
        }
    }

    /// Runs one es-shells job of kind `kind` (the job's own).
    pub async fn run(&self, job: &Job, kind: &Kind, ctx: &JobCtx) -> JobResult {
        let calls = CallCounter::for_job(ctx);
        let ec2 = match self.aws.client(job, calls.clone()) {
            Ok(c) => c,
            Err(e) => {
                let e = ShellsError::Invalid {
                    field: "spec.target.role_arn".into(),
                    reason: e.0,
                };
                return failed(e, &calls, None);
            }
        };
        let ssm = match self.aws.ssm_client(job, calls.clone()) {
            Ok(c) => c,
            Err(e) => {
                let e = ShellsError::Invalid {
                    field: "spec.target.role_arn".into(),
                    reason: e.0,
                };
                return failed(e, &calls, None);
            }
        };
        let sb = job.sandbox_id.as_str();
        let cx = Cx {
            ec2: &ec2,
            keys: keys::KeyStore {
                ssm: &ssm,
                prefix: &self.aws.settings.key_parameter_prefix,
                kms_key: &self.aws.settings.key_parameter_kms_key,
            },
            sandbox: sb,
            job_id: &job.id,
            ctx,
            concurrency: self.aws.settings.concurrency,
            sweep_min_age: self.aws.settings.sweep_min_age,
            user_data_http_allowed: self.aws.settings.user_data_http_allowed,
        };
        let outcome: Result<shells_result::Result> = tokio::select! {
            r = run_kind(&cx, kind) => r,
            _ = ctx.cancel.cancelled() => Err(ShellsError::Cancelled),
        };
        match outcome {
            Ok(r) => {
                let summary = summary(&r);
                // A cleanup or sweep that could not delete everything is a failure, with the
                // per-resource report attached.
                let failures = match &r {
                    shells_result::Result::Deleted(d) => {
                        d.resources.iter().filter(|x| x.outcome == "failed").count()
                    }
                    _ => 0,
                };
                let mut res = JobResult {
                    state: if failures == 0 {
                        JobState::Succeeded as i32
                    } else {
                        JobState::Failed as i32
                    },
                    output: summary,
                    error: if failures == 0 {
                        String::new()
                    } else {
                        format!("{failures} resources could not be deleted; see the report")
                    },
                    shells: None,
                    commands: None,
                };
                res.shells = Some(ShellsResult {
                    result: Some(r),
                    api_calls: calls.snapshot(),
                });
                res
            }
            Err(ShellsError::Cancelled) => JobResult {
                state: JobState::Cancelled as i32,
                output: String::new(),
                error:
                    "cancelled; resources created so far are tagged and removed by CleanupSandbox"
                        .into(),
                shells: Some(ShellsResult {
                    result: None,
                    api_calls: calls.snapshot(),
                }),
                commands: None,
            },
            Err(e) => failed(e, &calls, None),
        }
    }
}

fn failed(e: ShellsError, calls: &CallCounter, r: Option<shells_result::Result>) -> JobResult {
    JobResult {
        state: JobState::Failed as i32,
        output: String::new(),
        error: e.to_string(),
        shells: Some(ShellsResult {
            result: r,
            api_calls: calls.snapshot(),
        }),
        commands: None,
    }
}

/// What a job needs: the EC2 client for its target, the sandbox, progress.
pub(crate) struct Cx<'a> {
    pub ec2: &'a aws_sdk_ec2::Client,
    /// SSM Parameter Store, where sandbox private keys are kept.
    pub keys: keys::KeyStore<'a>,
    pub sandbox: &'a str,
    pub job_id: &'a str,
    pub ctx: &'a JobCtx,
    pub concurrency: usize,
    /// The agent's floor for a sweep's minimum sandbox age.
    pub sweep_min_age: std::time::Duration,
    /// Apps may fetch user data over plain http (`user_data_http_allowed`).
    pub user_data_http_allowed: bool,
}

async fn run_kind(cx: &Cx<'_>, kind: &Kind) -> Result<shells_result::Result> {
    use shells_result::Result as R;
    Ok(match kind {
        Kind::PrepareNetwork(p) => {
            // Every read and check first, all at once (the key type and the images it depends
            // on, the sandbox's existing resources, the VPC): bad input creates nothing. Then
            // the network graph and the key pair, which does not depend on it, at once.
            let (kind, checked) = tokio::try_join!(
                keys::key_kind(cx, &p.key_type, &p.amis),
                network::check(cx, p)
            )?;
            let fresh = checked.fresh();
            let key = async {
                match kind {
                    Some(kind) => keys::ensure(cx, kind, fresh).await.map(Some),
                    None => Ok(None),
                }
            };
            let (mut net, key) = tokio::try_join!(network::build(cx, p, checked), key)?;
            if let Some((name, parameter)) = key {
                net.key_pair_name = name;
                net.key_parameter = parameter;
            }
            R::Network(net)
        }
        Kind::GetAccessKey(g) => R::AccessKey(keys::access_key(cx, &g.recipient).await?),
        Kind::AddTags(t) => R::Apps(apps::manage::add_tags(cx, &t.apps, &t.tags).await?),
        Kind::UpdateAppSecurity(u) => R::Apps(apps::security::update(cx, u).await?),
        Kind::Snapshot(x) => R::Snapshots(apps::snapshots::snapshot(cx, x).await?),
        Kind::ListSnapshots(l) => R::Snapshots(apps::snapshots::list(cx, &l.apps).await?),
        Kind::RestoreSnapshot(r) => R::Apps(apps::snapshots::restore(cx, r).await?),
        Kind::ConsoleOutput(c) => {
            R::Console(apps::manage::console_output(cx, &c.app, c.latest).await?)
        }
        Kind::DeployApp(d) => {
            let apps: Vec<_> = d.app.iter().cloned().collect();
            R::Apps(apps::deploy::deploy(cx, &apps, "spec.deploy_app.app", &d.recipient).await?)
        }
        Kind::DeploySandbox(d) => R::Apps(
            apps::deploy::deploy(cx, &d.apps, "spec.deploy_sandbox.apps", &d.recipient).await?,
        ),
        Kind::Power(p) => R::Apps(apps::ops::power(cx, &p.apps, p.on).await?),
        Kind::Reboot(r) if r.power_cycle => {
            apps::ops::power(cx, &r.apps, false).await?;
            R::Apps(apps::ops::power(cx, &r.apps, true).await?)
        }
        Kind::Reboot(r) => R::Apps(apps::ops::reboot(cx, &r.apps).await?),
        Kind::RefreshIp(r) => R::Apps(apps::ops::describe(cx, &r.apps).await?),
        Kind::GetVmDetails(g) => R::Apps(apps::ops::describe(cx, &g.apps).await?),
        Kind::DeleteApp(d) => R::Deleted(apps::ops::delete(cx, &d.app).await?),
        Kind::CleanupSandbox(_) => R::Deleted(teardown::cleanup(cx).await?),
        Kind::SweepOrphans(s) => {
            // The job may ask for a longer minimum age, never a shorter one than the agent's.
            let min_age = cx
                .sweep_min_age
                .max(std::time::Duration::from_secs(s.min_age_s));
            R::Deleted(teardown::sweep(cx, &s.live_sandbox_ids, s.dry_run, min_age).await?)
        }
        Kind::Sleep(_) | Kind::Echo(_) | Kind::RunCommand(_) => {
            return Err(ShellsError::Invalid {
                field: "spec.kind".into(),
                reason: format!("{} is not an es-shells job kind", kinds::info(kind).name),
            })
        }
    })
}

fn summary(r: &shells_result::Result) -> String {
    match r {
        shells_result::Result::Network(n) => format!(
            "network ready: vpc {}, {} subnets, security groups {} / {}",
            n.vpc_id,
            n.subnets.len(),
            n.sandbox_security_group_id,
            n.isolated_security_group_id
        ),
        shells_result::Result::Snapshots(l) => format!(
            "{} snapshots and images: {}",
            l.snapshots.len(),
            l.snapshots
                .iter()
                .map(|x| x.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        shells_result::Result::Console(c) => format!(
            "console output of {} ({}): {} bytes{}",
            c.app,
            c.instance_id,
            c.output.len(),
            if c.truncated { ", the newest part" } else { "" }
        ),
        shells_result::Result::AccessKey(k) => format!(
            "{} key pair {}, sealed to the submitter",
            k.key_type, k.key_name
        ),
        shells_result::Result::Apps(a) => {
            let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
            for app in &a.apps {
                *by_state.entry(app.state.as_str()).or_default() += 1;
            }
            let parts: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
            format!("{} apps: {}", a.apps.len(), parts.join(", "))
        }
        shells_result::Result::Deleted(d) => {
            let mut by: BTreeMap<&str, usize> = BTreeMap::new();
            for x in &d.resources {
                *by.entry(x.outcome.as_str()).or_default() += 1;
            }
            if d.resources.is_empty() {
                "nothing to delete".into()
            } else {
                let parts: Vec<String> = by.iter().map(|(s, n)| format!("{n} {s}")).collect();
                format!("{} resources: {}", d.resources.len(), parts.join(", "))
            }
        }
    }
}
