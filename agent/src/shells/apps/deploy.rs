//! DeployApp and DeploySandbox: the lookups shared by the whole job (network, images, apps that
//! already run), the checks only the cloud can answer, one RunInstances per missing app
//! (launch.rs), an Elastic IP when asked, then waits for every app (running, and its status
//! checks when asked).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_ec2::types::{Instance, ResourceType};
use es_proto::v1::{AppList, AppResult, AppSpec, PublicIp};
use futures::StreamExt;

use crate::shells::ec2::{aws_err, retry_consistency, tag_value, tags};
use crate::shells::{Cx, Result, ShellsError, TAG_APP};

use super::checks::{check_key_type, check_password, check_static_groups, check_static_ips};
use super::launch::{images, key_for, launch, network};
use super::*;

/// How long an app may take to run (and pass its checks) when it does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(600);

fn wait_limit(a: &AppSpec) -> Duration {
    if a.wait_timeout_s == 0 {
        DEFAULT_WAIT
    } else {
        Duration::from_secs(a.wait_timeout_s.into())
    }
}

/// Deploys `apps` (skipping those that already run), reporting each as it finishes.
/// `base` is where the apps are in the spec (errors name their fields from it); `recipient`
/// is the key Windows passwords are sealed to.
pub(crate) async fn deploy(
    cx: &Cx<'_>,
    apps: &[AppSpec],
    base: &str,
    recipient: &[u8],
) -> Result<AppList> {
    let names: Vec<String> = apps.iter().map(|a| a.name.clone()).collect();
    // The network and image lookups and the search for apps that already run, all at once.
    let (net, found, images, sandbox_key) = tokio::try_join!(
        network(cx),
        instances(cx, &names, LIVE),
        images(cx, apps, base),
        crate::shells::keys::sandbox_key(cx)
    )?;
    // Every subnet named by an app must exist before anything is launched.
    for (i, a) in apps.iter().enumerate() {
        for (j, s) in a.subnets.iter().enumerate() {
            if !net.subnets.contains_key(s) {
                let mut known: Vec<&String> = net.subnets.keys().collect();
                known.sort();
                return Err(ShellsError::Invalid {
                    field: format!("{}.subnets[{j}]", app_path(base, i)),
                    reason: format!(
                        "no subnet {s:?} in sandbox {}; it has {known:?}",
                        cx.sandbox
                    ),
                });
            }
        }
    }
    let existing: HashMap<String, Instance> = found
        .into_iter()
        .map(|i| {
            (
                tag_value(i.tags(), TAG_APP).unwrap_or_default().to_owned(),
                i,
            )
        })
        .collect();
    // Static IPs of the apps still to launch (one that runs already holds its own).
    let to_launch: Vec<(usize, &AppSpec)> = apps
        .iter()
        .enumerate()
        .filter(|(_, a)| !existing.contains_key(&a.name))
        .collect();
    check_static_ips(cx, &net, &to_launch, base).await?;
    check_static_groups(cx, &net, &to_launch, base).await?;
    for (i, a) in &to_launch {
        check_key_type(
            a,
            &app_path(base, *i),
            &images[&a.ami],
            sandbox_key.as_ref(),
        )?;
    }
    for (i, a) in apps.iter().enumerate() {
        check_password(a, &app_path(base, i), &images[&a.ami], sandbox_key.as_ref())?;
    }
    // User data from URLs, fetched (all at once) before anything launches.
    let fetched: HashMap<String, String> = futures::future::try_join_all(
        to_launch
            .iter()
            .filter(|(_, a)| !a.user_data_url.is_empty())
            .map(|(i, a)| async move {
                let script = super::user_data::fetch(
                    &a.user_data_url,
                    &a.user_data_params,
                    cx.user_data_http_allowed,
                    &app_path(base, *i),
                )
                .await?;
                cx.ctx.log(format!(
                    "app {}: {} bytes of user data from {}",
                    a.name,
                    script.len(),
                    a.user_data_url
                ));
                Ok::<_, ShellsError>((a.name.clone(), script))
            }),
    )
    .await?
    .into_iter()
    .collect();
    let total = apps.len() as u32;
    let done = std::sync::atomic::AtomicU32::new(0);
    let report = |r: &AppResult| {
        let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let what = if r.error.is_empty() {
            format!(
                "app {}: {} {} {}",
                r.name,
                r.state,
                r.instance_id,
                r.private_ips.join(",")
            )
        } else {
            format!("app {}: failed: {}", r.name, r.error)
        };
        cx.ctx.progress(n, total, what);
    };

    // Phase 1: launch what is missing, in parallel within the bound.
    // Futures are collected first (and boxed): a lazy map inside a spawned task trips the
    // compiler's higher-ranked lifetime inference.
    let mut launch_futs = Vec::with_capacity(apps.len());
    for a in apps {
        let existing = existing.get(&a.name).cloned();
        let net = &net;
        let image = &images[&a.ami];
        let key = key_for(a, sandbox_key.as_ref().map(|(name, _)| name.as_str()));
        let user_data = fetched.get(&a.name).map(String::as_str);
        launch_futs.push(Box::pin(async move {
            match existing {
                Some(i) => (a, Ok(i.instance_id().unwrap_or_default().to_owned())),
                None => (a, launch(cx, net, image, key, user_data, a).await),
            }
        }));
    }
    let launches = futures::stream::iter(launch_futs)
        .buffer_unordered(cx.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut results: Vec<AppResult> = Vec::new();
    let mut ids = Vec::new();
    let mut by_id: HashMap<String, &AppSpec> = HashMap::new();
    for (a, r) in launches {
        match r {
            Ok(id) => {
                by_id.insert(id.clone(), a);
                ids.push(id);
            }
            Err(e) => {
                let r = AppResult {
                    name: a.name.clone(),
                    state: "failed".into(),
                    error: e.to_string(),
                    ..Default::default()
                };
                report(&r);
                results.push(r);
            }
        }
    }

    // Phase 2: wait for all of them at once, with one listing per round by the sandbox's tag.
    // The same listing finds duplicates: EC2 honours ClientToken, so a retried RunInstances
    // does not launch twice, but an emulator (moto ignores it) or an expired token might. One
    // instance per app is kept (the one this job launched or found); any other is terminated.
    let running = if ids.is_empty() {
        Vec::new()
    } else {
        let limit = apps.iter().map(wait_limit).max().unwrap_or(DEFAULT_WAIT);
        let all = wait_apps(cx, &names, &ids, limit).await?;
        let extra: Vec<String> = all
            .iter()
            .filter_map(|i| i.instance_id())
            .filter(|id| !by_id.contains_key(*id))
            .map(str::to_owned)
            .collect();
        if !extra.is_empty() {
            log::warn!(sandbox_id = cx.sandbox, job_id = cx.job_id; "terminating {} duplicate instances: {extra:?}", extra.len());
            cx.ec2
                .terminate_instances()
                .set_instance_ids(Some(extra))
                .send()
                .await
                .map_err(|e| aws_err("TerminateInstances", e))?;
        }
        all.into_iter()
            .filter(|i| i.instance_id().is_some_and(|id| by_id.contains_key(id)))
            .collect()
    };

    // Phase 2b: status checks, for the apps that asked, all in one wait.
    let checked: Vec<(String, Duration)> = running
        .iter()
        .filter_map(|i| {
            let id = i.instance_id()?;
            let spec = by_id.get(id)?;
            spec.wait_status_checks
                .then(|| (id.to_owned(), wait_limit(spec)))
        })
        .collect();
    let checks = if checked.is_empty() {
        HashMap::new()
    } else {
        wait_status_checks(cx, &checked).await?
    };

    // Phase 2c: Windows passwords, for the apps that asked.
    let waiting: Vec<(String, Duration)> = running
        .iter()
        .filter_map(|i| {
            let id = i.instance_id()?;
            let spec = by_id.get(id)?;
            spec.wait_password
                .then(|| (id.to_owned(), wait_limit(spec)))
        })
        .collect();
    let passwords = if waiting.is_empty() {
        HashMap::new()
    } else {
        super::password::wait_passwords(cx, &waiting, recipient).await?
    };

    // Phase 3: Elastic IPs, in parallel.
    let mut eip_futs = Vec::with_capacity(running.len());
    for i in running {
        let spec = by_id.get(i.instance_id().unwrap_or_default()).copied();
        let report = &report;
        let checks = &checks;
        let passwords = &passwords;
        eip_futs.push(Box::pin(async move {
            let mut r = app_result(&i);
            match passwords.get(&r.instance_id) {
                Some(Ok(sealed)) => r.sealed_password = sealed.clone(),
                Some(Err(why)) => r.error = format!("password: {why}"),
                None => {}
            }
            if let Some(status) = checks.get(&r.instance_id) {
                r.status_checks = status.clone();
                if status != "ok" {
                    r.error = format!("status checks did not pass in time: {status}");
                }
            }
            if let Some(spec) = spec {
                if r.name.is_empty() {
                    r.name = spec.name.clone();
                }
                if spec.public_ip == PublicIp::Elastic as i32 {
                    match elastic_ip(cx, &spec.name, &r.instance_id).await {
                        Ok(ip) => r.public_ip = ip,
                        Err(e) => r.error = e.to_string(),
                    }
                }
            }
            if r.state != "running" && r.error.is_empty() {
                r.error = format!("instance is {} after the wait", r.state);
            }
            report(&r);
            r
        }));
    }
    let finished = futures::stream::iter(eip_futs)
        .buffer_unordered(cx.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    results.extend(finished);
    results.sort_by(|a, b| a.name.cmp(&b.name));
    let failed: Vec<&AppResult> = results.iter().filter(|r| !r.error.is_empty()).collect();
    if !failed.is_empty() && failed.len() == results.len() {
        // Nothing deployed: fail with the first reason (the list is in the progress events).
        return Err(ShellsError::Aws {
            op: "RunInstances",
            code: "AllAppsFailed".into(),
            message: failed[0].error.clone(),
            hint: String::new(),
        });
    }
    Ok(AppList { apps: results })
}

async fn elastic_ip(cx: &Cx<'_>, app: &str, instance_id: &str) -> Result<String> {
    let existing = app_addresses(cx, app).await?;
    let (alloc, ip, associated) = match existing.first() {
        Some(a) => (
            a.allocation_id().unwrap_or_default().to_owned(),
            a.public_ip().unwrap_or_default().to_owned(),
            a.instance_id() == Some(instance_id),
        ),
        None => {
            let r = cx
                .ec2
                .allocate_address()
                .domain(aws_sdk_ec2::types::DomainType::Vpc)
                .tag_specifications(tags(
                    ResourceType::ElasticIp,
                    cx.sandbox,
                    &format!("{}-{app}", cx.sandbox),
                    &[(TAG_APP, app)],
                ))
                .send()
                .await
                .map_err(|e| aws_err("AllocateAddress", e))?;
            (
                r.allocation_id().unwrap_or_default().to_owned(),
                r.public_ip().unwrap_or_default().to_owned(),
                false,
            )
        }
    };
    if !associated {
        retry_consistency(|| {
            cx.ec2
                .associate_address()
                .allocation_id(&alloc)
                .instance_id(instance_id)
                .send()
        })
        .await
        .map_err(|e| aws_err("AssociateAddress", e))?;
    }
    Ok(ip)
}

/// Polls both status checks of `apps` (id, longest wait) with one DescribeInstanceStatus per
/// round until each passed or its wait is over; answers "ok" or what they were at the end.
async fn wait_status_checks(
    cx: &Cx<'_>,
    apps: &[(String, Duration)],
) -> Result<HashMap<String, String>> {
    let start = tokio::time::Instant::now();
    let mut out: HashMap<String, String> = HashMap::new();
    let mut delay = Duration::ZERO;
    loop {
        let pending: Vec<String> = apps
            .iter()
            .filter(|(id, _)| out.get(id).is_none_or(|s| s != "ok"))
            .filter(|(_, limit)| start.elapsed() <= *limit)
            .map(|(id, _)| id.clone())
            .collect();
        if pending.is_empty() {
            // Every app passed, or its wait is over with its last reading in `out`.
            for (id, _) in apps {
                out.entry(id.clone())
                    .or_insert_with(|| "unknown (no status reported)".into());
            }
            return Ok(out);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).clamp(Duration::from_millis(500), Duration::from_secs(10));
        let r = cx
            .ec2
            .describe_instance_status()
            .set_instance_ids(Some(pending))
            .send()
            .await
            .map_err(|e| aws_err("DescribeInstanceStatus", e))?;
        for s in r.instance_statuses() {
            let word = |st: Option<&aws_sdk_ec2::types::InstanceStatusSummary>| {
                st.and_then(|x| x.status())
                    .map(|x| x.as_str().to_owned())
                    .unwrap_or_else(|| "unknown".into())
            };
            let (system, instance) = (word(s.system_status()), word(s.instance_status()));
            let status = if system == "ok" && instance == "ok" {
                "ok".to_owned()
            } else {
                format!("system {system}, instance {instance}")
            };
            out.insert(s.instance_id().unwrap_or_default().to_owned(), status);
        }
    }
}
