//! es-shells against the moto EC2 emulator (started by the test on a free loopback port):
//! each network mode end to end (prepare -> deploy 3 apps -> power off/on -> cleanup -> nothing
//! tagged with the sandbox remains), re-runs after a simulated crash, sweep, and bad input.
//!
//! moto ignores `ClientToken`: these tests do not rely on it for idempotency (the agent looks
//! apps up by tag before launching). Apps boot from an AMI of moto's bundled image list
//! (`MOTO_AMI`): the agent reads the image's root device and size before it launches.

use std::time::Duration;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use es_proto::v1::*;
use es_tests::*;

use crate::{bins, Env};

const LONG: Duration = Duration::from_secs(90);

pub(crate) struct Aws {
    pub env: Env,
    pub moto: Moto,
    pub ec2: aws_sdk_ec2::Client,
    pub agent: Proc,
    pub mgmt: ManagementNetwork,
    /// Every EC2 operation the agent reported for the jobs of this test.
    pub ops: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// What went through the (pass-through) proxy between the agent and moto: the independent
    /// count of the agent's calls. `None` where a test connects the agent otherwise.
    proxy: Option<std::sync::Arc<ec2proxy::ProxyStats>>,
}

async fn setup() -> Aws {
    setup_with(ec2proxy::ProxyConfig::default()).await
}

/// An es-server, moto, and an es-shells agent reaching moto through a proxy configured by
/// `proxy` (by default it changes nothing and counts every call).
pub(crate) async fn setup_with(proxy: ec2proxy::ProxyConfig) -> Aws {
    setup_with_env(proxy, &[]).await
}

/// As [`setup_with`], the agent also given the environment `extra` (ES_AGENT_* settings).
pub(crate) async fn setup_with_env(proxy: ec2proxy::ProxyConfig, extra: &[(&str, &str)]) -> Aws {
    let env = Env::start(&[]);
    let moto = start_moto(env.dir.path());
    let ec2 = moto.ec2().await;
    let (vpc_id, main_rt) = moto.management_vpc().await;
    let (proxy_url, stats) = ec2proxy::start(&moto.url, proxy).await;
    // The shared-VPC test's account is on the agent's allow-list of roles to assume.
    let mut spec = moto
        .agent_env_via(AgentSpec::new("es-shells", "shells").slots(4), &proxy_url)
        .env("ES_AGENT_ASSUME_ROLES", "111111111111");
    for (k, v) in extra {
        spec = spec.env(k, v);
    }
    let agent = env.agent(&spec);
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells"]).await;
    Aws {
        env,
        moto,
        ec2,
        agent,
        mgmt: ManagementNetwork {
            vpc_id,
            cidr: "10.0.0.0/16".into(),
            route_table_ids: vec![main_rt],
        },
        ops: Default::default(),
        proxy: Some(stats),
    }
}

pub(crate) fn spec(kind: job_spec::Kind) -> JobSpec {
    JobSpec {
        kind: Some(kind),
        target: None,
    }
}

pub(crate) fn shells_req(sandbox: &str, kind: job_spec::Kind) -> SubmitRequest {
    SubmitRequest {
        role: role("shells"),
        sandbox_id: sandbox.into(),
        spec: Some(spec(kind)),
        ..Default::default()
    }
}

pub(crate) async fn run(a: &Aws, sandbox: &str, kind: job_spec::Kind) -> Job {
    let mut c = a.env.server.client().await;
    let job = submit(&mut c, shells_req(sandbox, kind)).await;
    let done = wait_done(&mut c, &job.id, LONG).await;
    if let Some(s) = done.result.as_ref().and_then(|r| r.shells.as_ref()) {
        a.ops.lock().unwrap().extend(s.api_calls.keys().cloned());
    }
    done
}

/// The sandbox's instances as the emulator has them, by app name (terminated ones left out).
pub(crate) async fn emulator_instances(
    ec2: &aws_sdk_ec2::Client,
    sandbox: &str,
) -> std::collections::BTreeMap<String, aws_sdk_ec2::types::Instance> {
    let r = ec2
        .describe_instances()
        .filters(sandbox_tag_filter(sandbox))
        .send()
        .await
        .unwrap();
    r.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
        .map(|i| {
            let app = i
                .tags()
                .iter()
                .find(|t| t.key() == Some("AppName"))
                .and_then(|t| t.value())
                .unwrap_or_default()
                .to_owned();
            (app, i.clone())
        })
        .collect()
}

/// Deploys one app (DeployApp, no recipient); it must succeed. Answers its instance id.
pub(crate) async fn deploy_one(a: &Aws, sandbox: &str, app: AppSpec) -> String {
    let dep = run(
        a,
        sandbox,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(app),
        }),
    )
    .await;
    ok(&dep);
    apps_of(&dep)[0].instance_id.clone()
}

/// Runs `kind` for `sandbox`: the job must fail, its error naming `field` and saying `why`.
pub(crate) async fn fails_naming(
    a: &Aws,
    sandbox: &str,
    kind: job_spec::Kind,
    field: &str,
    why: &str,
) {
    let j = run(a, sandbox, kind).await;
    assert_eq!(j.state, JobState::Failed as i32, "{field}: {j:?}");
    let err = j.result.map(|r| r.error).unwrap_or_default();
    assert!(err.contains(field) && err.contains(why), "{field}: {err}");
}

/// Submitting `kind` for `sandbox` is refused (INVALID_ARGUMENT) naming `field`.
pub(crate) async fn refused_naming(a: &Aws, sandbox: &str, kind: job_spec::Kind, field: &str) {
    let mut c = a.env.server.client().await;
    let err = c.submit(shells_req(sandbox, kind)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains(field), "{field}: {}", err.message());
}

/// The es-shells policy allows each operation: SSM's (the sandbox's private key) as ssm:, the
/// rest as ec2:.
pub(crate) fn check_policy(ops: &std::collections::BTreeSet<String>) {
    let (ssm, ec2): (std::collections::BTreeSet<String>, _) = ops
        .iter()
        .cloned()
        .partition(|op| op.ends_with("Parameter") || op == "AddTagsToResource");
    assert_policy_allows("es-shells-policy.json", "ec2", &ec2);
    assert_policy_allows("es-shells-policy.json", "ssm", &ssm);
}

/// The sandbox's audit trail (exported with the CLI as JSON lines) names who submitted each
/// job, the agent that leased it, every mutating EC2 call with its resource ids, and the
/// outcome; and the es-shells IAM policy allows every operation the agent made.
pub(crate) async fn check_audit_and_policy(a: &Aws, sandbox: &str, instances: &[String]) {
    let ops = a.ops.lock().unwrap().clone();
    check_policy(&ops);
    // The policy check again on what the proxy saw (not what the agent says it did), and the
    // agent's report agrees with it. STS calls (assumed roles) have their own policy statement.
    if let Some(proxy) = &a.proxy {
        let seen: std::collections::BTreeSet<String> = proxy
            .calls()
            .into_keys()
            .filter(|op| !matches!(op.as_str(), "AssumeRole" | "GetCallerIdentity"))
            .collect();
        check_policy(&seen);
        assert_eq!(
            seen, ops,
            "EC2 operations seen by the proxy vs reported by the agent"
        );
    }

    let out = std::process::Command::new(bins().server)
        .args(["audit", "--sandbox", sandbox, "--json", "--server"])
        .arg(a.env.server.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let entries: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let of = |action: &str| -> Vec<&serde_json::Value> {
        entries.iter().filter(|e| e["action"] == action).collect()
    };
    let submits = of("submit");
    assert!(!submits.is_empty());
    assert!(submits
        .iter()
        .all(|e| e["actor"].as_str().unwrap().starts_with("anonymous:")));
    assert!(of("lease").iter().all(|e| e["actor"] == "agent:es-shells"));
    assert_eq!(of("result").len(), submits.len(), "one outcome per job");
    let calls = of("aws_call");
    let ids_of = |op: &str| -> Vec<String> {
        calls
            .iter()
            .filter(|e| e["detail"]["operation"] == op)
            .flat_map(|e| e["detail"]["resource_ids"].as_array().unwrap().clone())
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    for op in [
        "CreateSubnet",
        "CreateSecurityGroup",
        "RunInstances",
        "TerminateInstances",
    ] {
        assert!(!ids_of(op).is_empty(), "no audited {op}: {calls:?}");
    }
    for i in instances {
        assert!(
            ids_of("RunInstances").contains(i),
            "launch of {i} not audited"
        );
        assert!(
            ids_of("TerminateInstances").contains(i),
            "termination of {i} not audited"
        );
    }
    assert!(
        calls.iter().all(|e| !e["detail"]["operation"]
            .as_str()
            .unwrap()
            .starts_with("Describe")),
        "reads are not audited"
    );
    assert!(entries.iter().all(|e| e["sandbox_id"] == sandbox));
}

pub(crate) fn shells(j: &Job) -> &ShellsResult {
    j.result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .unwrap_or_else(|| panic!("no shells result: {j:?}"))
}

/// The sandbox's instances as the emulator has them (not as the agent reported them): app name
/// -> (state, private IPs), instances that are not terminated.
pub(crate) async fn emulator_apps(
    ec2: &aws_sdk_ec2::Client,
    sandbox: &str,
) -> std::collections::BTreeMap<String, (String, Vec<String>)> {
    let r = ec2
        .describe_instances()
        .filters(sandbox_tag_filter(sandbox))
        .send()
        .await
        .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for i in r.reservations().iter().flat_map(|r| r.instances()) {
        let state = i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default();
        if state == "terminated" {
            continue;
        }
        let app = i
            .tags()
            .iter()
            .find(|t| t.key() == Some("AppName"))
            .and_then(|t| t.value())
            .unwrap_or_default()
            .to_owned();
        let ips = i
            .network_interfaces()
            .iter()
            .flat_map(|n| n.private_ip_addresses())
            .filter_map(|p| p.private_ip_address().map(str::to_owned))
            .collect();
        out.insert(app, (state, ips));
    }
    out
}

pub(crate) fn ok(j: &Job) {
    assert_eq!(
        j.state,
        JobState::Succeeded as i32,
        "job failed: {:?}",
        j.result
    );
}

pub(crate) fn subnet(name: &str, cidr: &str, public: bool) -> SubnetRequest {
    SubnetRequest {
        name: name.into(),
        cidr: cidr.into(),
        public,
        availability_zone: String::new(),
    }
}

pub(crate) fn app(name: &str, subnets: &[&str]) -> AppSpec {
    AppSpec {
        name: name.into(),
        ami: MOTO_AMI.into(),
        instance_type: "t3.micro".into(),
        subnets: subnets.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn three_apps() -> Vec<AppSpec> {
    let mut web = app("web", &["app"]);
    web.public_ip = PublicIp::Elastic as i32;
    web.inbound = vec![PortRule {
        protocol: "tcp".into(),
        from_port: 443,
        to_port: 443,
        cidr: String::new(),
    }];
    web.root_volume_gb = 20;
    web.user_data = "#!/bin/sh\necho hello\n".into();
    web.tags.insert("Team".into(), "qa".into());
    let mut db = app("db", &["db", "app"]);
    db.isolated = true;
    let mut worker = app("worker", &["app"]);
    worker.imds_v1_allowed = true;
    worker.imds_hop_limit = 1;
    vec![web, db, worker]
}

/// What `three_apps` asked for, read back from the emulator (not from the agent's report):
/// exact counts of instances, NICs and Elastic IPs; the web app's root volume size, user data,
/// custom tag, its own group opening 443 and its Elastic IP; the isolated db app in the
/// isolated group only, with a NIC per subnet; the worker in the sandbox group.
async fn deployed_as_asked_in_the_emulator(a: &Aws, sandbox: &str, net: &NetworkResult) {
    use base64::Engine;
    let f = sandbox_tag_filter(sandbox);
    let by_app = emulator_instances(&a.ec2, sandbox).await;
    assert_eq!(
        by_app.keys().map(String::as_str).collect::<Vec<_>>(),
        ["db", "web", "worker"]
    );
    // Instance metadata: IMDSv2 only with 2 hops by default; the worker asked for v1 and 1 hop.
    for (app, i) in &by_app {
        let m = i.metadata_options().expect("metadata options");
        let want = if app == "worker" {
            ("optional", 1)
        } else {
            ("required", 2)
        };
        assert_eq!(
            (
                m.http_tokens().map(|t| t.as_str()).unwrap_or_default(),
                m.http_put_response_hop_limit().unwrap_or_default()
            ),
            want,
            "{app}: {m:?}"
        );
    }
    let nics: usize = by_app.values().map(|i| i.network_interfaces().len()).sum();
    assert_eq!(nics, 4, "web 1, db 2 (one per subnet), worker 1");
    let volumes = a
        .ec2
        .describe_volumes()
        .filters(f.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        volumes.volumes().len(),
        3,
        "one root volume per app, tagged"
    );
    // Groups are set per NIC (RunInstances with network interfaces): the union of every NIC's.
    let groups = |app: &str| -> Vec<String> {
        let mut out: Vec<String> = by_app[app]
            .network_interfaces()
            .iter()
            .flat_map(|n| n.groups())
            .chain(by_app[app].security_groups())
            .filter_map(|g| g.group_id().map(str::to_owned))
            .collect();
        out.sort();
        out.dedup();
        out
    };

    // web: root volume, user data, tag, inbound 443, Elastic IP.
    let web = &by_app["web"];
    let root = web
        .block_device_mappings()
        .iter()
        .find_map(|m| m.ebs().and_then(|e| e.volume_id()))
        .expect("web has a root volume");
    let vol = a
        .ec2
        .describe_volumes()
        .volume_ids(root)
        .send()
        .await
        .unwrap();
    assert_eq!(vol.volumes()[0].size(), Some(20), "root volume size");
    let ud = a
        .ec2
        .describe_instance_attribute()
        .instance_id(web.instance_id().unwrap())
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let ud = ud.user_data().and_then(|v| v.value()).unwrap_or_default();
    let ud = base64::engine::general_purpose::STANDARD
        .decode(ud)
        .unwrap();
    assert_eq!(String::from_utf8(ud).unwrap(), "#!/bin/sh\necho hello\n");
    assert!(
        web.tags()
            .iter()
            .any(|t| t.key() == Some("Team") && t.value() == Some("qa")),
        "custom tag: {:?}",
        web.tags()
    );
    let web_groups = groups("web");
    let sgs = a
        .ec2
        .describe_security_groups()
        .set_group_ids(Some(web_groups.clone()))
        .send()
        .await
        .unwrap();
    assert!(
        sgs.security_groups().iter().any(|g| g
            .ip_permissions()
            .iter()
            .any(|p| p.ip_protocol() == Some("tcp")
                && p.from_port() == Some(443)
                && p.to_port() == Some(443))),
        "no group of web opens tcp/443: {sgs:?}"
    );
    assert!(
        web_groups.contains(&net.sandbox_security_group_id),
        "web is in {web_groups:?}, not in the sandbox group {}",
        net.sandbox_security_group_id
    );
    let addrs = a.ec2.describe_addresses().filters(f).send().await.unwrap();
    assert_eq!(addrs.addresses().len(), 1, "one Elastic IP: web's");
    assert_eq!(addrs.addresses()[0].instance_id(), web.instance_id());

    // db isolated: only the isolated group; worker: the sandbox group.
    let db_groups = groups("db");
    assert!(
        db_groups.contains(&net.isolated_security_group_id)
            && !db_groups.contains(&net.sandbox_security_group_id),
        "db (isolated) is in {db_groups:?}"
    );
    assert!(groups("worker").contains(&net.sandbox_security_group_id));
}

pub(crate) fn apps_of(j: &Job) -> Vec<AppResult> {
    match &shells(j).result {
        Some(shells_result::Result::Apps(a)) => a.apps.clone(),
        other => panic!("not an app list: {other:?}"),
    }
}

async fn lifecycle(a: &Aws, sandbox: &str, prepare: PrepareSandboxNetwork) {
    // Prepare, twice: the second run finds everything and creates nothing.
    let first = run(a, sandbox, job_spec::Kind::PrepareNetwork(prepare.clone())).await;
    ok(&first);
    let Some(shells_result::Result::Network(net)) = shells(&first).result.clone() else {
        panic!()
    };
    assert_eq!(net.subnets.len(), 2);
    assert!(
        !net.sandbox_security_group_id.is_empty() && !net.isolated_security_group_id.is_empty()
    );
    let before = tagged_resources(&a.ec2, sandbox).await;
    // Exact counts by tag, from the emulator: what this mode must have made, no more.
    let count = |kind: &str| {
        before
            .iter()
            .filter(|r| r.starts_with(&format!("{kind} ")))
            .count()
    };
    let dedicated = prepare.mode == NetworkMode::Dedicated as i32;
    assert_eq!(
        (
            count("subnet"),
            count("security-group"),
            count("vpc"),
            count("vpc-peering-connection")
        ),
        (2, 2, dedicated as usize, dedicated as usize),
        "subnets, groups, VPC, peering after prepare: {before:?}"
    );
    let again = run(a, sandbox, job_spec::Kind::PrepareNetwork(prepare.clone())).await;
    ok(&again);
    let Some(shells_result::Result::Network(net2)) = shells(&again).result.clone() else {
        panic!()
    };
    assert_eq!(net2, net, "a re-run returns the same network");
    let mut after = tagged_resources(&a.ec2, sandbox).await;
    let mut b = before.clone();
    b.sort();
    after.sort();
    assert_eq!(after, b, "a re-run created nothing new");
    let calls = &shells(&again).api_calls;
    assert!(
        !calls.contains_key("CreateVpc") && !calls.contains_key("CreateSubnet"),
        "{calls:?}"
    );

    // Deploy three apps; all run, with private IPs; the web app has an Elastic IP.
    let deploy = run(
        a,
        sandbox,
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps: three_apps(),
        }),
    )
    .await;
    ok(&deploy);
    let apps = apps_of(&deploy);
    assert_eq!(apps.len(), 3);
    let instances: Vec<String> = apps.iter().map(|r| r.instance_id.clone()).collect();
    for r in &apps {
        assert_eq!(r.state, "running", "{r:?}");
        assert!(!r.private_ips.is_empty(), "{r:?}");
    }
    let db = apps.iter().find(|r| r.name == "db").unwrap();
    assert_eq!(db.private_ips.len(), 2, "one NIC per subnet");
    assert!(!apps
        .iter()
        .find(|r| r.name == "web")
        .unwrap()
        .public_ip
        .is_empty());
    let calls = &shells(&deploy).api_calls;
    assert_eq!(calls.get("RunInstances"), Some(&3), "{calls:?}");
    deployed_as_asked_in_the_emulator(a, sandbox, &net).await;
    // Per-app progress was reported as apps finished.
    let mut c = a.env.server.client().await;
    let mut w = c
        .watch(WatchRequest {
            job_id: deploy.id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut progress = 0;
    while let Some(ev) = w.message().await.unwrap() {
        if let Some(job_event::Event::Progress(p)) = ev.event {
            if p.message.starts_with("app ") {
                progress += 1;
            }
        }
    }
    assert_eq!(progress, 3);

    // The same deploy again (a retry): no new instance.
    let redeploy = run(
        a,
        sandbox,
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps: three_apps(),
        }),
    )
    .await;
    ok(&redeploy);
    assert_eq!(shells(&redeploy).api_calls.get("RunInstances"), None);
    let live = tagged_resources(&a.ec2, sandbox)
        .await
        .into_iter()
        .filter(|r| r.starts_with("instance "))
        .count();
    assert_eq!(live, 3);
    // The leak check below can see what it checks for: each kind this sandbox has now.
    let seen = tagged_resources(&a.ec2, sandbox).await;
    for kind in [
        "instance",
        "volume",
        "security-group",
        "subnet",
        "elastic-ip",
    ] {
        assert!(
            seen.iter().any(|r| r.starts_with(&format!("{kind} "))),
            "the leak check sees no {kind} of a deployed sandbox: {seen:?}"
        );
    }
    // moto does not apply the NIC tags RunInstances asks for: a stray tagged NIC in the
    // sandbox's subnet (as another service may leave one) shows the check sees that kind too,
    // and the cleanup below must delete it.
    let stray = a
        .ec2
        .create_network_interface()
        .subnet_id(&net.subnets[0].subnet_id)
        .tag_specifications(tagspec(ResourceType::NetworkInterface, sandbox, &[]))
        .send()
        .await
        .unwrap();
    let stray = stray
        .network_interface()
        .and_then(|n| n.network_interface_id())
        .unwrap()
        .to_owned();
    assert!(
        tagged_resources(&a.ec2, sandbox)
            .await
            .contains(&format!("network-interface {stray}")),
        "the leak check does not see a tagged network interface"
    );
    // The per-app group (web's inbound 443) is seen too: the two network groups plus it.
    assert_eq!(
        seen.iter()
            .filter(|r| r.starts_with("security-group "))
            .count(),
        3,
        "{seen:?}"
    );

    // Power off, off again (no-op), on.
    let off = run(
        a,
        sandbox,
        job_spec::Kind::Power(PowerApps {
            apps: vec![],
            on: false,
        }),
    )
    .await;
    ok(&off);
    assert!(
        apps_of(&off).iter().all(|r| r.state == "stopped"),
        "{:?}",
        apps_of(&off)
    );
    let seen = emulator_apps(&a.ec2, sandbox).await;
    assert!(
        seen.len() == 3 && seen.values().all(|(st, _)| st == "stopped"),
        "the emulator's instances after power off: {seen:?}"
    );
    let off2 = run(
        a,
        sandbox,
        job_spec::Kind::Power(PowerApps {
            apps: vec![],
            on: false,
        }),
    )
    .await;
    ok(&off2);
    assert_eq!(
        shells(&off2).api_calls.get("StopInstances"),
        None,
        "no call when already off"
    );
    let on = run(
        a,
        sandbox,
        job_spec::Kind::Power(PowerApps {
            apps: vec!["web".into(), "db".into()],
            on: true,
        }),
    )
    .await;
    ok(&on);
    assert_eq!(apps_of(&on).len(), 2);
    assert!(apps_of(&on).iter().all(|r| r.state == "running"));
    let seen = emulator_apps(&a.ec2, sandbox).await;
    let states: Vec<(&str, &str)> = seen
        .iter()
        .map(|(app, (st, _))| (app.as_str(), st.as_str()))
        .collect();
    assert_eq!(
        states,
        [("db", "running"), ("web", "running"), ("worker", "stopped")],
        "the emulator's instances after powering on web and db"
    );
    // Reboot web (an OS restart: RebootInstances, seen at the proxy), power-cycle db (off, then
    // on); both end running in the emulator, the worker stays stopped.
    let calls_of = |op: &str| {
        a.proxy
            .as_ref()
            .map(|p| p.calls().get(op).copied().unwrap_or(0))
    };
    let (stops, starts) = (calls_of("StopInstances"), calls_of("StartInstances"));
    let reboot = run(
        a,
        sandbox,
        job_spec::Kind::Reboot(RebootApps {
            apps: vec!["web".into()],
            power_cycle: false,
        }),
    )
    .await;
    ok(&reboot);
    assert_eq!(shells(&reboot).api_calls.get("RebootInstances"), Some(&1));
    let cycle = run(
        a,
        sandbox,
        job_spec::Kind::Reboot(RebootApps {
            apps: vec!["db".into()],
            power_cycle: true,
        }),
    )
    .await;
    ok(&cycle);
    assert_eq!(apps_of(&cycle)[0].state, "running");
    if a.proxy.is_some() {
        assert_eq!(
            calls_of("RebootInstances"),
            Some(1),
            "one reboot reached EC2"
        );
        assert_eq!(
            (calls_of("StopInstances"), calls_of("StartInstances")),
            (stops.map(|n| n + 1), starts.map(|n| n + 1)),
            "the power cycle stopped and started once"
        );
    }
    let after_restarts = emulator_apps(&a.ec2, sandbox).await;
    let states: Vec<(&str, &str)> = after_restarts
        .iter()
        .map(|(app, (st, _))| (app.as_str(), st.as_str()))
        .collect();
    assert_eq!(
        states,
        [("db", "running"), ("web", "running"), ("worker", "stopped")]
    );
    let ips = run(
        a,
        sandbox,
        job_spec::Kind::RefreshIp(RefreshIp {
            apps: vec!["db".into()],
        }),
    )
    .await;
    ok(&ips);
    assert_eq!(apps_of(&ips)[0].private_ips, db.private_ips);
    assert_eq!(
        apps_of(&ips)[0].private_ips,
        seen["db"].1,
        "the refreshed IPs are the emulator's"
    );
    let details = run(
        a,
        sandbox,
        job_spec::Kind::GetVmDetails(GetVmDetails { apps: vec![] }),
    )
    .await;
    ok(&details);
    assert_eq!(apps_of(&details).len(), 3);
    assert!(apps_of(&details)
        .iter()
        .all(|r| r.instance_type == "t3.micro"));

    // Delete one app, then clean up the sandbox: nothing tagged with it remains.
    let del = run(
        a,
        sandbox,
        job_spec::Kind::DeleteApp(DeleteApp {
            app: "worker".into(),
        }),
    )
    .await;
    ok(&del);
    let seen = emulator_apps(&a.ec2, sandbox).await;
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        ["db", "web"],
        "DeleteApp terminated the worker instance and only it: {seen:?}"
    );
    let clean = run(
        a,
        sandbox,
        job_spec::Kind::CleanupSandbox(CleanupSandbox {}),
    )
    .await;
    ok(&clean);
    let left = tagged_resources(&a.ec2, sandbox).await;
    assert!(left.is_empty(), "left behind: {left:?}");
    // A second cleanup is a quick no-op.
    let clean2 = run(
        a,
        sandbox,
        job_spec::Kind::CleanupSandbox(CleanupSandbox {}),
    )
    .await;
    ok(&clean2);
    assert_eq!(
        clean2.result.as_ref().unwrap().output,
        "nothing to delete",
        "{:?}",
        shells(&clean2).result
    );
    check_audit_and_policy(a, sandbox, &instances).await;
}

/// Routes to `cidr` in the Management VPC's route tables (untagged: the leak check cannot see
/// them, so every test that peers a dedicated VPC checks them itself).
async fn mgmt_routes(a: &Aws, cidr: &str) -> usize {
    let rts = a
        .ec2
        .describe_route_tables()
        .set_route_table_ids(Some(a.mgmt.route_table_ids.clone()))
        .send()
        .await
        .unwrap();
    mgmt_routes_to(&rts, cidr)
}

fn mgmt_routes_to(
    rts: &aws_sdk_ec2::operation::describe_route_tables::DescribeRouteTablesOutput,
    cidr: &str,
) -> usize {
    rts.route_tables()
        .iter()
        .flat_map(|t| t.routes())
        .filter(|r| r.destination_cidr_block() == Some(cidr))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_mode_lifecycle_leaves_nothing_behind() {
    let a = setup().await;
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Dedicated as i32,
        vpc_cidr: "10.1.0.0/16".into(),
        subnets: vec![
            subnet("app", "10.1.1.0/24", true),
            subnet("db", "10.1.2.0/24", false),
        ],
        management: Some(a.mgmt.clone()),
        shared: None,
    };
    // The route back from the Management VPC exists while the sandbox lives.
    let first = run(
        &a,
        "sb-dedicated",
        job_spec::Kind::PrepareNetwork(prepare.clone()),
    )
    .await;
    ok(&first);
    let rts = a
        .ec2
        .describe_route_tables()
        .route_table_ids(&a.mgmt.route_table_ids[0])
        .send()
        .await
        .unwrap();
    assert_eq!(mgmt_routes_to(&rts, "10.1.0.0/16"), 1);
    lifecycle(&a, "sb-dedicated", prepare).await;
    let rts = a
        .ec2
        .describe_route_tables()
        .route_table_ids(&a.mgmt.route_table_ids[0])
        .send()
        .await
        .unwrap();
    assert_eq!(
        mgmt_routes_to(&rts, "10.1.0.0/16"),
        0,
        "the Management VPC route to the sandbox is gone: {:?}",
        rts.route_tables()[0].routes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_lifecycle_leaves_nothing_behind() {
    let a = setup().await;
    let shared = a
        .ec2
        .create_vpc()
        .cidr_block("172.16.0.0/16")
        .send()
        .await
        .unwrap();
    let shared_vpc = shared.vpc().unwrap().vpc_id().unwrap().to_owned();
    let tgw = a.ec2.create_transit_gateway().send().await.unwrap();
    let tgw_id = tgw
        .transit_gateway()
        .unwrap()
        .transit_gateway_id()
        .unwrap()
        .to_owned();
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Shared as i32,
        vpc_cidr: String::new(),
        subnets: vec![
            subnet("app", "172.16.1.0/24", false),
            subnet("db", "172.16.2.0/24", false),
        ],
        management: Some(a.mgmt.clone()),
        shared: Some(SharedVpc {
            vpc_id: shared_vpc.clone(),
            transit_gateway_id: tgw_id.clone(),
        }),
    };
    let first = run(
        &a,
        "sb-shared",
        job_spec::Kind::PrepareNetwork(prepare.clone()),
    )
    .await;
    ok(&first);
    let Some(shells_result::Result::Network(net)) = shells(&first).result.clone() else {
        panic!()
    };
    assert_eq!(net.vpc_id, shared_vpc);
    let rts = a
        .ec2
        .describe_route_tables()
        .set_route_table_ids(Some(net.route_table_ids.clone()))
        .send()
        .await
        .unwrap();
    let via_tgw = rts.route_tables().iter().flat_map(|t| t.routes()).any(|r| {
        r.destination_cidr_block() == Some("10.0.0.0/16")
            && r.transit_gateway_id() == Some(tgw_id.as_str())
    });
    assert!(
        via_tgw,
        "route to the management CIDR through the transit gateway"
    );
    lifecycle(&a, "sb-shared", prepare).await;
    // The shared VPC itself stays.
    assert_eq!(
        a.ec2
            .describe_vpcs()
            .vpc_ids(&shared_vpc)
            .send()
            .await
            .unwrap()
            .vpcs()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_mode_lifecycle_leaves_nothing_behind() {
    let a = setup().await;
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Single as i32,
        vpc_cidr: String::new(),
        subnets: vec![
            subnet("app", "10.0.101.0/24", false),
            subnet("db", "10.0.102.0/24", false),
        ],
        management: Some(a.mgmt.clone()),
        shared: None,
    };
    lifecycle(&a, "sb-single", prepare).await;
    assert_eq!(
        a.ec2
            .describe_vpcs()
            .vpc_ids(&a.mgmt.vpc_id)
            .send()
            .await
            .unwrap()
            .vpcs()
            .len(),
        1,
        "the Management VPC stays"
    );
}

fn tagspec(rt: ResourceType, sandbox: &str, extra: &[(&str, &str)]) -> TagSpecification {
    let mut b = TagSpecification::builder()
        .resource_type(rt)
        .tags(Tag::builder().key("ReservationId").value(sandbox).build())
        .tags(Tag::builder().key("CreatedBy").value("es-shells").build());
    for (k, v) in extra {
        b = b.tags(Tag::builder().key(*k).value(*v).build());
    }
    b.build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_after_a_crash_mid_way_creates_no_duplicates_and_sweep_finds_orphans() {
    let a = setup().await;
    let sb = "sb-crash";
    // What a crashed first run left: the VPC and one of two subnets, tagged at creation.
    let vpc = a
        .ec2
        .create_vpc()
        .cidr_block("10.7.0.0/16")
        .tag_specifications(tagspec(
            ResourceType::Vpc,
            sb,
            &[("es:role", "sandbox-vpc")],
        ))
        .send()
        .await
        .unwrap();
    let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
    a.ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("10.7.1.0/24")
        .tag_specifications(tagspec(ResourceType::Subnet, sb, &[("es:subnet", "app")]))
        .send()
        .await
        .unwrap();
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Dedicated as i32,
        vpc_cidr: "10.7.0.0/16".into(),
        subnets: vec![
            subnet("app", "10.7.1.0/24", false),
            subnet("db", "10.7.2.0/24", false),
        ],
        management: Some(a.mgmt.clone()),
        shared: None,
    };
    let j = run(&a, sb, job_spec::Kind::PrepareNetwork(prepare)).await;
    ok(&j);
    let left = tagged_resources(&a.ec2, sb).await;
    assert_eq!(
        left.iter().filter(|r| r.starts_with("vpc ")).count(),
        1,
        "{left:?}"
    );
    assert_eq!(
        left.iter().filter(|r| r.starts_with("subnet ")).count(),
        2,
        "{left:?}"
    );
    assert_eq!(shells(&j).api_calls.get("CreateVpc"), None);
    assert_eq!(shells(&j).api_calls.get("CreateSubnet"), Some(&1));

    // A deploy that crashed after launching one of three apps: the re-run launches two.
    let deploy1 = run(
        &a,
        sb,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(app("web", &["app"])),
        }),
    )
    .await;
    ok(&deploy1);
    let apps = vec![
        app("web", &["app"]),
        app("db", &["db"]),
        app("cache", &["db"]),
    ];
    let deploy = run(
        &a,
        sb,
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps,
        }),
    )
    .await;
    ok(&deploy);
    assert_eq!(shells(&deploy).api_calls.get("RunInstances"), Some(&2));
    let instances = tagged_resources(&a.ec2, sb)
        .await
        .into_iter()
        .filter(|r| r.starts_with("instance "))
        .count();
    assert_eq!(instances, 3);

    // Sweep. Resources of sandboxes the server never ran a job for, created two hours ago:
    // sb-orphan is an orphan, sb-live is named live. sb-young (a minute old) is kept by the
    // agent's minimum age, and sb-crash by the server, which knows it is alive (it ran its
    // jobs and no cleanup). A dry run lists, a real run deletes only the orphan.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let two_hours_ago = (now - 7200).to_string();
    let a_minute_ago = (now - 60).to_string();
    for (sandbox, created) in [
        ("sb-live", &two_hours_ago),
        ("sb-orphan", &two_hours_ago),
        ("sb-young", &a_minute_ago),
    ] {
        a.ec2
            .create_security_group()
            .group_name(format!("{sandbox}-sg"))
            .description("left behind")
            .vpc_id(&a.mgmt.vpc_id)
            .tag_specifications(tagspec(
                ResourceType::SecurityGroup,
                sandbox,
                &[("es:created-at", created)],
            ))
            .send()
            .await
            .unwrap();
    }
    let sweep_kind = |dry_run| {
        job_spec::Kind::SweepOrphans(SweepOrphans {
            live_sandbox_ids: vec!["sb-live".into()],
            dry_run,
            ..Default::default()
        })
    };
    let sb_before = tagged_resources(&a.ec2, sb).await;
    let dry = run(&a, "", sweep_kind(true)).await;
    ok(&dry);
    let Some(shells_result::Result::Deleted(d)) = shells(&dry).result.clone() else {
        panic!()
    };
    let would: Vec<_> = d
        .resources
        .iter()
        .filter(|r| r.outcome == "would-delete")
        .collect();
    assert!(!would.is_empty(), "{d:?}");
    assert!(would.iter().all(|r| r.sandbox_id == "sb-orphan"), "{d:?}");
    let kept: Vec<_> = d.resources.iter().filter(|r| r.outcome == "kept").collect();
    assert_eq!(kept.len(), 1, "{d:?}");
    assert_eq!(kept[0].sandbox_id, "sb-young");
    assert!(kept[0].error.contains("younger than"), "{d:?}");
    assert!(
        !tagged_resources(&a.ec2, "sb-orphan").await.is_empty(),
        "dry run deletes nothing"
    );
    let sweep = run(&a, "", sweep_kind(false)).await;
    ok(&sweep);
    let left_over = tagged_resources(&a.ec2, "sb-orphan").await;
    assert!(left_over.is_empty(), "{left_over:?}: {:?}", shells(&sweep));
    for (sandbox, why) in [
        ("sb-live", "named live"),
        ("sb-young", "younger than the minimum age"),
    ] {
        assert_eq!(
            tagged_resources(&a.ec2, sandbox).await.len(),
            1,
            "{sandbox} is {why}: its resources stay"
        );
    }
    assert_eq!(
        tagged_resources(&a.ec2, sb).await,
        sb_before,
        "the server knows {sb} is alive: the sweep left it whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shells_input_is_refused_and_creates_nothing() {
    let a = setup().await;
    let mut c = a.env.server.client().await;
    let sb = "sb-bad";
    let good = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Dedicated as i32,
        vpc_cidr: "10.9.0.0/16".into(),
        subnets: vec![subnet("app", "10.9.1.0/24", false)],
        management: Some(a.mgmt.clone()),
        shared: None,
    };
    let cases: Vec<(job_spec::Kind, &str)> = vec![
        (
            job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
                key_type: String::new(),
                amis: vec![],
                subnets: vec![subnet("app", "10.8.1.0/24", false)],
                ..good.clone()
            }),
            "spec.prepare_network.subnets[0].cidr",
        ),
        (
            job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
                key_type: String::new(),
                amis: vec![],
                subnets: vec![
                    subnet("a", "10.9.1.0/24", false),
                    subnet("b", "10.9.1.128/25", false),
                ],
                ..good.clone()
            }),
            "spec.prepare_network.subnets[1].cidr",
        ),
        (
            job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
                key_type: String::new(),
                amis: vec![],
                mode: 9,
                ..good.clone()
            }),
            "spec.prepare_network.mode",
        ),
        (
            job_spec::Kind::DeploySandbox(DeploySandbox {
                recipient: vec![],
                apps: (0..256).map(|i| app(&format!("a{i}"), &["app"])).collect(),
            }),
            "spec.deploy_sandbox.apps",
        ),
        (
            job_spec::Kind::DeployApp(DeployApp {
                recipient: vec![],
                app: Some(AppSpec {
                    ami: String::new(),
                    ..app("web", &["app"])
                }),
            }),
            "spec.deploy_app.app.ami",
        ),
        (
            job_spec::Kind::DeployApp(DeployApp {
                recipient: vec![],
                app: Some(AppSpec {
                    imds_hop_limit: 65,
                    ..app("web", &["app"])
                }),
            }),
            "spec.deploy_app.app.imds_hop_limit",
        ),
    ];
    for (kind, field) in cases {
        let err = c.submit(shells_req(sb, kind)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    // A subnet outside an existing VPC is only known at run time: the job fails naming the
    // field, before anything is created.
    let single = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Single as i32,
        vpc_cidr: String::new(),
        subnets: vec![subnet("app", "192.168.1.0/24", false)],
        management: Some(a.mgmt.clone()),
        shared: None,
    };
    let j = run(&a, sb, job_spec::Kind::PrepareNetwork(single)).await;
    assert_eq!(j.state, JobState::Failed as i32);
    let err = j.result.unwrap().error;
    assert!(
        err.contains("spec.prepare_network.subnets[0].cidr") && err.contains("outside VPC"),
        "{err}"
    );
    // Deploying before the network exists says so.
    let j = run(
        &a,
        sb,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(app("web", &["app"])),
        }),
    )
    .await;
    assert_eq!(j.state, JobState::Failed as i32);
    assert!(j
        .result
        .unwrap()
        .error
        .contains("PrepareSandboxNetwork first"));
    assert!(
        tagged_resources(&a.ec2, sb).await.is_empty(),
        "nothing was created"
    );
    let _ = (&a.moto, bins());
}

/// An agent whose EC2 endpoint is the fault-injecting proxy in front of `moto`.
fn agent_via_proxy(env: &Env, moto: &Moto, proxy_url: &str, name: &str) -> Proc {
    env.agent(&moto.agent_env_via(AgentSpec::new(name, "shells").slots(2), proxy_url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_are_retried_and_real_errors_fail_fast() {
    let env = Env::start(&[]);
    let moto = start_moto(env.dir.path());
    let ec2 = moto.ec2().await;
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .unwrap();
    let mgmt = ManagementNetwork {
        vpc_id: vpc.vpc().unwrap().vpc_id().unwrap().to_owned(),
        cidr: "10.0.0.0/16".into(),
        route_table_ids: vec![],
    };
    // 20 % of calls throttled and 5 % answered 503 at random (8 attempts per call make a
    // failure of the whole run about 1 in 10,000).
    let (flaky, stats) = ec2proxy::start(
        &moto.url,
        ec2proxy::ProxyConfig {
            throttle_percent: 20,
            error_percent: 5,
            ..Default::default()
        },
    )
    .await;
    let _a = agent_via_proxy(&env, &moto, &flaky, "es-shells");
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells"]).await;
    let a = Aws {
        env,
        moto,
        ec2,
        agent: _a,
        mgmt: mgmt.clone(),
        ops: Default::default(),
        proxy: None,
    };
    let sb = "sb-flaky";
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Single as i32,
        vpc_cidr: String::new(),
        subnets: vec![
            subnet("app", "10.0.50.0/24", false),
            subnet("db", "10.0.51.0/24", false),
        ],
        management: Some(mgmt),
        shared: None,
    };
    let prep = run(&a, sb, job_spec::Kind::PrepareNetwork(prepare)).await;
    ok(&prep);
    let deploy = run(
        &a,
        sb,
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps: three_apps(),
        }),
    )
    .await;
    ok(&deploy);
    assert!(apps_of(&deploy).iter().all(|r| r.state == "running"));
    let clean = run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await;
    ok(&clean);
    assert!(tagged_resources(&a.ec2, sb).await.is_empty());
    // Seen from the proxy, not from the agent: calls were refused (so retried, as every job
    // succeeded), and every attempt that reached the proxy is one the agent counted in a job's
    // result (attempts, retries included), no more and no fewer.
    let refused = stats.throttled_total() + *stats.errors.lock().unwrap();
    assert!(
        stats.throttled_total() > 0,
        "the proxy throttled nothing: {:?}",
        stats.calls()
    );
    // The agent's own STS GetCallerIdentity at start goes through the proxy too; it is no
    // job's call.
    let proxied: u64 = stats
        .calls()
        .iter()
        .filter(|(op, _)| op.as_str() != "GetCallerIdentity")
        .map(|(_, n)| n)
        .sum();
    let counted: u64 = [&prep, &deploy, &clean]
        .iter()
        .map(|j| shells(j).api_calls.values().sum::<u64>())
        .sum();
    assert_eq!(
        counted,
        proxied,
        "attempts counted by the agent vs seen by the proxy ({refused} refused): {:?}",
        stats.calls()
    );
    assert!(proxied > refused, "some calls went through");

    // A real error (a quota) is not retried: the job fails at once with what to fix.
    let (failing, fstats) = ec2proxy::start(
        &a.moto.url,
        ec2proxy::ProxyConfig {
            fail: Some(("RunInstances".into(), "VcpuLimitExceeded".into())),
            ..Default::default()
        },
    )
    .await;
    let mut b = agent_via_proxy(&a.env, &a.moto, &failing, "es-shells-quota");
    // Only the quota agent may take the next job: stop the first one.
    a.agent.sigterm();
    let mut cc = a.env.server.client().await;
    wait_healthy(&mut cc, &["es-shells-quota"]).await;
    let c2 = cc.clone();
    wait_until("the first agent to leave", LONG, move || {
        let mut c = c2.clone();
        async move {
            agents(&mut c)
                .await
                .iter()
                .any(|x| x.identity.as_ref().unwrap().name == "es-shells" && !x.healthy)
        }
    })
    .await;
    let sb2 = "sb-quota";
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Single as i32,
        vpc_cidr: String::new(),
        subnets: vec![subnet("app", "10.0.60.0/24", false)],
        management: Some(a.mgmt.clone()),
        shared: None,
    };
    ok(&run(&a, sb2, job_spec::Kind::PrepareNetwork(prepare)).await);
    let j = run(
        &a,
        sb2,
        job_spec::Kind::DeployApp(DeployApp {
            recipient: vec![],
            app: Some(app("web", &["app"])),
        }),
    )
    .await;
    assert_eq!(j.state, JobState::Failed as i32);
    let err = j.result.as_ref().unwrap().error.clone();
    assert!(
        err.contains("VcpuLimitExceeded") && err.contains("quota"),
        "{err}"
    );
    assert_eq!(fstats.calls().get("RunInstances"), Some(&1), "not retried");
    ok(&run(&a, sb2, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    b.sigterm();
    let _ = b.wait_exit(Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_of_one_prepare_leave_one_network() {
    let a = setup().await;
    let sb = "sb-race";
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Dedicated as i32,
        vpc_cidr: "10.5.0.0/16".into(),
        subnets: vec![
            subnet("app", "10.5.1.0/24", true),
            subnet("db", "10.5.2.0/24", false),
        ],
        management: Some(a.mgmt.clone()),
        shared: None,
    };
    // Three submissions at once (the agent has four slots). The server runs es-shells jobs of
    // one sandbox one at a time; the agent's look-up-before-create and reconcile steps cover
    // the rest (a fenced holder still mid-call).
    let mut c = a.env.server.client().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            submit(
                &mut c,
                shells_req(sb, job_spec::Kind::PrepareNetwork(prepare.clone())),
            )
            .await
            .id,
        );
    }
    let mut vpcs = std::collections::HashSet::new();
    for id in &ids {
        let j = wait_done(&mut c, id, LONG).await;
        ok(&j);
        let Some(shells_result::Result::Network(n)) = shells(&j).result.clone() else {
            panic!()
        };
        vpcs.insert(n.vpc_id);
    }
    assert_eq!(vpcs.len(), 1, "all runs report the same VPC");
    let left = tagged_resources(&a.ec2, sb).await;
    let count = |kind: &str| {
        left.iter()
            .filter(|r| r.starts_with(&format!("{kind} ")))
            .count()
    };
    assert_eq!(
        (
            count("vpc"),
            count("subnet"),
            count("security-group"),
            count("route-table"),
            count("internet-gateway"),
            count("vpc-peering-connection")
        ),
        (1, 2, 2, 2, 1, 1),
        "{left:?}"
    );
    assert_eq!(
        mgmt_routes(&a, "10.5.0.0/16").await,
        1,
        "one route back, not two"
    );
    ok(&run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    assert!(tagged_resources(&a.ec2, sb).await.is_empty());
    assert_eq!(
        mgmt_routes(&a, "10.5.0.0/16").await,
        0,
        "the route back is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_larger_than_one_describe_page_completes_and_cleans_up() {
    let a = setup().await;
    let sb = "sb-many";
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Single as i32,
        vpc_cidr: String::new(),
        subnets: vec![subnet("app", "10.0.200.0/22", false)],
        management: Some(a.mgmt.clone()),
        shared: None,
    };
    ok(&run(&a, sb, job_spec::Kind::PrepareNetwork(prepare)).await);
    // moto pages DescribeInstances at 100 results even when ids are given.
    let apps: Vec<AppSpec> = (0..120)
        .map(|i| app(&format!("app-{i:03}"), &["app"]))
        .collect();
    let deploy = run(
        &a,
        sb,
        job_spec::Kind::DeploySandbox(DeploySandbox {
            recipient: vec![],
            apps,
        }),
    )
    .await;
    ok(&deploy);
    assert_eq!(apps_of(&deploy).len(), 120);
    assert!(apps_of(&deploy).iter().all(|r| r.state == "running"));
    let live = tagged_resources(&a.ec2, sb)
        .await
        .into_iter()
        .filter(|r| r.starts_with("instance "))
        .count();
    assert_eq!(
        live, 120,
        "one instance per app, duplicates from retried launches removed"
    );
    let calls = &shells(&deploy).api_calls;
    let total: u64 = calls.values().sum();
    // One RunInstances per app (plus any retried attempt) and a handful of lookups.
    assert!(total <= 120 + 12, "about one call per app: {calls:?}");
    ok(&run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    assert!(tagged_resources(&a.ec2, sb).await.is_empty());
}

fn with_target(kind: job_spec::Kind, target: &AwsTarget) -> SubmitRequest {
    let mut r = shells_req("sb-xacct", kind);
    r.spec.as_mut().unwrap().target = Some(target.clone());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_vpc_in_another_account_through_an_assumed_role() {
    let a = setup().await;
    let role_arn = "arn:aws:iam::111111111111:role/es-shells-shared";
    // The test's own client in the other account, through the same STS assume-role (moto keys
    // assumed-role credentials to the role's account).
    let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(&a.moto.url)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "es-tests",
        ))
        .load()
        .await;
    let provider = aws_config::sts::AssumeRoleProvider::builder(role_arn)
        .session_name("es-tests")
        .configure(&base)
        .build()
        .await;
    let other = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(&base)
            .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
                provider,
            ))
            .build(),
    );
    let vpc = other
        .create_vpc()
        .cidr_block("172.20.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
    let tgw = other.create_transit_gateway().send().await.unwrap();
    let tgw_id = tgw
        .transit_gateway()
        .unwrap()
        .transit_gateway_id()
        .unwrap()
        .to_owned();
    assert!(
        a.ec2.describe_vpcs().vpc_ids(&vpc_id).send().await.is_err(),
        "the shared VPC must not be visible from the agent's own account (moto multi-account)"
    );

    let target = AwsTarget {
        role_arn: role_arn.into(),
        external_id: String::new(),
        region: String::new(),
    };
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Shared as i32,
        vpc_cidr: String::new(),
        subnets: vec![subnet("app", "172.20.1.0/24", false)],
        management: Some(a.mgmt.clone()),
        shared: Some(SharedVpc {
            vpc_id: vpc_id.clone(),
            transit_gateway_id: tgw_id,
        }),
    };
    let mut c = a.env.server.client().await;
    let j = submit(
        &mut c,
        with_target(job_spec::Kind::PrepareNetwork(prepare), &target),
    )
    .await;
    let j = wait_done(&mut c, &j.id, LONG).await;
    ok(&j);
    let j = submit(
        &mut c,
        with_target(
            job_spec::Kind::DeployApp(DeployApp {
                recipient: vec![],
                app: Some(app("web", &["app"])),
            }),
            &target,
        ),
    )
    .await;
    ok(&wait_done(&mut c, &j.id, LONG).await);
    assert!(
        !tagged_resources(&other, "sb-xacct").await.is_empty(),
        "created in the other account"
    );
    assert!(
        tagged_resources(&a.ec2, "sb-xacct").await.is_empty(),
        "nothing in the agent's account"
    );
    let j = submit(
        &mut c,
        with_target(job_spec::Kind::CleanupSandbox(CleanupSandbox {}), &target),
    )
    .await;
    ok(&wait_done(&mut c, &j.id, LONG).await);
    assert!(tagged_resources(&other, "sb-xacct").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_cli_runs_a_blueprint_and_refuses_a_bad_one() {
    let a = setup().await;
    let bp = a.env.dir.path().join("sandbox.yaml");
    std::fs::write(
        &bp,
        format!(
            "network:\n  mode: dedicated\n  vpc_cidr: 10.3.0.0/16\n  subnets:\n    - {{ name: app, cidr: 10.3.1.0/24, public: true }}\n  management: {{ vpc_id: {}, cidr: 10.0.0.0/16, route_table_ids: [{}] }}\napps:\n  - {{ name: web, ami: {MOTO_AMI}, instance_type: t3.micro, subnets: [app], public_ip: elastic }}\n  - {{ name: db, ami: {MOTO_AMI}, instance_type: t3.micro, subnets: [app], isolated: true }}\n",
            a.mgmt.vpc_id, a.mgmt.route_table_ids[0]
        ),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(bins().server)
            .args(args)
            .env("ES_SERVER", a.env.server.url())
            .output()
            .unwrap()
    };
    let out = cli(&["sandbox", "up", bp.to_str().unwrap(), "--sandbox", "sb-cli"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("prepare_network sb-cli") && text.contains("deploy_sandbox sb-cli"),
        "{text}"
    );
    assert!(
        text.contains("] app web: running") && text.contains("] app db: running"),
        "per-app progress: {text}"
    );
    assert!(
        text.contains("APP ") && text.contains("AWS calls:"),
        "summary table: {text}"
    );
    let out = cli(&[
        "sandbox",
        "power",
        "off",
        "--sandbox",
        "sb-cli",
        "--app",
        "db",
    ]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("stopped"),
        "{out:?}"
    );
    // A power cycle of the stopped db: off (already), then on.
    let out = cli(&[
        "sandbox",
        "reboot",
        "--sandbox",
        "sb-cli",
        "--app",
        "db",
        "--cycle",
    ]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("running"),
        "{out:?}"
    );
    let out = cli(&["sandbox", "details", "--sandbox", "sb-cli", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "succeeded");
    let out = cli(&["sandbox", "down", "--sandbox", "sb-cli"]);
    assert!(out.status.success(), "{out:?}");
    assert!(tagged_resources(&a.ec2, "sb-cli").await.is_empty());

    // A misspelt key: exit 64, the key named, nothing submitted.
    std::fs::write(
        &bp,
        "apps:\n  - { name: web, ami: ami-1, instance_typ: t3.micro, subnets: [app] }\n",
    )
    .unwrap();
    let out = cli(&[
        "sandbox",
        "up",
        bp.to_str().unwrap(),
        "--sandbox",
        "sb-cli2",
    ]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("instance_typ"),
        "{out:?}"
    );
    let mut c = a.env.server.client().await;
    let jobs = c
        .list(ListRequest {
            sandbox_id: "sb-cli2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty());
}

async fn burst_through_bucket_proxy(rate_limit: bool) -> (Job, u64) {
    let env = Env::start(&[]);
    let moto = start_moto(env.dir.path());
    let (vpc_id, _) = moto.management_vpc().await;
    // EC2's default token buckets, enforced by the proxy (mutating actions: 50, +5/s). The
    // unpaced control's buckets do not refill, so what it shows does not depend on how fast a
    // loaded machine sends the burst.
    let (url, stats) = ec2proxy::start(
        &moto.url,
        ec2proxy::ProxyConfig {
            buckets: true,
            no_refill: !rate_limit,
            ..Default::default()
        },
    )
    .await;
    let mut spec = moto.agent_env_via(AgentSpec::new("es-shells", "shells").slots(2), &url);
    spec.env
        .push(("ES_AGENT_AWS_RATE_LIMIT".into(), rate_limit.to_string()));
    spec.env
        .push(("ES_AGENT_AWS_CONCURRENCY".into(), "32".into()));
    let _agent = env.agent(&spec);
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells"]).await;
    let sb = "sb-burst";
    let prepare = PrepareSandboxNetwork {
        key_type: String::new(),
        amis: vec![],
        mode: NetworkMode::Single as i32,
        vpc_cidr: String::new(),
        subnets: vec![subnet("app", "10.0.64.0/22", false)],
        management: Some(ManagementNetwork {
            vpc_id,
            cidr: "10.0.0.0/16".into(),
            route_table_ids: vec![],
        }),
        shared: None,
    };
    let j = submit(
        &mut c,
        shells_req(sb, job_spec::Kind::PrepareNetwork(prepare)),
    )
    .await;
    ok(&wait_done(&mut c, &j.id, LONG).await);
    // 70 apps with an inbound port each: 70 CreateSecurityGroup and 70 AuthorizeSecurityGroupIngress
    // in a burst, past the 50-token buckets.
    let apps: Vec<AppSpec> = (0..70)
        .map(|i| AppSpec {
            inbound: vec![PortRule {
                protocol: "tcp".into(),
                from_port: 8080,
                to_port: 8080,
                cidr: String::new(),
            }],
            ..app(&format!("svc-{i:02}"), &["app"])
        })
        .collect();
    let j = submit(
        &mut c,
        shells_req(
            sb,
            job_spec::Kind::DeploySandbox(DeploySandbox {
                recipient: vec![],
                apps,
            }),
        ),
    )
    .await;
    let done = wait_done(&mut c, &j.id, LONG).await;
    eprintln!(
        "throttled by the proxy: {:?}",
        stats.throttled.lock().unwrap()
    );
    (done, stats.throttled_total())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_wide_pacing_keeps_bursts_within_ec2_token_buckets() {
    let (paced, throttled_paced) = burst_through_bucket_proxy(true).await;
    ok(&paced);
    assert_eq!(apps_of(&paced).len(), 70);
    // The control: without pacing the same burst runs into the buckets (the job may fail: its
    // retries find no tokens either).
    let (unpaced, throttled_unpaced) = burst_through_bucket_proxy(false).await;
    // Paced, at most a stray one (the agent's and the proxy's clocks and bucket start times
    // differ slightly; seen: 0 or 1).
    assert!(throttled_paced <= 2, "paced: {throttled_paced} throttled");
    // Unpaced, the 70 CreateSecurityGroup calls of the burst meet a bucket of 50 that (in the
    // control) never refills: at least 20 are throttled however slowly the burst is sent, so
    // this control can fail (a proxy that does not throttle, or pacing applied anyway).
    let secs = (unpaced.finished_at_us - unpaced.started_at_us) as f64 / 1e6;
    eprintln!("unpaced: {throttled_unpaced} throttled in {secs:.1} s");
    assert!(
        throttled_unpaced >= 20,
        "unpaced: {throttled_unpaced} throttled in {secs:.1} s (paced: {throttled_paced}); \
         expected at least 20: the proxy's buckets did not bite without pacing"
    );
}

/// Creates a VPC straight in moto with a raw EC2 Query call (the proxy's hook is synchronous;
/// moto routes by the credential scope, and checks no signature),
/// tagged as a sandbox VPC the way the agent tags its own; answers its id.
fn create_sandbox_vpc_raw(moto_addr: &str, sandbox: &str, cidr: &str) -> String {
    use std::io::{Read, Write};
    let body = format!(
        "Action=CreateVpc&Version=2016-11-15&CidrBlock={}\
         &TagSpecification.1.ResourceType=vpc\
         &TagSpecification.1.Tag.1.Key=ReservationId&TagSpecification.1.Tag.1.Value={sandbox}\
         &TagSpecification.1.Tag.2.Key=es%3Arole&TagSpecification.1.Tag.2.Value=sandbox-vpc",
        cidr.replace('/', "%2F")
    );
    let mut s = std::net::TcpStream::connect(moto_addr).unwrap();
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: {moto_addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=testing/20261130/us-east-1/ec2/aws4_request, \
         SignedHeaders=host, Signature=0\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let id = out
        .split_once("<vpcId>")
        .and_then(|(_, r)| r.split_once("</vpcId>"))
        .map(|(id, _)| id.to_owned());
    id.unwrap_or_else(|| panic!("moto did not create the VPC: {out}"))
}

/// Two runs of one prepare racing for the sandbox VPC. The server serializes es-shells jobs of
/// a sandbox, so the race is made by hand: between the agent's lookup and its CreateVpc, the
/// proxy's hook creates a VPC of the same sandbox in moto, as a concurrent run would. The agent
/// must settle on one VPC, the smallest id, and delete its own if it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vpc_made_by_a_concurrent_run_is_reconciled_to_one() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let env = Env::start(&[]);
    let moto = start_moto(env.dir.path());
    let ec2 = moto.ec2().await;
    let (mgmt_vpc, mgmt_rt) = moto.management_vpc().await;
    let sb = "sb-race";
    let moto_addr = moto
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let theirs: Arc<Mutex<Option<String>>> = Arc::default();
    let hook = {
        let (fired, theirs) = (Arc::new(AtomicBool::new(false)), theirs.clone());
        ec2proxy::Hook(Arc::new(move |_head: &str, body: &[u8]| {
            let body = String::from_utf8_lossy(body);
            if body.contains("Action=CreateVpc") && !fired.swap(true, Ordering::SeqCst) {
                let id = create_sandbox_vpc_raw(&moto_addr, sb, "10.77.0.0/16");
                *theirs.lock().unwrap() = Some(id);
            }
            None
        }))
    };
    let (proxy_url, _stats) = ec2proxy::start(
        &moto.url,
        ec2proxy::ProxyConfig {
            hook: Some(hook),
            ..Default::default()
        },
    )
    .await;
    let agent = agent_via_proxy(&env, &moto, &proxy_url, "es-shells");
    let mut c = env.server.client().await;
    wait_healthy(&mut c, &["es-shells"]).await;
    let mgmt = ManagementNetwork {
        vpc_id: mgmt_vpc,
        cidr: "10.0.0.0/16".into(),
        route_table_ids: vec![mgmt_rt],
    };
    let a = Aws {
        env,
        moto,
        ec2,
        agent,
        mgmt: mgmt.clone(),
        ops: Default::default(),
        proxy: None,
    };
    let prep = run(
        &a,
        sb,
        job_spec::Kind::PrepareNetwork(PrepareSandboxNetwork {
            key_type: String::new(),
            amis: vec![],
            mode: NetworkMode::Dedicated as i32,
            vpc_cidr: "10.77.0.0/16".into(),
            subnets: vec![subnet("app", "10.77.1.0/24", false)],
            management: Some(mgmt),
            shared: None,
        }),
    )
    .await;
    ok(&prep);
    let theirs = theirs
        .lock()
        .unwrap()
        .clone()
        .expect("the hook made the concurrent run's VPC");
    let Some(shells_result::Result::Network(net)) = shells(&prep).result.clone() else {
        panic!("no network result")
    };
    // Seen in the emulator, not in the agent's report.
    let mut vpcs: Vec<String> = a
        .ec2
        .describe_vpcs()
        .filters(sandbox_tag_filter(sb))
        .send()
        .await
        .unwrap()
        .vpcs()
        .iter()
        .filter_map(|v| v.vpc_id().map(str::to_owned))
        .collect();
    vpcs.sort();
    if net.vpc_id == theirs {
        // The concurrent run's VPC had the smaller id: the agent deleted its own duplicate.
        assert_eq!(
            vpcs,
            std::slice::from_ref(&theirs),
            "the agent's duplicate is gone"
        );
        assert!(
            a.agent.log().contains("deleting our duplicate"),
            "{}",
            a.agent.log()
        );
    } else {
        // The agent's VPC won (the smaller id); the other run would delete its own.
        assert!(net.vpc_id < theirs, "{} vs {theirs}", net.vpc_id);
        assert_eq!(vpcs, [net.vpc_id.clone(), theirs.clone()]);
    }
    // The subnet was made in the winning VPC.
    let subnets = a
        .ec2
        .describe_subnets()
        .filters(sandbox_tag_filter(sb))
        .send()
        .await
        .unwrap();
    assert!(subnets
        .subnets()
        .iter()
        .all(|s| s.vpc_id() == Some(net.vpc_id.as_str())));
    ok(&run(&a, sb, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await);
    let left = tagged_resources(&a.ec2, sb).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}
