//! Checks of the es-shells job kinds (network, cleanup, sweep; app templates in apps.rs). Every error names the
//! field with its path (e.g. `spec.deploy_sandbox.apps[3].subnets`) and says what is accepted.
//! Runtime facts (a subnet CIDR outside an existing VPC, an unknown AMI) are checked by the
//! agent before it creates anything.

use es_proto::v1::{job_spec::Kind, NetworkMode, PrepareSandboxNetwork, SubmitRequest};
use ipnet::Ipv4Net;

use es_proto::limits::{clip, MAX_APP_NAMES, MAX_LIVE_SANDBOXES, MAX_NAME};

use super::apps;
use super::field::{bad, cidr, id_ok, name_ok, short, FieldError};

const MAX_SUBNETS: usize = 16;

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
            apps::app("spec.deploy_app.app", app)?;
            apps::recipient(
                "spec.deploy_app.recipient",
                &d.recipient,
                std::slice::from_ref(app),
            )
        }
        Kind::DeploySandbox(d) => {
            apps::sandbox("spec.deploy_sandbox.apps", &d.apps)?;
            apps::recipient("spec.deploy_sandbox.recipient", &d.recipient, &d.apps)
        }
        Kind::Power(p) => names("spec.power.apps", &p.apps),
        Kind::Reboot(r) => names("spec.reboot.apps", &r.apps),
        Kind::RefreshIp(r) => names("spec.refresh_ip.apps", &r.apps),
        Kind::GetVmDetails(g) => names("spec.get_vm_details.apps", &g.apps),
        Kind::DeleteApp(d) => name_ok("spec.delete_app.app", &d.app),
        Kind::CleanupSandbox(_) => Ok(()),
        Kind::AddTags(t) => {
            names("spec.add_tags.apps", &t.apps)?;
            if t.tags.is_empty() {
                return Err(bad("spec.add_tags.tags", "is empty; give at least one tag"));
            }
            apps::tags("spec.add_tags.tags", &t.tags)
        }
        Kind::UpdateAppSecurity(u) => {
            name_ok("spec.update_app_security.app", &u.app)?;
            apps::inbound("spec.update_app_security.inbound", &u.inbound)
        }
        Kind::ConsoleOutput(c) => name_ok("spec.console_output.app", &c.app),
        Kind::Snapshot(x) => {
            name_ok("spec.snapshot.app", &x.app)?;
            if !x.name.is_empty() {
                name_ok("spec.snapshot.name", &x.name)?;
            }
            Ok(())
        }
        Kind::ListSnapshots(l) => names("spec.list_snapshots.apps", &l.apps),
        Kind::RestoreSnapshot(r) => {
            name_ok("spec.restore_snapshot.app", &r.app)?;
            name_ok("spec.restore_snapshot.name", &r.name)
        }
        Kind::GetAccessKey(g) => {
            if g.recipient.len() != es_proto::sealed::RECIPIENT_LEN {
                return Err(bad(
                    "spec.get_access_key.recipient",
                    format!(
                        "{} bytes; give the {}-byte X25519 public key the private key is to be \
                         sealed to (`es-server sandbox access-key` makes one)",
                        g.recipient.len(),
                        es_proto::sealed::RECIPIENT_LEN
                    ),
                ));
            }
            Ok(())
        }
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
    if p.amis.len() > apps::MAX_APPS {
        return Err(bad(format!("{f}.amis"), "at most one per app (255)"));
    }
    for (i, ami) in p.amis.iter().enumerate() {
        id_ok(&format!("{f}.amis[{i}]"), ami, "ami-")?;
    }
    if !matches!(p.key_type.as_str(), "" | "ed25519" | "rsa" | "none") {
        return Err(bad(
            format!("{f}.key_type"),
            format!(
                "{:?}: use ed25519 (the default), rsa (Windows apps need it) or none",
                clip(&p.key_type, 40)
            ),
        ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::v1::{
        AppSpec, DeploySandbox, JobSpec, ManagementNetwork, SharedVpc, SubnetRequest,
    };

    fn mgmt() -> Option<ManagementNetwork> {
        Some(ManagementNetwork {
            vpc_id: "vpc-1".into(),
            cidr: "10.0.0.0/16".into(),
            route_table_ids: vec!["rtb-1".into()],
        })
    }

    fn net(mode: NetworkMode, vpc: &str, subnets: &[(&str, &str)]) -> PrepareSandboxNetwork {
        PrepareSandboxNetwork {
            key_type: String::new(),
            amis: vec![],
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
            recipient: vec![],
            apps: (0..256).map(|i| app(&format!("a{i}"))).collect(),
        };
        let (r, k) = req(Kind::DeploySandbox(too_many));
        assert_eq!(
            submit(&r, &k).unwrap_err().field,
            "spec.deploy_sandbox.apps"
        );
        let dup = DeploySandbox {
            recipient: vec![],
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
            recipient: vec![],
            apps: vec![app("ok"), no_ami],
        }));
        assert_eq!(
            submit(&r, &k).unwrap_err().field,
            "spec.deploy_sandbox.apps[1].ami"
        );
        let ok = DeploySandbox {
            recipient: vec![],
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
