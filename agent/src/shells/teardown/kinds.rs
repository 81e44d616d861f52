//! How to delete each EC2 resource kind of `es_proto::resources::EC2_KINDS`, one match arm per
//! kind (the compiler points here when a kind is added); listing is in list.rs. Deleting goes
//! on past failures and reports each resource.

use std::time::Duration;

use aws_sdk_ec2::types::{Address, Filter, IpPermission, Tag, VpcPeeringConnection};
use aws_sdk_ec2::Client;
use es_proto::resources::{ec2_kind, Ec2Kind};
use es_proto::v1::DeletedResource;

use crate::shells::ec2::{already_gone, aws_err, code, filter, retry_consistency, tag_value};
use crate::shells::keys::{delete_parameter, KeyStore};
use crate::shells::{Result, TAG_SANDBOX};

use super::list::*;

/// Whether a listed resource carries this sandbox's tag. The listing was already filtered by the
/// tag; this is checked again here because an EC2 implementation that ignores a filter (moto
/// did, for peering connections) would otherwise hand one sandbox's cleanup another's resources.
fn mine(tags: &[Tag], sb: &str) -> bool {
    tag_value(tags, TAG_SANDBOX) == Some(sb)
}

fn rec(
    kind: Ec2Kind,
    id: &str,
    sandbox: &str,
    r: std::result::Result<(), String>,
) -> DeletedResource {
    let (outcome, error) = match r {
        Ok(()) => ("deleted", String::new()),
        Err(e) => ("failed", e),
    };
    DeletedResource {
        kind: ec2_kind(kind).name.into(),
        id: id.into(),
        sandbox_id: sandbox.into(),
        outcome: outcome.into(),
        error,
    }
}

fn would(kind: Ec2Kind, id: &str, sandbox: &str) -> DeletedResource {
    DeletedResource {
        kind: ec2_kind(kind).name.into(),
        id: id.into(),
        sandbox_id: sandbox.into(),
        outcome: "would-delete".into(),
        error: String::new(),
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
    rec(Ec2Kind::ElasticIp, id, sandbox, done("ReleaseAddress", r))
}

/// What one cleanup pass has seen so far that a later kind needs.
#[derive(Default)]
pub(super) struct Pass {
    /// The sandbox's peering connections (listed for their routes, then deleted).
    peerings: Option<Vec<VpcPeeringConnection>>,
}

impl Pass {
    async fn peerings(
        &mut self,
        ec2: &Client,
        f: &Filter,
        sb: &str,
    ) -> Result<&[VpcPeeringConnection]> {
        if self.peerings.is_none() {
            let mine: Vec<_> = peerings(ec2, f)
                .await?
                .into_iter()
                .filter(|p| mine(p.tags(), sb))
                .collect();
            self.peerings = Some(mine);
        }
        Ok(self.peerings.as_deref().unwrap_or_default())
    }
}

/// Deletes (or, with `dry_run`, lists) every resource of one kind that carries sandbox `sb`'s
/// tag (`f` filters by it). `keys`: where the key pair's private key is kept.
pub(super) async fn delete(
    ec2: &Client,
    keys: &KeyStore<'_>,
    kind: Ec2Kind,
    sb: &str,
    f: &Filter,
    dry_run: bool,
    pass: &mut Pass,
) -> Result<Vec<DeletedResource>> {
    let mut out = Vec::new();
    match kind {
        Ec2Kind::Instance => {
            let ids: Vec<String> = instances(ec2, f)
                .await?
                .iter()
                .filter(|i| mine(i.tags(), sb))
                .filter_map(|i| i.instance_id().map(str::to_owned))
                .collect();
            if dry_run {
                out.extend(ids.iter().map(|id| would(kind, id, sb)));
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
                out.extend(ids.iter().map(|id| rec(kind, id, sb, res.clone())));
            }
        }
        Ec2Kind::Volume => {
            for v in volumes(ec2, f, true).await? {
                let id = v.volume_id().unwrap_or_default();
                if !mine(v.tags(), sb) {
                    continue;
                }
                out.push(if dry_run {
                    would(kind, id, sb)
                } else {
                    let r = retry_consistency(|| ec2.delete_volume().volume_id(id).send()).await;
                    rec(kind, id, sb, done("DeleteVolume", r))
                });
            }
        }
        Ec2Kind::ElasticIp => {
            for a in addresses(ec2, f)
                .await?
                .iter()
                .filter(|a| mine(a.tags(), sb))
            {
                out.push(if dry_run {
                    would(kind, a.allocation_id().unwrap_or_default(), sb)
                } else {
                    release_address(ec2, a, sb).await
                });
            }
        }
        Ec2Kind::NetworkInterface => {
            for n in nics(ec2, f, true).await? {
                let id = n.network_interface_id().unwrap_or_default();
                if !mine(n.tag_set(), sb) {
                    continue;
                }
                out.push(if dry_run {
                    would(kind, id, sb)
                } else {
                    let r = retry_consistency(|| {
                        ec2.delete_network_interface()
                            .network_interface_id(id)
                            .send()
                    })
                    .await;
                    rec(kind, id, sb, done("DeleteNetworkInterface", r))
                });
            }
        }
        Ec2Kind::PeeringRoute => {
            // Routes through a peering live in the route tables of both VPCs (the Management
            // VPC's too).
            for p in pass.peerings(ec2, f, sb).await?.to_vec() {
                let pcx = p.vpc_peering_connection_id().unwrap_or_default();
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
                        out.push(if dry_run {
                            would(kind, &id, sb)
                        } else {
                            let r = ec2
                                .delete_route()
                                .route_table_id(rt_id)
                                .destination_cidr_block(dest)
                                .send()
                                .await;
                            rec(kind, &id, sb, done("DeleteRoute", r))
                        });
                    }
                }
            }
        }
        Ec2Kind::VpcPeering => {
            for p in pass.peerings(ec2, f, sb).await? {
                let pcx = p.vpc_peering_connection_id().unwrap_or_default();
                out.push(if dry_run {
                    would(kind, pcx, sb)
                } else {
                    let r = ec2
                        .delete_vpc_peering_connection()
                        .vpc_peering_connection_id(pcx)
                        .send()
                        .await;
                    rec(kind, pcx, sb, done("DeleteVpcPeeringConnection", r))
                });
            }
        }
        Ec2Kind::SecurityGroup => {
            let groups = ec2
                .describe_security_groups()
                .filters(f.clone())
                .send()
                .await
                .map_err(|e| aws_err("DescribeSecurityGroups", e))?;
            let groups: Vec<_> = groups
                .security_groups()
                .iter()
                .filter(|x| mine(x.tags(), sb))
                .collect();
            // Rules that reference other groups first: two groups naming each other cannot be
            // deleted otherwise.
            if !dry_run {
                for g in &groups {
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
            for g in groups {
                let id = g.group_id().unwrap_or_default();
                out.push(if dry_run {
                    would(kind, id, sb)
                } else {
                    let r =
                        retry_consistency(|| ec2.delete_security_group().group_id(id).send()).await;
                    rec(kind, id, sb, done("DeleteSecurityGroup", r))
                });
            }
        }
        Ec2Kind::Image => {
            for i in images(ec2, f).await?.iter().filter(|x| mine(x.tags(), sb)) {
                let id = i.image_id().unwrap_or_default();
                out.push(if dry_run {
                    would(kind, id, sb)
                } else {
                    let r = ec2.deregister_image().image_id(id).send().await;
                    rec(kind, id, sb, done("DeregisterImage", r))
                });
            }
        }
        Ec2Kind::Snapshot => {
            for x in snapshots(ec2, f)
                .await?
                .iter()
                .filter(|x| mine(x.tags(), sb))
            {
                let id = x.snapshot_id().unwrap_or_default();
                out.push(if dry_run {
                    would(kind, id, sb)
                } else {
                    // An image deregistered a moment ago may still hold it: retried.
                    let r =
                        retry_consistency(|| ec2.delete_snapshot().snapshot_id(id).send()).await;
                    rec(kind, id, sb, done("DeleteSnapshot", r))
                });
            }
        }
        Ec2Kind::KeyPair => {
            for k in key_pairs(ec2, f)
                .await?
                .iter()
                .filter(|k| mine(k.tags(), sb))
            {
                let name = k.key_name().unwrap_or_default();
                // The private key first: a key pair left behind still leads to it.
                out.extend(delete_parameter(keys, sb, dry_run).await?);
                out.push(if dry_run {
                    would(kind, name, sb)
                } else {
                    let r = ec2.delete_key_pair().key_name(name).send().await;
                    rec(kind, name, sb, done("DeleteKeyPair", r))
                });
            }
        }
        Ec2Kind::Subnet => {
            let subnets = ec2
                .describe_subnets()
                .filters(f.clone())
                .send()
                .await
                .map_err(|e| aws_err("DescribeSubnets", e))?;
            for s in subnets.subnets().iter().filter(|x| mine(x.tags(), sb)) {
                let id = s.subnet_id().unwrap_or_default();
                out.push(if dry_run {
                    would(kind, id, sb)
                } else {
                    let r = retry_consistency(|| ec2.delete_subnet().subnet_id(id).send()).await;
                    rec(kind, id, sb, done("DeleteSubnet", r))
                });
            }
        }
        Ec2Kind::RouteTable => {
            let rts = ec2
                .describe_route_tables()
                .filters(f.clone())
                .send()
                .await
                .map_err(|e| aws_err("DescribeRouteTables", e))?;
            for rt in rts.route_tables().iter().filter(|x| mine(x.tags(), sb)) {
                let id = rt.route_table_id().unwrap_or_default();
                if dry_run {
                    out.push(would(kind, id, sb));
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
                let r =
                    retry_consistency(|| ec2.delete_route_table().route_table_id(id).send()).await;
                out.push(rec(kind, id, sb, done("DeleteRouteTable", r)));
            }
        }
        Ec2Kind::InternetGateway => {
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
                    out.push(would(kind, id, sb));
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
                let r = retry_consistency(|| {
                    ec2.delete_internet_gateway().internet_gateway_id(id).send()
                })
                .await;
                out.push(rec(kind, id, sb, done("DeleteInternetGateway", r)));
            }
        }
        Ec2Kind::Vpc => {
            let vpcs = ec2
                .describe_vpcs()
                .filters(f.clone())
                .send()
                .await
                .map_err(|e| aws_err("DescribeVpcs", e))?;
            for v in vpcs.vpcs().iter().filter(|x| mine(x.tags(), sb)) {
                let id = v.vpc_id().unwrap_or_default();
                out.push(if dry_run {
                    would(kind, id, sb)
                } else {
                    let r = retry_consistency(|| ec2.delete_vpc().vpc_id(id).send()).await;
                    rec(kind, id, sb, done("DeleteVpc", r))
                });
            }
        }
    }
    Ok(out)
}

/// Waits (up to 10 minutes) until the instances are terminated: their network interfaces and
/// security groups cannot go before.
async fn wait_terminated(ec2: &Client, ids: &[String]) {
    let mut delay = Duration::from_millis(250);
    let until = tokio::time::Instant::now() + Duration::from_secs(600);
    while tokio::time::Instant::now() < until {
        let Ok(found) = crate::shells::ec2::describe_ids(ec2, ids).await else {
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
