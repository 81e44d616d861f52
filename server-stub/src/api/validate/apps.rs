//! Checks of app templates (DeployApp, DeploySandbox): names, image, NICs and their addresses,
//! ports, volumes, metadata options, user data and tags. What only the cloud knows (a subnet's
//! CIDR, whether an AMI exists) is checked by the agent before it launches anything.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use es_proto::limits::{clip, MAX_APP_TAGS, MAX_ARN, MAX_TAG_KEY, MAX_TAG_VALUE};
use es_proto::v1::{AppSpec, PortRule, PublicIp};

use super::field::{bad, cidr, id_ok, name_ok, short, FieldError};

/// Most apps in one sandbox.
pub const MAX_APPS: usize = 255;
const MAX_NICS: usize = 8;
const MAX_USER_DATA: usize = 16 * 1024;
const MAX_DATA_VOLUMES: usize = 16;
/// Secondary IPv4 addresses on one NIC: the most any instance type allows (50 with the primary).
const MAX_SECONDARY_IPS: u32 = 49;
const MAX_WAIT_S: u32 = 3600;
const VOLUME_TYPES: &[&str] = &["gp3", "gp2", "io1", "io2", "st1", "sc1", "standard"];

/// The apps of one DeploySandbox: 1 to [`MAX_APPS`], each valid, names and static IPs unique.
pub fn sandbox(f: &str, apps: &[AppSpec]) -> Result<(), FieldError> {
    if apps.is_empty() {
        return Err(bad(f, "is empty; give 1 to 255 apps"));
    }
    if apps.len() > MAX_APPS {
        return Err(bad(
            f,
            format!(
                "has {} apps; a sandbox holds at most {MAX_APPS}",
                apps.len()
            ),
        ));
    }
    let mut names = HashSet::new();
    let mut ips: std::collections::HashMap<&str, String> = Default::default();
    for (i, a) in apps.iter().enumerate() {
        let af = format!("{f}[{i}]");
        app(&af, a)?;
        if !names.insert(a.name.as_str()) {
            return Err(bad(
                format!("{af}.name"),
                format!(
                    "{:?} is used twice; app names are unique in a sandbox",
                    a.name
                ),
            ));
        }
        for (j, ip) in a.private_ips.iter().enumerate() {
            let field = format!("{af}.private_ips[{j}]");
            if ip.is_empty() {
                continue;
            }
            if let Some(first) = ips.insert(ip, field.clone()) {
                return Err(bad(
                    field,
                    format!("{ip} is also {first}; a private IP is used once in a sandbox"),
                ));
            }
        }
    }
    Ok(())
}

/// One app template: every field, with its path under `f`.
pub fn app(f: &str, a: &AppSpec) -> Result<(), FieldError> {
    name_ok(&format!("{f}.name"), &a.name)?;
    if a.ami.is_empty() {
        return Err(bad(
            format!("{f}.ami"),
            "missing; give the AMI id (ami-...)",
        ));
    }
    id_ok(&format!("{f}.ami"), &a.ami, "ami-")?;
    if a.instance_type.is_empty() || !a.instance_type.contains('.') || a.instance_type.len() > 64 {
        return Err(bad(
            format!("{f}.instance_type"),
            format!(
                "{:?} is not an instance type like t3.micro",
                clip(&a.instance_type, 80)
            ),
        ));
    }
    short(&format!("{f}.root_device_name"), &a.root_device_name, 64)?;
    short(
        &format!("{f}.instance_profile"),
        &a.instance_profile,
        MAX_ARN,
    )?;
    inbound(&format!("{f}.inbound"), &a.inbound)?;
    if a.imds_hop_limit > 64 {
        return Err(bad(
            format!("{f}.imds_hop_limit"),
            "1..=64 hops (0 = the default, 2)",
        ));
    }
    if a.subnets.is_empty() || a.subnets.len() > MAX_NICS {
        return Err(bad(
            format!("{f}.subnets"),
            format!("give 1 to {MAX_NICS} subnet names (one NIC each)"),
        ));
    }
    for (i, s) in a.subnets.iter().enumerate() {
        name_ok(&format!("{f}.subnets[{i}]"), s)?;
    }
    let public = PublicIp::try_from(a.public_ip)
        .map_err(|_| bad(format!("{f}.public_ip"), "use none, auto or elastic"))?;
    if public == PublicIp::Auto && a.subnets.len() > 1 {
        return Err(bad(
            format!("{f}.public_ip"),
            "EC2 assigns an automatic public IP only to single-NIC instances; use elastic",
        ));
    }
    volume(
        &format!("{f}.root_volume"),
        Volume {
            size_field: "root_volume_gb",
            size_gb: a.root_volume_gb,
            size_required: false,
            type_field: "root_volume_type",
            kind: &a.root_volume_type,
            iops_field: "root_volume_iops",
            iops: a.root_volume_iops,
            throughput_field: "root_volume_throughput",
            throughput: a.root_volume_throughput,
        },
    )?;
    data_volumes(f, a)?;
    short(&format!("{f}.kms_key_id"), &a.kms_key_id, MAX_ARN)?;
    if !a.key_pair.is_empty() {
        short(&format!("{f}.key_pair"), &a.key_pair, 255)?;
    }
    addresses(f, a)?;
    spot(f, a)?;
    user_data_url(f, a)?;
    if a.security_groups.len() > 3 {
        return Err(bad(
            format!("{f}.security_groups"),
            "at most 3: a network interface holds 5 groups, and the sandbox's and the app's \
             ports group take two",
        ));
    }
    for (i, g) in a.security_groups.iter().enumerate() {
        id_ok(&format!("{f}.security_groups[{i}]"), g, "sg-")?;
    }
    if a.wait_timeout_s > MAX_WAIT_S {
        return Err(bad(
            format!("{f}.wait_timeout_s"),
            format!("at most {MAX_WAIT_S} s (0 = 600)"),
        ));
    }
    if a.user_data.len() > MAX_USER_DATA {
        return Err(bad(
            format!("{f}.user_data"),
            "EC2 takes at most 16 KB of user data",
        ));
    }
    tags(&format!("{f}.tags"), &a.tags)?;
    Ok(())
}

/// One EBS volume's settings, with the names its fields have in the caller's message.
struct Volume<'a> {
    size_field: &'a str,
    size_gb: u32,
    size_required: bool,
    type_field: &'a str,
    kind: &'a str,
    iops_field: &'a str,
    iops: u32,
    throughput_field: &'a str,
    throughput: u32,
}

/// EBS's rules per volume type (sizes, who takes IOPS and throughput, their ranges), so that a
/// mistake is named here rather than by a RunInstances that fails after the network is made.
fn volume(prefix: &str, v: Volume<'_>) -> Result<(), FieldError> {
    // `prefix` is "apps[0].root_volume" or "apps[0].data_volumes[1]": fields go beside it.
    let at = |name: &str| match prefix.rsplit_once('.') {
        Some((parent, "root_volume")) => format!("{parent}.{name}"),
        _ => format!("{prefix}.{name}"),
    };
    let kind = if v.kind.is_empty() { "gp3" } else { v.kind };
    if !VOLUME_TYPES.contains(&kind) {
        return Err(bad(
            at(v.type_field),
            format!("{kind:?}: use one of {}", VOLUME_TYPES.join(", ")),
        ));
    }
    let (min_gb, max_gb) = match kind {
        "io1" | "io2" => (4, 16_384),
        "st1" | "sc1" => (125, 16_384),
        "standard" => (1, 1024),
        _ => (1, 16_384),
    };
    if v.size_gb == 0 && v.size_required {
        return Err(bad(
            at(v.size_field),
            format!("missing; a {kind} volume takes {min_gb}..={max_gb} GiB"),
        ));
    }
    if v.size_gb != 0 && !(min_gb..=max_gb).contains(&v.size_gb) {
        return Err(bad(
            at(v.size_field),
            format!(
                "{} GiB: a {kind} volume takes {min_gb}..={max_gb}",
                v.size_gb
            ),
        ));
    }
    let iops = match kind {
        "gp3" => Some((3000, 16_000, false)),
        "io1" => Some((100, 64_000, true)),
        "io2" => Some((100, 256_000, true)),
        _ => None,
    };
    match iops {
        None if v.iops != 0 => {
            return Err(bad(
                at(v.iops_field),
                format!(
                    "a {kind} volume has no provisioned IOPS (its performance follows its size); \
                     use gp3, io1 or io2, or leave it 0"
                ),
            ))
        }
        Some((_, _, true)) if v.iops == 0 => {
            return Err(bad(
                at(v.iops_field),
                format!("missing; a {kind} volume needs its provisioned IOPS"),
            ))
        }
        Some((lo, hi, _)) if v.iops != 0 && !(lo..=hi).contains(&v.iops) => {
            return Err(bad(
                at(v.iops_field),
                format!("{}: a {kind} volume takes {lo}..={hi} IOPS", v.iops),
            ))
        }
        _ => {}
    }
    if v.throughput != 0 && kind != "gp3" {
        return Err(bad(
            at(v.throughput_field),
            format!("only gp3 volumes take a throughput; {kind} does not"),
        ));
    }
    if v.throughput != 0 && !(125..=1000).contains(&v.throughput) {
        return Err(bad(
            at(v.throughput_field),
            format!("{} MiB/s: gp3 takes 125..=1000", v.throughput),
        ));
    }
    Ok(())
}

fn data_volumes(f: &str, a: &AppSpec) -> Result<(), FieldError> {
    if a.data_volumes.len() > MAX_DATA_VOLUMES {
        return Err(bad(
            format!("{f}.data_volumes"),
            format!("at most {MAX_DATA_VOLUMES} volumes"),
        ));
    }
    let mut devices = HashSet::new();
    for (i, d) in a.data_volumes.iter().enumerate() {
        let df = format!("{f}.data_volumes[{i}]");
        let dev = &d.device_name;
        if !dev.starts_with("/dev/")
            || dev.len() < 6
            || dev.len() > 32
            || !dev[5..].bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(bad(
                format!("{df}.device_name"),
                format!("{:?} is not a device name like /dev/sdf", clip(dev, 40)),
            ));
        }
        let root = if a.root_device_name.is_empty() {
            None
        } else {
            Some(&a.root_device_name)
        };
        if root == Some(dev) || !devices.insert(dev.as_str()) {
            return Err(bad(
                format!("{df}.device_name"),
                format!("{dev} is used twice in the app (root device included)"),
            ));
        }
        volume(
            &df,
            Volume {
                size_field: "size_gb",
                size_gb: d.size_gb,
                size_required: true,
                type_field: "type",
                kind: &d.r#type,
                iops_field: "iops",
                iops: d.iops,
                throughput_field: "throughput",
                throughput: d.throughput,
            },
        )?;
    }
    Ok(())
}

/// Static private IPs (one per NIC at most, unique in the app, well formed) and the secondary
/// count. Inside the subnet and not reserved is the agent's check: only it knows the CIDR.
fn addresses(f: &str, a: &AppSpec) -> Result<(), FieldError> {
    if a.private_ips.len() > a.subnets.len() {
        return Err(bad(
            format!("{f}.private_ips"),
            format!(
                "has {} addresses for {} NICs; give at most one per subnet, in the same order",
                a.private_ips.len(),
                a.subnets.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    for (i, ip) in a.private_ips.iter().enumerate() {
        if ip.is_empty() {
            continue;
        }
        let field = format!("{f}.private_ips[{i}]");
        let addr: Ipv4Addr = ip.parse().map_err(|_| {
            bad(
                &field,
                format!("{:?} is not an IPv4 address like 10.1.1.10", clip(ip, 40)),
            )
        })?;
        if !seen.insert(addr) {
            return Err(bad(field, format!("{addr} is given twice")));
        }
    }
    if a.secondary_private_ips > MAX_SECONDARY_IPS {
        return Err(bad(
            format!("{f}.secondary_private_ips"),
            format!("at most {MAX_SECONDARY_IPS} (the most any instance type allows per NIC)"),
        ));
    }
    Ok(())
}

/// The key secrets of a deploy are sealed to: required (32 bytes) when an app waits for its
/// password, and then only.
pub fn recipient(f: &str, recipient: &[u8], apps: &[AppSpec]) -> Result<(), FieldError> {
    let needed = apps.iter().any(|a| a.wait_password);
    match (needed, recipient.len()) {
        (true, es_proto::sealed::RECIPIENT_LEN) | (false, 0) => Ok(()),
        (true, n) => Err(bad(
            f,
            format!(
                "{n} bytes; an app waits for its password, which is sealed to a {}-byte X25519 \
                 public key (`es-server sandbox up` makes one)",
                es_proto::sealed::RECIPIENT_LEN
            ),
        )),
        (false, _) => Err(bad(f, "is set but no app waits for its password")),
    }
}

/// A user-data URL: http(s), not with `user_data` too; parameters only with it, named simply.
fn user_data_url(f: &str, a: &AppSpec) -> Result<(), FieldError> {
    let u = &a.user_data_url;
    if u.is_empty() {
        if !a.user_data_params.is_empty() {
            return Err(bad(
                format!("{f}.user_data_params"),
                "are set without user_data_url: they fill in the script fetched from it",
            ));
        }
        return Ok(());
    }
    if !a.user_data.is_empty() {
        return Err(bad(
            format!("{f}.user_data_url"),
            "give user_data or user_data_url, not both",
        ));
    }
    if u.len() > 2048
        || !(u.starts_with("https://") || u.starts_with("http://"))
        || u.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad(
            format!("{f}.user_data_url"),
            format!("{:?} is not an https:// URL", clip(u, 80)),
        ));
    }
    if a.user_data_params.len() > 50 {
        return Err(bad(
            format!("{f}.user_data_params"),
            "at most 50 parameters",
        ));
    }
    for (k, v) in &a.user_data_params {
        if k.is_empty()
            || k.len() > 64
            || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(bad(
                format!("{f}.user_data_params"),
                format!("{:?}: a name is 1 to 64 letters, digits or _", clip(k, 80)),
            ));
        }
        if v.len() > MAX_USER_DATA {
            return Err(bad(
                format!("{f}.user_data_params[{k}]"),
                "longer than the 16 KB EC2 takes in all",
            ));
        }
    }
    Ok(())
}

/// Spot: a max price only with spot, as a positive USD amount.
fn spot(f: &str, a: &AppSpec) -> Result<(), FieldError> {
    let p = &a.spot_max_price;
    if p.is_empty() {
        return Ok(());
    }
    let field = format!("{f}.spot_max_price");
    if !a.spot {
        return Err(bad(
            field,
            "is set but spot is not: set spot: true, or leave the price empty",
        ));
    }
    match p.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 10_000.0 && p.len() <= 16 => Ok(()),
        Ok(_) => Err(bad(
            field,
            format!("{p:?}: a price per instance-hour above 0 (USD, e.g. \"0.05\"), or empty for the on-demand price"),
        )),
        Err(_) => Err(bad(
            field,
            format!("{:?} is not a price like \"0.05\" (USD per instance-hour)", clip(p, 40)),
        )),
    }
}

/// Inbound rules (an app's, or UpdateAppSecurity's), under path `f`.
pub fn inbound(f: &str, rules: &[PortRule]) -> Result<(), FieldError> {
    if rules.len() > 60 {
        return Err(bad(
            f,
            "at most 60 rules (a security group's default limit)",
        ));
    }
    for (i, r) in rules.iter().enumerate() {
        let rf = format!("{f}[{i}]");
        if !matches!(r.protocol.as_str(), "tcp" | "udp" | "icmp") {
            return Err(bad(
                format!("{rf}.protocol"),
                format!("{:?}: use tcp, udp or icmp", r.protocol),
            ));
        }
        if r.from_port > 65535 || r.to_port > 65535 || r.from_port > r.to_port {
            return Err(bad(
                format!("{rf}.from_port"),
                "ports are 0..=65535 with from_port <= to_port",
            ));
        }
        if !r.cidr.is_empty() {
            cidr(&format!("{rf}.cidr"), &r.cidr)?;
        }
    }
    Ok(())
}

/// Custom tags (an app's, or AddTags'), under path `f`: EC2's sizes, none of the sandbox's own.
pub fn tags(f: &str, map: &std::collections::HashMap<String, String>) -> Result<(), FieldError> {
    if map.len() > MAX_APP_TAGS {
        return Err(bad(
            f,
            format!(
                "has {}; at most {MAX_APP_TAGS} tags (EC2 allows 50, es-shells adds its own)",
                map.len()
            ),
        ));
    }
    for (k, v) in map {
        if v.len() > MAX_TAG_VALUE {
            return Err(bad(
                format!("{f}[{}]", clip(k, 80)),
                format!(
                    "the value is {} bytes; EC2 takes at most {MAX_TAG_VALUE}",
                    v.len()
                ),
            ));
        }
    }
    for k in map.keys() {
        if k.is_empty()
            || k.len() > MAX_TAG_KEY
            || k.starts_with("aws:")
            || k.starts_with("es:")
            || matches!(k.as_str(), "ReservationId" | "CreatedBy" | "AppName")
        {
            return Err(bad(
                f,
                format!("tag key {:?} is reserved or invalid", clip(k, 80)),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::v1::DataVolume;

    fn app() -> AppSpec {
        AppSpec {
            name: "web".into(),
            ami: "ami-0123456789abcdef0".into(),
            instance_type: "t3.micro".into(),
            subnets: vec!["app".into(), "db".into()],
            ..Default::default()
        }
    }

    /// (what is changed, field named in the error or "" when accepted)
    #[test]
    fn storage_rules_per_volume_type() {
        type Edit = fn(&mut AppSpec);
        let cases: &[(&str, Edit, &str)] = &[
            ("defaults", |_| {}, ""),
            (
                "gp3 with IOPS and throughput",
                |a| {
                    a.root_volume_iops = 4000;
                    a.root_volume_throughput = 250;
                },
                "",
            ),
            (
                "IOPS on gp2",
                |a| {
                    a.root_volume_type = "gp2".into();
                    a.root_volume_iops = 3000;
                },
                "a.root_volume_iops",
            ),
            (
                "io1 without IOPS",
                |a| a.root_volume_type = "io1".into(),
                "a.root_volume_iops",
            ),
            (
                "io2 with IOPS",
                |a| {
                    a.root_volume_type = "io2".into();
                    a.root_volume_iops = 1000;
                },
                "",
            ),
            (
                "gp3 IOPS too low",
                |a| a.root_volume_iops = 100,
                "a.root_volume_iops",
            ),
            (
                "throughput on io1",
                |a| {
                    a.root_volume_type = "io1".into();
                    a.root_volume_iops = 1000;
                    a.root_volume_throughput = 200;
                },
                "a.root_volume_throughput",
            ),
            (
                "throughput too high",
                |a| a.root_volume_throughput = 2000,
                "a.root_volume_throughput",
            ),
            (
                "st1 too small",
                |a| {
                    a.root_volume_type = "st1".into();
                    a.root_volume_gb = 20;
                },
                "a.root_volume_gb",
            ),
            (
                "unknown type",
                |a| a.root_volume_type = "gp9".into(),
                "a.root_volume_type",
            ),
            (
                "root too big",
                |a| a.root_volume_gb = 20_000,
                "a.root_volume_gb",
            ),
            (
                "data volume",
                |a| {
                    a.data_volumes.push(DataVolume {
                        device_name: "/dev/sdf".into(),
                        size_gb: 10,
                        ..Default::default()
                    })
                },
                "",
            ),
            (
                "data volume without size",
                |a| {
                    a.data_volumes.push(DataVolume {
                        device_name: "/dev/sdf".into(),
                        ..Default::default()
                    })
                },
                "a.data_volumes[0].size_gb",
            ),
            (
                "data volume IOPS on sc1",
                |a| {
                    a.data_volumes.push(DataVolume {
                        device_name: "/dev/sdf".into(),
                        size_gb: 500,
                        r#type: "sc1".into(),
                        iops: 500,
                        ..Default::default()
                    })
                },
                "a.data_volumes[0].iops",
            ),
            (
                "data volume bad device",
                |a| {
                    a.data_volumes.push(DataVolume {
                        device_name: "sdf".into(),
                        size_gb: 10,
                        ..Default::default()
                    })
                },
                "a.data_volumes[0].device_name",
            ),
            (
                "data volume on the root device",
                |a| {
                    a.root_device_name = "/dev/xvda".into();
                    a.data_volumes.push(DataVolume {
                        device_name: "/dev/xvda".into(),
                        size_gb: 10,
                        ..Default::default()
                    })
                },
                "a.data_volumes[0].device_name",
            ),
            (
                "static IPs",
                |a| a.private_ips = vec!["10.1.1.10".into(), "".into()],
                "",
            ),
            (
                "more IPs than NICs",
                |a| a.private_ips = vec!["".into(); 3],
                "a.private_ips",
            ),
            (
                "not an IP",
                |a| a.private_ips = vec!["10.1.1".into()],
                "a.private_ips[0]",
            ),
            (
                "one IP twice",
                |a| a.private_ips = vec!["10.1.1.10".into(), "10.1.1.10".into()],
                "a.private_ips[1]",
            ),
            (
                "too many secondary IPs",
                |a| a.secondary_private_ips = 50,
                "a.secondary_private_ips",
            ),
            (
                "wait too long",
                |a| a.wait_timeout_s = 7200,
                "a.wait_timeout_s",
            ),
            (
                "spot with a price",
                |a| {
                    a.spot = true;
                    a.spot_max_price = "0.05".into();
                },
                "",
            ),
            (
                "a spot price of 0",
                |a| {
                    a.spot = true;
                    a.spot_max_price = "0".into();
                },
                "a.spot_max_price",
            ),
            (
                "a price without spot",
                |a| a.spot_max_price = "0.05".into(),
                "a.spot_max_price",
            ),
            (
                "not a price",
                |a| {
                    a.spot = true;
                    a.spot_max_price = "cheap".into();
                },
                "a.spot_max_price",
            ),
        ];
        for (what, edit, field) in cases {
            let mut a = app();
            edit(&mut a);
            match (app_check("a", &a), *field) {
                (Ok(()), "") => {}
                (Err(e), f) if e.field == f => {}
                (got, _) => panic!("{what}: expected {field:?}, got {got:?}"),
            }
        }
    }

    fn app_check(f: &str, a: &AppSpec) -> Result<(), FieldError> {
        super::app(f, a)
    }

    #[test]
    fn a_static_ip_is_used_once_in_a_sandbox() {
        let mut a = app();
        a.private_ips = vec!["10.1.1.10".into()];
        let mut b = app();
        b.name = "db".into();
        b.private_ips = vec!["".into(), "10.1.1.10".into()];
        let e = sandbox("apps", &[a, b]).unwrap_err();
        assert_eq!(e.field, "apps[1].private_ips[1]");
        assert!(e.reason.contains("apps[0].private_ips[0]"), "{}", e.reason);
    }
}
