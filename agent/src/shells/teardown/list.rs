//! How to list each EC2 resource kind of `es_proto::resources::EC2_KINDS` by a tag filter (every
//! page): the tags a sweep reads to find sandboxes and their age, and the resources a cleanup
//! deletes (kinds.rs).

use aws_sdk_ec2::types::{Address, Filter, KeyPairInfo, Tag, VpcPeeringConnection};
use aws_sdk_ec2::Client;
use es_proto::resources::Ec2Kind;

use crate::shells::ec2::{aws_err, filter, live_peering};
use crate::shells::Result;

/// Instance states that still hold resources.
const LIVE_INSTANCE: &[&str] = &["pending", "running", "stopping", "stopped", "shutting-down"];
/// Peering states that can still carry traffic (and routes).
const LIVE_PEERING: &[&str] = &["pending-acceptance", "provisioning", "active"];

/// The tags (and, for instances, launch time in Unix seconds) of every resource of a tagged
/// kind matching `f`; untagged kinds answer nothing.
pub(super) async fn tags_of(
    ec2: &Client,
    kind: Ec2Kind,
    f: &Filter,
) -> Result<Vec<(Vec<Tag>, Option<i64>)>> {
    let t = |tags: &[Tag]| (tags.to_vec(), None);
    Ok(match kind {
        Ec2Kind::Instance => instances(ec2, f)
            .await?
            .iter()
            .map(|i| (i.tags().to_vec(), i.launch_time().map(|t| t.secs())))
            .collect(),
        Ec2Kind::Volume => volumes(ec2, f, false)
            .await?
            .iter()
            .map(|v| t(v.tags()))
            .collect(),
        Ec2Kind::ElasticIp => addresses(ec2, f)
            .await?
            .iter()
            .map(|a| t(a.tags()))
            .collect(),
        Ec2Kind::NetworkInterface => nics(ec2, f, false)
            .await?
            .iter()
            .map(|n| t(n.tag_set()))
            .collect(),
        Ec2Kind::PeeringRoute => Vec::new(),
        Ec2Kind::VpcPeering => peerings(ec2, f)
            .await?
            .iter()
            .map(|p| t(p.tags()))
            .collect(),
        Ec2Kind::SecurityGroup => ec2
            .describe_security_groups()
            .filters(f.clone())
            .send()
            .await
            .map_err(|e| aws_err("DescribeSecurityGroups", e))?
            .security_groups()
            .iter()
            .map(|g| t(g.tags()))
            .collect(),
        Ec2Kind::Subnet => ec2
            .describe_subnets()
            .filters(f.clone())
            .send()
            .await
            .map_err(|e| aws_err("DescribeSubnets", e))?
            .subnets()
            .iter()
            .map(|s| t(s.tags()))
            .collect(),
        Ec2Kind::RouteTable => ec2
            .describe_route_tables()
            .filters(f.clone())
            .send()
            .await
            .map_err(|e| aws_err("DescribeRouteTables", e))?
            .route_tables()
            .iter()
            .map(|r| t(r.tags()))
            .collect(),
        Ec2Kind::InternetGateway => ec2
            .describe_internet_gateways()
            .filters(f.clone())
            .send()
            .await
            .map_err(|e| aws_err("DescribeInternetGateways", e))?
            .internet_gateways()
            .iter()
            .map(|g| t(g.tags()))
            .collect(),
        Ec2Kind::Image => images(ec2, f).await?.iter().map(|i| t(i.tags())).collect(),
        Ec2Kind::Snapshot => snapshots(ec2, f)
            .await?
            .iter()
            .map(|x| (x.tags().to_vec(), x.start_time().map(|t| t.secs())))
            .collect(),
        Ec2Kind::KeyPair => key_pairs(ec2, f)
            .await?
            .iter()
            .map(|k| t(k.tags()))
            .collect(),
        Ec2Kind::Vpc => ec2
            .describe_vpcs()
            .filters(f.clone())
            .send()
            .await
            .map_err(|e| aws_err("DescribeVpcs", e))?
            .vpcs()
            .iter()
            .map(|v| t(v.tags()))
            .collect(),
    })
}

pub(super) async fn instances(
    ec2: &Client,
    f: &Filter,
) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_instances()
        .filters(f.clone())
        .filters(filter("instance-state-name", LIVE_INSTANCE))
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeInstances", e))?;
        for r in p.reservations() {
            out.extend(r.instances().iter().cloned());
        }
    }
    Ok(out)
}

/// EBS volumes; `detached_only`: those not attached to an instance (a root volume goes with its
/// instance).
pub(super) async fn volumes(
    ec2: &Client,
    f: &Filter,
    detached_only: bool,
) -> Result<Vec<aws_sdk_ec2::types::Volume>> {
    let mut req = ec2.describe_volumes().filters(f.clone());
    if detached_only {
        req = req.filters(filter("status", &["available"]));
    }
    let mut out = Vec::new();
    let mut pages = req.into_paginator().send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeVolumes", e))?;
        out.extend(p.volumes().iter().cloned());
    }
    Ok(out)
}

pub(super) async fn addresses(ec2: &Client, f: &Filter) -> Result<Vec<Address>> {
    Ok(ec2
        .describe_addresses()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeAddresses", e))?
        .addresses()
        .to_vec())
}

pub(super) async fn nics(
    ec2: &Client,
    f: &Filter,
    detached_only: bool,
) -> Result<Vec<aws_sdk_ec2::types::NetworkInterface>> {
    let mut req = ec2.describe_network_interfaces().filters(f.clone());
    if detached_only {
        req = req.filters(filter("status", &["available"]));
    }
    Ok(req
        .send()
        .await
        .map_err(|e| aws_err("DescribeNetworkInterfaces", e))?
        .network_interfaces()
        .to_vec())
}

pub(super) async fn peerings(ec2: &Client, f: &Filter) -> Result<Vec<VpcPeeringConnection>> {
    Ok(ec2
        .describe_vpc_peering_connections()
        .filters(f.clone())
        .filters(filter("status-code", LIVE_PEERING))
        .send()
        .await
        .map_err(|e| aws_err("DescribeVpcPeeringConnections", e))?
        .vpc_peering_connections()
        .iter()
        .filter(|p| live_peering(p))
        .cloned()
        .collect())
}

pub(super) async fn key_pairs(ec2: &Client, f: &Filter) -> Result<Vec<KeyPairInfo>> {
    Ok(ec2
        .describe_key_pairs()
        .filters(f.clone())
        .send()
        .await
        .map_err(|e| aws_err("DescribeKeyPairs", e))?
        .key_pairs()
        .to_vec())
}

/// The account's own images matching `f` (never public or shared ones).
pub(super) async fn images(ec2: &Client, f: &Filter) -> Result<Vec<aws_sdk_ec2::types::Image>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_images()
        .owners("self")
        .filters(f.clone())
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeImages", e))?;
        out.extend(p.images().iter().cloned());
    }
    Ok(out)
}

/// The account's own snapshots matching `f`.
pub(super) async fn snapshots(
    ec2: &Client,
    f: &Filter,
) -> Result<Vec<aws_sdk_ec2::types::Snapshot>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(f.clone())
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeSnapshots", e))?;
        out.extend(p.snapshots().iter().cloned());
    }
    Ok(out)
}
