//! Operations on deployed apps: power on and off, reboot, IP refresh and VM details, delete one
//! app.

use std::time::Duration;

use aws_sdk_ec2::types::InstanceStateName;
use es_proto::v1::{AppList, AppResult, Deleted, DeletedResource};

use crate::shells::ec2::{aws_err, filter, retry_consistency, sandbox_filter};
use crate::shells::{Cx, Result, TAG_APP};

use super::*;

/// Reboots the running ones of the apps (RebootInstances: an OS restart, same instance, same
/// IPs); apps that are not running are reported as they are.
pub(crate) async fn reboot(cx: &Cx<'_>, apps: &[String]) -> Result<AppList> {
    let all = live_apps(cx, apps, "apps").await?;
    let running: Vec<String> = all
        .iter()
        .filter(|i| i.state().and_then(|s| s.name()) == Some(&InstanceStateName::Running))
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    for chunk in running.chunks(1000) {
        cx.ec2
            .reboot_instances()
            .set_instance_ids(Some(chunk.to_vec()))
            .send()
            .await
            .map_err(|e| aws_err("RebootInstances", e))?;
    }
    let mut out: Vec<AppResult> = all.iter().map(app_result).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    cx.ctx.progress(
        1,
        1,
        format!(
            "{} of {} apps rebooted (the others are not running)",
            running.len(),
            out.len()
        ),
    );
    Ok(AppList { apps: out })
}

/// Power on or off (no call for apps already in that state); waits for the state.
pub(crate) async fn power(cx: &Cx<'_>, apps: &[String], on: bool) -> Result<AppList> {
    let all = live_apps(cx, apps, "apps").await?;
    let (want, from): (&str, &[InstanceStateName]) = if on {
        (
            "running",
            &[InstanceStateName::Stopped, InstanceStateName::Stopping],
        )
    } else {
        (
            "stopped",
            &[InstanceStateName::Running, InstanceStateName::Pending],
        )
    };
    let to_change: Vec<String> = all
        .iter()
        .filter(|i| {
            i.state()
                .and_then(|s| s.name())
                .is_some_and(|n| from.contains(n))
        })
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    let ids: Vec<String> = all
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    for chunk in to_change.chunks(1000) {
        if on {
            cx.ec2
                .start_instances()
                .set_instance_ids(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| aws_err("StartInstances", e))?;
        } else {
            cx.ec2
                .stop_instances()
                .set_instance_ids(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| aws_err("StopInstances", e))?;
        }
    }
    let after = if to_change.is_empty() {
        all
    } else {
        wait_state(cx, &ids, &[want], Duration::from_secs(600)).await?
    };
    let mut out: Vec<AppResult> = after.iter().map(app_result).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    cx.ctx.progress(
        1,
        1,
        format!("{} apps {want} ({} changed)", out.len(), to_change.len()),
    );
    Ok(AppList { apps: out })
}

/// Current state and addresses of the apps (RefreshIp, GetVmDetails).
pub(crate) async fn describe(cx: &Cx<'_>, apps: &[String]) -> Result<AppList> {
    let mut out: Vec<AppResult> = instances(cx, apps, LIVE)
        .await?
        .iter()
        .map(app_result)
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    for a in apps {
        if !out.iter().any(|r| &r.name == a) {
            return Err(no_app(cx, "apps", a));
        }
    }
    Ok(AppList { apps: out })
}

/// Deletes one app: its Elastic IP, its instance (waiting until terminated), its port group.
pub(crate) async fn delete(cx: &Cx<'_>, app: &str) -> Result<Deleted> {
    let mut out = Vec::new();
    let rec = |kind: &str, id: &str, outcome: &str, error: String| DeletedResource {
        kind: kind.into(),
        id: id.into(),
        sandbox_id: cx.sandbox.into(),
        outcome: outcome.into(),
        error,
    };
    let addrs = app_addresses(cx, app).await?;
    for a in &addrs {
        out.push(crate::shells::teardown::release_address(cx.ec2, a, cx.sandbox).await);
    }
    let found = instances(cx, &[app.to_owned()], LIVE).await?;
    let ids: Vec<String> = found
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    if !ids.is_empty() {
        match cx
            .ec2
            .terminate_instances()
            .set_instance_ids(Some(ids.clone()))
            .send()
            .await
        {
            Ok(_) => {
                wait_state(cx, &ids, &["terminated"], Duration::from_secs(600)).await?;
                for id in &ids {
                    out.push(rec("instance", id, "deleted", String::new()));
                }
            }
            Err(e) => return Err(aws_err("TerminateInstances", e)),
        }
    }
    let groups = cx
        .ec2
        .describe_security_groups()
        .filters(sandbox_filter(cx.sandbox))
        .filters(filter(&format!("tag:{TAG_APP}"), &[app]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeSecurityGroups", e))?;
    for g in groups.security_groups() {
        let id = g.group_id().unwrap_or_default();
        match retry_consistency(|| cx.ec2.delete_security_group().group_id(id).send()).await {
            Ok(_) => out.push(rec("security-group", id, "deleted", String::new())),
            Err(e) => out.push(rec(
                "security-group",
                id,
                "failed",
                aws_err("DeleteSecurityGroup", e).to_string(),
            )),
        }
    }
    if out.is_empty() {
        return Err(no_app(cx, "app", app));
    }
    Ok(Deleted { resources: out })
}
