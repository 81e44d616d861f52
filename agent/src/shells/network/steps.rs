//! The steps of PrepareSandboxNetwork that need no routing, each looking in `Found` (read once
//! by tag) before it creates: the dedicated VPC (reconciled with a concurrent run), subnets and
//! the two security groups; plus the checks and look-ups they share (routing.rs has the rest).

use aws_sdk_ec2::types::{IpPermission, IpRange, ResourceType, UserIdGroupPair, Vpc};
use es_proto::v1::SubnetRequest;
use ipnet::Ipv4Net;

use crate::shells::ec2::{
    aws_err, code, filter, retry_consistency, sandbox_filter, tag_value, tags,
};
use crate::shells::{Cx, Result, ShellsError, TAG_ROLE, TAG_SUBNET};

use super::Found;

pub(super) const ROLE_VPC: &str = "sandbox-vpc";
pub(super) const ROLE_SG_SANDBOX: &str = "sandbox-sg";
pub(super) const ROLE_SG_ISOLATED: &str = "isolated-sg";
pub(super) const ROLE_IGW: &str = "internet-gateway";
pub(super) const ROLE_PEERING: &str = "peering";

pub(super) async fn sandbox_subnet(
    cx: &Cx<'_>,
    vpc_id: &str,
    name: &str,
) -> Result<Option<String>> {
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
pub(super) fn reconcile(mine: &str, mut all: Vec<String>) -> (String, bool) {
    all.sort();
    let winner = all.into_iter().next().unwrap_or_else(|| mine.to_owned());
    let lost = winner != mine;
    (winner, lost)
}

pub(super) fn invalid(field: &str, reason: &str) -> ShellsError {
    ShellsError::Invalid {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

pub(super) fn vpc_cidrs(v: &Vpc) -> Vec<Ipv4Net> {
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

pub(super) async fn existing_vpc_cidrs(
    cx: &Cx<'_>,
    vpc_id: &str,
    field: &str,
) -> Result<Vec<Ipv4Net>> {
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

pub(super) async fn sandbox_vpcs(cx: &Cx<'_>) -> Result<Vec<String>> {
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

/// The sandbox VPC: the one `found`, or a new one reconciled with a concurrent run (the smallest
/// id wins; the loser deletes its own).
pub(super) async fn dedicated_vpc(cx: &Cx<'_>, found: &Found, cidr: &str) -> Result<String> {
    if let Some(id) = found.vpcs.first() {
        return Ok(id.clone());
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
    let (winner, lost) = reconcile(&mine, sandbox_vpcs(cx).await?);
    if lost {
        log::warn!(sandbox_id = cx.sandbox, job_id = cx.job_id; "another run created VPC {winner}; deleting our duplicate {mine}");
        let _ = retry_consistency(|| cx.ec2.delete_vpc().vpc_id(&mine).send()).await;
    }
    Ok(winner)
}

/// One subnet: the one `found` with its name in the VPC, or a new one.
pub(super) async fn subnet(
    cx: &Cx<'_>,
    found: &Found,
    vpc_id: &str,
    s: &SubnetRequest,
) -> Result<String> {
    let existing = found
        .subnets
        .iter()
        .filter(|x| x.vpc_id() == Some(vpc_id))
        .filter(|x| tag_value(x.tags(), TAG_SUBNET) == Some(s.name.as_str()))
        .filter_map(|x| x.subnet_id())
        .min();
    if let Some(id) = existing {
        return Ok(id.to_owned());
    }
    let mut req = cx
        .ec2
        .create_subnet()
        .vpc_id(vpc_id)
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
        Ok(r) => Ok(r
            .subnet()
            .and_then(|x| x.subnet_id())
            .unwrap_or_default()
            .to_owned()),
        // A concurrent run created it between our lookup and our create.
        Err(e) if code(&e) == "InvalidSubnet.Conflict" => {
            match sandbox_subnet(cx, vpc_id, &s.name).await? {
                Some(id) => Ok(id),
                None => Err(aws_err("CreateSubnet", e)),
            }
        }
        Err(e) => Err(aws_err("CreateSubnet", e)),
    }
}

/// The two security groups, at once: "sandbox" (members talk to each other, management comes
/// in) and "isolated" (only management comes in).
pub(super) async fn security_groups(
    cx: &Cx<'_>,
    found: &Found,
    vpc_id: &str,
    mgmt_cidr: &str,
) -> Result<(String, String)> {
    let one = |role, desc| security_group(cx, found, vpc_id, mgmt_cidr, role, desc);
    tokio::try_join!(
        one(ROLE_SG_SANDBOX, "sandbox members and the Management VPC"),
        one(ROLE_SG_ISOLATED, "the Management VPC only"),
    )
}

async fn security_group(
    cx: &Cx<'_>,
    found: &Found,
    vpc_id: &str,
    mgmt_cidr: &str,
    role: &str,
    desc: &str,
) -> Result<String> {
    let existing = found
        .groups
        .iter()
        .filter(|g| g.vpc_id() == Some(vpc_id) && tag_value(g.tags(), TAG_ROLE) == Some(role))
        .filter_map(|g| g.group_id())
        .min();
    if let Some(id) = existing {
        return Ok(id.to_owned());
    }
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
    let id = match r {
        Ok(r) => r.group_id().unwrap_or_default().to_owned(),
        Err(e) if code(&e) == "InvalidGroup.Duplicate" => {
            // Created by a concurrent run between our lookup and create.
            let again = crate::shells::ec2::group_named(cx.ec2, vpc_id, &name).await?;
            again.and_then(|g| g.group_id).unwrap_or_default()
        }
        Err(e) => return Err(aws_err("CreateSecurityGroup", e)),
    };
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
    crate::shells::ec2::authorize_ingress(cx.ec2, &id, &perms).await?;
    Ok(id)
}
