//! How to delete each EC2 resource kind of `es_proto::resources::EC2_KINDS`, one match arm per
//! kind (the compiler points here when a kind is added): the compute, storage and account-wide
//! kinds here, the network kinds in net.rs, network interfaces in nics.rs; listing is in
//! list.rs. Deleting goes on past failures and reports each resource.

use std::time::Duration;

use aws_sdk_ec2::Client;
use es_proto::resources::Ec2Kind;
use es_proto::v1::DeletedResource;

use crate::shells::ec2::retry_consistency;
use crate::shells::keys::delete_parameter;
use crate::shells::Result;

use super::scope::{done, Scope};
use super::{gateways, list, net, nics};

/// Deletes (or, in a dry run, lists) every resource of one kind that is the sandbox's.
pub(super) async fn delete(s: &Scope<'_>, kind: Ec2Kind) -> Result<Vec<DeletedResource>> {
    match kind {
        Ec2Kind::Instance => instances(s).await,
        Ec2Kind::Image => images(s).await,
        Ec2Kind::Snapshot => snapshots(s).await,
        Ec2Kind::KeyPair => key_pairs(s).await,
        Ec2Kind::Volume => volumes(s).await,
        Ec2Kind::LaunchTemplate => launch_templates(s).await,
        Ec2Kind::NatGateway => gateways::nat_gateways(s).await,
        Ec2Kind::ElasticIp => net::addresses(s).await,
        Ec2Kind::VpcEndpoint => gateways::endpoints(s).await,
        Ec2Kind::EgressOnlyInternetGateway => gateways::egress_only_igws(s).await,
        Ec2Kind::TransitGatewayAttachment => gateways::tgw_attachments(s).await,
        Ec2Kind::FlowLog => net::flow_logs(s).await,
        Ec2Kind::NetworkInterface => nics::delete(s).await,
        Ec2Kind::PeeringRoute => net::peering_routes(s).await,
        Ec2Kind::VpcPeering => net::peerings(s).await,
        Ec2Kind::SecurityGroup => net::groups(s).await,
        Ec2Kind::Subnet => net::subnets(s).await,
        Ec2Kind::RouteTable => net::route_tables(s).await,
        Ec2Kind::InternetGateway => gateways::igws(s).await,
        Ec2Kind::NetworkAcl => net::network_acls(s).await,
        Ec2Kind::Vpc => net::vpcs(s).await,
        Ec2Kind::DhcpOptions => net::dhcp_options(s).await,
    }
}

/// Instances tagged with the sandbox or inside its VPC: terminated together, then waited for
/// (their network interfaces and groups cannot go before).
async fn instances(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let ec2 = s.ec2;
    let all = s
        .union(
            Ec2Kind::Instance,
            "vpc-id",
            |f| list::instances(ec2, f),
            |i| i.instance_id(),
        )
        .await?;
    let ids: Vec<String> = all
        .iter()
        .filter(|i| s.owns(i.tags(), &[i.vpc_id()]))
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    let kind = Ec2Kind::Instance;
    if s.dry_run || ids.is_empty() {
        return Ok(ids.iter().map(|id| s.would(kind, id)).collect());
    }
    s.ready(kind).await;
    let mut out = Vec::new();
    for chunk in ids.chunks(1000) {
        let r = ec2
            .terminate_instances()
            .set_instance_ids(Some(chunk.to_vec()))
            .send()
            .await;
        let res = done("TerminateInstances", r);
        if res.is_ok() {
            wait_terminated(ec2, chunk).await;
        }
        out.extend(chunk.iter().map(|id| s.rec(kind, id, res.clone())));
    }
    Ok(out)
}

async fn images(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let items = s
        .tagged(Ec2Kind::Image, list::images(s.ec2, s.tag.clone()))
        .await?
        .into_iter()
        .filter(|i| s.owns(i.tags(), &[]))
        .map(|i| (i.image_id().unwrap_or_default().to_owned(), ()))
        .collect();
    Ok(s.each(Ec2Kind::Image, items, |id, ()| async move {
        let r = s.ec2.deregister_image().image_id(&id).send().await;
        vec![s.rec(Ec2Kind::Image, &id, done("DeregisterImage", r))]
    })
    .await)
}

async fn snapshots(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let items = s
        .tagged(Ec2Kind::Snapshot, list::snapshots(s.ec2, s.tag.clone()))
        .await?
        .into_iter()
        .filter(|x| s.owns(x.tags(), &[]))
        .map(|x| (x.snapshot_id().unwrap_or_default().to_owned(), ()))
        .collect();
    Ok(s.each(Ec2Kind::Snapshot, items, |id, ()| async move {
        // An image deregistered a moment ago may still hold it: retried.
        let r = retry_consistency(|| s.ec2.delete_snapshot().snapshot_id(&id).send()).await;
        vec![s.rec(Ec2Kind::Snapshot, &id, done("DeleteSnapshot", r))]
    })
    .await)
}

/// The key pair, its private key's SSM parameter first: a key pair left behind still leads to it.
async fn key_pairs(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let mut out = Vec::new();
    let listed = s
        .tagged(Ec2Kind::KeyPair, list::key_pairs(s.ec2, s.tag.clone()))
        .await?;
    s.ready(Ec2Kind::KeyPair).await;
    for k in listed {
        if !s.owns(k.tags(), &[]) {
            continue;
        }
        let name = k.key_name().unwrap_or_default();
        out.extend(delete_parameter(s.keys, s.sb, s.dry_run).await?);
        out.push(if s.dry_run {
            s.would(Ec2Kind::KeyPair, name)
        } else {
            let r = s.ec2.delete_key_pair().key_name(name).send().await;
            s.rec(Ec2Kind::KeyPair, name, done("DeleteKeyPair", r))
        });
    }
    Ok(out)
}

/// Detached volumes (a root volume goes with its instance), listed once instances are gone: a
/// data volume kept on termination is detached by then.
async fn volumes(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    s.ready(Ec2Kind::Volume).await;
    let items = s
        .tagged(Ec2Kind::Volume, list::volumes(s.ec2, s.tag.clone(), true))
        .await?
        .into_iter()
        .filter(|v| s.owns(v.tags(), &[]))
        .map(|v| (v.volume_id().unwrap_or_default().to_owned(), ()))
        .collect();
    Ok(s.each(Ec2Kind::Volume, items, |id, ()| async move {
        let r = retry_consistency(|| s.ec2.delete_volume().volume_id(&id).send()).await;
        vec![s.rec(Ec2Kind::Volume, &id, done("DeleteVolume", r))]
    })
    .await)
}

async fn launch_templates(s: &Scope<'_>) -> Result<Vec<DeletedResource>> {
    let items = s
        .tagged(
            Ec2Kind::LaunchTemplate,
            list::launch_templates(s.ec2, s.tag.clone()),
        )
        .await?
        .into_iter()
        .filter(|l| s.owns(l.tags(), &[]))
        .map(|l| (l.launch_template_id().unwrap_or_default().to_owned(), ()))
        .collect();
    Ok(s.each(Ec2Kind::LaunchTemplate, items, |id, ()| async move {
        let r = s
            .ec2
            .delete_launch_template()
            .launch_template_id(&id)
            .send()
            .await;
        vec![s.rec(
            Ec2Kind::LaunchTemplate,
            &id,
            done("DeleteLaunchTemplate", r),
        )]
    })
    .await)
}

/// Waits (up to 10 minutes) until the instances are terminated: their network interfaces and
/// security groups cannot go before.
async fn wait_terminated(ec2: &Client, ids: &[String]) {
    let mut delay = Duration::from_millis(250);
    let until = tokio::time::Instant::now() + Duration::from_secs(600);
    while tokio::time::Instant::now() < until {
        let Ok(found) = crate::shells::ec2::describe_ids(ec2, ids).await else {
            return;
        };
        let all_gone = found
            .iter()
            .all(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) == Some("terminated"));
        if all_gone {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
