//! Checks of the es-shells job kinds (network, apps, cleanup, sweep). Every error names the
//! field with its path (e.g. `spec.deploy_sandbox.apps[3].subnets`) and says what is accepted.
//! Runtime facts (a subnet CIDR outside an existing VPC, an unknown AMI) are checked by the
//! agent before it creates anything.

use std::collections::HashSet;

use es_proto::v1::{
    job_spec::Kind, AppSpec, NetworkMode, PrepareSandboxNetwork, PublicIp, SubmitRequest,
};
use ipnet::Ipv4Net;

use es_proto::limits::{
    clip, MAX_APP_NAMES, MAX_APP_TAGS, MAX_ARN, MAX_LIVE_SANDBOXES, MAX_NAME, MAX_TAG_KEY,
    MAX_TAG_VALUE,
};

use super::field::{bad, FieldError};

/// Most apps in one sandbox.
pub const MAX_APPS: usize = 255;
const MAX_SUBNETS: usize = 16;
const MAX_NICS: usize = 8;
const MAX_USER_DATA: usize = 16 * 1024;
const VOLUME_TYPES: &[&str] = &["gp3", "gp2", "io1", "io2", "st1", "sc1", "standard"];

fn name_ok(field: &str, v: &str) -> Result<(), FieldError> {
    if v.is_empty() {
        return Err(bad(field, "is empty"));
    }
    if v.len() > 64 {
        return Err(bad(field, "at most 64 characters"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(bad(
            field,
            format!("{v:?} contains {c:?}; use letters, digits, - _ ."),
        ));
    }
    Ok(())
}

fn id_ok(field: &str, v: &str, prefix: &str) -> Result<(), FieldError> {
    if !v.starts_with(prefix)
        || v.len() <= prefix.len()
        || v.len() > 64
        || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(bad(
            field,
            format!(
                "{:?} is not an id like {prefix}0123456789abcdef",
                clip(v, 80)
            ),
        ));
    }
    Ok(())
}

/// A short free-form value (instance type, zone, device name): at most `max` bytes, printable.
fn short(field: &str, v: &str, max: usize) -> Result<(), FieldError> {
    if v.len() > max || v.chars().any(|c| c.is_control()) {
        return Err(bad(field, format!("at most {max} bytes of printable text")));
    }
    Ok(())
}

pub fn cidr(field: &str, v: &str) -> Result<Ipv4Net, FieldError> {
    let net: Ipv4Net = v.parse().map_err(|_| {
        bad(
            field,
            format!("{:?} is not an IPv4 CIDR like 10.1.0.0/16", clip(v, 80)),
        )
    })?;
    if net.network() != net.addr() {
        return Err(bad(
            field,
            format!("{v:?} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

/// Checks an es-shells submission (role, sandbox id, target, and the kind's own fields).
pub fn submit(req: &SubmitRequest, kind: &Kind) -> Result<(), FieldError> {
    if req.role != es_proto::Role::Shells as i32 {
        return Err(bad(
            "role",
            "this job kind runs on es-shells: use role shells",
        ));
    }
    if req.sandbox_id.is_empty() && !matches!(kind, Kind::SweepOrphans(_)) {
        return Err(bad(
            "sandbox_id",
            "is empty; es-shells jobs act on one sandbox (its ReservationId tag)",
        ));
    }
    match kind {
        Kind::PrepareNetwork(p) => prepare(p),
        Kind::DeployApp(d) => {
            let app = d
                .app
                .as_ref()
                .ok_or_else(|| bad("spec.deploy_app.app", "missing"))?;
            app_spec("spec.deploy_app.app", app)
        }
        Kind::DeploySandbox(d) => {
            if d.apps.is_empty() {
                return Err(bad(
                    "spec.deploy_sandbox.apps",
                    "is empty; give 1 to 255 apps",
                ));
            }
            if d.apps.len() > MAX_APPS {
                return Err(bad(
                    "spec.deploy_sandbox.apps",
                    format!(
                        "has {} apps; a sandbox holds at most {MAX_APPS}",
                        d.apps.len()
                    ),
                ));
            }
            let mut names = HashSet::new();
            for (i, app) in d.apps.iter().enumerate() {
                let f = format!("spec.deploy_sandbox.apps[{i}]");
                app_spec(&f, app)?;
                if !names.insert(app.name.as_str()) {
                    return Err(bad(
                        format!("{f}.name"),
                        format!(
                            "{:?} is used twice; app names are unique in a sandbox",
                            app.name
                        ),
                    ));
                }
            }
            Ok(())
        }
        Kind::Power(p) => names("spec.power.apps", &p.apps),
        Kind::Reboot(r) => names("spec.reboot.apps", &r.apps),
        Kind::RefreshIp(r) => names("spec.refresh_ip.apps", &r.apps),
        Kind::GetVmDetails(g) => names("spec.get_vm_details.apps", &g.apps),
        Kind::DeleteApp(d) => name_ok("spec.delete_app.app", &d.app),
        Kind::CleanupSandbox(_) => Ok(()),
        Kind::SweepOrphans(s) => sweep(s),
        Kind::Sleep(_) | Kind::Echo(_) | Kind::RunCommand(_) => Ok(()),
    }
}

/// Sweep: a non-empty live list or the explicit confirmation, each id a sandbox id.
fn sweep(s: &es_proto::v1::SweepOrphans) -> Result<(), FieldError> {
    const F: &str = "spec.sweep_orphans";
    if s.live_sandbox_ids.is_empty() && !s.no_live_sandboxes {
        return Err(bad(
            format!("{F}.live_sandbox_ids"),
            "is empty: a sweep deletes every sandbox not named live. Name the live sandboxes \
             (--live), or confirm that only those the server knows are alive with \
             no_live_sandboxes (--all-except-known)",
        ));
    }
    if s.live_sandbox_ids.len() > MAX_LIVE_SANDBOXES {
        return Err(bad(
            format!("{F}.live_sandbox_ids"),
            format!(
                "has {}; at most {MAX_LIVE_SANDBOXES}",
                s.live_sandbox_ids.len()
            ),
        ));
    }
    for (i, id) in s.live_sandbox_ids.iter().enumerate() {
        if id.is_empty()
            || id.len() > MAX_NAME
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
        {
            return Err(bad(
                format!("{F}.live_sandbox_ids[{i}]"),
                format!(
                    "{:?} is not a sandbox id (1 to {MAX_NAME} letters, digits, - _ . : /)",
                    clip(id, 80)
                ),
            ));
        }
    }
    if s.min_age_s > 365 * 24 * 3600 {
        return Err(bad(
            format!("{F}.min_age_s"),
            "at most one year (31536000 s)",
        ));
    }
    Ok(())
}

fn names(field: &str, list: &[String]) -> Result<(), FieldError> {
    if list.len() > MAX_APP_NAMES {
        return Err(bad(
            field,
            format!(
                "has {} names; a sandbox holds at most {MAX_APP_NAMES} apps",
                list.len()
            ),
        ));
    }
    for (i, n) in list.iter().enumerate() {
        name_ok(&format!("{field}[{i}]"), n)?;
    }
    Ok(())
}

fn prepare(p: &PrepareSandboxNetwork) -> Result<(), FieldError> {
    let f = "spec.prepare_network";
    let mode = NetworkMode::try_from(p.mode).unwrap_or(NetworkMode::Unspecified);
    let mgmt = p.management.as_ref().ok_or_else(|| {
        bad(
            format!("{f}.management"),
            "missing: the Management VPC's id and CIDR",
        )
    })?;
    id_ok(&format!("{f}.management.vpc_id"), &mgmt.vpc_id, "vpc-")?;
    let mgmt_net = cidr(&format!("{f}.management.cidr"), &mgmt.cidr)?;
    for (i, rt) in mgmt.route_table_ids.iter().enumerate() {
        id_ok(&format!("{f}.management.route_table_ids[{i}]"), rt, "rtb-")?;
    }
    let vpc_net = match mode {
        NetworkMode::Unspecified => {
            return Err(bad(
                format!("{f}.mode"),
                format!("unknown mode {}; use dedicated, shared or single", p.mode),
            ))
        }
        NetworkMode::Dedicated => {
            let net = cidr(&format!("{f}.vpc_cidr"), &p.vpc_cidr)?;
            if !(16..=28).contains(&net.prefix_len()) {
                return Err(bad(
                    format!("{f}.vpc_cidr"),
                    format!(
                        "/{} is outside what EC2 allows for a VPC (/16 to /28)",
                        net.prefix_len()
                    ),
                ));
            }
            if net.contains(&mgmt_net.network()) || mgmt_net.contains(&net.network()) {
                return Err(bad(
                    format!("{f}.vpc_cidr"),
                    format!("{net} overlaps the Management VPC {mgmt_net}; peering needs disjoint CIDRs"),
                ));
            }
            Some(net)
        }
        NetworkMode::Shared => {
            let s = p.shared.as_ref().ok_or_else(|| {
                bad(
                    format!("{f}.shared"),
                    "missing: shared mode needs the shared VPC",
                )
            })?;
            id_ok(&format!("{f}.shared.vpc_id"), &s.vpc_id, "vpc-")?;
            id_ok(
                &format!("{f}.shared.transit_gateway_id"),
                &s.transit_gateway_id,
                "tgw-",
            )?;
            None
        }
        NetworkMode::Single => None,
    };
    if mode != NetworkMode::Dedicated && !p.vpc_cidr.is_empty() {
        return Err(bad(
            format!("{f}.vpc_cidr"),
            "only dedicated mode creates a VPC; leave it empty",
        ));
    }
    if p.subnets.is_empty() || p.subnets.len() > MAX_SUBNETS {
        return Err(bad(
            format!("{f}.subnets"),
            format!("has {}; give 1 to {MAX_SUBNETS} subnets", p.subnets.len()),
        ));
    }
    let mut seen: Vec<(String, Ipv4Net)> = Vec::new();
    for (i, s) in p.subnets.iter().enumerate() {
        let sf = format!("{f}.subnets[{i}]");
        name_ok(&format!("{sf}.name"), &s.name)?;
        short(&format!("{sf}.availability_zone"), &s.availability_zone, 32)?;
        let net = cidr(&format!("{sf}.cidr"), &s.cidr)?;
        if !(16..=28).contains(&net.prefix_len()) {
            return Err(bad(format!("{sf}.cidr"), "EC2 subnets are /16 to /28"));
        }
        if let Some(vpc) = vpc_net {
            if !vpc.contains(&net) {
                return Err(bad(
                    format!("{sf}.cidr"),
                    format!("{net} is outside the VPC CIDR {vpc}"),
                ));
            }
        }
        if s.public && mode != NetworkMode::Dedicated {
            return Err(bad(
                format!("{sf}.public"),
                "public subnets exist only in dedicated mode",
            ));
        }
        for (other, onet) in &seen {
            if other == &s.name {
                return Err(bad(
                    format!("{sf}.name"),
                    format!("{other:?} is used twice"),
                ));
            }
            if onet.contains(&net.network()) || net.contains(&onet.network()) {
                return Err(bad(
                    format!("{sf}.cidr"),
                    format!("{net} overlaps subnet {other:?} ({onet})"),
                ));
            }
        }
        seen.push((s.name.clone(), net));
    }
    Ok(())
}

fn app_spec(f: &str, a: &AppSpec) -> Result<(), FieldError> {
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
    if a.inbound.len() > 60 {
        return Err(bad(
            format!("{f}.inbound"),
            "at most 60 rules (a security group's default limit)",
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
    for (i, r) in a.inbound.iter().enumerate() {
        let rf = format!("{f}.inbound[{i}]");
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
    if a.root_volume_gb > 16_384 {
        return Err(bad(format!("{f}.root_volume_gb"), "at most 16384"));
    }
    if a.imds_hop_limit > 64 {
        return Err(bad(
            format!("{f}.imds_hop_limit"),
            "1..=64 hops (0 = the default, 2)",
        ));
    }
    if !a.root_volume_type.is_empty() && !VOLUME_TYPES.contains(&a.root_volume_type.as_str()) {
        return Err(bad(
            format!("{f}.root_volume_type"),
            format!(
                "{:?}: use one of {}",
                a.root_volume_type,
                VOLUME_TYPES.join(", ")
            ),
        ));
    }
    if a.user_data.len() > MAX_USER_DATA {
        return Err(bad(
            format!("{f}.user_data"),
            "EC2 takes at most 16 KB of user data",
        ));
    }
    if a.tags.len() > MAX_APP_TAGS {
        return Err(bad(
            format!("{f}.tags"),
            format!(
                "has {}; at most {MAX_APP_TAGS} tags (EC2 allows 50, es-shells adds its own)",
                a.tags.len()
            ),
        ));
    }
    for (k, v) in &a.tags {
        if v.len() > MAX_TAG_VALUE {
            return Err(bad(
                format!("{f}.tags[{}]", clip(k, 80)),
                format!(
                    "the value is {} bytes; EC2 takes at most {MAX_TAG_VALUE}",
                    v.len()
                ),
            ));
        }
    }
    for k in a.tags.keys() {
        if k.is_empty()
            || k.len() > MAX_TAG_KEY
            || k.starts_with("aws:")
            || k.starts_with("es:")
            || matches!(k.as_str(), "ReservationId" | "CreatedBy" | "AppName")
        {
            return Err(bad(
                format!("{f}.tags"),
                format!("tag key {:?} is reserved or invalid", clip(k, 80)),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::v1::{DeploySandbox, JobSpec, ManagementNetwork, SharedVpc, SubnetRequest};

    fn mgmt() -> Option<ManagementNetwork> {
        Some(ManagementNetwork {
            vpc_id: "vpc-1".into(),
            cidr: "10.0.0.0/16".into(),
            route_table_ids: vec!["rtb-1".into()],
        })
    }

    fn net(mode: NetworkMode, vpc: &str, subnets: &[(&str, &str)]) -> PrepareSandboxNetwork {
        PrepareSandboxNetwork {
            mode: mode as i32,
            vpc_cidr: vpc.into(),
            subnets: subnets
                .iter()
                .map(|(n, c)| SubnetRequest {
                    name: (*n).into(),
                    cidr: (*c).into(),
                    ..Default::default()
                })
                .collect(),
            management: mgmt(),
            shared: Some(SharedVpc {
                vpc_id: "vpc-2".into(),
                transit_gateway_id: "tgw-1".into(),
            }),
        }
    }

    fn req(kind: Kind) -> (SubmitRequest, Kind) {
        let r = SubmitRequest {
            role: es_proto::Role::Shells as i32,
            sandbox_id: "sb-1".into(),
            spec: Some(JobSpec {
                kind: Some(kind.clone()),
                target: None,
            }),
            ..Default::default()
        };
        (r, kind)
    }

    fn app(name: &str) -> AppSpec {
        AppSpec {
            name: name.into(),
            ami: "ami-123".into(),
            instance_type: "t3.micro".into(),
            subnets: vec!["app".into()],
            ..Default::default()
        }
    }

    #[test]
    fn networks() {
        let d = NetworkMode::Dedicated;
        let cases: Vec<(PrepareSandboxNetwork, Option<&str>)> = vec![
            (
                net(
                    d,
                    "10.1.0.0/16",
                    &[("app", "10.1.1.0/24"), ("db", "10.1.2.0/24")],
                ),
                None,
            ),
            (
                net(d, "10.1.0.0/16", &[("app", "10.2.1.0/24")]),
                Some("spec.prepare_network.subnets[0].cidr"),
            ),
            (
                net(
                    d,
                    "10.1.0.0/16",
                    &[("app", "10.1.0.0/23"), ("db", "10.1.1.0/24")],
                ),
                Some("spec.prepare_network.subnets[1].cidr"),
            ),
            (
                net(d, "10.0.0.0/16", &[("app", "10.0.1.0/24")]),
                Some("spec.prepare_network.vpc_cidr"),
            ),
            (
                net(d, "10.1.0.1/16", &[("app", "10.1.1.0/24")]),
                Some("spec.prepare_network.vpc_cidr"),
            ),
            (
                net(NetworkMode::Unspecified, "", &[("app", "10.1.1.0/24")]),
                Some("spec.prepare_network.mode"),
            ),
            (
                net(NetworkMode::Single, "", &[("app", "10.0.9.0/24")]),
                None,
            ),
            (
                net(NetworkMode::Shared, "", &[("app", "172.16.9.0/24")]),
                None,
            ),
            (
                net(NetworkMode::Shared, "", &[]),
                Some("spec.prepare_network.subnets"),
            ),
            (
                net(d, "10.1.0.0/16", &[("a b", "10.1.1.0/24")]),
                Some("spec.prepare_network.subnets[0].name"),
            ),
        ];
        for (p, want) in cases {
            let (r, k) = req(Kind::PrepareNetwork(p.clone()));
            assert_eq!(
                submit(&r, &k).err().map(|e| e.field),
                want.map(String::from),
                "{p:?}"
            );
        }
    }

    #[test]
    fn apps_and_roles() {
        let too_many = DeploySandbox {
            apps: (0..256).map(|i| app(&format!("a{i}"))).collect(),
        };
        let (r, k) = req(Kind::DeploySandbox(too_many));
        assert_eq!(
            submit(&r, &k).unwrap_err().field,
            "spec.deploy_sandbox.apps"
        );
        let dup = DeploySandbox {
            apps: vec![app("web"), app("web")],
        };
        let (r, k) = req(Kind::DeploySandbox(dup));
        assert_eq!(
            submit(&r, &k).unwrap_err().field,
            "spec.deploy_sandbox.apps[1].name"
        );
        let mut no_ami = app("web");
        no_ami.ami.clear();
        let (r, k) = req(Kind::DeploySandbox(DeploySandbox {
            apps: vec![app("ok"), no_ami],
        }));
        assert_eq!(
            submit(&r, &k).unwrap_err().field,
            "spec.deploy_sandbox.apps[1].ami"
        );
        let ok = DeploySandbox {
            apps: (0..255).map(|i| app(&format!("a{i}"))).collect(),
        };
        let (mut r, k) = req(Kind::DeploySandbox(ok));
        assert!(submit(&r, &k).is_ok());
        r.role = es_proto::Role::Commands as i32;
        assert_eq!(submit(&r, &k).unwrap_err().field, "role");
        r.role = es_proto::Role::Shells as i32;
        r.sandbox_id.clear();
        assert_eq!(submit(&r, &k).unwrap_err().field, "sandbox_id");
    }
}
