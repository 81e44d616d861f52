//! Apps: deploy (one or many, in parallel within a bound), power, IP refresh, details, delete.
//!
//! A deploy makes, per app on the happy path, one RunInstances call (tags, NICs, security
//! groups, volume, profile and user data in the one call), plus AllocateAddress and
//! AssociateAddress for an Elastic IP. Lookups are shared by the whole job: one DescribeSubnets,
//! one DescribeSecurityGroups, one DescribeInstances to find apps that already exist, and waits
//! that poll all instances in one DescribeInstances call.

mod checks;
pub(crate) mod deploy;
mod launch;
pub(crate) mod manage;
pub(crate) mod ops;
mod password;
pub(crate) mod security;
pub(crate) mod snapshots;
mod user_data;

use std::time::Duration;

use aws_sdk_ec2::types::{Instance, InstanceStateName};
use es_proto::v1::AppResult;

use crate::shells::ec2::{aws_err, filter, sandbox_filter, tag_value};
use crate::shells::{Cx, Result, ShellsError, TAG_APP};

const LIVE: &[&str] = &["pending", "running", "stopping", "stopped"];

/// Deterministic RunInstances ClientToken for (job, app): a retry of the same job on any agent
/// gets the same token, so EC2 does not launch the app twice.
fn client_token(job_id: &str, app: &str) -> String {
    let u = stable_hash(format!("{job_id}/{app}").as_bytes());
    format!("es-{u}")
}

/// The path of app `i` in the job's spec (`base` is "spec.deploy_app.app" for the one app of a
/// DeployApp, "spec.deploy_sandbox.apps" for a list), for errors that name the field.
fn app_path(base: &str, i: usize) -> String {
    if base.ends_with(".app") {
        base.to_owned()
    } else {
        format!("{base}[{i}]")
    }
}

fn stable_hash(data: &[u8]) -> String {
    // FNV-1a 128 folded into hex: stable across builds and platforms (unlike std's hasher).
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in data {
        h ^= *b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    format!("{h:032x}")
}

pub(crate) fn app_result(i: &Instance) -> AppResult {
    let mut ips: Vec<(i32, String)> = i
        .network_interfaces()
        .iter()
        .filter_map(|n| {
            let idx = n.attachment().and_then(|a| a.device_index()).unwrap_or(0);
            n.private_ip_address().map(|ip| (idx, ip.to_owned()))
        })
        .collect();
    ips.sort();
    let mut private_ips: Vec<String> = ips.into_iter().map(|(_, ip)| ip).collect();
    if private_ips.is_empty() {
        private_ips.extend(i.private_ip_address().map(str::to_owned));
    }
    AppResult {
        name: tag_value(i.tags(), TAG_APP).unwrap_or_default().to_owned(),
        instance_id: i.instance_id().unwrap_or_default().to_owned(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        private_ips,
        public_ip: i.public_ip_address().unwrap_or_default().to_owned(),
        error: String::new(),
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        ami: i.image_id().unwrap_or_default().to_owned(),
        subnet_id: i.subnet_id().unwrap_or_default().to_owned(),
        status_checks: String::new(),
        sealed_password: Vec::new(),
        lifecycle: match i.instance_lifecycle() {
            Some(aws_sdk_ec2::types::InstanceLifecycleType::Spot) => "spot".into(),
            _ => "on-demand".into(),
        },
    }
}

fn no_app(cx: &Cx<'_>, field: &str, app: &str) -> ShellsError {
    ShellsError::Invalid {
        field: field.into(),
        reason: format!("no app {app:?} in sandbox {}", cx.sandbox),
    }
}

/// The sandbox's live instances (optionally only the named apps), in one call per 1000.
pub(crate) async fn instances(
    cx: &Cx<'_>,
    apps: &[String],
    states: &[&str],
) -> Result<Vec<Instance>> {
    let mut req = cx
        .ec2
        .describe_instances()
        .filters(sandbox_filter(cx.sandbox))
        .filters(filter("instance-state-name", states));
    // EC2 takes at most 200 values per filter: for long lists, filter here instead.
    let server_side = !apps.is_empty() && apps.len() <= 100;
    if server_side {
        let names: Vec<&str> = apps.iter().map(String::as_str).collect();
        req = req.filters(filter(&format!("tag:{TAG_APP}"), &names));
    }
    let mut out = Vec::new();
    let mut pages = req.into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| aws_err("DescribeInstances", e))?;
        for r in page.reservations() {
            out.extend(r.instances().iter().cloned());
        }
    }
    if !apps.is_empty() && !server_side {
        out.retain(|i| tag_value(i.tags(), TAG_APP).is_some_and(|n| apps.iter().any(|a| a == n)));
    }
    Ok(out)
}

/// The live instances of the named apps (every app when none is named); an unknown name is
/// refused (naming `field`) before anything is changed.
pub(super) async fn live_apps(
    cx: &Cx<'_>,
    apps: &[String],
    field: &str,
) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
    let all = instances(cx, apps, LIVE).await?;
    for a in apps {
        if !all
            .iter()
            .any(|i| tag_value(i.tags(), TAG_APP) == Some(a.as_str()))
        {
            return Err(no_app(cx, field, a));
        }
    }
    Ok(all)
}

/// Polls the given instances (one DescribeInstances per round) until all are in `want`.
async fn wait_state(
    cx: &Cx<'_>,
    ids: &[String],
    want: &[&str],
    limit: Duration,
) -> Result<Vec<Instance>> {
    let until = tokio::time::Instant::now() + limit;
    let mut delay = Duration::from_millis(250);
    loop {
        let all = super::ec2::describe_ids(cx.ec2, ids).await?;
        let done = all.len() >= ids.len()
            && all.iter().all(|i| {
                let s = i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default();
                want.contains(&s.as_str())
            });
        if done || tokio::time::Instant::now() > until {
            return Ok(all);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Polls the live instances of `names` (one listing per round) until every id in `ids` is
/// running; answers the last listing.
async fn wait_apps(
    cx: &Cx<'_>,
    names: &[String],
    ids: &[String],
    limit: Duration,
) -> Result<Vec<Instance>> {
    let until = tokio::time::Instant::now() + limit;
    let mut delay = Duration::from_millis(250);
    loop {
        let all = instances(cx, names, LIVE).await?;
        let done = ids.iter().all(|id| {
            all.iter().any(|i| {
                i.instance_id() == Some(id.as_str())
                    && i.state().and_then(|s| s.name()) == Some(&InstanceStateName::Running)
            })
        });
        if done || tokio::time::Instant::now() > until {
            return Ok(all);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The Elastic IPs tagged with the sandbox and app `app`.
pub(crate) async fn app_addresses(
    cx: &Cx<'_>,
    app: &str,
) -> Result<Vec<aws_sdk_ec2::types::Address>> {
    Ok(cx
        .ec2
        .describe_addresses()
        .filters(sandbox_filter(cx.sandbox))
        .filters(filter(&format!("tag:{TAG_APP}"), &[app]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeAddresses", e))?
        .addresses()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_are_stable_short_and_distinct() {
        let a = client_token("job-1", "web");
        assert_eq!(a, client_token("job-1", "web"));
        assert_ne!(a, client_token("job-1", "db"));
        assert_ne!(a, client_token("job-2", "web"));
        assert!(a.len() <= 64 && a.is_ascii());
    }
}
