//! The EC2 resource kinds an es-shells agent tears down, in one table: the name a cleanup
//! reports (`DeletedResource.kind`), the call that lists them (by the sandbox tag, and in
//! dedicated mode by the sandbox VPC: whatever anyone put in it goes too), the call that deletes
//! them, and what must be gone first. The table is in an order that deletes dependencies first.
//!
//! Used by the agent's cleanup (the order and names it deletes in), its sweep (the kinds it
//! lists to find sandboxes) and the end-to-end tests' "nothing tagged is left" check, which
//! lists every tagged kind with its own SDK calls (an observer independent of the agent's code)
//! and is written as an exhaustive match over [`Ec2Kind`]: a kind added here fails to compile
//! until the cleanup, the sweep and the tests all handle it.

/// A kind of EC2 resource the agent makes for a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ec2Kind {
    Instance,
    /// An image (AMI) of an app; deregistered before its snapshots can go.
    Image,
    /// An EBS snapshot of an app's volume (or behind one of its images).
    Snapshot,
    /// The sandbox key pair. Its private key's SSM parameter goes with it (deleted first, so
    /// what is left is still found by the key pair's tag).
    KeyPair,
    /// An EBS volume left behind (a root volume goes with its instance; a detached one stays).
    Volume,
    ElasticIp,
    NetworkInterface,
    /// A NAT gateway (deleted and waited for: its Elastic IPs are released with it).
    NatGateway,
    /// A VPC endpoint (an interface endpoint's network interfaces go with it).
    VpcEndpoint,
    EgressOnlyInternetGateway,
    /// A launch template tagged with the sandbox.
    LaunchTemplate,
    /// A transit gateway VPC attachment tagged with the sandbox (shared mode), its static
    /// routes in the transit gateway's route tables first.
    TransitGatewayAttachment,
    /// A VPC flow log (on the sandbox VPC, or tagged).
    FlowLog,
    /// A route through a sandbox's peering connection, in either VPC's route tables (the
    /// Management VPC's too). Routes carry no tags: found through their peering connection.
    PeeringRoute,
    VpcPeering,
    SecurityGroup,
    Subnet,
    RouteTable,
    InternetGateway,
    /// A network ACL other than the VPC's default.
    NetworkAcl,
    Vpc,
    /// A DHCP option set tagged with the sandbox (free once its VPC is gone).
    DhcpOptions,
}

/// What is known of an EC2 resource kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ec2KindInfo {
    pub kind: Ec2Kind,
    /// As reported in a cleanup's `DeletedResource.kind`.
    pub name: &'static str,
    /// The EC2 call that lists it (by the `ReservationId` tag when `tagged`).
    pub list: &'static str,
    /// The EC2 call that deletes it.
    pub delete: &'static str,
    /// Whether it carries the sandbox's tags (and so is found by them).
    pub tagged: bool,
    /// Kinds whose resources must be gone (or detached from it) before it can be deleted.
    pub after: &'static [Ec2Kind],
    /// How DescribeTags names its resources (`resource-type`; the emulator's spelling too, where
    /// it differs). Empty: not reliably answered by DescribeTags, so always listed.
    pub tag_types: &'static [&'static str],
}

use Ec2Kind::*;

/// Every kind, in an order that deletes dependencies first (a cleanup runs each kind as soon as
/// the kinds in its `after` are done, independent ones at once).
pub const EC2_KINDS: &[Ec2KindInfo] = &[
    named(
        &["instance"],
        row(
            Instance,
            "instance",
            "DescribeInstances",
            "TerminateInstances",
            &[],
        ),
    ),
    named(
        &["image"],
        row(Image, "image", "DescribeImages", "DeregisterImage", &[]),
    ),
    named(
        &["snapshot"],
        row(
            Snapshot,
            "snapshot",
            "DescribeSnapshots",
            "DeleteSnapshot",
            &[Image],
        ),
    ),
    named(
        &["key-pair"],
        row(
            KeyPair,
            "key-pair",
            "DescribeKeyPairs",
            "DeleteKeyPair",
            &[Instance],
        ),
    ),
    named(
        &["volume"],
        row(
            Volume,
            "volume",
            "DescribeVolumes",
            "DeleteVolume",
            &[Instance],
        ),
    ),
    named(
        &["natgateway", "nat-gateway"],
        row(
            NatGateway,
            "nat-gateway",
            "DescribeNatGateways",
            "DeleteNatGateway",
            &[],
        ),
    ),
    named(
        &["elastic-ip", "vpc-elastic-ip"],
        row(
            ElasticIp,
            "elastic-ip",
            "DescribeAddresses",
            "ReleaseAddress",
            &[Instance, NatGateway],
        ),
    ),
    named(
        &["vpc-endpoint"],
        row(
            VpcEndpoint,
            "vpc-endpoint",
            "DescribeVpcEndpoints",
            "DeleteVpcEndpoints",
            &[],
        ),
    ),
    row(
        EgressOnlyInternetGateway,
        "egress-only-internet-gateway",
        "DescribeEgressOnlyInternetGateways",
        "DeleteEgressOnlyInternetGateway",
        &[],
    ),
    named(
        &["launch-template"],
        row(
            LaunchTemplate,
            "launch-template",
            "DescribeLaunchTemplates",
            "DeleteLaunchTemplate",
            &[],
        ),
    ),
    row(
        TransitGatewayAttachment,
        "transit-gateway-attachment",
        "DescribeTransitGatewayVpcAttachments",
        "DeleteTransitGatewayVpcAttachment",
        &[],
    ),
    row(
        FlowLog,
        "flow-log",
        "DescribeFlowLogs",
        "DeleteFlowLogs",
        &[],
    ),
    named(
        &["network-interface"],
        row(
            NetworkInterface,
            "network-interface",
            "DescribeNetworkInterfaces",
            "DeleteNetworkInterface",
            &[Instance, ElasticIp, NatGateway, VpcEndpoint],
        ),
    ),
    Ec2KindInfo {
        tagged: false,
        ..row(
            PeeringRoute,
            "route",
            "DescribeRouteTables",
            "DeleteRoute",
            &[],
        )
    },
    named(
        &["vpc-peering-connection"],
        row(
            VpcPeering,
            "vpc-peering-connection",
            "DescribeVpcPeeringConnections",
            "DeleteVpcPeeringConnection",
            &[PeeringRoute],
        ),
    ),
    named(
        &["security-group"],
        row(
            SecurityGroup,
            "security-group",
            "DescribeSecurityGroups",
            "DeleteSecurityGroup",
            &[Instance, NetworkInterface, VpcEndpoint],
        ),
    ),
    named(
        &["subnet"],
        row(
            Subnet,
            "subnet",
            "DescribeSubnets",
            "DeleteSubnet",
            &[
                Instance,
                NetworkInterface,
                NatGateway,
                VpcEndpoint,
                TransitGatewayAttachment,
            ],
        ),
    ),
    // Its associations are removed first; nothing else holds a route table.
    named(
        &["route-table"],
        row(
            RouteTable,
            "route-table",
            "DescribeRouteTables",
            "DeleteRouteTable",
            &[],
        ),
    ),
    named(
        &["internet-gateway"],
        row(
            InternetGateway,
            "internet-gateway",
            "DescribeInternetGateways",
            "DeleteInternetGateway",
            // Detaching fails while the VPC has public addresses mapped.
            &[ElasticIp, Instance, NatGateway],
        ),
    ),
    named(
        &["network-acl"],
        row(
            NetworkAcl,
            "network-acl",
            "DescribeNetworkAcls",
            "DeleteNetworkAcl",
            &[Subnet],
        ),
    ),
    named(
        &["vpc"],
        row(
            Vpc,
            "vpc",
            "DescribeVpcs",
            "DeleteVpc",
            &[
                VpcPeering,
                SecurityGroup,
                Subnet,
                RouteTable,
                InternetGateway,
                NetworkInterface,
                NatGateway,
                VpcEndpoint,
                EgressOnlyInternetGateway,
                NetworkAcl,
                FlowLog,
                TransitGatewayAttachment,
            ],
        ),
    ),
    named(
        &["dhcp-options"],
        row(
            DhcpOptions,
            "dhcp-options",
            "DescribeDhcpOptions",
            "DeleteDhcpOptions",
            &[Vpc],
        ),
    ),
];

/// A tagged kind's row.
const fn row(
    kind: Ec2Kind,
    name: &'static str,
    list: &'static str,
    delete: &'static str,
    after: &'static [Ec2Kind],
) -> Ec2KindInfo {
    Ec2KindInfo {
        kind,
        name,
        list,
        delete,
        tagged: true,
        after,
        tag_types: &[],
    }
}

/// A row whose resources DescribeTags names `types`.
const fn named(types: &'static [&'static str], row: Ec2KindInfo) -> Ec2KindInfo {
    Ec2KindInfo {
        tag_types: types,
        ..row
    }
}

/// Every resource type DescribeTags may answer for a kind of the table.
pub fn known_tag_types() -> impl Iterator<Item = &'static str> {
    EC2_KINDS.iter().flat_map(|k| k.tag_types.iter().copied())
}

/// The facts of one kind.
pub fn ec2_kind(kind: Ec2Kind) -> &'static Ec2KindInfo {
    EC2_KINDS
        .iter()
        .find(|k| k.kind == kind)
        .expect("every Ec2Kind has a row in EC2_KINDS")
}

/// The kinds that carry the sandbox tag, in deletion order.
pub fn tagged_ec2_kinds() -> impl Iterator<Item = &'static Ec2KindInfo> {
    EC2_KINDS.iter().filter(|k| k.tagged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_table_is_in_an_order_that_deletes_dependencies_first() {
        for (i, k) in EC2_KINDS.iter().enumerate() {
            for dep in k.after {
                let at = EC2_KINDS.iter().position(|x| x.kind == *dep).unwrap();
                assert!(
                    at < i,
                    "{} must come after {} in EC2_KINDS",
                    k.name,
                    ec2_kind(*dep).name
                );
            }
        }
    }

    #[test]
    fn every_kind_has_one_row_and_a_unique_name() {
        let kinds: HashSet<_> = EC2_KINDS.iter().map(|k| k.kind).collect();
        let names: HashSet<_> = EC2_KINDS.iter().map(|k| k.name).collect();
        assert_eq!(kinds.len(), EC2_KINDS.len());
        assert_eq!(names.len(), EC2_KINDS.len());
        // Exhaustive: a new variant without a row fails here (and in ec2_kind).
        for k in [
            Instance,
            Image,
            Snapshot,
            KeyPair,
            Volume,
            NatGateway,
            ElasticIp,
            VpcEndpoint,
            EgressOnlyInternetGateway,
            LaunchTemplate,
            TransitGatewayAttachment,
            FlowLog,
            NetworkInterface,
            PeeringRoute,
            VpcPeering,
            SecurityGroup,
            Subnet,
            RouteTable,
            InternetGateway,
            NetworkAcl,
            Vpc,
            DhcpOptions,
        ] {
            let _ = match k {
                Instance
                | Image
                | Snapshot
                | KeyPair
                | Volume
                | NatGateway
                | ElasticIp
                | VpcEndpoint
                | EgressOnlyInternetGateway
                | LaunchTemplate
                | TransitGatewayAttachment
                | FlowLog
                | NetworkInterface
                | PeeringRoute
                | VpcPeering
                | SecurityGroup
                | Subnet
                | RouteTable
                | InternetGateway
                | NetworkAcl
                | Vpc
                | DhcpOptions => ec2_kind(k),
            };
        }
        assert!(!ec2_kind(PeeringRoute).tagged, "routes carry no tags");
    }
}
