//! How to list each EC2 resource kind of `es_proto::resources::EC2_KINDS` by a filter (every
//! page): the tags a sweep reads to find sandboxes and their age, and the resources a cleanup
//! deletes (kinds.rs, net.rs).

use aws_sdk_ec2::types::{
    Address, Filter, KeyPairInfo, NatGateway, NetworkAcl, RouteTable, SecurityGroup, Subnet, Tag,
    VpcEndpoint, VpcPeeringConnection,
};
use aws_sdk_ec2::Client;
use es_proto::resources::Ec2Kind;

use crate::shells::ec2::{aws_err, filter, live_peering};
use crate::shells::Result;

/// Instance states that still hold resources.
const LIVE_INSTANCE: &[&str] = &["pending", "running", "stopping", "stopped", "shutting-down"];
/// Peering states that can still carry traffic (and routes).
const LIVE_PEERING: &[&str] = &["pending-acceptance", "provisioning", "active"];

/// One `Describe*` call (every page) answering a list: `$call` the client method, `$op` the
/// operation's name for errors, `$items` the answer's list accessor.
macro_rules! list_all {
    ($ec2:expr, $call:ident, $op:literal, $items:ident, $f:expr) => {{
        let mut out = Vec::new();
        let mut pages = $ec2.$call().filters($f).into_paginator().send();
        while let Some(p) = pages.next().await {
            let p = p.map_err(|e| aws_err($op, e))?;
            out.extend(p.$items().iter().cloned());
        }
        Ok::<_, crate::shells::ShellsError>(out)
    }};
}

/// The tags (and, for instances and snapshots, creation time in Unix seconds) of every resource
/// of a tagged kind matching `f`; untagged kinds answer nothing.
pub(super) async fn tags_of(
    ec2: &Client,
    kind: Ec2Kind,
    f: &Filter,
) -> Result<Vec<(Vec<Tag>, Option<i64>)>> {
    fn t(tags: &[Tag]) -> (Vec<Tag>, Option<i64>) {
        (tags.to_vec(), None)
    }
    let f = f.clone();
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
        Ec2Kind::VpcPeering => peerings(ec2, Some(f))
            .await?
            .iter()
            .map(|p| t(p.tags()))
            .collect(),
        Ec2Kind::SecurityGroup => groups(ec2, f).await?.iter().map(|g| t(g.tags())).collect(),
        Ec2Kind::Subnet => subnets(ec2, f).await?.iter().map(|s| t(s.tags())).collect(),
        Ec2Kind::RouteTable => route_tables(ec2, f)
            .await?
            .iter()
            .map(|r| t(r.tags()))
            .collect(),
        Ec2Kind::InternetGateway => igws(ec2, f).await?.iter().map(|g| t(g.tags())).collect(),
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
        Ec2Kind::Vpc => list_all!(ec2, describe_vpcs, "DescribeVpcs", vpcs, f)?
            .iter()
            .map(|v| t(v.tags()))
            .collect(),
        Ec2Kind::NatGateway => nat_gateways(ec2, f)
            .await?
            .iter()
            .map(|n| (n.tags().to_vec(), n.create_time().map(|t| t.secs())))
            .collect(),
        Ec2Kind::VpcEndpoint => endpoints(ec2, f)
            .await?
            .iter()
            .map(|e| t(e.tags()))
            .collect(),
        Ec2Kind::EgressOnlyInternetGateway => egress_only_igws(ec2, Some(f))
            .await?
            .iter()
            .map(|g| t(g.tags()))
            .collect(),
        Ec2Kind::LaunchTemplate => launch_templates(ec2, f)
            .await?
            .iter()
            .map(|l| (l.tags().to_vec(), l.create_time().map(|t| t.secs())))
            .collect(),
        Ec2Kind::TransitGatewayAttachment => tgw_attachments(ec2, f)
            .await?
            .iter()
            .map(|a| (a.tags().to_vec(), a.creation_time().map(|t| t.secs())))
            .collect(),
        Ec2Kind::FlowLog => flow_logs(ec2, f)
            .await?
            .iter()
            .map(|l| (l.tags().to_vec(), l.creation_time().map(|t| t.secs())))
            .collect(),
        Ec2Kind::NetworkAcl => network_acls(ec2, f)
            .await?
            .iter()
            .map(|a| t(a.tags()))
            .collect(),
        Ec2Kind::DhcpOptions => dhcp_options(ec2, f)
            .await?
            .iter()
            .map(|d| t(d.tags()))
            .collect(),
    })
}

pub(super) async fn instances(
    ec2: &Client,
    f: Filter,
) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_instances()
        .filters(f)
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
    f: Filter,
    detached_only: bool,
) -> Result<Vec<aws_sdk_ec2::types::Volume>> {
    let mut req = ec2.describe_volumes().filters(f);
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

pub(super) async fn addresses(ec2: &Client, f: Filter) -> Result<Vec<Address>> {
    let r = ec2.describe_addresses().filters(f).send().await;
    Ok(r.map_err(|e| aws_err("DescribeAddresses", e))?
        .addresses()
        .to_vec())
}

/// Network interfaces; `detached_only`: those not attached to anything.
pub(super) async fn nics(
    ec2: &Client,
    f: Filter,
    detached_only: bool,
) -> Result<Vec<aws_sdk_ec2::types::NetworkInterface>> {
    let mut req = ec2.describe_network_interfaces().filters(f);
    if detached_only {
        req = req.filters(filter("status", &["available"]));
    }
    let mut out = Vec::new();
    let mut pages = req.into_paginator().send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeNetworkInterfaces", e))?;
        out.extend(p.network_interfaces().iter().cloned());
    }
    Ok(out)
}

/// Live peering connections matching `f`; none when there is no filter (a sandbox without a VPC
/// of its own has no peering "in" it).
pub(super) async fn peerings(ec2: &Client, f: Option<Filter>) -> Result<Vec<VpcPeeringConnection>> {
    let Some(f) = f else {
        return Ok(Vec::new());
    };
    let mut all = Vec::new();
    let mut pages = ec2
        .describe_vpc_peering_connections()
        .filters(f)
        .filters(filter("status-code", LIVE_PEERING))
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeVpcPeeringConnections", e))?;
        all.extend(p.vpc_peering_connections().iter().cloned());
    }
    Ok(all.into_iter().filter(live_peering).collect())
}

pub(super) async fn groups(ec2: &Client, f: Filter) -> Result<Vec<SecurityGroup>> {
    list_all!(
        ec2,
        describe_security_groups,
        "DescribeSecurityGroups",
        security_groups,
        f
    )
}

pub(super) async fn subnets(ec2: &Client, f: Filter) -> Result<Vec<Subnet>> {
    list_all!(ec2, describe_subnets, "DescribeSubnets", subnets, f)
}

pub(super) async fn route_tables(ec2: &Client, f: Filter) -> Result<Vec<RouteTable>> {
    list_all!(
        ec2,
        describe_route_tables,
        "DescribeRouteTables",
        route_tables,
        f
    )
}

pub(super) async fn igws(
    ec2: &Client,
    f: Filter,
) -> Result<Vec<aws_sdk_ec2::types::InternetGateway>> {
    list_all!(
        ec2,
        describe_internet_gateways,
        "DescribeInternetGateways",
        internet_gateways,
        f
    )
}

pub(super) async fn key_pairs(ec2: &Client, f: Filter) -> Result<Vec<KeyPairInfo>> {
    let r = ec2.describe_key_pairs().filters(f).send().await;
    Ok(r.map_err(|e| aws_err("DescribeKeyPairs", e))?
        .key_pairs()
        .to_vec())
}

/// The account's own images matching `f` (never public or shared ones).
pub(super) async fn images(ec2: &Client, f: Filter) -> Result<Vec<aws_sdk_ec2::types::Image>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_images()
        .owners("self")
        .filters(f)
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
    f: Filter,
) -> Result<Vec<aws_sdk_ec2::types::Snapshot>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(f)
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeSnapshots", e))?;
        out.extend(p.snapshots().iter().cloned());
    }
    Ok(out)
}

/// NAT gateways not yet deleted.
pub(super) async fn nat_gateways(ec2: &Client, f: Filter) -> Result<Vec<NatGateway>> {
    let live = filter("state", &["pending", "available", "failed", "deleting"]);
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_nat_gateways()
        .filter(f)
        .filter(live)
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeNatGateways", e))?;
        out.extend(p.nat_gateways().iter().cloned());
    }
    Ok(out
        .into_iter()
        .filter(|n| n.state().map(|s| s.as_str()) != Some("deleted"))
        .collect())
}

/// VPC endpoints not yet deleted.
pub(super) async fn endpoints(ec2: &Client, f: Filter) -> Result<Vec<VpcEndpoint>> {
    let all: Vec<VpcEndpoint> = list_all!(
        ec2,
        describe_vpc_endpoints,
        "DescribeVpcEndpoints",
        vpc_endpoints,
        f
    )?;
    let gone = |e: &VpcEndpoint| {
        matches!(
            e.state()
                .map(|s| s.as_str().to_ascii_lowercase())
                .as_deref(),
            Some("deleted" | "deleting")
        )
    };
    Ok(all.into_iter().filter(|e| !gone(e)).collect())
}

/// Egress-only internet gateways matching `f`, or every one when `f` is None (EC2 filters them
/// by tag only: the ones in a VPC are picked from all by their attachments).
pub(super) async fn egress_only_igws(
    ec2: &Client,
    f: Option<Filter>,
) -> Result<Vec<aws_sdk_ec2::types::EgressOnlyInternetGateway>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_egress_only_internet_gateways()
        .set_filters(f.map(|f| vec![f]))
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeEgressOnlyInternetGateways", e))?;
        out.extend(p.egress_only_internet_gateways().iter().cloned());
    }
    Ok(out)
}

pub(super) async fn launch_templates(
    ec2: &Client,
    f: Filter,
) -> Result<Vec<aws_sdk_ec2::types::LaunchTemplate>> {
    list_all!(
        ec2,
        describe_launch_templates,
        "DescribeLaunchTemplates",
        launch_templates,
        f
    )
}

/// Transit gateway VPC attachments not yet deleted.
pub(super) async fn tgw_attachments(
    ec2: &Client,
    f: Filter,
) -> Result<Vec<aws_sdk_ec2::types::TransitGatewayVpcAttachment>> {
    let all: Vec<aws_sdk_ec2::types::TransitGatewayVpcAttachment> = list_all!(
        ec2,
        describe_transit_gateway_vpc_attachments,
        "DescribeTransitGatewayVpcAttachments",
        transit_gateway_vpc_attachments,
        f
    )?;
    let gone = |a: &aws_sdk_ec2::types::TransitGatewayVpcAttachment| {
        matches!(a.state().map(|s| s.as_str()), Some("deleted" | "deleting"))
    };
    Ok(all.into_iter().filter(|a| !gone(a)).collect())
}

pub(super) async fn flow_logs(ec2: &Client, f: Filter) -> Result<Vec<aws_sdk_ec2::types::FlowLog>> {
    let mut out = Vec::new();
    let mut pages = ec2.describe_flow_logs().filter(f).into_paginator().send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeFlowLogs", e))?;
        out.extend(p.flow_logs().iter().cloned());
    }
    Ok(out)
}

pub(super) async fn network_acls(ec2: &Client, f: Filter) -> Result<Vec<NetworkAcl>> {
    list_all!(
        ec2,
        describe_network_acls,
        "DescribeNetworkAcls",
        network_acls,
        f
    )
}

pub(super) async fn dhcp_options(
    ec2: &Client,
    f: Filter,
) -> Result<Vec<aws_sdk_ec2::types::DhcpOptions>> {
    list_all!(
        ec2,
        describe_dhcp_options,
        "DescribeDhcpOptions",
        dhcp_options,
        f
    )
}
