//! The EC2 resource kinds an es-shells agent creates and tears down, in one table: the name a
//! cleanup reports (`DeletedResource.kind`), the call that lists them by the sandbox tag, the
//! call that deletes them, and what must be gone first. The table is in deletion order.
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
    /// A route through a sandbox's peering connection, in either VPC's route tables (the
    /// Management VPC's too). Routes carry no tags: found through their peering connection.
    PeeringRoute,
    VpcPeering,
    SecurityGroup,
    Subnet,
    RouteTable,
    InternetGateway,
    Vpc,
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
}

use Ec2Kind::*;

/// Every kind, in deletion order.
pub const EC2_KINDS: &[Ec2KindInfo] = &[
    Ec2KindInfo {
        kind: Instance,
        name: "instance",
        list: "DescribeInstances",
        delete: "TerminateInstances",
        tagged: true,
        after: &[],
    },
    Ec2KindInfo {
        kind: Image,
        name: "image",
        list: "DescribeImages",
        delete: "DeregisterImage",
        tagged: true,
        after: &[],
    },
    Ec2KindInfo {
        kind: Snapshot,
        name: "snapshot",
        list: "DescribeSnapshots",
        delete: "DeleteSnapshot",
        tagged: true,
        after: &[Image],
    },
    Ec2KindInfo {
        kind: KeyPair,
        name: "key-pair",
        list: "DescribeKeyPairs",
        delete: "DeleteKeyPair",
        tagged: true,
        after: &[Instance],
    },
    Ec2KindInfo {
        kind: Volume,
        name: "volume",
        list: "DescribeVolumes",
        delete: "DeleteVolume",
        tagged: true,
        after: &[Instance],
    },
    Ec2KindInfo {
        kind: ElasticIp,
        name: "elastic-ip",
        list: "DescribeAddresses",
        delete: "ReleaseAddress",
        tagged: true,
        after: &[Instance],
    },
    Ec2KindInfo {
        kind: NetworkInterface,
        name: "network-interface",
        list: "DescribeNetworkInterfaces",
        delete: "DeleteNetworkInterface",
        tagged: true,
        after: &[Instance, ElasticIp],
    },
    Ec2KindInfo {
        kind: PeeringRoute,
        name: "route",
        list: "DescribeRouteTables",
        delete: "DeleteRoute",
        tagged: false,
        after: &[],
    },
    Ec2KindInfo {
        kind: VpcPeering,
        name: "vpc-peering-connection",
        list: "DescribeVpcPeeringConnections",
        delete: "DeleteVpcPeeringConnection",
        tagged: true,
        after: &[PeeringRoute],
    },
    Ec2KindInfo {
        kind: SecurityGroup,
        name: "security-group",
        list: "DescribeSecurityGroups",
        delete: "DeleteSecurityGroup",
        tagged: true,
        after: &[Instance, NetworkInterface],
    },
    Ec2KindInfo {
        kind: Subnet,
        name: "subnet",
        list: "DescribeSubnets",
        delete: "DeleteSubnet",
        tagged: true,
        after: &[Instance, NetworkInterface],
    },
    Ec2KindInfo {
        kind: RouteTable,
        name: "route-table",
        list: "DescribeRouteTables",
        delete: "DeleteRouteTable",
        tagged: true,
        after: &[Subnet],
    },
    Ec2KindInfo {
        kind: InternetGateway,
        name: "internet-gateway",
        list: "DescribeInternetGateways",
        delete: "DeleteInternetGateway",
        tagged: true,
        after: &[ElasticIp, Instance],
    },
    Ec2KindInfo {
        kind: Vpc,
        name: "vpc",
        list: "DescribeVpcs",
        delete: "DeleteVpc",
        tagged: true,
        after: &[
            VpcPeering,
            SecurityGroup,
            Subnet,
            RouteTable,
            InternetGateway,
            NetworkInterface,
        ],
    },
];

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
            ElasticIp,
            NetworkInterface,
            PeeringRoute,
            VpcPeering,
            SecurityGroup,
            Subnet,
            RouteTable,
            InternetGateway,
            Vpc,
        ] {
            let _ = match k {
                Instance | Image | Snapshot | KeyPair | Volume | ElasticIp | NetworkInterface
                | PeeringRoute | VpcPeering | SecurityGroup | Subnet | RouteTable
                | InternetGateway | Vpc => ec2_kind(k),
            };
        }
        assert!(!ec2_kind(PeeringRoute).tagged, "routes carry no tags");
    }
}
