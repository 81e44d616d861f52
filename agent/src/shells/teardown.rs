//! CleanupSandbox and SweepOrphans: find every resource by its `ReservationId` tag (never from
//! memory) and delete it in dependency order, going on past failures and reporting each one:
//!
//! instances (terminate, wait) → Elastic IPs → network interfaces → peering (and the routes
//! that point at it, in the Management VPC too) → security groups (cross-references revoked
//! first) → subnets → route tables (associations first) → internet gateway (detached first) →
//! the sandbox VPC (dedicated mode only; shared and Management VPCs carry no sandbox tag).
//!
//! `DependencyViolation` and `*.NotFound` right after a delete are retried with backoff; a
//! resource already gone counts as deleted. A second cleanup finds nothing: a quick no-op.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use aws_sdk_ec2::types::{Address, Filter, IpPermission};
use aws_sdk_ec2::Client;
use es_proto::v1::{Deleted, DeletedResource};

use super::ec2::{
    already_gone, aws_err, code, filter, retry_consistency, sandbox_filter, tag_value,
};
use super::{Cx, Result, TAG_CREATED_AT, TAG_SANDBOX};

/// Whether a listed resource carries this sandbox's tag. The listing was already filtered by the
/// tag; this is checked again here because an EC2 implementation that ignores a filter (moto
/// did, for peering connections) would otherwise hand one sandbox's cleanup another's resources.
fn mine(tags: &[aws_sdk_ec2::types::Tag], sb: &str) -> bool {
    tag_value(tags, TAG_SANDBOX) == Some(sb)
}

fn rec(kind: &str, id: &str, sandbox: &str, r: std::result::Result<(), String>) -> DeletedResource {
    let (outcome, error) = match r {
        Ok(()) => ("deleted", String::new()),
        Err(e) => ("failed", e),
    };
    DeletedResource {
        kind: kind.into(),
        id: id.into(),
        sandbox_id: sandbox.into(),
        outcome: outcome.into(),
        error,
    }
}

/// Maps a delete's outcome: gone already is fine.
fn done<T, E, R>(
    op: &'static str,
    r: std::result::Result<T, aws_sdk_ec2::error::SdkError<E, R>>,
) -> std::result::Result<(), String>
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match r {
        Ok(_) => Ok(()),
        Err(e) if already_gone(&code(&e)) => Ok(()),
        Err(e) => Err(aws_err(op, e).to_string()),
    }
}

pub(crate) async fn release_address(ec2: &Client, a: &Address, sandbox: &str) -> DeletedResource {
    let id = a.allocation_id().unwrap_or_default();
    if let Some(assoc) = a.association_id() {
        let _ = ec2
            .disassociate_address()
            .association_id(assoc)
            .send()
            .await;
    }
    let r = retry_consistency(|| ec2.release_address().allocation_id(id).send()).await;
    rec("elastic-ip", id, sandbox, done("ReleaseAddress", r))
}

/// Everything tagged with the sandbox, deleted in dependency order.
pub(crate) async fn cleanup(cx: &Cx<'_>) -> Result<Deleted> {
    let out = cleanup_passes(cx, cx.sandbox).await?;
    Ok(Deleted { resources: out })
}

/// Passes until one finds nothing more (at most 5): a listing that pages, or a resource that
/// became visible late, is caught by the next pass. A clean sandbox costs one pass.
async fn cleanup_passes(cx: &Cx<'_>, sb: &str) -> Result<Vec<DeletedResource>> {
    let mut out = Vec::new();
    for _ in 0..5 {
        let pass = cleanup_one(cx.ec2, sb, false, cx).await?;
        let found = pass.len();
        let failed = pass.iter().any(|r| r.outcome == "failed");
        out.extend(pass);
        if found == 0 || failed {
            break;
        }
    }
    Ok(out)
}

async fn cleanup_one(
    ec2: &Client,
    sb: &str,
    dry_run: bool,
    cx: &Cx<'_>,
) -> Result<Vec<DeletedResource>> {
    let f = sandbox_filter(sb);
    let mut out = Vec::new();
    let would = |kind: &str, id: &str| DeletedResource {
        kind: kind.into(),
        id: id.into(),
        sandbox_id: sb.into(),
        outcome: "would-delete".into(),
        error: String::new(),
    };

    // 1. Instances.
    let mut ids = Vec::new();
    let mut pages = ec2
        .describe_instances()
        .filters(f.clone())
        .filters(filter(
            "instance-state-name",
            &["pending", "running", "stopping", "stopped", "shutting-down"],
        ))
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeInstances", e))?;
        for r in p.reservations() {
            ids.extend(
                r.instances()
                    .iter()
                    .filter(|i| mine(i.tags(), sb))
                    .filter_map(|i| i.instance_id().map(str::to_owned)),
            );
        }
    }
    if dry_run {
        out.extend(ids.iter().map(|id| would("instance", id)));
    } else if !ids.is_empty() {
        let r = ec2
            .terminate_instances()
            .set_instance_ids(Some(ids.clone()))
            .send()
            .await;
        let res = done("TerminateInstances", r);
        if res.is_ok() {
            wait_terminated(ec2, &ids).await;
        }
        for id in &ids {
            out.push(rec("instance", id, sb, res.clone()));
        }
        cx.ctx
            .progress(1, 8, format!("{} instances terminated", ids.len()));
    }

    // 2. Elastic IPs.
    let addrs = ec2
        .describe_addresses()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeAddresses", e))?;
    for a in addrs.addresses().iter().filter(|x| mine(x.tags(), sb)) {
        if dry_run {
            out.push(would("elastic-ip", a.allocation_id().unwrap_or_default()));
        } else {
            out.push(release_address(ec2, a, sb).await);
        }
    }

    // 3. Network interfaces left behind (not attached).
    let nics = ec2
        .describe_network_interfaces()
        .filters(f.clone())
        .filters(filter("status", &["available"]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeNetworkInterfaces", e))?;
    for n in nics
        .network_interfaces()
        .iter()
        .filter(|x| mine(x.tag_set(), sb))
    {
        let id = n.network_interface_id().unwrap_or_default();
        if dry_run {
            out.push(would("network-interface", id));
        } else {
            let r = retry_consistency(|| {
                ec2.delete_network_interface()
                    .network_interface_id(id)
                    .send()
            })
            .await;
            out.push(rec(
                "network-interface",
                id,
                sb,
                done("DeleteNetworkInterface", r),
            ));
        }
    }

    // 4. Peering connections, and every route that points at them (Management VPC included).
    let peerings = ec2
        .describe_vpc_peering_connections()
        .filters(f.clone())
        .filters(filter(
            "status-code",
            &["pending-acceptance", "provisioning", "active"],
        ))
        .send()
        .await
        .map_err(|e| aws_err("DescribeVpcPeeringConnections", e))?;
    for p in peerings
        .vpc_peering_connections()
        .iter()
        .filter(|p| super::ec2::live_peering(p) && mine(p.tags(), sb))
    {
        let pcx = p.vpc_peering_connection_id().unwrap_or_default();
        // Routes through it live in the route tables of both VPCs (the Management VPC's too).
        let vpcs: Vec<&str> = [p.requester_vpc_info(), p.accepter_vpc_info()]
            .into_iter()
            .flatten()
            .filter_map(|v| v.vpc_id())
            .collect();
        let rts = ec2
            .describe_route_tables()
            .filters(filter("vpc-id", &vpcs))
            .send()
            .await
            .map_err(|e| aws_err("DescribeRouteTables", e))?;
        for rt in rts.route_tables() {
            let rt_id = rt.route_table_id().unwrap_or_default();
            for route in rt
                .routes()
                .iter()
                .filter(|r| r.vpc_peering_connection_id() == Some(pcx))
            {
                let dest = route.destination_cidr_block().unwrap_or_default();
                let id = format!("{rt_id}:{dest}");
                if dry_run {
                    out.push(would("route", &id));
                } else {
                    let r = ec2
                        .delete_route()
                        .route_table_id(rt_id)
                        .destination_cidr_block(dest)
                        .send()
                        .await;
                    out.push(rec("route", &id, sb, done("DeleteRoute", r)));
                }
            }
        }
        if dry_run {
            out.push(would("vpc-peering-connection", pcx));
        } else {
            let r = ec2
                .delete_vpc_peering_connection()
                .vpc_peering_connection_id(pcx)
                .send()
                .await;
            out.push(rec(
                "vpc-peering-connection",
                pcx,
                sb,
                done("DeleteVpcPeeringConnection", r),
            ));
        }
    }

    // 5. Security groups: rules that reference other groups first, then the groups.
    let groups = ec2
        .describe_security_groups()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeSecurityGroups", e))?;
    if !dry_run {
        for g in groups
            .security_groups()
            .iter()
            .filter(|x| mine(x.tags(), sb))
        {
            let refs: Vec<IpPermission> = g
                .ip_permissions()
                .iter()
                .filter(|p| !p.user_id_group_pairs().is_empty())
                .cloned()
                .collect();
            if !refs.is_empty() {
                let _ = ec2
                    .revoke_security_group_ingress()
                    .group_id(g.group_id().unwrap_or_default())
                    .set_ip_permissions(Some(refs))
                    .send()
                    .await;
            }
        }
    }
    for g in groups
        .security_groups()
        .iter()
        .filter(|x| mine(x.tags(), sb))
    {
        let id = g.group_id().unwrap_or_default();
        if dry_run {
            out.push(would("security-group", id));
        } else {
            let r = retry_consistency(|| ec2.delete_security_group().group_id(id).send()).await;
            out.push(rec(
                "security-group",
                id,
                sb,
                done("DeleteSecurityGroup", r),
            ));
        }
    }

    // 6. Subnets.
    let subnets = ec2
        .describe_subnets()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeSubnets", e))?;
    for s in subnets.subnets().iter().filter(|x| mine(x.tags(), sb)) {
        let id = s.subnet_id().unwrap_or_default();
        if dry_run {
            out.push(would("subnet", id));
        } else {
            let r = retry_consistency(|| ec2.delete_subnet().subnet_id(id).send()).await;
            out.push(rec("subnet", id, sb, done("DeleteSubnet", r)));
        }
    }

    // 7. Route tables (associations first).
    let rts = ec2
        .describe_route_tables()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeRouteTables", e))?;
    for rt in rts.route_tables().iter().filter(|x| mine(x.tags(), sb)) {
        let id = rt.route_table_id().unwrap_or_default();
        if dry_run {
            out.push(would("route-table", id));
            continue;
        }
        for a in rt.associations().iter().filter(|a| a.main() != Some(true)) {
            if let Some(aid) = a.route_table_association_id() {
                let _ = ec2
                    .disassociate_route_table()
                    .association_id(aid)
                    .send()
                    .await;
            }
        }
        let r = retry_consistency(|| ec2.delete_route_table().route_table_id(id).send()).await;
        out.push(rec("route-table", id, sb, done("DeleteRouteTable", r)));
    }

    // 8. Internet gateways (detached first).
    let igws = ec2
        .describe_internet_gateways()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeInternetGateways", e))?;
    for g in igws
        .internet_gateways()
        .iter()
        .filter(|x| mine(x.tags(), sb))
    {
        let id = g.internet_gateway_id().unwrap_or_default();
        if dry_run {
            out.push(would("internet-gateway", id));
            continue;
        }
        for a in g.attachments() {
            if let Some(vpc) = a.vpc_id() {
                let _ = retry_consistency(|| {
                    ec2.detach_internet_gateway()
                        .internet_gateway_id(id)
                        .vpc_id(vpc)
                        .send()
                })
                .await;
            }
        }
        let r = retry_consistency(|| ec2.delete_internet_gateway().internet_gateway_id(id).send())
            .await;
        out.push(rec(
            "internet-gateway",
            id,
            sb,
            done("DeleteInternetGateway", r),
        ));
    }

    // 9. The sandbox VPC (dedicated mode).
    let vpcs = ec2
        .describe_vpcs()
        .filters(f)
        .send()
        .await
        .map_err(|e| aws_err("DescribeVpcs", e))?;
    for v in vpcs.vpcs().iter().filter(|x| mine(x.tags(), sb)) {
        let id = v.vpc_id().unwrap_or_default();
        if dry_run {
            out.push(would("vpc", id));
        } else {
            let r = retry_consistency(|| ec2.delete_vpc().vpc_id(id).send()).await;
            out.push(rec("vpc", id, sb, done("DeleteVpc", r)));
        }
    }
    if !dry_run {
        cx.ctx.progress(
            8,
            8,
            format!("{} resources of sandbox {sb} processed", out.len()),
        );
    }
    Ok(out)
}

async fn wait_terminated(ec2: &Client, ids: &[String]) {
    let mut delay = Duration::from_millis(250);
    let until = tokio::time::Instant::now() + Duration::from_secs(600);
    while tokio::time::Instant::now() < until {
        let Ok(found) = super::ec2::describe_ids(ec2, ids).await else {
            return;
        };
        let all_gone = found
            .iter()
            .all(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) == Some("terminated"));
        if all_gone {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Sandbox ids found on any taggable resource type this agent creates, each with the creation
/// time (Unix seconds) of its oldest resource, when any resource says (the `es:created-at` tag,
/// or an instance's launch time).
async fn tagged_sandboxes(ec2: &Client) -> Result<BTreeMap<String, Option<i64>>> {
    let f = Filter::builder()
        .name("tag-key")
        .values(TAG_SANDBOX)
        .build();
    let mut ids: BTreeMap<String, Option<i64>> = BTreeMap::new();
    let mut add_at = |tags: &[aws_sdk_ec2::types::Tag], launched: Option<i64>| {
        if let Some(v) = tag_value(tags, TAG_SANDBOX) {
            let at = tag_value(tags, TAG_CREATED_AT)
                .and_then(|t| t.parse::<i64>().ok())
                .or(launched);
            let e = ids.entry(v.to_owned()).or_insert(at);
            *e = match (*e, at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    };
    let mut pages = ec2
        .describe_instances()
        .filters(f.clone())
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeInstances", e))?;
        for r in p.reservations() {
            for i in r.instances() {
                if i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated") {
                    add_at(i.tags(), i.launch_time().map(|t| t.secs()));
                }
            }
        }
    }
    for a in ec2
        .describe_addresses()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeAddresses", e))?
        .addresses()
    {
        add_at(a.tags(), None);
    }
    for x in ec2
        .describe_security_groups()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeSecurityGroups", e))?
        .security_groups()
    {
        add_at(x.tags(), None);
    }
    for x in ec2
        .describe_subnets()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeSubnets", e))?
        .subnets()
    {
        add_at(x.tags(), None);
    }
    for x in ec2
        .describe_route_tables()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeRouteTables", e))?
        .route_tables()
    {
        add_at(x.tags(), None);
    }
    for x in ec2
        .describe_internet_gateways()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeInternetGateways", e))?
        .internet_gateways()
    {
        add_at(x.tags(), None);
    }
    for x in ec2
        .describe_vpc_peering_connections()
        .filters(f.clone())
        .filters(filter(
            "status-code",
            &["pending-acceptance", "provisioning", "active"],
        ))
        .send()
        .await
        .map_err(|e| aws_err("DescribeVpcPeeringConnections", e))?
        .vpc_peering_connections()
        .iter()
        .filter(|p| super::ec2::live_peering(p))
    {
        add_at(x.tags(), None);
    }
    for x in ec2
        .describe_network_interfaces()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeNetworkInterfaces", e))?
        .network_interfaces()
    {
        add_at(x.tag_set(), None);
    }
    for x in ec2
        .describe_vpcs()
        .filters(f)
        .send()
        .await
        .map_err(|e| aws_err("DescribeVpcs", e))?
        .vpcs()
    {
        add_at(x.tags(), None);
    }
    Ok(ids)
}

/// What a sweep does with one sandbox it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SweepVerdict {
    Orphan,
    /// Kept, and why (shown in the result as outcome `kept`).
    Keep(String),
}

/// The sweep's decision for one sandbox: named live, too young, or of unknown age are kept.
pub(crate) fn verdict(
    sandbox: &str,
    created_at: Option<i64>,
    live: &HashSet<&str>,
    now: i64,
    min_age: Duration,
) -> SweepVerdict {
    if live.contains(sandbox) {
        return SweepVerdict::Keep("alive".into());
    }
    match created_at {
        None => SweepVerdict::Keep(format!(
            "age unknown (no {TAG_CREATED_AT} tag or launch time): delete it with CleanupSandbox if it is an orphan"
        )),
        Some(at) if now - at < min_age.as_secs() as i64 => SweepVerdict::Keep(format!(
            "younger than the minimum age of {} s (created {} s ago)",
            min_age.as_secs(),
            (now - at).max(0)
        )),
        Some(_) => SweepVerdict::Orphan,
    }
}

/// Deletes (or lists, with `dry_run`) the resources of every sandbox not in `live` and older
/// than `min_age`; every sandbox kept is reported with the reason.
pub(crate) async fn sweep(
    cx: &Cx<'_>,
    live: &[String],
    dry_run: bool,
    min_age: Duration,
) -> Result<Deleted> {
    let found = tagged_sandboxes(cx.ec2).await?;
    let live: HashSet<&str> = live.iter().map(String::as_str).collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut out = Vec::new();
    let mut orphans = Vec::new();
    for (sb, at) in &found {
        match verdict(sb, *at, &live, now, min_age) {
            SweepVerdict::Orphan => orphans.push(sb),
            // Sandboxes named live are not listed (there may be thousands); kept ones are.
            SweepVerdict::Keep(why) if why != "alive" => out.push(DeletedResource {
                kind: "sandbox".into(),
                id: sb.clone(),
                sandbox_id: sb.clone(),
                outcome: "kept".into(),
                error: why,
            }),
            SweepVerdict::Keep(_) => {}
        }
    }
    let total = orphans.len() as u32;
    for (i, sb) in orphans.into_iter().enumerate() {
        let r = if dry_run {
            cleanup_one(cx.ec2, sb, true, cx).await?
        } else {
            cleanup_passes(cx, sb).await?
        };
        cx.ctx.progress(
            i as u32 + 1,
            total,
            format!("orphan sandbox {sb}: {} resources", r.len()),
        );
        out.extend(r);
    }
    Ok(Deleted { resources: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_keeps_live_young_and_ageless_sandboxes() {
        let live: HashSet<&str> = ["sb-live"].into();
        let hour = Duration::from_secs(3600);
        let now = 1_000_000;
        let cases = [
            ("sb-live", Some(0), true),
            ("sb-old", Some(now - 3601), false),
            ("sb-young", Some(now - 60), true),
            ("sb-just", Some(now - 3599), true),
            ("sb-unknown", None, true),
            ("sb-future", Some(now + 60), true),
        ];
        for (sb, at, kept) in cases {
            let v = verdict(sb, at, &live, now, hour);
            assert_eq!(matches!(v, SweepVerdict::Keep(_)), kept, "{sb}: {v:?}");
        }
        assert_eq!(
            verdict("sb-old", Some(0), &live, now, Duration::ZERO),
            SweepVerdict::Orphan
        );
    }
}
