//! How to delete the network kinds of `es_proto::resources::EC2_KINDS` but gateways (those are in
//! gateways.rs; kinds.rs dispatches):
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
use super::scope::{batch_outcome, done, record, Scope};

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
            .map(|id| s.rec(kind, id, batch_outcome(r.unsuccessful(), id)))
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
