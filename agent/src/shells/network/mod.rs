//! PrepareSandboxNetwork in its three modes. Each step looks up by tag before it creates, so a
//! second run (after a crash, or on the fallback) finds what the first made and adds only what
//! is missing. Two concurrent runs may both create a VPC; both then keep the one with the
//! smallest id and the loser deletes its own, so one VPC remains.

mod steps;

use aws_sdk_ec2::types::ResourceType;
use es_proto::v1::{NetworkMode, NetworkResult, PrepareSandboxNetwork, SubnetResult};
use ipnet::Ipv4Net;

use crate::shells::ec2::{
    aws_err, code, filter, retry_consistency, sandbox_filter, tag_value, tags,
};
use crate::shells::{Cx, Result, TAG_SUBNET};

use steps::*;

/// `checked` is told once every input is checked against the cloud, before the first create
/// that can fail on input (the dedicated VPC is made first: its CIDR was checked by the server).
pub(crate) async fn prepare(
    cx: &Cx<'_>,
    p: &PrepareSandboxNetwork,
    checked: tokio::sync::oneshot::Sender<()>,
) -> Result<NetworkResult> {
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
    let _ = checked.send(());
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
