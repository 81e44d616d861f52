//! How to delete the gateway kinds of `es_proto::resources::EC2_KINDS` (kinds.rs dispatches):
//! NAT gateways (and their Elastic IPs), VPC endpoints, egress-only and internet gateways,
//! transit gateway attachments (and their static routes); tagged with the sandbox or, in
//! dedicated mode, inside its VPC.

use std::time::Duration;

use aws_sdk_ec2::Client;
use es_proto::resources::Ec2Kind;
use es_proto::v1::DeletedResource;

use crate::shells::ec2::{aws_err, filter, retry_consistency};
use crate::shells::Result;

use super::list;
use super::net::wait_until;
use super::scope::{batch_outcome, done, Scope};

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
                    out.push(s.rec(kind, id, batch_outcome(r.unsuccessful(), id)));
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
