//! The routing steps of PrepareSandboxNetwork, each looking in `Found` before it creates: the
//! peering to the Management VPC (accepted), the internet gateway (attached), the route tables
//! (reconciled with a concurrent run), routes and subnet associations.

use aws_sdk_ec2::types::ResourceType;

use crate::shells::ec2::{
    aws_err, code, filter, retry_consistency, sandbox_filter, tag_value, tags,
};
use crate::shells::{Cx, Result, TAG_ROLE};

use super::steps::{reconcile, ROLE_IGW, ROLE_PEERING};
use super::Found;

pub(super) async fn live_peerings(cx: &Cx<'_>) -> Result<Vec<(String, String)>> {
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
        .filter(|p| crate::shells::ec2::live_peering(p))
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

/// The peering to the Management VPC: the one `found` (accepted if it is not yet), or a new one,
/// accepted while a concurrent run's is looked for (the routes wait for both).
pub(super) async fn peering(
    cx: &Cx<'_>,
    found: &Found,
    vpc_id: &str,
    mgmt_vpc: &str,
) -> Result<String> {
    if let Some((id, status)) = found.peerings.first() {
        if status != "active" {
            accept(cx, id).await?;
        }
        return Ok(id.clone());
    }
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
    let (all, accepted) = tokio::join!(live_peerings(cx), accept(cx, &mine));
    let all = all?;
    let (winner, lost) = reconcile(&mine, all.iter().map(|(i, _)| i.clone()).collect());
    if !lost {
        accepted?;
        return Ok(mine);
    }
    let _ = cx
        .ec2
        .delete_vpc_peering_connection()
        .vpc_peering_connection_id(&mine)
        .send()
        .await;
    if all.iter().any(|(i, s)| *i == winner && s != "active") {
        accept(cx, &winner).await?;
    }
    Ok(winner)
}

async fn accept(cx: &Cx<'_>, id: &str) -> Result<()> {
    let r = retry_consistency(|| {
        cx.ec2
            .accept_vpc_peering_connection()
            .vpc_peering_connection_id(id)
            .send()
    })
    .await;
    match r {
        // Accepted meanwhile by a concurrent run.
        Err(e) if code(&e) != "InvalidStateTransition" => {
            Err(aws_err("AcceptVpcPeeringConnection", e))
        }
        _ => Ok(()),
    }
}
pub(super) async fn sandbox_igws(cx: &Cx<'_>) -> Result<Vec<aws_sdk_ec2::types::InternetGateway>> {
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

/// An internet gateway and the VPCs it is attached to.
pub(super) struct Gateway {
    pub id: String,
    attached_to: Vec<String>,
}

fn gateway(g: &aws_sdk_ec2::types::InternetGateway) -> Gateway {
    Gateway {
        id: g.internet_gateway_id().unwrap_or_default().to_owned(),
        attached_to: g
            .attachments()
            .iter()
            .filter_map(|a| a.vpc_id().map(str::to_owned))
            .collect(),
    }
}

/// The sandbox's internet gateway: the one `found`, or a new one reconciled with a concurrent
/// run. It needs no VPC, so it is made beside the VPC and attached once both exist.
pub(super) async fn internet_gateway(cx: &Cx<'_>, found: &Found) -> Result<Gateway> {
    if let Some(g) = found.igws.first() {
        return Ok(gateway(g));
    }
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
    let ids = all
        .iter()
        .filter_map(|g| g.internet_gateway_id().map(str::to_owned))
        .collect();
    let (winner, lost) = reconcile(&mine, ids);
    if lost {
        let _ = cx
            .ec2
            .delete_internet_gateway()
            .internet_gateway_id(&mine)
            .send()
            .await;
    }
    Ok(all
        .iter()
        .find(|g| g.internet_gateway_id() == Some(winner.as_str()))
        .map(gateway)
        .unwrap_or(Gateway {
            id: winner,
            attached_to: Vec::new(),
        }))
}

pub(super) async fn attach_gateway(cx: &Cx<'_>, g: &Gateway, vpc_id: &str) -> Result<()> {
    if g.attached_to.iter().any(|v| v == vpc_id) {
        return Ok(());
    }
    let r = retry_consistency(|| {
        cx.ec2
            .attach_internet_gateway()
            .internet_gateway_id(&g.id)
            .vpc_id(vpc_id)
            .send()
    })
    .await;
    match r {
        Err(e) if code(&e) != "Resource.AlreadyAssociated" => {
            Err(aws_err("AttachInternetGateway", e))
        }
        _ => Ok(()),
    }
}
pub(super) async fn sandbox_route_tables(
    cx: &Cx<'_>,
    vpc_id: &str,
    role: &str,
) -> Result<Vec<String>> {
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

/// A route table and the subnets associated with it.
pub(super) struct Table {
    pub id: String,
    pub associated: Vec<String>,
}

/// The sandbox's `kind` ("public", "private") route table in the VPC: the one `found`, or a new
/// one reconciled with a concurrent run.
pub(super) async fn route_table(
    cx: &Cx<'_>,
    found: &Found,
    vpc_id: &str,
    kind: &str,
) -> Result<Table> {
    let role = format!("{kind}-routes");
    let existing = found
        .route_tables
        .iter()
        .filter(|t| t.vpc_id() == Some(vpc_id))
        .filter(|t| tag_value(t.tags(), TAG_ROLE) == Some(role.as_str()))
        .min_by_key(|t| t.route_table_id().unwrap_or_default().to_owned());
    if let Some(t) = existing {
        return Ok(Table {
            id: t.route_table_id().unwrap_or_default().to_owned(),
            associated: t
                .associations()
                .iter()
                .filter_map(|a| a.subnet_id().map(str::to_owned))
                .collect(),
        });
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
    // A new table has no associations; the winner of a race may have some, and associating a
    // subnet again answers "already associated".
    Ok(Table {
        id: winner,
        associated: Vec::new(),
    })
}

pub(super) enum Target<'a> {
    Peering(&'a str),
    Gateway(&'a str),
    TransitGateway(&'a str),
}

pub(super) async fn add_route(cx: &Cx<'_>, rt: &str, cidr: &str, target: Target<'_>) -> Result<()> {
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
        Err(e) if crate::shells::ec2::already_exists(&code(&e)) => Ok(()),
        Err(e) => Err(aws_err("CreateRoute", e)),
    }
}

pub(super) async fn associate(cx: &Cx<'_>, rt: &str, subnet_id: &str) -> Result<()> {
    let r = retry_consistency(|| {
        cx.ec2
            .associate_route_table()
            .route_table_id(rt)
            .subnet_id(subnet_id)
            .send()
    })
    .await;
    match r {
        Err(e) if !crate::shells::ec2::already_exists(&code(&e)) => {
            Err(aws_err("AssociateRouteTable", e))
        }
        _ => Ok(()),
    }
}
