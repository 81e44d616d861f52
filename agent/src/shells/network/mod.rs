//! PrepareSandboxNetwork in its three modes, as a dependency graph run concurrently. Each
//! resource is made as soon as what it needs exists:
//!
//! ```text
//! DescribeTags (anything of the   ──► VPC (create, reconcile) ──┬─► subnets
//! sandbox yet? if so, one look-up     internet gateway          ├─► security groups ─► ingress rules
//! per kind, at once); the shared/     (create, reconcile)       ├─► peering ─► accept ‖ reconcile
//! Management VPC's CIDRs; the key                               ├─► route tables ─► reconcile
//! type and images                                               └─► gateway attachment
//!                         then every route (both ways) and every subnet association at once
//! ```
//!
//! `check` does every read and refutes bad input before anything is created; `build` creates.
//! Each step looks up (in `Found`, read once) before it creates, so a second run (after a
//! crash, or on the fallback) adds only what is missing. Two concurrent runs may both create a
//! VPC, gateway, peering or route table; both then keep the one with the smallest id and the
//! loser deletes its own, so one of each remains.

mod routing;
mod steps;

use std::sync::atomic::{AtomicU32, Ordering};

use aws_sdk_ec2::types::{RouteTable, SecurityGroup, Subnet};
use es_proto::v1::{NetworkMode, NetworkResult, PrepareSandboxNetwork, SubnetResult};
use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;

use crate::shells::ec2::{aws_err, filter, sandbox_filter};
use crate::shells::{Cx, Result, TAG_SANDBOX};

use routing::*;
use steps::*;

/// What a sandbox already has, read once at the start (every kind at once, by the sandbox tag).
#[derive(Default)]
pub(super) struct Found {
    /// Nothing carries the sandbox's tag: no look-up of any kind was needed (nor is the key
    /// pair's).
    pub fresh: bool,
    pub vpcs: Vec<String>,
    pub subnets: Vec<Subnet>,
    pub groups: Vec<SecurityGroup>,
    pub route_tables: Vec<RouteTable>,
    /// Live peering connections: (id, status code), sorted.
    pub peerings: Vec<(String, String)>,
    pub igws: Vec<aws_sdk_ec2::types::InternetGateway>,
}

/// A prepare whose input has been checked against the cloud: nothing is created before it.
pub(crate) struct Checked {
    mode: NetworkMode,
    /// The existing VPC (shared and single modes); the dedicated one is made by `build`.
    vpc_id: String,
    found: Found,
}

impl Checked {
    /// Nothing carries the sandbox's tag yet (its key pair neither).
    pub fn fresh(&self) -> bool {
        self.found.fresh
    }
}

/// Parses every subnet CIDR and checks it lies inside one of `vpc_cidrs`.
fn check_subnets(p: &PrepareSandboxNetwork, vpc: &str, vpc_cidrs: &[Ipv4Net]) -> Result<()> {
    for (i, s) in p.subnets.iter().enumerate() {
        let field = format!("spec.prepare_network.subnets[{i}].cidr");
        let net: Ipv4Net = s.cidr.parse().map_err(|_| invalid(&field, "not a CIDR"))?;
        if !vpc_cidrs.iter().any(|v| v.contains(&net)) {
            let list: Vec<String> = vpc_cidrs.iter().map(|c| c.to_string()).collect();
            return Err(invalid(
                &field,
                &format!("{net} is outside VPC {vpc} ({})", list.join(", ")),
            ));
        }
    }
    Ok(())
}

/// Every read of a prepare, at once: the sandbox's existing resources and, in shared and single
/// modes, the existing VPC's CIDRs; then the input is checked against them. Creates nothing.
pub(crate) async fn check(cx: &Cx<'_>, p: &PrepareSandboxNetwork) -> Result<Checked> {
    let mode = NetworkMode::try_from(p.mode).unwrap_or_default();
    let mgmt = p.management.clone().unwrap_or_default();
    let (vpc_id, field) = match mode {
        NetworkMode::Dedicated => (String::new(), ""),
        NetworkMode::Shared => (
            p.shared.clone().unwrap_or_default().vpc_id,
            "spec.prepare_network.shared.vpc_id",
        ),
        NetworkMode::Single => (mgmt.vpc_id, "spec.prepare_network.management.vpc_id"),
        NetworkMode::Unspecified => {
            return Err(invalid("spec.prepare_network.mode", "unknown mode"))
        }
    };
    let public = p.subnets.iter().any(|s| s.public);
    let cidrs = async {
        if mode == NetworkMode::Dedicated {
            let net = p
                .vpc_cidr
                .parse::<Ipv4Net>()
                .map_err(|_| invalid("spec.prepare_network.vpc_cidr", "not a CIDR"))?;
            Ok(vec![net])
        } else {
            existing_vpc_cidrs(cx, &vpc_id, field).await
        }
    };
    let (cidrs, found) = tokio::try_join!(cidrs, lookups(cx, mode, public))?;
    check_subnets(p, if vpc_id.is_empty() { "(new)" } else { &vpc_id }, &cidrs)?;
    Ok(Checked {
        mode,
        vpc_id,
        found,
    })
}

/// The sandbox's resources of every kind a prepare makes. One DescribeTags tells whether
/// anything carries the sandbox's tag at all: a new sandbox (the usual case) needs nothing more;
/// otherwise one call per kind, all at once.
async fn lookups(cx: &Cx<'_>, mode: NetworkMode, public: bool) -> Result<Found> {
    let any = cx
        .ec2
        .describe_tags()
        .filters(filter("key", &[TAG_SANDBOX]))
        .filters(filter("value", &[cx.sandbox]))
        .max_results(5)
        .send()
        .await
        .map_err(|e| aws_err("DescribeTags", e))?;
    if any.tags().is_empty() {
        return Ok(Found {
            fresh: true,
            ..Default::default()
        });
    }
    let f = sandbox_filter(cx.sandbox);
    let dedicated = mode == NetworkMode::Dedicated;
    let subnets = async {
        let r = cx.ec2.describe_subnets().filters(f.clone()).send().await;
        Ok(r.map_err(|e| aws_err("DescribeSubnets", e))?
            .subnets()
            .to_vec())
    };
    let groups = async {
        let r = cx.ec2.describe_security_groups().filters(f.clone()).send();
        let r = r.await.map_err(|e| aws_err("DescribeSecurityGroups", e))?;
        Ok(r.security_groups().to_vec())
    };
    let route_tables = async {
        if mode == NetworkMode::Single {
            return Ok(Vec::new());
        }
        let r = cx.ec2.describe_route_tables().filters(f.clone()).send();
        let r = r.await.map_err(|e| aws_err("DescribeRouteTables", e))?;
        Ok(r.route_tables().to_vec())
    };
    let vpcs = async {
        match dedicated {
            true => sandbox_vpcs(cx).await,
            false => Ok(Vec::new()),
        }
    };
    let peerings = async {
        match dedicated {
            true => live_peerings(cx).await,
            false => Ok(Vec::new()),
        }
    };
    let igws = async {
        match dedicated && public {
            true => sandbox_igws(cx).await,
            false => Ok(Vec::new()),
        }
    };
    let (subnets, groups, route_tables, vpcs, peerings, igws) =
        tokio::try_join!(subnets, groups, route_tables, vpcs, peerings, igws)?;
    Ok(Found {
        fresh: false,
        vpcs,
        subnets,
        groups,
        route_tables,
        peerings,
        igws,
    })
}

/// Progress of a graph whose steps finish in any order: each reports the count done so far.
struct Steps<'a> {
    cx: &'a Cx<'a>,
    done: AtomicU32,
    total: u32,
}

impl Steps<'_> {
    fn done(&self, what: String) {
        let n = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        self.cx.ctx.progress(n, self.total, what);
    }
}

/// One call of the last phase: a route or a subnet association.
enum Link<'a> {
    Route(String, String, Target<'a>),
    Associate(String, String),
}

/// Creates what `check` did not find, each resource as soon as what it needs exists.
pub(crate) async fn build(
    cx: &Cx<'_>,
    p: &PrepareSandboxNetwork,
    c: Checked,
) -> Result<NetworkResult> {
    let mgmt = p.management.clone().unwrap_or_default();
    let shared = p.shared.clone().unwrap_or_default();
    let found = &c.found;
    let dedicated = c.mode == NetworkMode::Dedicated;
    let public = dedicated && p.subnets.iter().any(|s| s.public);
    let steps = Steps {
        cx,
        done: AtomicU32::new(0),
        total: match c.mode {
            NetworkMode::Dedicated => 6 + u32::from(public),
            NetworkMode::Shared => 4,
            _ => 2,
        },
    };

    // The VPC and, beside it, the internet gateway (which needs no VPC until it is attached).
    let vpc = async {
        let id = match dedicated {
            true => dedicated_vpc(cx, found, &p.vpc_cidr).await?,
            false => c.vpc_id.clone(),
        };
        if dedicated {
            steps.done(format!("vpc {id}"));
        }
        Ok(id)
    };
    let igw = async {
        match public {
            true => internet_gateway(cx, found).await.map(Some),
            false => Ok(None),
        }
    };
    let (vpc_id, igw) = tokio::try_join!(vpc, igw)?;
    let vpc_id = vpc_id.as_str();

    // Everything that needs only the VPC.
    let subnets = async {
        let s = subnets(cx, found, vpc_id, &p.subnets).await?;
        steps.done(format!("{} subnets", s.len()));
        Ok(s)
    };
    let groups = async {
        let g = security_groups(cx, found, vpc_id, &mgmt.cidr).await?;
        steps.done("security groups".into());
        Ok(g)
    };
    let pcx = async {
        if !dedicated {
            return Ok(String::new());
        }
        let id = peering(cx, found, vpc_id, &mgmt.vpc_id).await?;
        steps.done(format!("peering {id}"));
        Ok(id)
    };
    let kinds: Vec<&str> = match c.mode {
        NetworkMode::Dedicated => {
            let private = p.subnets.iter().any(|s| !s.public);
            [(public, "public"), (private, "private")]
                .into_iter()
                .filter_map(|(on, k)| on.then_some(k))
                .collect()
        }
        NetworkMode::Shared => vec!["private"],
        _ => vec![],
    };
    let tables = async {
        let t =
            futures::future::try_join_all(kinds.iter().map(|k| route_table(cx, found, vpc_id, k)))
                .await?;
        if !t.is_empty() {
            steps.done(format!("{} route tables", t.len()));
        }
        Ok(t)
    };
    let attach = async {
        if let Some(g) = &igw {
            attach_gateway(cx, g, vpc_id).await?;
            steps.done(format!("internet gateway {}", g.id));
        }
        Ok(())
    };
    let (subnets, (sandbox_sg, isolated_sg), pcx, tables, ()) =
        tokio::try_join!(subnets, groups, pcx, tables, attach)?;

    // Last: every route (both ways) and every association, at once.
    let mut links = Vec::new();
    for (kind, t) in kinds.iter().zip(&tables) {
        let target = match c.mode {
            NetworkMode::Shared => Target::TransitGateway(&shared.transit_gateway_id),
            _ => Target::Peering(&pcx),
        };
        links.push(Link::Route(t.id.clone(), mgmt.cidr.clone(), target));
        if let (true, Some(g)) = (*kind == "public", &igw) {
            let gw = Target::Gateway(&g.id);
            links.push(Link::Route(t.id.clone(), "0.0.0.0/0".into(), gw));
        }
        for s in &subnets {
            let is_public = p.subnets.iter().any(|r| r.name == s.name && r.public);
            let here = c.mode == NetworkMode::Shared || is_public == (*kind == "public");
            if here && !t.associated.contains(&s.subnet_id) {
                links.push(Link::Associate(t.id.clone(), s.subnet_id.clone()));
            }
        }
    }
    if dedicated {
        // The way back: sandbox CIDR -> peering in the Management VPC's route tables.
        for rt in &mgmt.route_table_ids {
            let back = Target::Peering(&pcx);
            links.push(Link::Route(rt.clone(), p.vpc_cidr.clone(), back));
        }
    }
    let n = links.len();
    // Built first, then run: a stream holding the closure trips the compiler's Send check.
    let calls: Vec<_> = links.into_iter().map(|l| link(cx, l)).collect();
    futures::stream::iter(calls)
        .buffer_unordered(cx.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    if !kinds.is_empty() {
        steps.done(format!("{n} routes and associations"));
    }
    Ok(NetworkResult {
        vpc_id: vpc_id.to_owned(),
        subnets,
        sandbox_security_group_id: sandbox_sg,
        isolated_security_group_id: isolated_sg,
        route_table_ids: tables.into_iter().map(|t| t.id).collect(),
        peering_connection_id: pcx,
        internet_gateway_id: igw.map(|g| g.id).unwrap_or_default(),
        ..Default::default()
    })
}

/// The subnets of `p`, made where `found` has none of that name in the VPC, all at once.
async fn subnets(
    cx: &Cx<'_>,
    found: &Found,
    vpc_id: &str,
    want: &[es_proto::v1::SubnetRequest],
) -> Result<Vec<SubnetResult>> {
    let calls: Vec<_> = want
        .iter()
        .map(|s| subnet_result(cx, found, vpc_id, s))
        .collect();
    futures::stream::iter(calls)
        .buffered(cx.concurrency.max(1))
        .try_collect()
        .await
}

async fn subnet_result(
    cx: &Cx<'_>,
    found: &Found,
    vpc_id: &str,
    s: &es_proto::v1::SubnetRequest,
) -> Result<SubnetResult> {
    Ok(SubnetResult {
        name: s.name.clone(),
        subnet_id: subnet(cx, found, vpc_id, s).await?,
        cidr: s.cidr.clone(),
    })
}

async fn link(cx: &Cx<'_>, l: Link<'_>) -> Result<()> {
    match l {
        Link::Route(rt, cidr, target) => add_route(cx, &rt, &cidr, target).await,
        Link::Associate(rt, subnet) => associate(cx, &rt, &subnet).await,
    }
}
