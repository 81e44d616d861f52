//! What one RunInstances needs and the call itself: the sandbox's network (subnets with their
//! CIDRs, its two security groups), the images the apps boot from (root device, size,
//! platform), and the request: NICs, encrypted volumes, metadata options, key pair, profile,
//! user data and tags, all in the one call, on spot with an on-demand fallback when asked.
//! (What must be refuted before it, checks.rs.)

use std::collections::{HashMap, HashSet};

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceNetworkInterfaceSpecification, InstanceType,
    IpPermission, IpRange, MarketType, ResourceType, SpotInstanceType, SpotMarketOptions,
    VolumeType,
};
use es_proto::v1::{AppSpec, PortRule, PublicIp};
use ipnet::Ipv4Net;

use crate::shells::ec2::{aws_err, code, retry_consistency, sandbox_filter, tag_value, tags};
use crate::shells::{Cx, Result, ShellsError, TAG_APP, TAG_ROLE, TAG_SUBNET};

use super::{app_path, client_token};

/// The sandbox network the apps attach to, found by its tags.
pub(super) struct Network {
    /// Subnet name → (id, CIDR).
    pub subnets: HashMap<String, (String, Ipv4Net)>,
    pub sandbox_sg: String,
    pub isolated_sg: String,
    pub vpc_id: String,
    /// The sandbox's groups by name (apps' port groups among them), from the same look-up.
    pub groups: HashMap<String, String>,
}

pub(super) async fn network(cx: &Cx<'_>) -> Result<Network> {
    // Both lookups at once: they do not depend on each other.
    let (subnets, groups) = tokio::try_join!(
        async {
            cx.ec2
                .describe_subnets()
                .filters(sandbox_filter(cx.sandbox))
                .send()
                .await
                .map_err(|e| aws_err("DescribeSubnets", e))
        },
        async {
            cx.ec2
                .describe_security_groups()
                .filters(sandbox_filter(cx.sandbox))
                .send()
                .await
                .map_err(|e| aws_err("DescribeSecurityGroups", e))
        }
    )?;
    let mut map = HashMap::new();
    let mut vpc_id = String::new();
    for s in subnets.subnets() {
        let cidr = s.cidr_block().and_then(|c| c.parse::<Ipv4Net>().ok());
        if let (Some(name), Some(id), Some(cidr)) =
            (tag_value(s.tags(), TAG_SUBNET), s.subnet_id(), cidr)
        {
            map.insert(name.to_owned(), (id.to_owned(), cidr));
            vpc_id = s.vpc_id().unwrap_or_default().to_owned();
        }
    }
    if map.is_empty() {
        return Err(ShellsError::NoNetwork(format!(
            "no subnet is tagged ReservationId={}",
            cx.sandbox
        )));
    }
    let find = |role: &str| {
        groups
            .security_groups()
            .iter()
            .find(|g| tag_value(g.tags(), TAG_ROLE) == Some(role))
            .and_then(|g| g.group_id())
            .map(str::to_owned)
    };
    let (Some(sandbox_sg), Some(isolated_sg)) = (find("sandbox-sg"), find("isolated-sg")) else {
        return Err(ShellsError::NoNetwork(
            "the sandbox security groups are missing".into(),
        ));
    };
    let named = groups
        .security_groups()
        .iter()
        .filter(|g| g.vpc_id() == Some(vpc_id.as_str()))
        .filter_map(|g| Some((g.group_name()?.to_owned(), g.group_id()?.to_owned())))
        .collect();
    Ok(Network {
        subnets: map,
        sandbox_sg,
        isolated_sg,
        vpc_id,
        groups: named,
    })
}

/// What an app needs to know of its image.
#[derive(Debug, Clone)]
pub(super) struct Image {
    /// The device the image boots from (/dev/xvda, /dev/sda1): the root volume's mapping
    /// must name it, or EC2 adds a second volume instead of encrypting the root.
    pub root_device: String,
    /// GiB of the root snapshot: the root volume's size when the app gives none.
    pub root_gb: i32,
    /// Windows images need an RSA key pair (EC2 refuses ed25519 for them).
    pub windows: bool,
}

/// The images of `apps`, one DescribeImages for all of them. An AMI that does not exist (or is
/// not shared with this account) fails the job naming the app's field, before anything launches.
pub(super) async fn images(
    cx: &Cx<'_>,
    apps: &[AppSpec],
    base: &str,
) -> Result<HashMap<String, Image>> {
    let ids: Vec<String> = apps
        .iter()
        .map(|a| a.ami.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let first_with = |ami: &str| {
        let i = apps.iter().position(|a| a.ami == ami).unwrap_or(0);
        format!("{}.ami", app_path(base, i))
    };
    let r = cx
        .ec2
        .describe_images()
        .set_image_ids(Some(ids.clone()))
        .send()
        .await;
    let r = match r {
        Ok(r) => r,
        Err(e) if crate::shells::ec2::code(&e).starts_with("InvalidAMIID") => {
            // The message names the ids EC2 does not know; point at the first app using one.
            let msg = e.as_service_error().and_then(|s| {
                aws_smithy_types::error::metadata::ProvideErrorMetadata::message(s)
                    .map(str::to_owned)
            });
            let ami = ids
                .iter()
                .find(|id| msg.as_deref().is_some_and(|m| m.contains(id.as_str())))
                .unwrap_or(&ids[0]);
            return Err(not_found(&first_with(ami), ami, cx));
        }
        Err(e) => return Err(aws_err("DescribeImages", e)),
    };
    let mut out = HashMap::new();
    for im in r.images() {
        let Some(id) = im.image_id() else { continue };
        let root_device = im.root_device_name().unwrap_or("/dev/xvda").to_owned();
        let root_gb = im
            .block_device_mappings()
            .iter()
            .find(|m| m.device_name() == Some(root_device.as_str()))
            .and_then(|m| m.ebs())
            .and_then(|e| e.volume_size())
            .unwrap_or(8);
        let windows = im
            .platform()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("windows"));
        out.insert(
            id.to_owned(),
            Image {
                root_device,
                root_gb,
                windows,
            },
        );
    }
    if let Some(missing) = ids.iter().find(|id| !out.contains_key(*id)) {
        return Err(not_found(&first_with(missing), missing, cx));
    }
    Ok(out)
}

fn not_found(field: &str, ami: &str, cx: &Cx<'_>) -> ShellsError {
    ShellsError::Invalid {
        field: field.into(),
        reason: format!(
            "no image {ami} in {} for this account (it does not exist in this region, or is \
             not shared with the account)",
            cx.ec2
                .config()
                .region()
                .map(|r| r.as_ref())
                .unwrap_or("the region")
        ),
    }
}

/// One EBS volume of the app: always encrypted (with the app's key, or the account's default
/// EBS key), deleted with the instance.
fn ebs(a: &AppSpec, kind: &str, size_gb: i32, iops: u32, throughput: u32) -> EbsBlockDevice {
    let mut e = EbsBlockDevice::builder()
        .delete_on_termination(true)
        .encrypted(true)
        .volume_type(VolumeType::from(if kind.is_empty() { "gp3" } else { kind }))
        .volume_size(size_gb);
    if !a.kms_key_id.is_empty() {
        e = e.kms_key_id(&a.kms_key_id);
    }
    if iops > 0 {
        e = e.iops(iops as i32);
    }
    if throughput > 0 {
        e = e.throughput(throughput as i32);
    }
    e.build()
}

/// The root volume's mapping (on the image's root device) and one per data volume.
fn block_devices(a: &AppSpec, image: &Image) -> Vec<BlockDeviceMapping> {
    let device = if a.root_device_name.is_empty() {
        image.root_device.as_str()
    } else {
        a.root_device_name.as_str()
    };
    let root_gb = if a.root_volume_gb > 0 {
        a.root_volume_gb as i32
    } else {
        image.root_gb
    };
    let root = BlockDeviceMapping::builder()
        .device_name(device)
        .ebs(ebs(
            a,
            &a.root_volume_type,
            root_gb,
            a.root_volume_iops,
            a.root_volume_throughput,
        ))
        .build();
    std::iter::once(root)
        .chain(a.data_volumes.iter().map(|d| {
            BlockDeviceMapping::builder()
                .device_name(&d.device_name)
                .ebs(ebs(a, &d.r#type, d.size_gb as i32, d.iops, d.throughput))
                .build()
        }))
        .collect()
}

/// EC2's answers that mean "no spot capacity for this request": the app then launches on
/// demand. Anything else (a bad AMI, a quota on instances) fails the same way on demand.
pub(super) fn spot_refused(code: &str) -> bool {
    matches!(
        code,
        "InsufficientInstanceCapacity"
            | "SpotMaxPriceTooLow"
            | "MaxSpotInstanceCountExceeded"
            | "InsufficientCapacity"
            | "UnfulfillableCapacity"
    )
}

/// One-time spot, terminated on interruption, at most `max_price` (empty = on-demand price).
fn spot_options(max_price: &str) -> InstanceMarketOptionsRequest {
    let mut o = SpotMarketOptions::builder()
        .spot_instance_type(SpotInstanceType::OneTime)
        .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate);
    if !max_price.is_empty() {
        o = o.max_price(max_price);
    }
    InstanceMarketOptionsRequest::builder()
        .market_type(MarketType::Spot)
        .spot_options(o.build())
        .build()
}

/// The key pair app `a` launches with: its own `key_pair`, else the sandbox's (if any).
pub(super) fn key_for<'k>(a: &'k AppSpec, sandbox_key: Option<&'k str>) -> Option<&'k str> {
    if a.key_pair.is_empty() {
        sandbox_key
    } else {
        Some(&a.key_pair)
    }
}

pub(super) async fn launch(
    cx: &Cx<'_>,
    net: &Network,
    image: &Image,
    key: Option<&str>,
    // Fetched from `a.user_data_url`, when it has one.
    user_data: Option<&str>,
    a: &AppSpec,
) -> Result<String> {
    // Inbound ports: a per-app group (looked up first, so a re-run reuses it).
    let mut groups = vec![if a.isolated {
        net.isolated_sg.clone()
    } else {
        net.sandbox_sg.clone()
    }];
    if !a.inbound.is_empty() {
        groups.push(app_group(cx, net, a).await?);
    }
    // Static groups the app names (checked to be in the sandbox's VPC before the launch).
    groups.extend(a.security_groups.iter().cloned());
    let mut nics = Vec::new();
    for (i, s) in a.subnets.iter().enumerate() {
        let mut n = InstanceNetworkInterfaceSpecification::builder()
            .device_index(i as i32)
            .subnet_id(&net.subnets[s].0)
            .set_groups(Some(groups.clone()))
            .delete_on_termination(true);
        if i == 0 && a.public_ip == PublicIp::Auto as i32 {
            n = n.associate_public_ip_address(true);
        }
        if let Some(ip) = a.private_ips.get(i).filter(|ip| !ip.is_empty()) {
            n = n.private_ip_address(ip);
        }
        if i == 0 && a.secondary_private_ips > 0 {
            n = n.secondary_private_ip_address_count(a.secondary_private_ips as i32);
        }
        nics.push(n.build());
    }
    let name = format!("{}-{}", cx.sandbox, a.name);
    let extra: Vec<(&str, &str)> = std::iter::once((TAG_APP, a.name.as_str()))
        .chain(a.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect();
    let mut req = cx
        .ec2
        .run_instances()
        .image_id(&a.ami)
        .instance_type(InstanceType::from(a.instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .client_token(client_token(cx.job_id, &a.name))
        .set_network_interfaces(Some(nics))
        .set_block_device_mappings(Some(block_devices(a, image)))
        .tag_specifications(tags(ResourceType::Instance, cx.sandbox, &name, &extra))
        .tag_specifications(tags(ResourceType::Volume, cx.sandbox, &name, &extra))
        .tag_specifications(tags(
            ResourceType::NetworkInterface,
            cx.sandbox,
            &name,
            &extra,
        ));
    // IMDSv2 only (session tokens) unless the app allows v1; 2 hops so containers reach it.
    req = req.metadata_options(
        InstanceMetadataOptionsRequest::builder()
            .http_endpoint(InstanceMetadataEndpointState::Enabled)
            .http_tokens(if a.imds_v1_allowed {
                HttpTokensState::Optional
            } else {
                HttpTokensState::Required
            })
            .http_put_response_hop_limit(if a.imds_hop_limit == 0 {
                2
            } else {
                a.imds_hop_limit as i32
            })
            .build(),
    );
    if let Some(k) = key {
        req = req.key_name(k);
    }
    let user_data = user_data.unwrap_or(&a.user_data);
    if !user_data.is_empty() {
        req = req.user_data(aws_smithy_types::base64::encode(user_data.as_bytes()));
    }
    if !a.instance_profile.is_empty() {
        let p = IamInstanceProfileSpecification::builder();
        let p = if a.instance_profile.starts_with("arn:") {
            p.arn(&a.instance_profile)
        } else {
            p.name(&a.instance_profile)
        };
        req = req.iam_instance_profile(p.build());
    }
    let r = if a.spot {
        let spot = req
            .clone()
            .client_token(client_token(cx.job_id, &format!("{}/spot", a.name)))
            .instance_market_options(spot_options(&a.spot_max_price))
            .tag_specifications(tags(
                ResourceType::SpotInstancesRequest,
                cx.sandbox,
                &name,
                &extra,
            ));
        match retry_consistency(|| spot.clone().send()).await {
            Ok(r) => Ok(r),
            Err(e) if spot_refused(&crate::shells::ec2::code(&e)) => {
                let why = crate::shells::ec2::code(&e);
                cx.ctx.log(format!(
                    "app {}: spot capacity refused ({why}); launching on demand",
                    a.name
                ));
                retry_consistency(|| req.clone().send()).await
            }
            Err(e) => Err(e),
        }
    } else {
        retry_consistency(|| req.clone().send()).await
    }
    .map_err(|e| aws_err("RunInstances", e))?;
    let id = r
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .unwrap_or_default()
        .to_owned();
    log::info!(sandbox_id = cx.sandbox, job_id = cx.job_id; "launched app {} as {id}", a.name);
    Ok(id)
}

/// The EC2 form of inbound rules (source 0.0.0.0/0 when none is given; ICMP: every type).
pub(super) fn permissions(inbound: &[PortRule]) -> Vec<IpPermission> {
    inbound
        .iter()
        .map(|p| {
            let cidr = if p.cidr.is_empty() {
                "0.0.0.0/0"
            } else {
                p.cidr.as_str()
            };
            let (from, to) = if p.protocol == "icmp" {
                (-1, -1)
            } else {
                (p.from_port as i32, p.to_port as i32)
            };
            IpPermission::builder()
                .ip_protocol(&p.protocol)
                .from_port(from)
                .to_port(to)
                .ip_ranges(IpRange::builder().cidr_ip(cidr).build())
                .build()
        })
        .collect()
}

/// The app's own security group for its inbound ports, made (with `a.inbound`) when the
/// network's look-up did not find it (a group made by a concurrent run meanwhile is looked up by
/// name).
pub(super) async fn app_group(cx: &Cx<'_>, net: &Network, a: &AppSpec) -> Result<String> {
    let name = format!("{}-{}-ports", cx.sandbox, a.name);
    if let Some(id) = net.groups.get(&name) {
        return Ok(id.clone());
    }
    let r = cx
        .ec2
        .create_security_group()
        .vpc_id(&net.vpc_id)
        .group_name(&name)
        .description(format!("es-shells: inbound ports of app {}", a.name))
        .tag_specifications(tags(
            ResourceType::SecurityGroup,
            cx.sandbox,
            &name,
            &[(TAG_APP, &a.name), (TAG_ROLE, "app-ports")],
        ))
        .send()
        .await;
    let id = match r {
        Ok(r) => r.group_id().unwrap_or_default().to_owned(),
        Err(e) if code(&e) == "InvalidGroup.Duplicate" => {
            // Made by a concurrent run between the network's look-up and this create.
            let found = crate::shells::ec2::group_named(cx.ec2, &net.vpc_id, &name).await?;
            return Ok(found.and_then(|g| g.group_id).unwrap_or_default());
        }
        Err(e) => return Err(aws_err("CreateSecurityGroup", e)),
    };
    let perms = permissions(&a.inbound);
    crate::shells::ec2::authorize_ingress(cx.ec2, &id, &perms).await?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_capacity_refusals_fall_back_to_on_demand() {
        for (code, falls_back) in [
            ("InsufficientInstanceCapacity", true),
            ("SpotMaxPriceTooLow", true),
            ("MaxSpotInstanceCountExceeded", true),
            ("InvalidAMIID.NotFound", false),
            ("VcpuLimitExceeded", false),
            ("UnauthorizedOperation", false),
        ] {
            assert_eq!(spot_refused(code), falls_back, "{code}");
        }
        let o = spot_options("0.05");
        assert_eq!(o.market_type(), Some(&MarketType::Spot));
        let s = o.spot_options().unwrap();
        assert_eq!(s.max_price(), Some("0.05"));
        assert_eq!(s.spot_instance_type(), Some(&SpotInstanceType::OneTime));
    }

    #[test]
    fn every_volume_is_encrypted_and_the_root_is_on_the_image_device() {
        let image = Image {
            root_device: "/dev/sda1".into(),
            root_gb: 15,
            windows: false,
        };
        let mut a = AppSpec {
            kms_key_id: "alias/sandboxes".into(),
            root_volume_iops: 4000,
            ..Default::default()
        };
        a.data_volumes.push(es_proto::v1::DataVolume {
            device_name: "/dev/sdf".into(),
            size_gb: 100,
            r#type: "st1".into(),
            ..Default::default()
        });
        let m = block_devices(&a, &image);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].device_name(), Some("/dev/sda1"));
        let root = m[0].ebs().unwrap();
        assert_eq!(root.volume_size(), Some(15));
        assert_eq!(root.iops(), Some(4000));
        assert_eq!(root.volume_type(), Some(&VolumeType::Gp3));
        for d in &m {
            let e = d.ebs().unwrap();
            assert_eq!(e.encrypted(), Some(true));
            assert_eq!(e.kms_key_id(), Some("alias/sandboxes"));
            assert_eq!(e.delete_on_termination(), Some(true));
        }
        assert_eq!(m[1].ebs().unwrap().volume_type(), Some(&VolumeType::St1));
    }
}
