//! PrepareSandboxNetwork in its three modes. Each step looks up by tag before it creates, so a
//! second run (after a crash, or on the fallback) finds what the first made and adds only what
//! is missing. Two concurrent runs may both create a VPC; both then keep the one with the
//! smallest id and the loser deletes its own, so one VPC remains.

use aws_sdk_ec2::types::{IpPermission, IpRange, ResourceType, UserIdGroupPair, Vpc};
use es_proto::v1::{NetworkMode, NetworkResult, PrepareSandboxNetwork, SubnetResult};
use ipnet::Ipv4Net;

use super::ec2::{aws_err, code, filter, retry_consistency, sandbox_filter, tag_value, tags};
use super::{Cx, Result, ShellsError, TAG_ROLE, TAG_SUBNET};

const ROLE_VPC: &str = "sandbox-vpc";
const ROLE_SG_SANDBOX: &str = "sandbox-sg";
const ROLE_SG_ISOLATED: &str = "isolated-sg";
const ROLE_IGW: &str = "internet-gateway";
const ROLE_PEERING: &str = "peering";

pub(crate) async fn prepare(cx: &Cx<'_>, p: &PrepareSandboxNetwork) -> Result<NetworkResult> {
    let mode = NetworkMode::try_from(p.mode).unwrap_or_default();
    let mgmt = p.management.clone().unwrap_or_default();
    let mut out = NetworkResult::default();
    let (vpc_id, vpc_cidrs) = match mode {
        NetworkMode::Dedicated => {
            let id = dedicated_vpc(cx, &p.vpc_cidr).await?;
            (
                id,
                vec![p
                    .vpc_cidr
                    .parse::<Ipv4Net>()
                    .map_err(|_| invalid("spec.prepare_network.vpc_cidr", "not a CIDR"))?],
            )
        }
        NetworkMode::Shared => {
            let shared = p.shared.clone().unwrap_or_default();
            let cidrs =
                existing_vpc_cidrs(cx, &shared.vpc_id, "spec.prepare_network.shared.vpc_id")
                    .await?;
            (shared.vpc_id, cidrs)
        }
        NetworkMode::Single => {
            let cidrs =
                existing_vpc_cidrs(cx, &mgmt.vpc_id, "spec.prepare_network.management.vpc_id")
                    .await?;
            (mgmt.vpc_id.clone(), cidrs)
        }
        NetworkMode::Unspecified => {
            return Err(invalid("spec.prepare_network.mode", "unknown mode"))
        }
    };
    // Check every subnet against the VPC before creating anything.
    for (i, s) in p.subnets.iter().enumerate() {
        let net: Ipv4Net = s.cidr.parse().map_err(|_| {
            invalid(
                &format!("spec.prepare_network.subnets[{i}].cidr"),
                "not a CIDR",
            )
        })?;
        if !vpc_cidrs.iter().any(|v| v.contains(&net)) {
            let list: Vec<String> = vpc_cidrs.iter().map(|c| c.to_string()).collect();
            return Err(invalid(
                &format!("spec.prepare_network.subnets[{i}].cidr"),
                &format!("{net} is outside VPC {vpc_id} ({})", list.join(", ")),
            ));
        }
    }
    out.vpc_id = vpc_id.clone();
    cx.ctx.progress(1, 5, format!("vpc {vpc_id}"));

    // Subnets.
    let existing = cx
        .ec2
        .describe_subnets()
        .filters(sandbox_filter(cx.sandbox))
        .filters(filter("vpc-id", &[&vpc_id]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeSubnets", e))?;
    for s in &p.subnets {
        let found = existing
            .subnets()
            .iter()
            .find(|x| tag_value(x.tags(), TAG_SUBNET) == Some(s.name.as_str()));
        let id = match found {
            Some(x) => x.subnet_id().unwrap_or_default().to_owned(),
            None => {
                let mut req = cx
                    .ec2
                    .create_subnet()
                    .vpc_id(&vpc_id)
                    .cidr_block(&s.cidr)
                    .tag_specifications(tags(
                        ResourceType::Subnet,
                        cx.sandbox,
                        &format!("{}-{}", cx.sandbox, s.name),
                        &[(TAG_SUBNET, &s.name)],
                    ));
                if !s.availability_zone.is_empty() {
                    req = req.availability_zone(&s.availability_zone);
                }
                match retry_consistency(|| req.clone().send()).await {
                    Ok(r) => r
                        .subnet()
                        .and_then(|x| x.subnet_id())
                        .unwrap_or_default()
                        .to_owned(),
                    // A concurrent run created it between our lookup and our create.
                    Err(e) if code(&e) == "InvalidSubnet.Conflict" => {
                        match sandbox_subnet(cx, &vpc_id, &s.name).await? {
                            Some(id) => id,
                            None => return Err(aws_err("CreateSubnet", e)),
                        }
                    }
                    Err(e) => return Err(aws_err("CreateSubnet", e)),
                }
            }
        };
        out.subnets.push(SubnetResult {
            name: s.name.clone(),
            subnet_id: id,
            cidr: s.cidr.clone(),
        });
    }
    cx.ctx
        .progress(2, 5, format!("{} subnets", out.subnets.len()));

    // Security groups: "sandbox" (members talk to each other, management comes in) and
    // "isolated" (only management comes in).
    let (sandbox_sg, isolated_sg) = security_groups(cx, &vpc_id, &mgmt.cidr).await?;
    out.sandbox_security_group_id = sandbox_sg;
    out.isolated_security_group_id = isolated_sg;
    cx.ctx.progress(3, 5, "security groups");

    // Routing.
    match mode {
        NetworkMode::Dedicated => {
            let public: Vec<&SubnetResult> = out
                .subnets
                .iter()
                .filter(|s| p.subnets.iter().any(|r| r.name == s.name && r.public))
                .collect();
            let private: Vec<&SubnetResult> = out
                .subnets
                .iter()
                .filter(|s| !public.iter().any(|p| p.name == s.name))
                .collect();
            let pcx = peering(cx, &vpc_id, &mgmt.vpc_id).await?;
            out.peering_connection_id = pcx.clone();
            let mut igw = String::new();
            if !public.is_empty() {
                igw = internet_gateway(cx, &vpc_id).await?;
                out.internet_gateway_id = igw.clone();
            }
            for (kind, subnets) in [("public", &public), ("private", &private)] {
                if subnets.is_empty() {
                    continue;
                }
                let rt = route_table(cx, &vpc_id, kind).await?;
                add_route(cx, &rt, &mgmt.cidr, Target::Peering(&pcx)).await?;
                if kind == "public" {
                    add_route(cx, &rt, "0.0.0.0/0", Target::Gateway(&igw)).await?;
                }
                associate(cx, &rt, subnets).await?;
                out.route_table_ids.push(rt);
            }
            // The way back: sandbox CIDR -> peering in the Management VPC's route tables.
            for rt in &mgmt.route_table_ids {
                add_route(cx, rt, &p.vpc_cidr, Target::Peering(&pcx)).await?;
            }
        }
        NetworkMode::Shared => {
            let shared = p.shared.clone().unwrap_or_default();
            let rt = route_table(cx, &vpc_id, "private").await?;
            add_route(
                cx,
                &rt,
                &mgmt.cidr,
                Target::TransitGateway(&shared.transit_gateway_id),
            )
            .await?;
            let all: Vec<&SubnetResult> = out.subnets.iter().collect();
            associate(cx, &rt, &all).await?;
            out.route_table_ids.push(rt);
        }
        // Inside the Management VPC: its own routing already reaches everything.
        NetworkMode::Single | NetworkMode::Unspecified => {}
    }
    cx.ctx.progress(5, 5, "routes");
    Ok(out)
}

async fn sandbox_subnet(cx: &Cx<'_>, vpc_id: &str, name: &str) -> Result<Option<String>> {
    let r = cx
        .ec2
        .describe_subnets()
        .filters(sandbox_filter(cx.sandbox))
        .filters(filter("vpc-id", &[vpc_id]))
        .filters(filter(&format!("tag:{TAG_SUBNET}"), &[name]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeSubnets", e))?;
    let mut ids: Vec<String> = r
        .subnets()
        .iter()
        .filter_map(|s| s.subnet_id().map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids.into_iter().next())
}

/// After creating `mine`, agree with any concurrent run on one winner (the smallest id among
/// `all`); answers the winner and whether `mine` lost (the caller then deletes it).
fn reconcile(mine: &str, mut all: Vec<String>) -> (String, bool) {
    all.sort();
    let winner = all.into_iter().next().unwrap_or_else(|| mine.to_owned());
    let lost = winner != mine;
    (winner, lost)
}

fn invalid(field: &str, reason: &str) -> ShellsError {
    ShellsError::Invalid {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

fn vpc_cidrs(v: &Vpc) -> Vec<Ipv4Net> {
    let mut out: Vec<Ipv4Net> = v
        .cidr_block()
        .and_then(|c| c.parse().ok())
        .into_iter()
        .collect();
    for a in v.cidr_block_association_set() {
        if let Some(c) = a.cidr_block().and_then(|c| c.parse().ok()) {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

async fn existing_vpc_cidrs(cx: &Cx<'_>, vpc_id: &str, field: &str) -> Result<Vec<Ipv4Net>> {
    let r = cx.ec2.describe_vpcs().vpc_ids(vpc_id).send().await;
    match r {
        Ok(r) => match r.vpcs().first() {
            Some(v) => Ok(vpc_cidrs(v)),
            None => Err(invalid(field, &format!("VPC {vpc_id} does not exist"))),
        },
        Err(e) if code(&e).starts_with("InvalidVpcID") => Err(invalid(
            field,
            &format!("VPC {vpc_id} does not exist in this account and region"),
        )),
        Err(e) => Err(aws_err("DescribeVpcs", e)),
    }
}

async fn sandbox_vpcs(cx: &Cx<'_>) -> Result<Vec<String>> {
    let r = cx
        .ec2
        .describe_vpcs()
        .filters(sandbox_filter(cx.sandbox))
        .filters(filter(&format!("tag:{TAG_ROLE}"), &[ROLE_VPC]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeVpcs", e))?;
    let mut ids: Vec<String> = r
        .vpcs()
        .iter()
        .filter_map(|v| v.vpc_id().map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids)
}

async fn dedicated_vpc(cx: &Cx<'_>, cidr: &str) -> Result<String> {
    if let Some(id) = sandbox_vpcs(cx).await?.into_iter().next() {
        return Ok(id);
    }
    let created = cx
        .ec2
        .create_vpc()
        .cidr_block(cidr)
        .tag_specifications(tags(
            ResourceType::Vpc,
            cx.sandbox,
            &format!("{}-vpc", cx.sandbox),
            &[(TAG_ROLE, ROLE_VPC)],
        ))
        .send()
        .await
        .map_err(|e| aws_err("CreateVpc", e))?;
    let mine = created
        .vpc()
        .and_then(|v| v.vpc_id())
        .unwrap_or_default()
        .to_owned();
    // Reconcile with a concurrent run: the smallest id wins, the loser removes its own.
    let all = sandbox_vpcs(cx).await?;
    let winner = all.first().cloned().unwrap_or_else(|| mine.clone());
    if winner != mine {
        log::warn!(sandbox_id = cx.sandbox, job_id = cx.job_id; "another run created VPC {winner}; deleting our duplicate {mine}");
        let _ = retry_consistency(|| cx.ec2.delete_vpc().vpc_id(&mine).send()).await;
    }
    Ok(winner)
}

async fn security_groups(cx: &Cx<'_>, vpc_id: &str, mgmt_cidr: &str) -> Result<(String, String)> {
    let existing = cx
        .ec2
        .describe_security_groups()
        .filters(sandbox_filter(cx.sandbox))
        .filters(filter("vpc-id", &[vpc_id]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeSecurityGroups", e))?;
    let mut ids = Vec::new();
    for (role, desc) in [
        (ROLE_SG_SANDBOX, "sandbox members and the Management VPC"),
        (ROLE_SG_ISOLATED, "the Management VPC only"),
    ] {
        let found = existing
            .security_groups()
            .iter()
            .filter(|g| tag_value(g.tags(), TAG_ROLE) == Some(role))
            .filter_map(|g| g.group_id().map(str::to_owned))
            .min();
        let (id, fresh) = match found {
            Some(id) => (id, false),
            None => {
                let name = format!("{}-{}", cx.sandbox, role);
                let r = cx
                    .ec2
                    .create_security_group()
                    .vpc_id(vpc_id)
                    .group_name(&name)
                    .description(format!(
                        "es-shells sandbox {}: reachable from {desc}",
                        cx.sandbox
                    ))
                    .tag_specifications(tags(
                        ResourceType::SecurityGroup,
                        cx.sandbox,
                        &name,
                        &[(TAG_ROLE, role)],
                    ))
                    .send()
                    .await;
                match r {
                    Ok(r) => (r.group_id().unwrap_or_default().to_owned(), true),
                    Err(e) if code(&e) == "InvalidGroup.Duplicate" => {
                        // Created by a concurrent run between our lookup and create.
                        let again = cx
                            .ec2
                            .describe_security_groups()
                            .filters(filter("vpc-id", &[vpc_id]))
                            .filters(filter("group-name", &[&name]))
                            .send()
                            .await
                            .map_err(|e| aws_err("DescribeSecurityGroups", e))?;
                        let id = again
                            .security_groups()
                            .first()
                            .and_then(|g| g.group_id())
                            .unwrap_or_default()
                            .to_owned();
                        (id, true)
                    }
                    Err(e) => return Err(aws_err("CreateSecurityGroup", e)),
                }
            }
        };
        if fresh {
            let mut perms = vec![IpPermission::builder()
                .ip_protocol("-1")
                .ip_ranges(
                    IpRange::builder()
                        .cidr_ip(mgmt_cidr)
                        .description("Management VPC")
                        .build(),
                )
                .build()];
            if role == ROLE_SG_SANDBOX {
                perms.push(
                    IpPermission::builder()
                        .ip_protocol("-1")
                        .user_id_group_pairs(
                            UserIdGroupPair::builder()
                                .group_id(&id)
                                .description("sandbox members")
                                .build(),
                        )
                        .build(),
                );
            }
            let r = retry_consistency(|| {
                cx.ec2
                    .authorize_security_group_ingress()
                    .group_id(&id)
                    .set_ip_permissions(Some(perms.clone()))
                    .send()
            })
            .await;
            if let Err(e) = r {
                if !super::ec2::already_exists(&code(&e)) {
                    return Err(aws_err("AuthorizeSecurityGroupIngress", e));
                }
            }
        }
        ids.push(id);
    }
    Ok((ids[0].clone(), ids[1].clone()))
}

async fn live_peerings(cx: &Cx<'_>) -> Result<Vec<(String, String)>> {
    let r = cx
        .ec2
        .describe_vpc_peering_connections()
        .filters(sandbox_filter(cx.sandbox))
        .filters(filter(
            "status-code",
            &["pending-acceptance", "provisioning", "active"],
        ))
        .send()
        .await
        .map_err(|e| aws_err("DescribeVpcPeeringConnections", e))?;
    let mut out: Vec<(String, String)> = r
        .vpc_peering_connections()
        .iter()
        .filter(|p| super::ec2::live_peering(p))
        .map(|p| {
            (
                p.vpc_peering_connection_id().unwrap_or_default().to_owned(),
                p.status()
                    .and_then(|s| s.code())
                    .map(|c| c.as_str().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

async fn peering(cx: &Cx<'_>, vpc_id: &str, mgmt_vpc: &str) -> Result<String> {
    let (id, status) = match live_peerings(cx).await?.into_iter().next() {
        Some(found) => found,
        None => {
            let r = retry_consistency(|| {
                cx.ec2
                    .create_vpc_peering_connection()
                    .vpc_id(vpc_id)
                    .peer_vpc_id(mgmt_vpc)
                    .tag_specifications(tags(
                        ResourceType::VpcPeeringConnection,
                        cx.sandbox,
                        &format!("{}-to-management", cx.sandbox),
                        &[(TAG_ROLE, ROLE_PEERING)],
                    ))
                    .send()
            })
            .await
            .map_err(|e| aws_err("CreateVpcPeeringConnection", e))?;
            let mine = r
                .vpc_peering_connection()
                .and_then(|p| p.vpc_peering_connection_id())
                .unwrap_or_default()
                .to_owned();
            let all = live_peerings(cx).await?;
            let (winner, lost) = reconcile(&mine, all.iter().map(|(i, _)| i.clone()).collect());
            if lost {
                let _ = cx
                    .ec2
                    .delete_vpc_peering_connection()
                    .vpc_peering_connection_id(&mine)
                    .send()
                    .await;
            }
            let status = all
                .into_iter()
                .find(|(i, _)| *i == winner)
                .map(|(_, s)| s)
                .unwrap_or_default();
            (winner, status)
        }
    };
    if status != "active" {
        let r = retry_consistency(|| {
            cx.ec2
                .accept_vpc_peering_connection()
                .vpc_peering_connection_id(&id)
                .send()
        })
        .await;
        if let Err(e) = r {
            // Accepted meanwhile by a concurrent run.
            if code(&e) != "InvalidStateTransition" {
                return Err(aws_err("AcceptVpcPeeringConnection", e));
            }
        }
    }
    Ok(id)
}

async fn sandbox_igws(cx: &Cx<'_>) -> Result<Vec<aws_sdk_ec2::types::InternetGateway>> {
    let r = cx
        .ec2
        .describe_internet_gateways()
        .filters(sandbox_filter(cx.sandbox))
        .send()
        .await
        .map_err(|e| aws_err("DescribeInternetGateways", e))?;
    let mut v = r.internet_gateways().to_vec();
    v.sort_by(|a, b| a.internet_gateway_id().cmp(&b.internet_gateway_id()));
    Ok(v)
}

async fn internet_gateway(cx: &Cx<'_>, vpc_id: &str) -> Result<String> {
    let attached_to = |g: &aws_sdk_ec2::types::InternetGateway| {
        g.attachments().iter().any(|a| a.vpc_id() == Some(vpc_id))
    };
    let (id, attached) = match sandbox_igws(cx).await?.first() {
        Some(g) => (
            g.internet_gateway_id().unwrap_or_default().to_owned(),
            attached_to(g),
        ),
        None => {
            let r = cx
                .ec2
                .create_internet_gateway()
                .tag_specifications(tags(
                    ResourceType::InternetGateway,
                    cx.sandbox,
                    &format!("{}-igw", cx.sandbox),
                    &[(TAG_ROLE, ROLE_IGW)],
                ))
                .send()
                .await
                .map_err(|e| aws_err("CreateInternetGateway", e))?;
            let mine = r
                .internet_gateway()
                .and_then(|g| g.internet_gateway_id())
                .unwrap_or_default()
                .to_owned();
            let all = sandbox_igws(cx).await?;
            let (winner, lost) = reconcile(
                &mine,
                all.iter()
                    .filter_map(|g| g.internet_gateway_id().map(str::to_owned))
                    .collect(),
            );
            if lost {
                let _ = cx
                    .ec2
                    .delete_internet_gateway()
                    .internet_gateway_id(&mine)
                    .send()
                    .await;
            }
            let attached = all
                .iter()
                .any(|g| g.internet_gateway_id() == Some(winner.as_str()) && attached_to(g));
            (winner, attached)
        }
    };
    if !attached {
        let r = retry_consistency(|| {
            cx.ec2
                .attach_internet_gateway()
                .internet_gateway_id(&id)
                .vpc_id(vpc_id)
                .send()
        })
        .await;
        if let Err(e) = r {
            if code(&e) != "Resource.AlreadyAssociated" {
                return Err(aws_err("AttachInternetGateway", e));
            }
        }
    }
    Ok(id)
}

async fn sandbox_route_tables(cx: &Cx<'_>, vpc_id: &str, role: &str) -> Result<Vec<String>> {
    let r = cx
        .ec2
        .describe_route_tables()
        .filters(sandbox_filter(cx.sandbox))
        .filters(filter("vpc-id", &[vpc_id]))
        .filters(filter(&format!("tag:{TAG_ROLE}"), &[role]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeRouteTables", e))?;
    let mut ids: Vec<String> = r
        .route_tables()
        .iter()
        .filter_map(|t| t.route_table_id().map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids)
}

async fn route_table(cx: &Cx<'_>, vpc_id: &str, kind: &str) -> Result<String> {
    let role = format!("{kind}-routes");
    if let Some(id) = sandbox_route_tables(cx, vpc_id, &role)
        .await?
        .into_iter()
        .next()
    {
        return Ok(id);
    }
    let r = retry_consistency(|| {
        cx.ec2
            .create_route_table()
            .vpc_id(vpc_id)
            .tag_specifications(tags(
                ResourceType::RouteTable,
                cx.sandbox,
                &format!("{}-{kind}", cx.sandbox),
                &[(TAG_ROLE, &role)],
            ))
            .send()
    })
    .await
    .map_err(|e| aws_err("CreateRouteTable", e))?;
    let mine = r
        .route_table()
        .and_then(|t| t.route_table_id())
        .unwrap_or_default()
        .to_owned();
    let (winner, lost) = reconcile(&mine, sandbox_route_tables(cx, vpc_id, &role).await?);
    if lost {
        let _ = cx
            .ec2
            .delete_route_table()
            .route_table_id(&mine)
            .send()
            .await;
    }
    Ok(winner)
}

enum Target<'a> {
    Peering(&'a str),
    Gateway(&'a str),
    TransitGateway(&'a str),
}

async fn add_route(cx: &Cx<'_>, rt: &str, cidr: &str, target: Target<'_>) -> Result<()> {
    let r = retry_consistency(|| {
        let req = cx
            .ec2
            .create_route()
            .route_table_id(rt)
            .destination_cidr_block(cidr);
        let req = match target {
            Target::Peering(p) => req.vpc_peering_connection_id(p),
            Target::Gateway(g) => req.gateway_id(g),
            Target::TransitGateway(t) => req.transit_gateway_id(t),
        };
        req.send()
    })
    .await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if super::ec2::already_exists(&code(&e)) => Ok(()),
        Err(e) => Err(aws_err("CreateRoute", e)),
    }
}

async fn associate(cx: &Cx<'_>, rt: &str, subnets: &[&SubnetResult]) -> Result<()> {
    let current = cx
        .ec2
        .describe_route_tables()
        .route_table_ids(rt)
        .send()
        .await
        .map_err(|e| aws_err("DescribeRouteTables", e))?;
    let associated: Vec<String> = current
        .route_tables()
        .iter()
        .flat_map(|t| t.associations())
        .filter_map(|a| a.subnet_id().map(str::to_owned))
        .collect();
    for s in subnets {
        if associated.contains(&s.subnet_id) {
            continue;
        }
        let r = retry_consistency(|| {
            cx.ec2
                .associate_route_table()
                .route_table_id(rt)
                .subnet_id(&s.subnet_id)
                .send()
        })
        .await;
        if let Err(e) = r {
            if !super::ec2::already_exists(&code(&e)) {
                return Err(aws_err("AssociateRouteTable", e));
            }
        }
    }
    Ok(())
}
