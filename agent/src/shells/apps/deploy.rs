//! DeployApp and DeploySandbox: the network lookups shared by the whole job, one RunInstances per
//! missing app (tags, NICs, security groups, volume, profile and user data in the one call), its
//! own security group for inbound ports, an Elastic IP when asked, then waits for every app.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, IamInstanceProfileSpecification, Instance,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceType, IpPermission, IpRange, ResourceType,
    VolumeType,
};
use es_proto::v1::{AppList, AppResult, AppSpec, PublicIp};
use futures::StreamExt;

use crate::shells::ec2::{aws_err, filter, retry_consistency, sandbox_filter, tag_value, tags};
use crate::shells::{Cx, Result, ShellsError, TAG_APP, TAG_ROLE, TAG_SUBNET};

use super::*;

struct Network {
    subnets: HashMap<String, String>,
    sandbox_sg: String,
    isolated_sg: String,
    vpc_id: String,
}

async fn network(cx: &Cx<'_>) -> Result<Network> {
    // Both lookups at once: they do not depend on each other.
    let (subnets, groups) = tokio::try_join!(
        async {
            cx.ec2
                .describe_subnets()
                .filters(sandbox_filter(cx.sandbox))
                .send()
                .await
                .map_err(|e| aws_err("DescribeSubnets", e))
        },
        async {
            cx.ec2
                .describe_security_groups()
                .filters(sandbox_filter(cx.sandbox))
                .send()
                .await
                .map_err(|e| aws_err("DescribeSecurityGroups", e))
        }
    )?;
    let mut map = HashMap::new();
    let mut vpc_id = String::new();
    for s in subnets.subnets() {
        if let (Some(name), Some(id)) = (tag_value(s.tags(), TAG_SUBNET), s.subnet_id()) {
            map.insert(name.to_owned(), id.to_owned());
            vpc_id = s.vpc_id().unwrap_or_default().to_owned();
        }
    }
    if map.is_empty() {
        return Err(ShellsError::NoNetwork(format!(
            "no subnet is tagged ReservationId={}",
            cx.sandbox
        )));
    }
    let find = |role: &str| {
        groups
            .security_groups()
            .iter()
            .find(|g| tag_value(g.tags(), TAG_ROLE) == Some(role))
            .and_then(|g| g.group_id())
            .map(str::to_owned)
    };
    let (Some(sandbox_sg), Some(isolated_sg)) = (find("sandbox-sg"), find("isolated-sg")) else {
        return Err(ShellsError::NoNetwork(
            "the sandbox security groups are missing".into(),
        ));
    };
    Ok(Network {
        subnets: map,
        sandbox_sg,
        isolated_sg,
        vpc_id,
    })
}

/// Deploys `apps` (skipping those that already run), reporting each as it finishes.
pub(crate) async fn deploy(cx: &Cx<'_>, apps: &[AppSpec]) -> Result<AppList> {
    let names: Vec<String> = apps.iter().map(|a| a.name.clone()).collect();
    // The network lookups and the search for apps that already run, all at once.
    let (net, found) = tokio::try_join!(network(cx), instances(cx, &names, LIVE))?;
    // Every subnet named by an app must exist before anything is launched.
    for (i, a) in apps.iter().enumerate() {
        for (j, s) in a.subnets.iter().enumerate() {
            if !net.subnets.contains_key(s) {
                let mut known: Vec<&String> = net.subnets.keys().collect();
                known.sort();
                return Err(ShellsError::Invalid {
                    field: format!("apps[{i}].subnets[{j}]"),
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
        launch_futs.push(Box::pin(async move {
            match existing {
                Some(i) => (a, Ok(i.instance_id().unwrap_or_default().to_owned())),
                None => (a, launch(cx, net, a).await),
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
        let all = wait_apps(cx, &names, &ids, Duration::from_secs(600)).await?;
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

    // Phase 3: Elastic IPs, in parallel.
    let mut eip_futs = Vec::with_capacity(running.len());
    for i in running {
        let spec = by_id.get(i.instance_id().unwrap_or_default()).copied();
        let report = &report;
        eip_futs.push(Box::pin(async move {
            let mut r = app_result(&i);
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

async fn launch(cx: &Cx<'_>, net: &Network, a: &AppSpec) -> Result<String> {
    // Inbound ports: a per-app group (looked up first, so a re-run reuses it).
    let mut groups = vec![if a.isolated {
        net.isolated_sg.clone()
    } else {
        net.sandbox_sg.clone()
    }];
    if !a.inbound.is_empty() {
        groups.push(app_group(cx, net, a).await?);
    }
    let mut nics = Vec::new();
    for (i, s) in a.subnets.iter().enumerate() {
        let mut n = InstanceNetworkInterfaceSpecification::builder()
            .device_index(i as i32)
            .subnet_id(&net.subnets[s])
            .set_groups(Some(groups.clone()))
            .delete_on_termination(true);
        if i == 0 && a.public_ip == PublicIp::Auto as i32 {
            n = n.associate_public_ip_address(true);
        }
        nics.push(n.build());
    }
    let name = format!("{}-{}", cx.sandbox, a.name);
    let extra: Vec<(&str, &str)> = std::iter::once((TAG_APP, a.name.as_str()))
        .chain(a.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect();
    let mut req = cx
        .ec2
        .run_instances()
        .image_id(&a.ami)
        .instance_type(InstanceType::from(a.instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .client_token(client_token(cx.job_id, &a.name))
        .set_network_interfaces(Some(nics))
        .tag_specifications(tags(ResourceType::Instance, cx.sandbox, &name, &extra))
        .tag_specifications(tags(ResourceType::Volume, cx.sandbox, &name, &extra))
        .tag_specifications(tags(
            ResourceType::NetworkInterface,
            cx.sandbox,
            &name,
            &extra,
        ));
    // IMDSv2 only (session tokens) unless the app allows v1; 2 hops so containers reach it.
    req = req.metadata_options(
        InstanceMetadataOptionsRequest::builder()
            .http_endpoint(InstanceMetadataEndpointState::Enabled)
            .http_tokens(if a.imds_v1_allowed {
                HttpTokensState::Optional
            } else {
                HttpTokensState::Required
            })
            .http_put_response_hop_limit(if a.imds_hop_limit == 0 {
                2
            } else {
                a.imds_hop_limit as i32
            })
            .build(),
    );
    if a.root_volume_gb > 0 || !a.root_volume_type.is_empty() {
        let mut ebs = EbsBlockDevice::builder()
            .delete_on_termination(true)
            .volume_type(VolumeType::from(if a.root_volume_type.is_empty() {
                "gp3"
            } else {
                a.root_volume_type.as_str()
            }));
        if a.root_volume_gb > 0 {
            ebs = ebs.volume_size(a.root_volume_gb as i32);
        }
        let device = if a.root_device_name.is_empty() {
            "/dev/xvda"
        } else {
            a.root_device_name.as_str()
        };
        req = req.block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(ebs.build())
                .build(),
        );
    }
    if !a.user_data.is_empty() {
        req = req.user_data(aws_smithy_types::base64::encode(a.user_data.as_bytes()));
    }
    if !a.instance_profile.is_empty() {
        let p = IamInstanceProfileSpecification::builder();
        let p = if a.instance_profile.starts_with("arn:") {
            p.arn(&a.instance_profile)
        } else {
            p.name(&a.instance_profile)
        };
        req = req.iam_instance_profile(p.build());
    }
    let r = retry_consistency(|| req.clone().send())
        .await
        .map_err(|e| aws_err("RunInstances", e))?;
    let id = r
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .unwrap_or_default()
        .to_owned();
    log::info!(sandbox_id = cx.sandbox, job_id = cx.job_id; "launched app {} as {id}", a.name);
    Ok(id)
}

async fn app_group(cx: &Cx<'_>, net: &Network, a: &AppSpec) -> Result<String> {
    let name = format!("{}-{}-ports", cx.sandbox, a.name);
    let found = cx
        .ec2
        .describe_security_groups()
        .filters(filter("vpc-id", &[&net.vpc_id]))
        .filters(filter("group-name", &[&name]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeSecurityGroups", e))?;
    if let Some(id) = found.security_groups().first().and_then(|g| g.group_id()) {
        return Ok(id.to_owned());
    }
    let r = cx
        .ec2
        .create_security_group()
        .vpc_id(&net.vpc_id)
        .group_name(&name)
        .description(format!("es-shells: inbound ports of app {}", a.name))
        .tag_specifications(tags(
            ResourceType::SecurityGroup,
            cx.sandbox,
            &name,
            &[(TAG_APP, &a.name), (TAG_ROLE, "app-ports")],
        ))
        .send()
        .await
        .map_err(|e| aws_err("CreateSecurityGroup", e))?;
    let id = r.group_id().unwrap_or_default().to_owned();
    let perms: Vec<IpPermission> = a
        .inbound
        .iter()
        .map(|p| {
            let cidr = if p.cidr.is_empty() {
                "0.0.0.0/0"
            } else {
                p.cidr.as_str()
            };
            let (from, to) = if p.protocol == "icmp" {
                (-1, -1)
            } else {
                (p.from_port as i32, p.to_port as i32)
            };
            IpPermission::builder()
                .ip_protocol(&p.protocol)
                .from_port(from)
                .to_port(to)
                .ip_ranges(IpRange::builder().cidr_ip(cidr).build())
                .build()
        })
        .collect();
    crate::shells::ec2::authorize_ingress(cx.ec2, &id, &perms).await?;
    Ok(id)
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
