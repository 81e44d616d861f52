//! How to delete the network kinds of `es_proto::resources::EC2_KINDS` (kinds.rs dispatches):
//! each lists what is tagged with the sandbox and, in dedicated mode, whatever else is inside
//! its VPC, then deletes them at once (bounded by the pass), dependents first within a kind
//! (routes before peerings, rule references before groups, associations before route tables).

use std::time::Duration;

use aws_sdk_ec2::types::{Address, IpPermission};
use aws_sdk_ec2::Client;
use es_proto::resources::Ec2Kind;
use es_proto::v1::DeletedResource;

use crate::shells::ec2::{aws_err, filter, retry_consistency, tag_value};
use crate::shells::{Result, TAG_SANDBOX};

use super::list;
use super::scope::{done, record, Scope};

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
    record(Ec2Kind::ElasticIp, id, sandbox, done("ReleaseAddress", r))
}

/// Polls `gone` with backoff (250 ms up to 5 s between polls) until it answers true or `limit`
/// passes; answers whether it did.
pub(super) async fn wait_until<F, Fut>(limit: Duration, mut gone: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + limit;
    let mut delay = Duration::from_millis(250);
    loop {
        if gone().await {
            return true;
        }
        if tokio::time::Instant::now() + delay > until {
            return false;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// NAT gateways: deleted, waited for (AWS takes about a minute), then their Elastic IPs are
/// released: they are the sandbox's even when untagged.
pub(super) async fn nat_gateways(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::NatGateway,
            "vpc-id",
            |f| list::nat_gateways(ec2, f),
            |n| n.nat_gateway_id(),
        )
        .await?;
    let items = all
        .into_iter()
        .filter(|n| s.owns(n.tags(), &[n.vpc_id()]))
        .map(|n| (n.nat_gateway_id().unwrap_or_default().to_owned(), n))
        .collect();
    Ok(s.each(Ec2Kind::NatGateway, items, |id, n| async move {
        let r = ec2.delete_nat_gateway().nat_gateway_id(&id).send().await;
        let mut res = done("DeleteNatGateway", r);
        if res.is_ok() {
            let gone = wait_until(Duration::from_secs(600), || async {
                let r = ec2
                    .describe_nat_gateways()
                    .nat_gateway_ids(&id)
                    .send()
                    .await;
                r.map(|r| {
                    r.nat_gateways()
                        .iter()
                        .all(|n| n.state().map(|s| s.as_str()) == Some("deleted"))
                })
                .unwrap_or(false)
            })
            .await;
            if !gone {
                res = Err("still deleting after 10 minutes: run CleanupSandbox again".into());
            }
        }
        let mut out = vec![s.rec(Ec2Kind::NatGateway, &id, res.clone())];
        if res.is_ok() {
            for a in n.nat_gateway_addresses() {
                if let Some(alloc) = a.allocation_id() {
                    let r = retry_consistency(|| ec2.release_address().allocation_id(alloc).send());
                    out.push(s.rec(Ec2Kind::ElasticIp, alloc, done("ReleaseAddress", r.await)));
                }
            }
        }
        out
    })
    .await)
}

/// Elastic IPs tagged with the sandbox (disassociated first).
pub(super) async fn addresses(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let items = s
        .tagged(Ec2Kind::ElasticIp, list::addresses(s.ec2, s.tag.clone()))
        .await?
        .into_iter()
        .filter(|a| s.owns(a.tags(), &[]))
        .map(|a| (a.allocation_id().unwrap_or_default().to_owned(), a))
        .collect();
    Ok(s.each(Ec2Kind::ElasticIp, items, |_, a| async move {
        vec![release_address(s.ec2, &a, s.sb).await]
    })
    .await)
}

/// VPC endpoints, in one call (an interface endpoint's network interfaces go with it, later).
pub(super) async fn endpoints(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::VpcEndpoint,
            "vpc-id",
            |f| list::endpoints(ec2, f),
            |e| e.vpc_endpoint_id(),
        )
        .await?;
    let ids: Vec<String> = all
        .iter()
        .filter(|e| s.owns(e.tags(), &[e.vpc_id()]))
        .filter_map(|e| e.vpc_endpoint_id().map(str::to_owned))
        .collect();
    let kind = Ec2Kind::VpcEndpoint;
    if s.dry_run || ids.is_empty() {
        return Ok(ids.iter().map(|id| s.would(kind, id)).collect());
    }
    s.ready(kind).await;
    let mut out = Vec::new();
    // At most 25 per call.
    for chunk in ids.chunks(25) {
        let r = ec2
            .delete_vpc_endpoints()
            .set_vpc_endpoint_ids(Some(chunk.to_vec()))
            .send()
            .await;
        match r {
            Ok(r) => {
                for id in chunk {
                    let failed = r
                        .unsuccessful()
                        .iter()
                        .find(|u| u.resource_id() == Some(id.as_str()))
                        .and_then(|u| u.error())
                        .map(|e| {
                            format!("{}: {}", e.code().unwrap_or(""), e.message().unwrap_or(""))
                        });
                    let failed = failed.filter(|e| !e.contains("NotFound"));
                    out.push(s.rec(kind, id, failed.map_or(Ok(()), Err)));
                }
            }
            Err(e) => {
                let e = aws_err("DeleteVpcEndpoints", e).to_string();
                out.extend(chunk.iter().map(|id| s.rec(kind, id, Err(e.clone()))));
            }
        }
    }
    Ok(out)
}

/// Egress-only internet gateways: tagged ones, and (dedicated mode) those attached to the
/// sandbox VPC, picked from all (EC2 filters these by tag only).
pub(super) async fn egress_only_igws(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let inside = async {
        match s.vpcs.is_empty() {
            true => Ok(Vec::new()),
            false => list::egress_only_igws(s.ec2, None).await,
        }
    };
    let (tagged, inside) =
        tokio::try_join!(list::egress_only_igws(s.ec2, Some(s.tag.clone())), inside)?;
    let mut items: Vec<(String, ())> = Vec::new();
    for g in tagged.iter().chain(&inside) {
        let vpcs: Vec<Option<&str>> = g.attachments().iter().map(|a| a.vpc_id()).collect();
        let id = g.egress_only_internet_gateway_id().unwrap_or_default();
        if s.owns(g.tags(), &vpcs) && !items.iter().any(|(x, _)| x == id) {
            items.push((id.to_owned(), ()));
        }
    }
    let kind = Ec2Kind::EgressOnlyInternetGateway;
    Ok(s.each(kind, items, |id, ()| async move {
        let r = s
            .ec2
            .delete_egress_only_internet_gateway()
            .egress_only_internet_gateway_id(&id)
            .send()
            .await;
        vec![s.rec(kind, &id, done("DeleteEgressOnlyInternetGateway", r))]
    })
    .await)
}

/// Transit gateway attachments of the sandbox (tagged, or of its VPC): their static routes in
/// the transit gateway's route tables first, then the attachment.
pub(super) async fn tgw_attachments(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::TransitGatewayAttachment,
            "vpc-id",
            |f| list::tgw_attachments(ec2, f),
            |a| a.transit_gateway_attachment_id(),
        )
        .await?;
    let items = all
        .into_iter()
        .filter(|a| s.owns(a.tags(), &[a.vpc_id()]))
        .map(|a| {
            (
                a.transit_gateway_attachment_id()
                    .unwrap_or_default()
                    .to_owned(),
                a,
            )
        })
        .collect();
    let kind = Ec2Kind::TransitGatewayAttachment;
    Ok(s.each(kind, items, |id, a| async move {
        let mut out = Vec::new();
        let tgw = a.transit_gateway_id().unwrap_or_default();
        match tgw_static_routes(ec2, tgw, &id).await {
            Ok(routes) => {
                for (table, cidr) in routes {
                    let r = ec2
                        .delete_transit_gateway_route()
                        .transit_gateway_route_table_id(&table)
                        .destination_cidr_block(&cidr)
                        .send()
                        .await;
                    let rid = format!("{table}:{cidr}");
                    out.push(s.rec(
                        Ec2Kind::PeeringRoute,
                        &rid,
                        done("DeleteTransitGatewayRoute", r),
                    ));
                }
            }
            Err(e) => out.push(s.rec(
                Ec2Kind::PeeringRoute,
                &format!("{tgw}:*"),
                Err(e.to_string()),
            )),
        }
        let r = ec2
            .delete_transit_gateway_vpc_attachment()
            .transit_gateway_attachment_id(&id)
            .send()
            .await;
        out.push(s.rec(kind, &id, done("DeleteTransitGatewayVpcAttachment", r)));
        out
    })
    .await)
}

/// The static routes to attachment `att` in transit gateway `tgw`'s route tables: (table, CIDR).
/// Each route's attachments are checked here too, so an implementation that ignores the
/// search filter cannot hand us another attachment's routes.
async fn tgw_static_routes(ec2: &Client, tgw: &str, att: &str) -> Result<Vec<(String, String)>> {
    let tables = ec2
        .describe_transit_gateway_route_tables()
        .filters(filter("transit-gateway-id", &[tgw]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeTransitGatewayRouteTables", e))?;
    let mut out = Vec::new();
    for t in tables.transit_gateway_route_tables() {
        let table = t.transit_gateway_route_table_id().unwrap_or_default();
        let r = ec2
            .search_transit_gateway_routes()
            .transit_gateway_route_table_id(table)
            .filters(filter("type", &["static"]))
            .filters(filter("attachment.transit-gateway-attachment-id", &[att]))
            .send()
            .await
            .map_err(|e| aws_err("SearchTransitGatewayRoutes", e))?;
        for route in r.routes() {
            let to_att = route
                .transit_gateway_attachments()
                .iter()
                .any(|a| a.transit_gateway_attachment_id() == Some(att));
            if let (true, Some(cidr)) = (to_att, route.destination_cidr_block()) {
                out.push((table.to_owned(), cidr.to_owned()));
            }
        }
    }
    Ok(out)
}

/// Flow logs on the sandbox VPC or tagged with the sandbox, in one call.
pub(super) async fn flow_logs(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::FlowLog,
            "resource-id",
            |f| list::flow_logs(ec2, f),
            |l| l.flow_log_id(),
        )
        .await?;
    let ids: Vec<String> = all
        .iter()
        .filter(|l| s.owns(l.tags(), &[l.resource_id()]))
        .filter_map(|l| l.flow_log_id().map(str::to_owned))
        .collect();
    let kind = Ec2Kind::FlowLog;
    if s.dry_run || ids.is_empty() {
        return Ok(ids.iter().map(|id| s.would(kind, id)).collect());
    }
    s.ready(kind).await;
    let r = ec2
        .delete_flow_logs()
        .set_flow_log_ids(Some(ids.clone()))
        .send()
        .await;
    Ok(match r {
        Ok(r) => ids
            .iter()
            .map(|id| {
                let failed = r
                    .unsuccessful()
                    .iter()
                    .find(|u| u.resource_id() == Some(id.as_str()))
                    .and_then(|u| u.error())
                    .map(|e| format!("{}: {}", e.code().unwrap_or(""), e.message().unwrap_or("")));
                s.rec(kind, id, failed.map_or(Ok(()), Err))
            })
            .collect(),
        Err(e) => {
            let e = aws_err("DeleteFlowLogs", e).to_string();
            ids.iter()
                .map(|id| s.rec(kind, id, Err(e.clone())))
                .collect()
        }
    })
}

/// Routes through the sandbox's peering connections, in the route tables of both VPCs (the
/// Management VPC's too). Routes carry no tags: found through their peering connection.
pub(super) async fn peering_routes(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let mut items = Vec::new();
    for p in s.peerings().await? {
        let pcx = p.vpc_peering_connection_id().unwrap_or_default();
        let vpcs: Vec<&str> = [p.requester_vpc_info(), p.accepter_vpc_info()]
            .into_iter()
            .flatten()
            .filter_map(|v| v.vpc_id())
            .collect();
        for rt in list::route_tables(s.ec2, filter("vpc-id", &vpcs)).await? {
            let rt_id = rt.route_table_id().unwrap_or_default();
            for route in rt.routes() {
                if route.vpc_peering_connection_id() == Some(pcx) {
                    let dest = route.destination_cidr_block().unwrap_or_default();
                    items.push((
                        format!("{rt_id}:{dest}"),
                        (rt_id.to_owned(), dest.to_owned()),
                    ));
                }
            }
        }
    }
    let kind = Ec2Kind::PeeringRoute;
    Ok(s.each(kind, items, |id, (rt, dest)| async move {
        let r = s
            .ec2
            .delete_route()
            .route_table_id(&rt)
            .destination_cidr_block(&dest)
            .send()
            .await;
        vec![s.rec(kind, &id, done("DeleteRoute", r))]
    })
    .await)
}

pub(super) async fn peerings(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let items = s
        .peerings()
        .await?
        .iter()
        .map(|p| {
            (
                p.vpc_peering_connection_id().unwrap_or_default().to_owned(),
                (),
            )
        })
        .collect();
    let kind = Ec2Kind::VpcPeering;
    Ok(s.each(kind, items, |id, ()| async move {
        let r = s
            .ec2
            .delete_vpc_peering_connection()
            .vpc_peering_connection_id(&id)
            .send()
            .await;
        vec![s.rec(kind, &id, done("DeleteVpcPeeringConnection", r))]
    })
    .await)
}

/// Security groups but a VPC's default one (it goes with the VPC). Rules that reference other
/// groups are revoked first: two groups naming each other cannot be deleted otherwise.
pub(super) async fn groups(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::SecurityGroup,
            "vpc-id",
            |f| list::groups(ec2, f),
            |g| g.group_id(),
        )
        .await?;
    let groups: Vec<_> = all
        .into_iter()
        .filter(|g| s.owns(g.tags(), &[g.vpc_id()]) && g.group_name() != Some("default"))
        .collect();
    if !s.dry_run {
        let refs = |perms: &[IpPermission]| -> Option<Vec<IpPermission>> {
            let v: Vec<IpPermission> = perms
                .iter()
                .filter(|p| !p.user_id_group_pairs().is_empty())
                .cloned()
                .collect();
            (!v.is_empty()).then_some(v)
        };
        let revokes = groups.iter().map(|g| async move {
            let id = g.group_id().unwrap_or_default();
            if let Some(p) = refs(g.ip_permissions()) {
                let r = ec2.revoke_security_group_ingress().group_id(id);
                let _ = r.set_ip_permissions(Some(p)).send().await;
            }
            if let Some(p) = refs(g.ip_permissions_egress()) {
                let r = ec2.revoke_security_group_egress().group_id(id);
                let _ = r.set_ip_permissions(Some(p)).send().await;
            }
        });
        futures::future::join_all(revokes).await;
    }
    let items = groups
        .iter()
        .map(|g| (g.group_id().unwrap_or_default().to_owned(), ()))
        .collect();
    let kind = Ec2Kind::SecurityGroup;
    Ok(s.each(kind, items, |id, ()| async move {
        let r = retry_consistency(|| ec2.delete_security_group().group_id(&id).send()).await;
        vec![s.rec(kind, &id, done("DeleteSecurityGroup", r))]
    })
    .await)
}

pub(super) async fn subnets(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::Subnet,
            "vpc-id",
            |f| list::subnets(ec2, f),
            |x| x.subnet_id(),
        )
        .await?;
    let items = all
        .into_iter()
        .filter(|x| s.owns(x.tags(), &[x.vpc_id()]))
        .map(|x| (x.subnet_id().unwrap_or_default().to_owned(), ()))
        .collect();
    let kind = Ec2Kind::Subnet;
    Ok(s.each(kind, items, |id, ()| async move {
        let r = retry_consistency(|| ec2.delete_subnet().subnet_id(&id).send()).await;
        vec![s.rec(kind, &id, done("DeleteSubnet", r))]
    })
    .await)
}

/// Route tables but a VPC's main one (it goes with the VPC), their associations first.
pub(super) async fn route_tables(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::RouteTable,
            "vpc-id",
            |f| list::route_tables(ec2, f),
            |t| t.route_table_id(),
        )
        .await?;
    let items = all
        .into_iter()
        .filter(|t| s.owns(t.tags(), &[t.vpc_id()]))
        .filter(|t| !t.associations().iter().any(|a| a.main() == Some(true)))
        .map(|t| (t.route_table_id().unwrap_or_default().to_owned(), t))
        .collect();
    let kind = Ec2Kind::RouteTable;
    Ok(s.each(kind, items, |id, t| async move {
        let assocs = t
            .associations()
            .iter()
            .filter_map(|a| a.route_table_association_id());
        let unlink = assocs.map(|a| ec2.disassociate_route_table().association_id(a).send());
        futures::future::join_all(unlink).await;
        let r = retry_consistency(|| ec2.delete_route_table().route_table_id(&id).send()).await;
        vec![s.rec(kind, &id, done("DeleteRouteTable", r))]
    })
    .await)
}

/// Internet gateways (tagged, or attached to the sandbox VPC), detached first.
pub(super) async fn igws(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::InternetGateway,
            "attachment.vpc-id",
            |f| list::igws(ec2, f),
            |g| g.internet_gateway_id(),
        )
        .await?;
    let items = all
        .into_iter()
        .filter(|g| {
            let vpcs: Vec<Option<&str>> = g.attachments().iter().map(|a| a.vpc_id()).collect();
            s.owns(g.tags(), &vpcs)
        })
        .map(|g| (g.internet_gateway_id().unwrap_or_default().to_owned(), g))
        .collect();
    let kind = Ec2Kind::InternetGateway;
    Ok(s.each(kind, items, |id, g| async move {
        for vpc in g.attachments().iter().filter_map(|a| a.vpc_id()) {
            let _ = retry_consistency(|| {
                ec2.detach_internet_gateway()
                    .internet_gateway_id(&id)
                    .vpc_id(vpc)
                    .send()
            })
            .await;
        }
        let r = retry_consistency(|| {
            ec2.delete_internet_gateway()
                .internet_gateway_id(&id)
                .send()
        });
        vec![s.rec(kind, &id, done("DeleteInternetGateway", r.await))]
    })
    .await)
}

/// Network ACLs but a VPC's default one (it goes with the VPC); their subnets are gone first.
pub(super) async fn network_acls(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::NetworkAcl,
            "vpc-id",
            |f| list::network_acls(ec2, f),
            |a| a.network_acl_id(),
        )
        .await?;
    let items = all
        .into_iter()
        .filter(|a| s.owns(a.tags(), &[a.vpc_id()]) && a.is_default() != Some(true))
        .map(|a| (a.network_acl_id().unwrap_or_default().to_owned(), ()))
        .collect();
    let kind = Ec2Kind::NetworkAcl;
    Ok(s.each(kind, items, |id, ()| async move {
        let r = retry_consistency(|| ec2.delete_network_acl().network_acl_id(&id).send()).await;
        vec![s.rec(kind, &id, done("DeleteNetworkAcl", r))]
    })
    .await)
}

/// The sandbox's own VPCs (read when the pass began).
pub(super) async fn vpcs(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let items = s.vpcs.iter().map(|v| (v.clone(), ())).collect();
    let kind = Ec2Kind::Vpc;
    Ok(s.each(kind, items, |id, ()| async move {
        let r = retry_consistency(|| s.ec2.delete_vpc().vpc_id(&id).send()).await;
        vec![s.rec(kind, &id, done("DeleteVpc", r))]
    })
    .await)
}

/// DHCP option sets tagged with the sandbox: free once its VPC is gone.
pub(super) async fn dhcp_options(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let items = s
        .tagged(
            Ec2Kind::DhcpOptions,
            list::dhcp_options(s.ec2, s.tag.clone()),
        )
        .await?
        .into_iter()
        .filter(|d| tag_value(d.tags(), TAG_SANDBOX) == Some(s.sb))
        .map(|d| (d.dhcp_options_id().unwrap_or_default().to_owned(), ()))
        .collect();
    let kind = Ec2Kind::DhcpOptions;
    Ok(s.each(kind, items, |id, ()| async move {
        let r = retry_consistency(|| s.ec2.delete_dhcp_options().dhcp_options_id(&id).send());
        let r = done("DeleteDhcpOptions", r.await).map_err(|e| {
            format!("{e} (still used by a VPC that is not the sandbox's: associate that VPC with another option set)")
        });
        vec![s.rec(kind, &id, r)]
    })
    .await)
}
