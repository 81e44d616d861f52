//! App templates at parity with Quali's AWS EC2 shell (issue 11), against moto: every field is
//! read back from the emulator (not from the agent's report), and where moto drops a field
//! (RunInstances there ignores a mapping's Iops and Throughput and a NIC's secondary address
//! count) from the RunInstances request the proxy saw on the wire. Mistakes only the cloud can refute (an address outside its subnet
//! or reserved, an address in use, an AMI that does not exist) fail the job naming the field
//! before anything is launched.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use es_proto::v1::*;
use es_tests::*;

use crate::shells::{
    app, apps_of, deploy_one, emulator_instances, fails_naming, ok, refused_naming, run,
    setup_with, shells_req, subnet, Aws,
};

/// Prepares a single-mode network (two subnets inside the Management VPC) for `sb`.
async fn network(a: &Aws, sb: &str, third_octet: u8) {
    let prep = run(
        a,
        sb,
        job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
            key_type: String::new(),
            amis: vec![],
            mode: NetworkMode::Single as i32,
            vpc_cidr: String::new(),
            subnets: vec![
                subnet("app", &format!("10.0.{third_octet}.0/24"), false),
                subnet("db", &format!("10.0.{}.0/24", third_octet + 1), false),
            ],
            management: Some(a.mgmt.clone()),
            shared: None,
        }),
    )
    .await;
    ok(&prep);
}

/// An es-shells agent behind a proxy that keeps the body of every RunInstances request.
async fn setup_recording() -> (Aws, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let hook = {
        let seen = seen.clone();
        ec2proxy::Hook(Arc::new(move |_head: &str, body: &[u8]| {
            let body = String::from_utf8_lossy(body);
            if body.contains("Action=RunInstances") {
                seen.lock().unwrap().push(body.into_owned());
            }
            None
        }))
    };
    let a = setup_with(ec2proxy::ProxyConfig {
        hook: Some(hook),
        ..Default::default()
    })
    .await;
    (a, seen)
}

/// The query parameters of a form-encoded EC2 request.
fn params(body: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_fields_are_deployed_as_asked_and_read_back_from_the_emulator() {
    let (a, seen) = setup_recording().await;
    let sb = "sb-fields";
    network(&a, sb, 111).await;

    // web: a gp3 root with IOPS and throughput, a data volume, a customer key, a static IP,
    // two secondary IPs, a wait for its status checks.
    let mut web = app("web", &["app"]);
    web.root_volume_gb = 30;
    web.root_volume_iops = 4000;
    web.root_volume_throughput = 250;
    web.kms_key_id = "alias/es-sandboxes".into();
    web.data_volumes = vec![DataVolume {
        device_name: "/dev/sdf".into(),
        size_gb: 125,
        r#type: "st1".into(),
        ..Default::default()
    }];
    web.private_ips = vec!["10.0.111.10".into()];
    web.secondary_private_ips = 2;
    web.wait_status_checks = true;
    web.wait_timeout_s = 120;
    // db: two NICs, a static IP on the second only; defaults elsewhere (root from the image).
    let mut db = app("db", &["app", "db"]);
    db.private_ips = vec![String::new(), "10.0.112.20".into()];
    let j = run(
        &a,
        sb,
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps: vec![web, db],
        }),
    )
    .await;
    ok(&j);
    let apps: BTreeMap<String, AppResult> = apps_of(&j)
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    assert_eq!(apps["web"].status_checks, "ok", "{:?}", apps["web"]);
    assert_eq!(apps["db"].status_checks, "", "db did not ask to wait");

    // Read back from moto: instances, their NICs and their volumes.
    let instances = emulator_instances(&a.ec2, sb).await;
    assert_eq!(instances.len(), 2);
    let nic_ips = |app: &str| -> Vec<Vec<String>> {
        let mut nics: Vec<_> = instances[app].network_interfaces().to_vec();
        nics.sort_by_key(|n| n.attachment().and_then(|a| a.device_index()));
        nics.iter()
            .map(|n| {
                n.private_ip_addresses()
                    .iter()
                    .filter_map(|p| p.private_ip_address().map(str::to_owned))
                    .collect()
            })
            .collect()
    };
    let web_ips = nic_ips("web");
    assert_eq!(web_ips.len(), 1);
    assert_eq!(
        web_ips[0][0], "10.0.111.10",
        "the static address is primary"
    );
    // moto ignores SecondaryPrivateIpAddressCount: the request is checked on the wire below.
    let db_ips = nic_ips("db");
    assert_eq!(db_ips.len(), 2);
    assert_eq!(db_ips[1][0], "10.0.112.20");
    assert!(db_ips[0][0].starts_with("10.0.111."), "{db_ips:?}");

    let vols = a
        .ec2
        .describe_volumes()
        .filters(sandbox_tag_filter(sb))
        .send()
        .await
        .unwrap();
    let mut by_app: BTreeMap<(String, String), aws_sdk_ec2::types::Volume> = BTreeMap::new();
    for v in vols.volumes() {
        let att = v.attachments().first().expect("attached");
        let app = instances
            .iter()
            .find(|(_, i)| i.instance_id() == att.instance_id())
            .map(|(n, _)| n.clone())
            .expect("a volume of a sandbox app");
        by_app.insert((app, att.device().unwrap().to_owned()), v.clone());
    }
    let keys: Vec<_> = by_app.keys().cloned().collect();
    assert_eq!(
        keys,
        vec![
            ("db".to_owned(), "/dev/xvda".to_owned()),
            ("web".to_owned(), "/dev/sdf".to_owned()),
            ("web".to_owned(), "/dev/xvda".to_owned()),
        ],
        "one root volume each (on the image's root device, not a second one) and web's data volume"
    );
    for ((app, dev), v) in &by_app {
        assert_eq!(v.encrypted(), Some(true), "{app} {dev} is encrypted");
    }
    let web_root = &by_app[&("web".into(), "/dev/xvda".into())];
    assert_eq!(web_root.size(), Some(30));
    assert_eq!(web_root.volume_type().map(|t| t.as_str()), Some("gp3"));
    assert_eq!(web_root.kms_key_id(), Some("alias/es-sandboxes"));
    let web_data = &by_app[&("web".into(), "/dev/sdf".into())];
    assert_eq!(
        (web_data.size(), web_data.volume_type().map(|t| t.as_str())),
        (Some(125), Some("st1"))
    );
    assert_eq!(web_data.kms_key_id(), Some("alias/es-sandboxes"));
    let db_root = &by_app[&("db".into(), "/dev/xvda".into())];
    assert_eq!(
        db_root.size(),
        Some(15),
        "the image's size when none is given"
    );
    assert!(
        db_root
            .kms_key_id()
            .is_some_and(|k| k.starts_with("arn:aws:kms:")),
        "no key named: the account's default EBS key ({:?})",
        db_root.kms_key_id()
    );

    // moto drops a mapping's Iops and Throughput and the secondary address count: what the
    // agent asked EC2 for, on the wire.
    let requests = seen.lock().unwrap().clone();
    let web_req = requests
        .iter()
        .map(|b| params(b))
        .find(|p| p.values().any(|v| v == "web"))
        .expect("web's RunInstances went through the proxy");
    let root: Vec<(&str, &str)> = [
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.Ebs.Iops", "4000"),
        ("BlockDeviceMapping.1.Ebs.Throughput", "250"),
        ("BlockDeviceMapping.1.Ebs.Encrypted", "true"),
        ("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
        ("BlockDeviceMapping.2.DeviceName", "/dev/sdf"),
        ("BlockDeviceMapping.2.Ebs.DeleteOnTermination", "true"),
        ("NetworkInterface.1.PrivateIpAddress", "10.0.111.10"),
        ("NetworkInterface.1.SecondaryPrivateIpAddressCount", "2"),
    ]
    .into();
    for (k, v) in root {
        assert_eq!(
            web_req.get(k).map(String::as_str),
            Some(v),
            "{k} in {web_req:?}"
        );
    }

    // Cleanup leaves nothing (data volumes included).
    ok(&run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    assert_eq!(tagged_resources(&a.ec2, sb).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_and_images_only_the_cloud_can_refute_fail_before_anything_launches() {
    let (a, seen) = setup_recording().await;
    let sb = "sb-refuted";
    network(&a, sb, 121).await;
    // One app holds 10.0.121.50.
    let mut holder = app("holder", &["app"]);
    holder.private_ips = vec!["10.0.121.50".into()];
    ok(&run(
        &a,
        sb,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(holder),
        }),
    )
    .await);
    let launched = seen.lock().unwrap().len();
    assert_eq!(launched, 1);

    let with = |edit: &dyn Fn(&mut AppSpec)| {
        let mut web = app("web", &["app", "db"]);
        edit(&mut web);
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps: vec![app("ok", &["app"]), web],
        })
    };
    let cases: Vec<(job_spec::Kind, &str, &str)> = vec![
        (
            with(&|w| w.private_ips = vec!["10.0.200.10".into()]),
            "spec.deploy_sandbox.apps[1].private_ips[0]",
            "outside the subnet",
        ),
        (
            with(&|w| w.private_ips = vec![String::new(), "10.0.122.3".into()]),
            "spec.deploy_sandbox.apps[1].private_ips[1]",
            "reserved by AWS",
        ),
        (
            with(&|w| w.private_ips = vec!["10.0.121.255".into()]),
            "spec.deploy_sandbox.apps[1].private_ips[0]",
            "reserved by AWS",
        ),
        (
            with(&|w| w.private_ips = vec!["10.0.121.50".into()]),
            "spec.deploy_sandbox.apps[1].private_ips[0]",
            "in use by eni-",
        ),
        (
            with(&|w| w.ami = "ami-00000000deadbeef0".into()),
            "spec.deploy_sandbox.apps[1].ami",
            "no image ami-00000000deadbeef0",
        ),
    ];
    for (kind, field, why) in cases {
        fails_naming(&a, sb, kind, field, why).await;
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        launched,
        "no RunInstances for a refuted job (not even for its valid app)"
    );
    // Bad input the server can judge alone is refused at submission (INVALID_ARGUMENT).
    let server_cases: Vec<(job_spec::Kind, &str)> = vec![
        (
            with(&|w| {
                w.root_volume_type = "gp2".into();
                w.root_volume_iops = 3000;
            }),
            "spec.deploy_sandbox.apps[1].root_volume_iops",
        ),
        (
            with(&|w| w.private_ips = vec!["10.0.121".into()]),
            "spec.deploy_sandbox.apps[1].private_ips[0]",
        ),
        (
            with(&|w| {
                w.data_volumes = vec![DataVolume {
                    device_name: "/dev/sdf".into(),
                    size_gb: 10,
                    r#type: "io2".into(),
                    ..Default::default()
                }]
            }),
            "spec.deploy_sandbox.apps[1].data_volumes[0].iops",
        ),
    ];
    for (kind, field) in server_cases {
        refused_naming(&a, sb, kind, field).await;
    }
    ok(&run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    assert_eq!(tagged_resources(&a.ec2, sb).await, Vec::<String>::new());
}

fn net_of(j: &Job) -> NetworkResult {
    match j
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .and_then(|s| s.result.clone())
    {
        Some(shells_result::Result::Network(n)) => n,
        other => panic!("not a network: {other:?}"),
    }
}

/// The tags of one resource, as the emulator has them.
async fn tags_of(ec2: &aws_sdk_ec2::Client, id: &str) -> BTreeMap<String, String> {
    ec2.describe_tags()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("resource-id")
                .values(id)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn instance(a: &Aws, id: &str) -> aws_sdk_ec2::types::Instance {
    a.ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap()
        .reservations()[0]
        .instances()[0]
        .clone()
}

/// (protocol, from, to, cidr) of every inbound rule of the group named `name`, if it exists.
async fn group_rules(a: &Aws, name: &str) -> Option<(String, Vec<(String, i32, i32, String)>)> {
    let r = a
        .ec2
        .describe_security_groups()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("group-name")
                .values(name)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let g = r.security_groups().first()?;
    let mut rules: Vec<_> = g
        .ip_permissions()
        .iter()
        .flat_map(|p| {
            p.ip_ranges().iter().map(|r| {
                (
                    p.ip_protocol().unwrap_or_default().to_owned(),
                    p.from_port().unwrap_or(-1),
                    p.to_port().unwrap_or(-1),
                    r.cidr_ip().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect();
    rules.sort();
    Some((g.group_id().unwrap().to_owned(), rules))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_inbound_rules_and_console_output_of_a_running_app() {
    let (a, _seen) = setup_recording().await;
    let sb = "sb-live";
    let prep = run(
        &a,
        sb,
        job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
            key_type: "none".into(),
            amis: vec![],
            mode: NetworkMode::Single as i32,
            vpc_cidr: String::new(),
            subnets: vec![subnet("app", "10.0.141.0/24", false)],
            management: Some(a.mgmt.clone()),
            shared: None,
        }),
    )
    .await;
    ok(&prep);
    let net = net_of(&prep);
    let mut web = app("web", &["app"]);
    web.public_ip = PublicIp::Elastic as i32;
    web.inbound = vec![PortRule {
        protocol: "tcp".into(),
        from_port: 443,
        to_port: 443,
        cidr: String::new(),
    }];
    let id = deploy_one(&a, sb, web).await;

    // AddTags: on the instance, its volume, its NIC and its Elastic IP (read back from moto).
    let t = run(
        &a,
        sb,
        job_spec::Kind::AddTags(AddTags {
            apps: vec![],
            tags: [("CostCenter".to_owned(), "42".to_owned())].into(),
        }),
    )
    .await;
    ok(&t);
    let inst = instance(&a, &id).await;
    let mut owned: Vec<String> = vec![id.clone()];
    owned.extend(
        inst.block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.volume_id()).map(str::to_owned)),
    );
    owned.extend(
        inst.network_interfaces()
            .iter()
            .filter_map(|n| n.network_interface_id().map(str::to_owned)),
    );
    let eips = a
        .ec2
        .describe_addresses()
        .filters(sandbox_tag_filter(sb))
        .send()
        .await
        .unwrap();
    owned.extend(
        eips.addresses()
            .iter()
            .filter_map(|e| e.allocation_id().map(str::to_owned)),
    );
    assert_eq!(
        owned.len(),
        4,
        "instance, root volume, NIC, Elastic IP: {owned:?}"
    );
    for r in &owned {
        assert_eq!(
            tags_of(&a.ec2, r)
                .await
                .get("CostCenter")
                .map(String::as_str),
            Some("42"),
            "{r}"
        );
    }
    // The sandbox's own tags cannot be set.
    let mut c = a.env.server.client().await;
    let err = c
        .submit(shells_req(
            sb,
            job_spec::Kind::AddTags(AddTags {
                apps: vec![],
                tags: [("ReservationId".to_owned(), "sb-other".to_owned())].into(),
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("spec.add_tags.tags"),
        "{}",
        err.message()
    );

    // UpdateAppSecurity: new rules exactly, isolated, on the same instance (no restart).
    let ports = format!("{sb}-web-ports");
    let (ports_id, before) = group_rules(&a, &ports).await.unwrap();
    assert_eq!(before, vec![("tcp".into(), 443, 443, "0.0.0.0/0".into())]);
    let u = run(
        &a,
        sb,
        job_spec::Kind::UpdateAppSecurity(UpdateAppSecurity {
            app: "web".into(),
            inbound: vec![
                PortRule {
                    protocol: "tcp".into(),
                    from_port: 8443,
                    to_port: 8443,
                    cidr: "10.0.0.0/8".into(),
                },
                PortRule {
                    protocol: "udp".into(),
                    from_port: 53,
                    to_port: 53,
                    cidr: String::new(),
                },
            ],
            isolated: true,
        }),
    )
    .await;
    ok(&u);
    let (same_id, after) = group_rules(&a, &ports).await.unwrap();
    assert_eq!(same_id, ports_id, "the group is changed, not replaced");
    assert_eq!(
        after,
        vec![
            ("tcp".into(), 8443, 8443, "10.0.0.0/8".into()),
            ("udp".into(), 53, 53, "0.0.0.0/0".into())
        ]
    );
    let nic_groups = |i: &aws_sdk_ec2::types::Instance| -> std::collections::BTreeSet<String> {
        i.network_interfaces()[0]
            .groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_owned))
            .collect()
    };
    let inst = instance(&a, &id).await;
    assert_eq!(
        nic_groups(&inst),
        [net.isolated_security_group_id.clone(), ports_id.clone()].into()
    );
    assert_eq!(
        inst.state().and_then(|s| s.name()).map(|n| n.as_str()),
        Some("running")
    );
    // No rules, whole sandbox: the ports group is detached and deleted.
    ok(&run(
        &a,
        sb,
        job_spec::Kind::UpdateAppSecurity(UpdateAppSecurity {
            app: "web".into(),
            inbound: vec![],
            isolated: false,
        }),
    )
    .await);
    assert_eq!(
        nic_groups(&instance(&a, &id).await),
        [net.sandbox_security_group_id.clone()].into()
    );
    assert!(
        group_rules(&a, &ports).await.is_none(),
        "ports group deleted"
    );
    // An app that does not exist is named.
    let j = run(
        &a,
        sb,
        job_spec::Kind::UpdateAppSecurity(UpdateAppSecurity {
            app: "nope".into(),
            inbound: vec![],
            isolated: false,
        }),
    )
    .await;
    assert_eq!(j.state, JobState::Failed as i32);
    assert!(j
        .result
        .unwrap()
        .error
        .contains("spec.update_app_security.app"));

    // ConsoleOutput: what EC2 (moto) has for the instance, decoded.
    let co = run(
        &a,
        sb,
        job_spec::Kind::ConsoleOutput(GetConsoleOutput {
            app: "web".into(),
            latest: false,
        }),
    )
    .await;
    ok(&co);
    let Some(shells_result::Result::Console(got)) = co
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .and_then(|s| s.result.clone())
    else {
        panic!("no console output: {co:?}")
    };
    let theirs = a
        .ec2
        .get_console_output()
        .instance_id(&id)
        .send()
        .await
        .unwrap();
    let decoded = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            theirs.output().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(!decoded.is_empty());
    assert_eq!(got.output, decoded);
    assert_eq!(got.instance_id, id);
    assert!(!got.truncated);

    ok(&run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    assert_eq!(tagged_resources(&a.ec2, sb).await, Vec::<String>::new());
    // CreateTags, RevokeSecurityGroupIngress and ModifyNetworkInterfaceAttribute are audited
    // with the resources they touched; the policy allows every call.
    crate::shells::check_audit_and_policy(&a, sb, std::slice::from_ref(&id)).await;
    let out = std::process::Command::new(crate::bins().server)
        .args(["audit", "--sandbox", sb, "--json", "--server"])
        .arg(a.env.server.url())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for (op, res) in [
        ("CreateTags", id.as_str()),
        ("RevokeSecurityGroupIngress", ports_id.as_str()),
        ("ModifyNetworkInterfaceAttribute", owned[2].as_str()),
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("\"operation\":\"{op}\"")) && l.contains(res)),
            "{op} not audited with {res}"
        );
    }
}

/// The emulator's snapshots with tag `key`=`value`: id -> tags.
async fn snapshots_tagged(
    a: &Aws,
    key: &str,
    value: &str,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let r = a
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{key}"))
                .values(value)
                .build(),
        )
        .send()
        .await
        .unwrap();
    r.snapshots()
        .iter()
        .map(|s| {
            (
                s.snapshot_id().unwrap().to_owned(),
                s.tags()
                    .iter()
                    .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
                    .collect(),
            )
        })
        .collect()
}

fn snapshots_of(j: &Job) -> Vec<SnapshotInfo> {
    match j
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .and_then(|s| s.result.clone())
    {
        Some(shells_result::Result::Snapshots(l)) => l.snapshots,
        other => panic!("not a snapshot list: {other:?} {j:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_images_kept_sets_and_cleanup() {
    let (a, _seen) = setup_recording().await;
    let sb = "sb-snap";
    ok(&run(
        &a,
        sb,
        job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
            key_type: "none".into(),
            amis: vec![],
            mode: NetworkMode::Single as i32,
            vpc_cidr: String::new(),
            subnets: vec![subnet("app", "10.0.151.0/24", false)],
            management: Some(a.mgmt.clone()),
            shared: None,
        }),
    )
    .await);
    let mut web = app("web", &["app"]);
    web.data_volumes = vec![DataVolume {
        device_name: "/dev/sdf".into(),
        size_gb: 10,
        ..Default::default()
    }];
    let id = deploy_one(&a, sb, web).await;
    let snap = |name: &str, image: bool, keep: bool| {
        job_spec::Kind::Snapshot(Snapshot {
            app: "web".into(),
            name: name.into(),
            image,
            keep,
        })
    };

    // A set: one snapshot per volume, complete, tagged with the sandbox, app, set and device.
    let j = run(&a, sb, snap("before", false, false)).await;
    ok(&j);
    let got = snapshots_of(&j);
    let mut devices: Vec<&str> = got.iter().map(|s| s.device.as_str()).collect();
    devices.sort();
    assert_eq!(devices, ["/dev/sdf", "/dev/xvda"]);
    assert!(got.iter().all(|s| s.state == "completed" && !s.kept));
    let in_moto = snapshots_tagged(&a, "es:snapshot", "before").await;
    assert_eq!(in_moto.len(), 2);
    for tags in in_moto.values() {
        assert_eq!(tags["ReservationId"], sb);
        assert_eq!(tags["AppName"], "web");
        assert!(tags.contains_key("es:device"));
    }
    // The same set again makes nothing new.
    let again = run(&a, sb, snap("before", false, false)).await;
    ok(&again);
    let calls = &again
        .result
        .as_ref()
        .unwrap()
        .shells
        .as_ref()
        .unwrap()
        .api_calls;
    assert_eq!(calls.get("CreateSnapshot"), None, "{calls:?}");
    assert_eq!(snapshots_tagged(&a, "es:snapshot", "before").await.len(), 2);

    // An image: moto's CreateImage fails on the snapshot tags the agent sends (AWS takes them;
    // the request is checked on recorded answers in the agent's unit tests). The image here is
    // made with the test's own SDK, tagged as the agent tags it, for the list and the cleanup.
    let golden = a
        .ec2
        .create_image()
        .instance_id(&id)
        .name(format!("{sb}-web-golden"))
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Image)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("ReservationId")
                        .value(sb)
                        .build(),
                )
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("AppName")
                        .value("web")
                        .build(),
                )
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("es:snapshot")
                        .value("golden")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    // A kept set (no ReservationId: it outlives the sandbox).
    let kept = run(&a, sb, snap("kept", false, true)).await;
    ok(&kept);
    let kept_ids = snapshots_tagged(&a, "es:kept-from", sb).await;
    assert_eq!(kept_ids.len(), 2);
    assert!(kept_ids.values().all(|t| !t.contains_key("ReservationId")));

    // The list holds all of them (kept ones too).
    let list = run(
        &a,
        sb,
        job_spec::Kind::ListSnapshots(ListSnapshots { apps: vec![] }),
    )
    .await;
    ok(&list);
    let listed = snapshots_of(&list);
    let sets: std::collections::BTreeSet<(&str, &str)> = listed
        .iter()
        .map(|s| (s.name.as_str(), s.kind.as_str()))
        .collect();
    assert!(sets.contains(&("before", "snapshot")));
    assert!(sets.contains(&("golden", "image")));
    assert!(listed.iter().any(|s| s.id == golden));
    assert!(sets.contains(&("kept", "snapshot")));
    assert_eq!(listed.iter().filter(|s| s.kept).count(), 2);

    // Restore: an unknown set is named before anything is called; the emulator has no
    // CreateReplaceRootVolumeTask (that adapter is tested on recorded answers in the agent's
    // unit tests), so the job fails naming the call and the instance is untouched.
    let j = run(
        &a,
        sb,
        job_spec::Kind::RestoreSnapshot(RestoreSnapshot {
            app: "web".into(),
            name: "nope".into(),
        }),
    )
    .await;
    assert_eq!(j.state, JobState::Failed as i32);
    let err = j.result.unwrap().error;
    assert!(
        err.contains("spec.restore_snapshot.name") && err.contains("before"),
        "{err}"
    );
    let j = run(
        &a,
        sb,
        job_spec::Kind::RestoreSnapshot(RestoreSnapshot {
            app: "web".into(),
            name: "before".into(),
        }),
    )
    .await;
    assert_eq!(j.state, JobState::Failed as i32);
    let err = j.result.unwrap().error;
    assert!(err.contains("CreateReplaceRootVolumeTask"), "{err}");
    assert_eq!(
        instance(&a, &id)
            .await
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str()),
        Some("running")
    );

    // Cleanup: the image, then the sandbox's snapshots; kept ones stay. A second cleanup finds
    // nothing.
    let down = run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await;
    ok(&down);
    assert_eq!(tagged_resources(&a.ec2, sb).await, Vec::<String>::new());
    assert_eq!(snapshots_tagged(&a, "es:kept-from", sb).await, kept_ids);
    let second = run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await;
    ok(&second);
    assert_eq!(second.result.unwrap().output, "nothing to delete");
    crate::shells::check_audit_and_policy(&a, sb, std::slice::from_ref(&id)).await;
    for k in kept_ids.keys() {
        a.ec2.delete_snapshot().snapshot_id(k).send().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_apps_run_on_spot_and_fall_back_to_on_demand_when_refused() {
    // EC2 refuses spot for the app "fallback" (as it does when the price is below the market's),
    // through the proxy; moto grants it for the others.
    let refused = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let hook = {
        let refused = refused.clone();
        ec2proxy::Hook(Arc::new(move |_head: &str, body: &[u8]| {
            let body = String::from_utf8_lossy(body);
            let p = params(&body);
            let spot_for_fallback = p.get("Action").map(String::as_str) == Some("RunInstances")
                && p.keys().any(|k| k.starts_with("InstanceMarketOptions"))
                && p.values().any(|v| v == "fallback");
            spot_for_fallback.then(|| {
                refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                ec2proxy::ec2_error(
                    "400 Bad Request",
                    "SpotMaxPriceTooLow",
                    "Your Spot request price of 0.001 is lower than the minimum required Spot request fulfillment price of 0.0035.",
                )
            })
        }))
    };
    let a = setup_with(ec2proxy::ProxyConfig {
        hook: Some(hook),
        ..Default::default()
    })
    .await;
    let sb = "sb-spot";
    network(&a, sb, 161).await;
    let mut cheap = app("cheap", &["app"]);
    cheap.spot = true;
    cheap.spot_max_price = "0.05".into();
    let mut fallback = app("fallback", &["app"]);
    fallback.spot = true;
    fallback.spot_max_price = "0.001".into();
    let j = run(
        &a,
        sb,
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps: vec![cheap, fallback, app("plain", &["app"])],
        }),
    )
    .await;
    ok(&j);
    let got: BTreeMap<String, String> = apps_of(&j)
        .into_iter()
        .map(|r| (r.name, r.lifecycle))
        .collect();
    assert_eq!(
        got,
        [
            ("cheap".to_owned(), "spot".to_owned()),
            ("fallback".to_owned(), "on-demand".to_owned()),
            ("plain".to_owned(), "on-demand".to_owned()),
        ]
        .into()
    );
    assert_eq!(
        refused.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "refused once, not retried"
    );
    // Read back from the emulator: the spot app is a spot instance, the others are not.
    let r = a
        .ec2
        .describe_instances()
        .filters(sandbox_tag_filter(sb))
        .send()
        .await
        .unwrap();
    for i in r.reservations().iter().flat_map(|r| r.instances()) {
        let app = i
            .tags()
            .iter()
            .find(|t| t.key() == Some("AppName"))
            .and_then(|t| t.value())
            .unwrap();
        let spot = i.instance_lifecycle().map(|l| l.as_str()) == Some("spot");
        assert_eq!(spot, app == "cheap", "{app}");
    }
    // The fallback is said in the job's log.
    let mut c = a.env.server.client().await;
    let evs = format!("{:?}", job_events(&mut c, &j.id).await);
    assert!(
        evs.contains(
            "app fallback: spot capacity refused (SpotMaxPriceTooLow); launching on demand"
        ),
        "{evs}"
    );
    // A spot price of 0 is refused at submission.
    let mut zero = app("zero", &["app"]);
    zero.spot = true;
    zero.spot_max_price = "0".into();
    let err = c
        .submit(shells_req(
            sb,
            job_spec::Kind::DeployApp(DeployApp {
                recipient: vec![],
                app: Some(zero),
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("spec.deploy_app.app.spot_max_price"),
        "{}",
        err.message()
    );
    ok(&run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    assert_eq!(tagged_resources(&a.ec2, sb).await, Vec::<String>::new());
}

/// A one-connection-at-a-time HTTP server on 127.0.0.1 for user-data URLs: path -> (status,
/// body). Stops with the test (its task is aborted on drop of the runtime).
async fn serve_files(files: BTreeMap<&'static str, (u16, Vec<u8>)>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let (status, body) = files
                .get(path.as_str())
                .cloned()
                .unwrap_or((404, b"no".to_vec()));
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes()).await;
            let _ = s.write_all(&body).await;
            let _ = s.shutdown().await;
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_data_from_a_url_is_fetched_filled_in_and_checked() {
    let a = crate::shells::setup_with_env(
        ec2proxy::ProxyConfig::default(),
        &[("ES_AGENT_USER_DATA_HTTP_ALLOWED", "true")],
    )
    .await;
    let base = serve_files(
        [
            (
                "/boot.sh",
                (
                    200,
                    b"#!/bin/sh\necho {{greeting}} > /etc/motd\necho ${HOME} {{unset}}\n".to_vec(),
                ),
            ),
            ("/big.sh", (200, vec![b'#'; 20 * 1024])),
            ("/gone.sh", (404, b"not here".to_vec())),
        ]
        .into(),
    )
    .await;
    let sb = "sb-ud";
    network(&a, sb, 181).await;
    let mut web = app("web", &["app"]);
    web.user_data_url = format!("{base}/boot.sh");
    web.user_data_params = [("greeting".to_owned(), "hello from es-shells".to_owned())].into();
    let j = run(
        &a,
        sb,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(web.clone()),
        }),
    )
    .await;
    ok(&j);
    // Read back from the emulator: the fetched script, filled in.
    let id = apps_of(&j)[0].instance_id.clone();
    let attr = a
        .ec2
        .describe_instance_attribute()
        .instance_id(&id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let got = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            attr.user_data().and_then(|u| u.value()).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        got,
        "#!/bin/sh\necho hello from es-shells > /etc/motd\necho ${HOME} {{unset}}\n"
    );

    // Too big, missing, unreachable: the job fails naming the field, and nothing launches.
    let before = tagged_resources(&a.ec2, sb).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("http://127.0.0.1:{port}/boot.sh")
    };
    for (url, why) in [
        (format!("{base}/big.sh"), "16 KB"),
        (format!("{base}/gone.sh"), "404"),
        (dead, "cannot fetch"),
    ] {
        let mut other = app("other", &["app"]);
        other.user_data_url = url.clone();
        let deploy = job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(other),
        });
        fails_naming(&a, sb, deploy, "spec.deploy_app.app.user_data_url", why).await;
    }
    assert_eq!(
        tagged_resources(&a.ec2, sb).await,
        before,
        "nothing launched"
    );
    // Refused at submission: both user_data and a URL; parameters without a URL.
    let mut c = a.env.server.client().await;
    let mut both = web.clone();
    both.user_data = "#!/bin/sh\n".into();
    let mut params_only = app("p", &["app"]);
    params_only.user_data_params = [("x".to_owned(), "y".to_owned())].into();
    for (bad, field) in [
        (both, "spec.deploy_app.app.user_data_url"),
        (params_only, "spec.deploy_app.app.user_data_params"),
    ] {
        let err = c
            .submit(shells_req(
                sb,
                job_spec::Kind::DeployApp(DeployApp {
                    recipient: vec![],
                    app: Some(bad),
                }),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    ok(&run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    assert_eq!(tagged_resources(&a.ec2, sb).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_security_groups_join_the_app_in_its_vpc_only() {
    let (a, _seen) = setup_recording().await;
    let sb = "sb-static-sg";
    network(&a, sb, 191).await;
    // An operator's group in the Management VPC (where single-mode sandboxes live), opted in
    // for es-shells; and one in another VPC.
    let opted_in = aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(aws_sdk_ec2::types::ResourceType::SecurityGroup)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("es:shells-access")
                .value("true")
                .build(),
        )
        .build();
    let mine = a
        .ec2
        .create_security_group()
        .group_name("corp-monitoring")
        .description("monitoring agents")
        .vpc_id(&a.mgmt.vpc_id)
        .tag_specifications(opted_in)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_owned();
    let other_vpc = a
        .ec2
        .create_vpc()
        .cidr_block("172.31.0.0/16")
        .send()
        .await
        .unwrap()
        .vpc()
        .unwrap()
        .vpc_id()
        .unwrap()
        .to_owned();
    let foreign = a
        .ec2
        .create_security_group()
        .group_name("elsewhere")
        .description("not the sandbox's")
        .vpc_id(&other_vpc)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_owned();
    let mut web = app("web", &["app"]);
    web.security_groups = vec![mine.clone()];
    let j = run(
        &a,
        sb,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(web),
        }),
    )
    .await;
    ok(&j);
    let id = apps_of(&j)[0].instance_id.clone();
    let groups: Vec<String> = instance(&a, &id).await.network_interfaces()[0]
        .groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_owned))
        .collect();
    assert!(groups.contains(&mine), "{groups:?}");
    assert_eq!(
        groups.len(),
        2,
        "the sandbox group and the static one: {groups:?}"
    );
    for (g, why) in [
        (foreign.as_str(), "not in the sandbox's VPC"),
        ("sg-0123456789abcdef0", "no security group"),
    ] {
        let mut x = app("x", &["app"]);
        x.security_groups = vec![g.to_owned()];
        let deploy = job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps: vec![x],
        });
        let field = "spec.deploy_sandbox.apps[0].security_groups[0]";
        fails_naming(&a, sb, deploy, field, why).await;
    }
    ok(&run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    assert_eq!(tagged_resources(&a.ec2, sb).await, Vec::<String>::new());
    // The operator's group is theirs: it stays.
    let still = a
        .ec2
        .describe_security_groups()
        .group_ids(&mine)
        .send()
        .await
        .unwrap();
    assert_eq!(still.security_groups().len(), 1);
}
