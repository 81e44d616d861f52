//! UpdateAppSecurity: a running app's inbound rules and its "whole sandbox may reach it" choice,
//! changed in place (no restart). The app's ports group gets exactly the new rules (only the
//! difference is revoked and authorized), and each of its network interfaces is given the
//! sandbox (or isolated) group plus the ports group; a ports group left without rules is
//! detached and deleted.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::{IpPermission, IpRange};
use es_proto::v1::{AppList, AppSpec, UpdateAppSecurity};

use crate::shells::ec2::{aws_err, retry_consistency};
use crate::shells::{Cx, Result};

use super::launch::{app_group, network, permissions};
use super::*;

/// One inbound rule as EC2 holds it: (protocol, from, to, source CIDR).
type Rule = (String, i32, i32, String);

/// Each (rule, source) of EC2 permissions as its own [`Rule`].
fn rules(perms: &[IpPermission]) -> BTreeSet<Rule> {
    perms
        .iter()
        .flat_map(|p| {
            p.ip_ranges().iter().map(move |r| {
                (
                    p.ip_protocol().unwrap_or_default().to_owned(),
                    p.from_port().unwrap_or(-1),
                    p.to_port().unwrap_or(-1),
                    r.cidr_ip().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect()
}

fn permission((proto, from, to, cidr): &Rule) -> IpPermission {
    IpPermission::builder()
        .ip_protocol(proto)
        .from_port(*from)
        .to_port(*to)
        .ip_ranges(IpRange::builder().cidr_ip(cidr).build())
        .build()
}

/// What to revoke and what to authorize to go from `current` to `wanted`.
fn rule_diff(current: &BTreeSet<Rule>, wanted: &BTreeSet<Rule>) -> (Vec<Rule>, Vec<Rule>) {
    (
        current.difference(wanted).cloned().collect(),
        wanted.difference(current).cloned().collect(),
    )
}

pub(crate) async fn update(cx: &Cx<'_>, u: &UpdateAppSecurity) -> Result<AppList> {
    let names = [u.app.clone()];
    let (net, found) = tokio::try_join!(
        network(cx),
        live_apps(cx, &names, "spec.update_app_security.app")
    )?;
    let Some(inst) = found.first() else {
        return Err(no_app(cx, "spec.update_app_security.app", &u.app));
    };
    let name = format!("{}-{}-ports", cx.sandbox, u.app);
    let existing = crate::shells::ec2::group_named(cx.ec2, &net.vpc_id, &name).await?;
    let wanted = rules(&permissions(&u.inbound));
    // The ports group: its rules brought to `wanted`, or made with them.
    let ports = match (&existing, wanted.is_empty()) {
        (Some(g), _) => {
            let id = g.group_id().unwrap_or_default().to_owned();
            let (revoke, authorize) = rule_diff(&rules(g.ip_permissions()), &wanted);
            if !revoke.is_empty() {
                cx.ec2
                    .revoke_security_group_ingress()
                    .group_id(&id)
                    .set_ip_permissions(Some(revoke.iter().map(permission).collect()))
                    .send()
                    .await
                    .map_err(|e| aws_err("RevokeSecurityGroupIngress", e))?;
            }
            if !authorize.is_empty() {
                let perms: Vec<IpPermission> = authorize.iter().map(permission).collect();
                crate::shells::ec2::authorize_ingress(cx.ec2, &id, &perms).await?;
            }
            cx.ctx.log(format!(
                "app {}: {} inbound rules removed, {} added",
                u.app,
                revoke.len(),
                authorize.len()
            ));
            (!wanted.is_empty()).then_some(id)
        }
        (None, true) => None,
        (None, false) => {
            let spec = AppSpec {
                name: u.app.clone(),
                inbound: u.inbound.clone(),
                ..Default::default()
            };
            cx.ctx.log(format!(
                "app {}: {} inbound rules added",
                u.app,
                wanted.len()
            ));
            Some(app_group(cx, &net, &spec).await?)
        }
    };
    let base = if u.isolated {
        &net.isolated_sg
    } else {
        &net.sandbox_sg
    };
    let groups: Vec<String> = std::iter::once(base.clone()).chain(ports.clone()).collect();
    let want_set: BTreeSet<&str> = groups.iter().map(String::as_str).collect();
    for n in inst.network_interfaces() {
        let have: BTreeSet<&str> = n.groups().iter().filter_map(|g| g.group_id()).collect();
        if have == want_set {
            continue;
        }
        let nic = n.network_interface_id().unwrap_or_default();
        cx.ec2
            .modify_network_interface_attribute()
            .network_interface_id(nic)
            .set_groups(Some(groups.clone()))
            .send()
            .await
            .map_err(|e| aws_err("ModifyNetworkInterfaceAttribute", e))?;
        cx.ctx
            .log(format!("app {}: {nic} now in {}", u.app, groups.join(", ")));
    }
    // A ports group with no rules left is detached above; it goes now.
    if let (Some(g), None) = (&existing, &ports) {
        let id = g.group_id().unwrap_or_default();
        retry_consistency(|| cx.ec2.delete_security_group().group_id(id).send())
            .await
            .map_err(|e| aws_err("DeleteSecurityGroup", e))?;
        cx.ctx
            .log(format!("app {}: ports group {id} deleted", u.app));
    }
    let id = inst.instance_id().unwrap_or_default().to_owned();
    let now = crate::shells::ec2::describe_ids(cx.ec2, &[id]).await?;
    cx.ctx.progress(
        1,
        1,
        format!(
            "app {}: {} inbound rules, {}",
            u.app,
            wanted.len(),
            if u.isolated {
                "reached by the Management VPC only"
            } else {
                "reached by the whole sandbox"
            }
        ),
    );
    Ok(AppList {
        apps: now.iter().map(app_result).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(p: &str, from: i32, to: i32, cidr: &str) -> Rule {
        (p.into(), from, to, cidr.into())
    }

    #[test]
    fn only_the_difference_is_revoked_and_authorized() {
        type Case = (Vec<Rule>, Vec<Rule>, Vec<Rule>, Vec<Rule>);
        let cases: Vec<Case> = vec![
            // (current, wanted, revoke, authorize)
            (vec![], vec![], vec![], vec![]),
            (
                vec![r("tcp", 443, 443, "0.0.0.0/0")],
                vec![r("tcp", 443, 443, "0.0.0.0/0")],
                vec![],
                vec![],
            ),
            (
                vec![r("tcp", 443, 443, "0.0.0.0/0")],
                vec![r("tcp", 8443, 8443, "0.0.0.0/0")],
                vec![r("tcp", 443, 443, "0.0.0.0/0")],
                vec![r("tcp", 8443, 8443, "0.0.0.0/0")],
            ),
            (
                vec![
                    r("tcp", 22, 22, "10.0.0.0/16"),
                    r("udp", 53, 53, "0.0.0.0/0"),
                ],
                vec![r("tcp", 22, 22, "10.0.0.0/16")],
                vec![r("udp", 53, 53, "0.0.0.0/0")],
                vec![],
            ),
            (
                vec![],
                vec![r("icmp", -1, -1, "0.0.0.0/0")],
                vec![],
                vec![r("icmp", -1, -1, "0.0.0.0/0")],
            ),
        ];
        for (cur, want, revoke, authorize) in cases {
            let got = rule_diff(&cur.into_iter().collect(), &want.into_iter().collect());
            assert_eq!(got, (revoke, authorize));
        }
    }

    #[test]
    fn a_permission_with_several_sources_is_one_rule_each() {
        let p = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(80)
            .to_port(80)
            .ip_ranges(IpRange::builder().cidr_ip("10.0.0.0/8").build())
            .ip_ranges(IpRange::builder().cidr_ip("192.168.0.0/16").build())
            .build();
        assert_eq!(rules(&[p]).len(), 2);
    }
}
