//! What one cleanup pass works on: the sandbox, its own VPCs (dedicated mode: everything inside
//! them goes, tagged or not), what the pass has read that several kinds need, and the bound on
//! concurrent deletions. Plus the report records every kind's deletion produces.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, Tag, VpcPeeringConnection};
use aws_sdk_ec2::Client;
use es_proto::resources::{ec2_kind, Ec2Kind, EC2_KINDS};
use es_proto::v1::DeletedResource;
use tokio::sync::{watch, OnceCell, Semaphore};

use crate::shells::ec2::{already_gone, aws_err, code, filter, sandbox_filter, tag_value};
use crate::shells::keys::KeyStore;
use crate::shells::{Result, TAG_SANDBOX};

use super::list;

/// How long a network interface managed by another AWS service (Lambda, a load balancer, an
/// endpoint being deleted) is waited for before it is reported "in use". Lambda's can take
/// 20–45 minutes: a later cleanup finishes those.
pub(super) const FOREIGN_NIC_WAIT: Duration = Duration::from_secs(120);

pub(super) struct Scope<'a> {
    pub ec2: &'a Client,
    pub keys: &'a KeyStore<'a>,
    pub sb: &'a str,
    /// The `ReservationId=<sb>` filter.
    pub tag: Filter,
    /// The sandbox's own VPCs (dedicated mode), sorted; empty in shared and single modes.
    pub vpcs: Vec<String>,
    pub dry_run: bool,
    permits: Semaphore,
    peerings: OnceCell<Vec<VpcPeeringConnection>>,
    /// Per kind, whether its deletions are done: a kind deletes once those it comes after are.
    done: HashMap<Ec2Kind, watch::Sender<bool>>,
    /// What DescribeTags found the sandbox's tag on: resource type → ids. None: not trusted
    /// (every kind is listed by tag).
    tagged: Option<HashMap<String, HashSet<String>>>,
}

impl<'a> Scope<'a> {
    /// Reads the sandbox's own VPCs and, at once, which resource types carry its tag (one
    /// DescribeTags): kinds it names none of are not listed by tag.
    pub async fn of(
        ec2: &'a Client,
        keys: &'a KeyStore<'a>,
        sb: &'a str,
        dry_run: bool,
        concurrency: usize,
    ) -> Result<Scope<'a>> {
        let tag = sandbox_filter(sb);
        let vpcs = async {
            let r = ec2.describe_vpcs().filters(tag.clone()).send().await;
            let r = r.map_err(|e| aws_err("DescribeVpcs", e))?;
            let mut vpcs: Vec<String> = r
                .vpcs()
                .iter()
                .filter(|v| tag_value(v.tags(), TAG_SANDBOX) == Some(sb))
                .filter_map(|v| v.vpc_id().map(str::to_owned))
                .collect();
            vpcs.sort();
            Ok(vpcs)
        };
        let (vpcs, types) = tokio::try_join!(vpcs, tagged_types(ec2, sb))?;
        Ok(Scope {
            ec2,
            keys,
            sb,
            tag,
            vpcs,
            dry_run,
            permits: Semaphore::new(concurrency.max(1)),
            peerings: OnceCell::new(),
            done: EC2_KINDS
                .iter()
                .map(|k| (k.kind, watch::channel(false).0))
                .collect(),
            tagged: trusted(types),
        })
    }

    /// Whether `kind` may have resources carrying the sandbox's tag (and so is listed by it).
    pub fn maybe_tagged(&self, kind: Ec2Kind) -> bool {
        self.tagged_ids(kind).is_none_or(|ids| !ids.is_empty())
    }

    /// The ids of `kind` that DescribeTags found the sandbox's tag on; None when it cannot tell.
    fn tagged_ids(&self, kind: Ec2Kind) -> Option<HashSet<&str>> {
        let names = ec2_kind(kind).tag_types;
        let found = self.tagged.as_ref().filter(|_| !names.is_empty())?;
        Some(
            names
                .iter()
                .filter_map(|n| found.get(*n))
                .flatten()
                .map(String::as_str)
                .collect(),
        )
    }

    /// Waits until every kind that `kind` comes after (`after` in the table) is done. Kinds list
    /// before they wait, so their look-ups run beside the deletions they depend on.
    pub async fn ready(&self, kind: Ec2Kind) {
        for dep in ec2_kind(kind).after {
            let mut rx = self.done[dep].subscribe();
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Marks `kind` done (its dependents may go).
    pub fn finish(&self, kind: Ec2Kind) {
        self.done[&kind].send_replace(true);
    }

    /// Whether a resource is the sandbox's: tagged with it, or inside one of its VPCs. Listings
    /// are filtered already; this is checked again because an EC2 implementation that ignores a
    /// filter (moto did, for peering connections) would otherwise hand one sandbox's cleanup
    /// another's resources.
    pub fn owns(&self, tags: &[Tag], vpcs: &[Option<&str>]) -> bool {
        tag_value(tags, TAG_SANDBOX) == Some(self.sb)
            || vpcs
                .iter()
                .flatten()
                .any(|v| self.vpcs.iter().any(|x| x == v))
    }

    /// The filter `name` = the sandbox's VPCs, when it has any.
    pub fn in_vpcs(&self, name: &str) -> Option<Filter> {
        let ids: Vec<&str> = self.vpcs.iter().map(String::as_str).collect();
        (!ids.is_empty()).then(|| filter(name, &ids))
    }

    /// Lists `kind`: in dedicated mode by `vpc_filter` = the sandbox's VPCs (what anyone put
    /// there), and by the sandbox tag too unless DescribeTags showed every tagged one of the kind
    /// inside them; otherwise by the tag when DescribeTags found it on the kind. Each resource
    /// once (by `id`).
    pub async fn union<T, F, Fut>(
        &self,
        kind: Ec2Kind,
        vpc_filter: &str,
        list: F,
        id: fn(&T) -> Option<&str>,
    ) -> Result<Vec<T>>
    where
        F: Fn(Filter) -> Fut,
        Fut: Future<Output = Result<Vec<T>>>,
    {
        let (mut all, inside) = match (self.in_vpcs(vpc_filter), self.tagged_ids(kind)) {
            (None, _) => return self.tagged(kind, list(self.tag.clone())).await,
            (Some(f), Some(ids)) => {
                let inside = list(f).await?;
                let all_inside = ids.iter().all(|i| inside.iter().any(|x| id(x) == Some(*i)));
                if all_inside {
                    return Ok(inside);
                }
                (list(self.tag.clone()).await?, inside)
            }
            (Some(f), None) => tokio::try_join!(list(self.tag.clone()), list(f))?,
        };
        for x in inside {
            if !all.iter().any(|y| id(y) == id(&x)) {
                all.push(x);
            }
        }
        Ok(all)
    }

    /// Lists `kind` by the sandbox tag, unless DescribeTags found that tag on none of its type.
    pub async fn tagged<T, Fut>(&self, kind: Ec2Kind, list: Fut) -> Result<Vec<T>>
    where
        Fut: Future<Output = Result<Vec<T>>>,
    {
        match self.maybe_tagged(kind) {
            true => list.await,
            false => Ok(Vec::new()),
        }
    }

    /// The sandbox's live peering connections (tagged, or of its VPCs), read once per pass: the
    /// routes through them and then they themselves are deleted.
    pub async fn peerings(&self) -> Result<&[VpcPeeringConnection]> {
        let all = self
            .peerings
            .get_or_try_init(|| async {
                let (tagged, req, acc) = tokio::try_join!(
                    list::peerings(
                        self.ec2,
                        self.maybe_tagged(Ec2Kind::VpcPeering)
                            .then(|| self.tag.clone())
                    ),
                    list::peerings(self.ec2, self.in_vpcs("requester-vpc-info.vpc-id")),
                    list::peerings(self.ec2, self.in_vpcs("accepter-vpc-info.vpc-id")),
                )?;
                let mut out: Vec<VpcPeeringConnection> = Vec::new();
                for p in tagged.into_iter().chain(req).chain(acc) {
                    let vpcs = [
                        p.requester_vpc_info().and_then(|v| v.vpc_id()),
                        p.accepter_vpc_info().and_then(|v| v.vpc_id()),
                    ];
                    let id = p.vpc_peering_connection_id();
                    if self.owns(p.tags(), &vpcs)
                        && !out.iter().any(|x| x.vpc_peering_connection_id() == id)
                    {
                        out.push(p);
                    }
                }
                Ok::<_, crate::shells::ShellsError>(out)
            })
            .await?;
        Ok(all)
    }

    /// Once `kind` is ready, runs `delete` on every item, at most `aws_concurrency` at once across the whole pass; in
    /// a dry run reports each as "would-delete" instead.
    pub async fn each<T, Fut>(
        &self,
        kind: Ec2Kind,
        items: Vec<(String, T)>,
        delete: impl Fn(String, T) -> Fut,
    ) -> Vec<DeletedResource>
    where
        Fut: Future<Output = Vec<DeletedResource>>,
    {
        if self.dry_run {
            return items.iter().map(|(id, _)| self.would(kind, id)).collect();
        }
        self.ready(kind).await;
        let runs = items.into_iter().map(|(id, x)| {
            let fut = delete(id, x);
            async {
                let _permit = self.permits.acquire().await;
                fut.await
            }
        });
        futures::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    pub fn rec(
        &self,
        kind: Ec2Kind,
        id: &str,
        r: std::result::Result<(), String>,
    ) -> DeletedResource {
        record(kind, id, self.sb, r)
    }

    pub fn would(&self, kind: Ec2Kind, id: &str) -> DeletedResource {
        DeletedResource {
            kind: ec2_kind(kind).name.into(),
            id: id.into(),
            sandbox_id: self.sb.into(),
            outcome: "would-delete".into(),
            error: String::new(),
        }
    }
}

/// The resources carrying the sandbox's tag, by resource type: every page of DescribeTags.
async fn tagged_types(ec2: &Client, sb: &str) -> Result<HashMap<String, HashSet<String>>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    let mut pages = ec2
        .describe_tags()
        .filters(filter("key", &[TAG_SANDBOX]))
        .filters(filter("value", &[sb]))
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        let p = p.map_err(|e| aws_err("DescribeTags", e))?;
        for t in p.tags() {
            if let (Some(ty), Some(id)) = (t.resource_type(), t.resource_id()) {
                let ids = out.entry(ty.as_str().to_owned()).or_default();
                ids.insert(id.to_owned());
            }
        }
    }
    Ok(out)
}

/// DescribeTags' answer is trusted to skip listings only when it names no type this agent does
/// not know: an unknown spelling of a known kind would otherwise hide that kind.
fn trusted(types: HashMap<String, HashSet<String>>) -> Option<HashMap<String, HashSet<String>>> {
    let known: HashSet<&str> = es_proto::resources::known_tag_types().collect();
    types
        .keys()
        .all(|t| known.contains(t.as_str()))
        .then_some(types)
}

/// The report of one deletion: "deleted", or "failed" with the reason.
pub(super) fn record(
    kind: Ec2Kind,
    id: &str,
    sandbox: &str,
    r: std::result::Result<(), String>,
) -> DeletedResource {
    let (outcome, error) = match r {
        Ok(()) => ("deleted", String::new()),
        Err(e) => ("failed", e),
    };
    DeletedResource {
        kind: ec2_kind(kind).name.into(),
        id: id.into(),
        sandbox_id: sandbox.into(),
        outcome: outcome.into(),
        error,
    }
}

/// The outcome for `id` of a batch delete (DeleteVpcEndpoints, DeleteFlowLogs) that answered
/// its failures in `Unsuccessful`: gone already is fine, as in [`done`].
pub(super) fn batch_outcome(
    unsuccessful: &[aws_sdk_ec2::types::UnsuccessfulItem],
    id: &str,
) -> std::result::Result<(), String> {
    let error = unsuccessful
        .iter()
        .find(|u| u.resource_id() == Some(id))
        .and_then(|u| u.error());
    match error {
        Some(e) if !already_gone(e.code().unwrap_or_default()) => Err(format!(
            "{}: {}",
            e.code().unwrap_or_default(),
            e.message().unwrap_or_default()
        )),
        _ => Ok(()),
    }
}

/// Maps a delete's outcome: gone already is fine.
pub(super) fn done<T, E, R>(
    op: &'static str,
    r: std::result::Result<T, aws_sdk_ec2::error::SdkError<E, R>>,
) -> std::result::Result<(), String>
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match r {
        Ok(_) => Ok(()),
        Err(e) if already_gone(&code(&e)) => Ok(()),
        Err(e) => Err(aws_err(op, e).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_tags_answers_are_trusted_only_when_every_type_is_known() {
        let set = |v: &[&str]| {
            v.iter()
                .map(|s| (s.to_string(), HashSet::from(["x".to_string()])))
                .collect::<HashMap<_, _>>()
        };
        assert!(trusted(set(&[])).is_some());
        assert!(trusted(set(&["instance", "vpc", "key-pair", "vpc-elastic-ip"])).is_some());
        assert!(trusted(set(&["instance", "elastic-ip-v2"])).is_none());
        assert!(trusted(set(&["transit-gateway-attachment"])).is_none());
    }
}
