//! What only the cloud can refute, checked before anything launches: a static IP inside its
//! subnet, not reserved and not in use; a Windows image with an RSA key pair; a Windows password
//! that es-shells can decrypt. Each failure names the app's field.

use std::net::Ipv4Addr;

use aws_sdk_ec2::types::KeyType;
use es_proto::v1::AppSpec;
use ipnet::Ipv4Net;

use crate::shells::ec2::{aws_err, filter};
use crate::shells::{Cx, Result, ShellsError};

use super::app_path;
use super::launch::{Image, Network};

/// Why `ip` cannot be a static address in the subnet `net`, if it cannot: outside it, or one of
/// the five addresses AWS keeps in every subnet (network, router, DNS, future use, broadcast).
pub(super) fn static_ip_problem(net: Ipv4Net, ip: Ipv4Addr) -> Option<String> {
    if !net.contains(&ip) {
        return Some(format!("{ip} is outside the subnet's CIDR {net}"));
    }
    let first = u32::from(net.network());
    let offset = u32::from(ip) - first;
    if offset <= 3 || ip == net.broadcast() {
        return Some(format!(
            "{ip} is reserved by AWS in {net} (the first four addresses and the last one are)"
        ));
    }
    None
}

/// Checks every static private IP of the apps to launch (by their index in the job):
/// inside its subnet, not reserved, and used by no network interface of the VPC (one
/// DescribeNetworkInterfaces, only when some app asks for a static IP).
pub(super) async fn check_static_ips(
    cx: &Cx<'_>,
    net: &Network,
    apps: &[(usize, &AppSpec)],
    base: &str,
) -> Result<()> {
    let mut wanted: Vec<(String, Ipv4Addr)> = Vec::new();
    for (i, a) in apps {
        for (j, ip) in a.private_ips.iter().enumerate() {
            if ip.is_empty() {
                continue;
            }
            let field = format!("{}.private_ips[{j}]", app_path(base, *i));
            let invalid = |reason: String| ShellsError::Invalid {
                field: field.clone(),
                reason,
            };
            let addr: Ipv4Addr = ip
                .parse()
                .map_err(|_| invalid(format!("{ip:?} is not an IPv4 address")))?;
            let subnet = a.subnets.get(j).map(String::as_str).unwrap_or_default();
            let Some((_, cidr)) = net.subnets.get(subnet) else {
                return Err(invalid(format!(
                    "there is no NIC {j} in subnet {subnet:?} for it"
                )));
            };
            if let Some(why) = static_ip_problem(*cidr, addr) {
                return Err(invalid(format!("{why} (subnet {subnet:?})")));
            }
            wanted.push((field, addr));
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let values: Vec<String> = wanted.iter().map(|(_, ip)| ip.to_string()).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let used = cx
        .ec2
        .describe_network_interfaces()
        .filters(filter("vpc-id", &[&net.vpc_id]))
        .filters(filter("addresses.private-ip-address", &refs))
        .send()
        .await
        .map_err(|e| aws_err("DescribeNetworkInterfaces", e))?;
    for n in used.network_interfaces() {
        let held: Vec<&str> = n
            .private_ip_addresses()
            .iter()
            .filter_map(|a| a.private_ip_address())
            .chain(n.private_ip_address())
            .collect();
        if let Some((field, ip)) = wanted
            .iter()
            .find(|(_, ip)| held.contains(&ip.to_string().as_str()))
        {
            let by = n
                .attachment()
                .and_then(|a| a.instance_id())
                .map(|i| format!(", attached to {i}"))
                .unwrap_or_default();
            return Err(ShellsError::Invalid {
                field: field.clone(),
                reason: format!(
                    "{ip} is in use by {}{by}; choose a free address",
                    n.network_interface_id().unwrap_or("a network interface")
                ),
            });
        }
    }
    Ok(())
}

/// The static security groups of the apps to launch exist in the sandbox's VPC (one
/// DescribeSecurityGroups, only when an app names some).
pub(super) async fn check_static_groups(
    cx: &Cx<'_>,
    net: &Network,
    apps: &[(usize, &AppSpec)],
    base: &str,
) -> Result<()> {
    let wanted: Vec<String> = apps
        .iter()
        .flat_map(|(_, a)| a.security_groups.iter().cloned())
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let found = match cx
        .ec2
        .describe_security_groups()
        .set_group_ids(Some(wanted))
        .send()
        .await
    {
        Ok(r) => r.security_groups().to_vec(),
        Err(e) if crate::shells::ec2::code(&e).starts_with("InvalidGroup") => Vec::new(),
        Err(e) => return Err(aws_err("DescribeSecurityGroups", e)),
    };
    for (i, a) in apps {
        for (j, g) in a.security_groups.iter().enumerate() {
            let there = found
                .iter()
                .find(|x| x.group_id() == Some(g.as_str()))
                .and_then(|x| x.vpc_id());
            if there != Some(net.vpc_id.as_str()) {
                return Err(ShellsError::Invalid {
                    field: format!("{}.security_groups[{j}]", app_path(base, *i)),
                    reason: match there {
                        Some(v) => {
                            format!("{g} is in {v}, not in the sandbox's VPC {}", net.vpc_id)
                        }
                        None => format!("no security group {g} here"),
                    },
                });
            }
        }
    }
    Ok(())
}

/// Whether app `i` can boot with the sandbox's key: EC2 refuses ed25519 keys for Windows, and
/// a Windows password is encrypted to the key (so it must be RSA to be read back).
pub(super) fn check_key_type(
    a: &AppSpec,
    path: &str,
    image: &Image,
    sandbox_key: Option<&(String, KeyType)>,
) -> Result<()> {
    match sandbox_key {
        Some((name, kind)) if image.windows && a.key_pair.is_empty() && *kind != KeyType::Rsa => {
            Err(ShellsError::Invalid {
                field: format!("{path}.ami"),
                reason: format!(
                    "{} is a Windows image, and Windows needs an RSA key pair; the sandbox's \
                     ({name}) is {}: prepare the sandbox with key_type rsa, or name an RSA \
                     key_pair for the app",
                    a.ami,
                    kind.as_str()
                ),
            })
        }
        _ => Ok(()),
    }
}

/// Whether app `i` can have its Windows password read back: a Windows image, launched with the
/// sandbox's RSA key pair (the one whose private key es-shells holds).
pub(super) fn check_password(
    a: &AppSpec,
    path: &str,
    image: &Image,
    sandbox_key: Option<&(String, KeyType)>,
) -> Result<()> {
    if !a.wait_password {
        return Ok(());
    }
    let invalid = |reason: String| ShellsError::Invalid {
        field: format!("{path}.wait_password"),
        reason,
    };
    if !image.windows {
        return Err(invalid(format!(
            "{} is not a Windows image: only Windows has a password to wait for",
            a.ami
        )));
    }
    if !a.key_pair.is_empty() {
        return Err(invalid(format!(
            "the password is encrypted to the app's key pair {}, whose private key es-shells \
             does not hold: launch with the sandbox's key pair (no key_pair)",
            a.key_pair
        )));
    }
    match sandbox_key {
        Some((_, KeyType::Rsa)) => Ok(()),
        Some((name, kind)) => Err(invalid(format!(
            "the sandbox key pair {name} is {}; a Windows password needs an RSA key: prepare \
             the sandbox with key_type rsa",
            kind.as_str()
        ))),
        None => Err(invalid(
            "the sandbox has no key pair (key_type none): prepare it with key_type rsa".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_ips_inside_the_subnet_and_not_reserved() {
        let net: Ipv4Net = "10.1.1.0/24".parse().unwrap();
        let cases = [
            ("10.1.1.10", None),
            ("10.1.1.4", None),
            ("10.1.1.254", None),
            ("10.1.1.0", Some("reserved")),
            ("10.1.1.1", Some("reserved")),
            ("10.1.1.3", Some("reserved")),
            ("10.1.1.255", Some("reserved")),
            ("10.1.2.10", Some("outside")),
        ];
        for (ip, want) in cases {
            let got = static_ip_problem(net, ip.parse().unwrap());
            match (want, &got) {
                (None, None) => {}
                (Some(w), Some(g)) if g.contains(w) => {}
                _ => panic!("{ip}: expected {want:?}, got {got:?}"),
            }
        }
    }
}
