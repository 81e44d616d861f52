//! A teardown that nothing escapes: in dedicated mode the sandbox VPC is the sandbox's, so
//! whatever an operator put in it with the SDK — untagged instances, NAT gateways and their
//! Elastic IPs, endpoints, an egress-only gateway, a network ACL, interfaces (one attached to an
//! instance), a flow log, a route table, a security group referring to the sandbox's, a subnet,
//! a peering to another VPC, a transit gateway attachment with a static route — is gone after
//! CleanupSandbox, as are the sandbox-tagged DHCP options (associated with the VPC) and launch
//! template; a second cleanup finds nothing. Against moto; everything is made here as an
//! operator would, read back from the emulator after the cleanup.

use aws_sdk_ec2::types::{
    FlowLogsResourceType, NewDhcpConfiguration, ResourceType, Tag, TagSpecification, TrafficType,
    VpcEndpointType,
};
use es_proto::v1::*;
use es_tests::*;

use crate::shells::{app, check_policy, deploy_one, ok, run, setup_with, subnet};

const SB: &str = "sb-nuke";

fn sandbox_tags(rt: ResourceType) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(rt)
        .tags(Tag::builder().key("ReservationId").value(SB).build())
        .build()
}

/// What the operator made, by kind, to be looked for after the cleanup.
#[derive(Default, Debug)]
struct Made {
    instance: String,
    nat: String,
    nat_eip: String,
    endpoints: Vec<String>,
    egress_only: String,
    acl: String,
    nics: Vec<String>,
    flow_log: String,
    route_table: String,
    group: String,
    subnet: String,
    peering: String,
    tgw_attachment: String,
    dhcp: String,
    dhcp_free: String,
    launch_template: String,
}

/// Makes one of each kind inside (or, for DHCP options and a launch template, tagged with) the
/// sandbox, untagged unless said, as an operator with the SDK would.
async fn operator_makes_things(ec2: &aws_sdk_ec2::Client, net: &NetworkResult) -> Made {
    let vpc = net.vpc_id.as_str();
    let public = net.subnets.iter().find(|s| s.name == "app").unwrap();
    let private = net.subnets.iter().find(|s| s.name == "db").unwrap();
    let mut m = Made::default();

    let run = ec2
        .run_instances()
        .image_id(MOTO_AMI)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .subnet_id(&private.subnet_id)
        .send()
        .await
        .unwrap();
    m.instance = run.instances()[0].instance_id().unwrap().to_owned();

    let eip = ec2.allocate_address().send().await.unwrap();
    m.nat_eip = eip.allocation_id().unwrap().to_owned();
    let nat = ec2
        .create_nat_gateway()
        .subnet_id(&public.subnet_id)
        .allocation_id(&m.nat_eip)
        .send()
        .await
        .unwrap();
    m.nat = nat
        .nat_gateway()
        .unwrap()
        .nat_gateway_id()
        .unwrap()
        .to_owned();

    for (service, ty) in [
        ("com.amazonaws.us-east-1.s3", VpcEndpointType::Gateway),
        ("com.amazonaws.us-east-1.ssm", VpcEndpointType::Interface),
    ] {
        let mut req = ec2
            .create_vpc_endpoint()
            .vpc_id(vpc)
            .service_name(service)
            .vpc_endpoint_type(ty.clone());
        if ty == VpcEndpointType::Interface {
            req = req.subnet_ids(&private.subnet_id);
        }
        let e = req.send().await.unwrap();
        m.endpoints.push(
            e.vpc_endpoint()
                .unwrap()
                .vpc_endpoint_id()
                .unwrap()
                .to_owned(),
        );
    }

    let eigw = ec2
        .create_egress_only_internet_gateway()
        .vpc_id(vpc)
        .send()
        .await
        .unwrap();
    m.egress_only = eigw
        .egress_only_internet_gateway()
        .unwrap()
        .egress_only_internet_gateway_id()
        .unwrap()
        .to_owned();

    let acl = ec2.create_network_acl().vpc_id(vpc).send().await.unwrap();
    m.acl = acl
        .network_acl()
        .unwrap()
        .network_acl_id()
        .unwrap()
        .to_owned();

    // A free interface, and one attached to the operator's instance.
    for attach in [false, true] {
        let n = ec2
            .create_network_interface()
            .subnet_id(&private.subnet_id)
            .send()
            .await
            .unwrap();
        let id = n
            .network_interface()
            .unwrap()
            .network_interface_id()
            .unwrap()
            .to_owned();
        if attach {
            ec2.attach_network_interface()
                .network_interface_id(&id)
                .instance_id(&m.instance)
                .device_index(1)
                .send()
                .await
                .unwrap();
        }
        m.nics.push(id);
    }

    let fl = ec2
        .create_flow_logs()
        .resource_ids(vpc)
        .resource_type(FlowLogsResourceType::Vpc)
        .traffic_type(TrafficType::All)
        .log_group_name("operator-flow-logs")
        .deliver_logs_permission_arn("arn:aws:iam::123456789012:role/flow-logs")
        .send()
        .await
        .unwrap();
    m.flow_log = fl.flow_log_ids()[0].clone();

    let extra = ec2
        .create_subnet()
        .vpc_id(vpc)
        .cidr_block("10.5.9.0/24")
        .send()
        .await
        .unwrap();
    m.subnet = extra.subnet().unwrap().subnet_id().unwrap().to_owned();
    let rt = ec2.create_route_table().vpc_id(vpc).send().await.unwrap();
    m.route_table = rt
        .route_table()
        .unwrap()
        .route_table_id()
        .unwrap()
        .to_owned();
    ec2.associate_route_table()
        .route_table_id(&m.route_table)
        .subnet_id(&m.subnet)
        .send()
        .await
        .unwrap();

    let g = ec2
        .create_security_group()
        .vpc_id(vpc)
        .group_name("operator-group")
        .description("made by hand")
        .send()
        .await
        .unwrap();
    m.group = g.group_id().unwrap().to_owned();
    // The sandbox's group refers to the operator's one: neither goes unless that goes first.
    let pair = aws_sdk_ec2::types::UserIdGroupPair::builder()
        .group_id(&m.group)
        .build();
    ec2.authorize_security_group_ingress()
        .group_id(&net.sandbox_security_group_id)
        .ip_permissions(
            aws_sdk_ec2::types::IpPermission::builder()
                .ip_protocol("-1")
                .user_id_group_pairs(pair)
                .build(),
        )
        .send()
        .await
        .unwrap();

    let other = ec2
        .create_vpc()
        .cidr_block("10.77.0.0/16")
        .send()
        .await
        .unwrap();
    let other = other.vpc().unwrap().vpc_id().unwrap().to_owned();
    let pcx = ec2
        .create_vpc_peering_connection()
        .vpc_id(vpc)
        .peer_vpc_id(&other)
        .send()
        .await
        .unwrap();
    m.peering = pcx
        .vpc_peering_connection()
        .unwrap()
        .vpc_peering_connection_id()
        .unwrap()
        .to_owned();

    let tgw = ec2.create_transit_gateway().send().await.unwrap();
    let tgw = tgw
        .transit_gateway()
        .unwrap()
        .transit_gateway_id()
        .unwrap()
        .to_owned();
    let att = ec2
        .create_transit_gateway_vpc_attachment()
        .transit_gateway_id(&tgw)
        .vpc_id(vpc)
        .subnet_ids(&private.subnet_id)
        .send()
        .await
        .unwrap();
    m.tgw_attachment = att
        .transit_gateway_vpc_attachment()
        .unwrap()
        .transit_gateway_attachment_id()
        .unwrap()
        .to_owned();

    // Two tagged option sets: one in use by the sandbox VPC (it can only go after the VPC; moto
    // deletes it with the VPC, AWS does not), one in use by nothing.
    for associate in [true, false] {
        let dhcp = ec2
            .create_dhcp_options()
            .dhcp_configurations(
                NewDhcpConfiguration::builder()
                    .key("domain-name")
                    .values("sandbox.internal")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let id = dhcp
            .dhcp_options()
            .unwrap()
            .dhcp_options_id()
            .unwrap()
            .to_owned();
        // moto drops TagSpecifications on this call: tagged afterwards.
        ec2.create_tags()
            .resources(&id)
            .tags(Tag::builder().key("ReservationId").value(SB).build())
            .send()
            .await
            .unwrap();
        if associate {
            ec2.associate_dhcp_options()
                .dhcp_options_id(&id)
                .vpc_id(vpc)
                .send()
                .await
                .unwrap();
            m.dhcp = id;
        } else {
            m.dhcp_free = id;
        }
    }

    let lt = ec2
        .create_launch_template()
        .launch_template_name("sandbox-template")
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .tag_specifications(sandbox_tags(ResourceType::LaunchTemplate))
        .send()
        .await
        .unwrap();
    m.launch_template = lt
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_owned();
    m
}

/// What of `m` the emulator still has, each as "kind id (state)".
async fn still_there(ec2: &aws_sdk_ec2::Client, m: &Made) -> Vec<String> {
    let mut left = Vec::new();
    let r = ec2
        .describe_instances()
        .instance_ids(&m.instance)
        .send()
        .await
        .unwrap();
    for i in r.reservations().iter().flat_map(|r| r.instances()) {
        let state = i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned());
        if state.as_deref() != Some("terminated") {
            left.push(format!("instance {} ({state:?})", m.instance));
        }
    }
    let r = ec2
        .describe_nat_gateways()
        .nat_gateway_ids(&m.nat)
        .send()
        .await
        .unwrap();
    for n in r.nat_gateways() {
        if n.state().map(|s| s.as_str()) != Some("deleted") {
            left.push(format!("nat-gateway {} ({:?})", m.nat, n.state()));
        }
    }
    let r = ec2.describe_addresses().send().await.unwrap();
    if r.addresses()
        .iter()
        .any(|a| a.allocation_id() == Some(m.nat_eip.as_str()))
    {
        left.push(format!("elastic-ip {} of the NAT gateway", m.nat_eip));
    }
    let r = ec2.describe_vpc_endpoints().send().await.unwrap();
    for e in r.vpc_endpoints() {
        let id = e.vpc_endpoint_id().unwrap_or_default().to_owned();
        let state = e.state().map(|s| s.as_str().to_ascii_lowercase());
        if m.endpoints.contains(&id) && state.as_deref() != Some("deleted") {
            left.push(format!("vpc-endpoint {id} ({state:?})"));
        }
    }
    let r = ec2
        .describe_egress_only_internet_gateways()
        .send()
        .await
        .unwrap();
    let eigws = r.egress_only_internet_gateways();
    if eigws
        .iter()
        .any(|g| g.egress_only_internet_gateway_id() == Some(m.egress_only.as_str()))
    {
        left.push(format!("egress-only-internet-gateway {}", m.egress_only));
    }
    let r = ec2.describe_network_acls().send().await.unwrap();
    if r.network_acls()
        .iter()
        .any(|a| a.network_acl_id() == Some(m.acl.as_str()))
    {
        left.push(format!("network-acl {}", m.acl));
    }
    let r = ec2.describe_network_interfaces().send().await.unwrap();
    for n in r.network_interfaces() {
        let id = n.network_interface_id().unwrap_or_default().to_owned();
        if m.nics.contains(&id) {
            left.push(format!("network-interface {id} ({:?})", n.status()));
        }
    }
    let r = ec2.describe_flow_logs().send().await.unwrap();
    if r.flow_logs()
        .iter()
        .any(|l| l.flow_log_id() == Some(m.flow_log.as_str()))
    {
        left.push(format!("flow-log {}", m.flow_log));
    }
    let r = ec2.describe_route_tables().send().await.unwrap();
    if r.route_tables()
        .iter()
        .any(|t| t.route_table_id() == Some(m.route_table.as_str()))
    {
        left.push(format!("route-table {}", m.route_table));
    }
    let r = ec2.describe_security_groups().send().await.unwrap();
    if r.security_groups()
        .iter()
        .any(|g| g.group_id() == Some(m.group.as_str()))
    {
        left.push(format!("security-group {}", m.group));
    }
    let r = ec2.describe_subnets().send().await.unwrap();
    if r.subnets()
        .iter()
        .any(|s| s.subnet_id() == Some(m.subnet.as_str()))
    {
        left.push(format!("subnet {}", m.subnet));
    }
    let r = ec2.describe_vpc_peering_connections().send().await.unwrap();
    for p in r.vpc_peering_connections() {
        let code = p
            .status()
            .and_then(|s| s.code())
            .map(|c| c.as_str().to_owned());
        let live = !matches!(
            code.as_deref(),
            Some("deleted" | "rejected" | "failed" | "expired")
        );
        if p.vpc_peering_connection_id() == Some(m.peering.as_str()) && live {
            left.push(format!("vpc-peering-connection {} ({code:?})", m.peering));
        }
    }
    let r = ec2
        .describe_transit_gateway_vpc_attachments()
        .send()
        .await
        .unwrap();
    for a in r.transit_gateway_vpc_attachments() {
        let state = a.state().map(|s| s.as_str().to_owned());
        let live = !matches!(state.as_deref(), Some("deleted" | "deleting"));
        if a.transit_gateway_attachment_id() == Some(m.tgw_attachment.as_str()) && live {
            left.push(format!(
                "transit-gateway-attachment {} ({state:?})",
                m.tgw_attachment
            ));
        }
    }
    let r = ec2.describe_dhcp_options().send().await.unwrap();
    if r.dhcp_options()
        .iter()
        .any(|d| d.dhcp_options_id() == Some(m.dhcp.as_str()))
    {
        left.push(format!("dhcp-options {}", m.dhcp));
    }
    let r = ec2.describe_launch_templates().send().await.unwrap();
    let lts = r.launch_templates();
    if lts
        .iter()
        .any(|l| l.launch_template_id() == Some(m.launch_template.as_str()))
    {
        left.push(format!("launch-template {}", m.launch_template));
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatever_an_operator_put_in_a_sandbox_vpc_goes_with_it() {
    let a = setup_with(ec2proxy::ProxyConfig::default()).await;
    let prepare = PrepareSandboxNetwork {
        mode: NetworkMode::Dedicated as i32,
        vpc_cidr: "10.5.0.0/16".into(),
        subnets: vec![
            subnet("app", "10.5.1.0/24", true),
            subnet("db", "10.5.2.0/24", false),
        ],
        management: Some(a.mgmt.clone()),
        ..Default::default()
    };
    let prep = run(&a, SB, job_spec::Kind::PrepareNetwork(prepare)).await;
    ok(&prep);
    let net = match prep.result.unwrap().shells.unwrap().result.unwrap() {
        shells_result::Result::Network(n) => n,
        other => panic!("{other:?}"),
    };
    deploy_one(&a, SB, app("web", &["app"])).await;
    let made = operator_makes_things(&a.ec2, &net).await;
    assert!(still_there(&a.ec2, &made).await.len() >= 16, "{made:?}");

    let clean = run(&a, SB, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await;
    ok(&clean);
    let left = still_there(&a.ec2, &made).await;
    assert!(left.is_empty(), "left behind by the cleanup: {left:#?}");
    let tagged = tagged_resources(&a.ec2, SB).await;
    assert!(tagged.is_empty(), "tagged and left behind: {tagged:?}");
    // The report names what others made, by kind.
    let report = match clean.result.unwrap().shells.unwrap().result.unwrap() {
        shells_result::Result::Deleted(d) => d.resources,
        other => panic!("{other:?}"),
    };
    for (kind, id) in [
        ("nat-gateway", &made.nat),
        ("elastic-ip", &made.nat_eip),
        ("egress-only-internet-gateway", &made.egress_only),
        ("network-acl", &made.acl),
        ("flow-log", &made.flow_log),
        ("transit-gateway-attachment", &made.tgw_attachment),
        ("dhcp-options", &made.dhcp_free),
        ("launch-template", &made.launch_template),
        ("instance", &made.instance),
        ("vpc-peering-connection", &made.peering),
    ] {
        assert!(
            report
                .iter()
                .any(|r| r.kind == kind && &r.id == id && r.outcome == "deleted"),
            "{kind} {id} not reported deleted: {report:#?}"
        );
    }

    // A second cleanup finds nothing.
    let again = run(&a, SB, job_spec::Kind::CleanupSandbox(CleanupSandbox {})).await;
    ok(&again);
    assert_eq!(again.result.unwrap().output, "nothing to delete");
    check_policy(&a.ops.lock().unwrap());
}
