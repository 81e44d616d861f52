//! CleanupSandbox and SweepOrphans: find every resource by its `ReservationId` tag (never from
//! memory) and, in dedicated mode, everything inside the sandbox's own VPC, tagged or not; delete
//! it all as a dependency graph: each kind of `es_proto::resources::EC2_KINDS` starts as soon as
//! the kinds in its `after` are done, independent kinds at once, and the deletions within a kind
//! at once (at most `aws_concurrency` calls in flight across the pass).
//!
//! The longest chain: instances (terminate, wait) → network interfaces → security groups and
//! subnets → the sandbox VPC; beside it Elastic IPs, NAT gateways, endpoints, images → snapshots,
//! the key pair (its SSM parameter first), peering routes → peering, route tables, gateways.
//! How each kind is listed is in `list.rs`, deleted in `kinds.rs`, `net.rs`, `gateways.rs` and
//! `nics.rs`.
//!
//! `DependencyViolation` and `*.NotFound` right after a delete are retried with backoff; a
//! resource already gone counts as deleted; what cannot go is reported with its reason and the
//! job fails (a later cleanup finishes it). One pass: each kind is listed in full as it starts
//! (kinds freed by others' deletions, network interfaces and volumes, once those are done), so a
//! second listing would prove nothing. A second cleanup finds nothing: a quick no-op.

mod gateways;
mod kinds;
mod list;
mod net;
mod nics;
mod scope;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use aws_sdk_ec2::Client;
use es_proto::resources::{tagged_ec2_kinds, EC2_KINDS};
use es_proto::v1::{Deleted, DeletedResource};
use futures::StreamExt;

use super::ec2::tag_value;
use super::{Cx, Result, TAG_CREATED_AT, TAG_SANDBOX};

pub(crate) use net::release_address;

/// Everything of the sandbox, deleted in dependency order, in one pass: every kind is listed in
/// full (by the tag, and in dedicated mode by the VPC), so listing again afterwards would prove
/// nothing (the server runs a sandbox's es-shells jobs one at a time); what could not be deleted
/// fails the job, and the next cleanup takes it.
pub(crate) async fn cleanup(cx: &Cx<'_>) -> Result<Deleted> {
    let out = cleanup_one(cx, cx.sandbox, false).await?;
    Ok(Deleted { resources: out })
}

/// One pass: every kind lists at once and deletes as soon as the kinds it comes after are done;
/// progress names each kind that had resources, counting the kinds done so far.
async fn cleanup_one(cx: &Cx<'_>, sb: &str, dry_run: bool) -> Result<Vec<DeletedResource>> {
    let s = scope::Scope::of(cx.ec2, &cx.keys, sb, dry_run, cx.concurrency).await?;
    let s = &s;
    let total = EC2_KINDS.len() as u32;
    let mut running: futures::stream::FuturesUnordered<_> = EC2_KINDS
        .iter()
        .map(|k| async move {
            let r = kinds::delete(s, k.kind).await;
            // Done only once what it comes after is (a kind with nothing to delete returns at
            // once): so "after" holds through it.
            s.ready(k.kind).await;
            s.finish(k.kind);
            (k, r)
        })
        .collect();
    let mut out = Vec::new();
    let mut finished = 0;
    while let Some((k, got)) = running.next().await {
        let got = got?;
        finished += 1;
        if !dry_run && !got.is_empty() {
            let failed = got.iter().filter(|r| r.outcome == "failed").count();
            let mut line = format!("{}: {} deleted", k.name, got.len() - failed);
            if failed > 0 {
                line.push_str(&format!(", {failed} failed"));
            }
            cx.ctx.progress(finished, total, line);
        }
        out.extend(got);
    }
    // Reported in the table's order, whatever order the kinds finished in.
    let rank = |name: &str| EC2_KINDS.iter().position(|k| k.name == name);
    out.sort_by_key(|r| rank(&r.kind));
    Ok(out)
}

/// Sandbox ids found on any tagged kind of `EC2_KINDS`, each with the creation time (Unix
/// seconds) of its oldest resource, when any resource says (the `es:created-at` tag, or an
/// instance's launch time).
async fn tagged_sandboxes(ec2: &Client) -> Result<BTreeMap<String, Option<i64>>> {
    let f = Filter::builder()
        .name("tag-key")
        .values(TAG_SANDBOX)
        .build();
    let mut ids: BTreeMap<String, Option<i64>> = BTreeMap::new();
    for k in tagged_ec2_kinds() {
        for (tags, launched) in list::tags_of(ec2, k.kind, &f).await? {
            let Some(v) = tag_value(&tags, TAG_SANDBOX) else {
                continue;
            };
            let at = tag_value(&tags, TAG_CREATED_AT)
                .and_then(|t| t.parse::<i64>().ok())
                .or(launched);
            let e = ids.entry(v.to_owned()).or_insert(at);
            *e = match (*e, at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    Ok(ids)
}

/// What a sweep does with one sandbox it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SweepVerdict {
    Orphan,
    /// Kept, and why (shown in the result as outcome `kept`).
    Keep(String),
}

/// The sweep's decision for one sandbox: named live, too young, or of unknown age are kept.
pub(crate) fn verdict(
    sandbox: &str,
    created_at: Option<i64>,
    live: &HashSet<&str>,
    now: i64,
    min_age: Duration,
) -> SweepVerdict {
    if live.contains(sandbox) {
        return SweepVerdict::Keep("alive".into());
    }
    match created_at {
        None => SweepVerdict::Keep(format!(
            "age unknown (no {TAG_CREATED_AT} tag or launch time): delete it with CleanupSandbox if it is an orphan"
        )),
        Some(at) if now - at < min_age.as_secs() as i64 => SweepVerdict::Keep(format!(
            "younger than the minimum age of {} s (created {} s ago)",
            min_age.as_secs(),
            (now - at).max(0)
        )),
        Some(_) => SweepVerdict::Orphan,
    }
}

/// Deletes (or lists, with `dry_run`) the resources of every sandbox not in `live` and older
/// than `min_age`; every sandbox kept is reported with the reason.
pub(crate) async fn sweep(
    cx: &Cx<'_>,
    live: &[String],
    dry_run: bool,
    min_age: Duration,
) -> Result<Deleted> {
    let found = tagged_sandboxes(cx.ec2).await?;
    let live: HashSet<&str> = live.iter().map(String::as_str).collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut out = Vec::new();
    let mut orphans = Vec::new();
    for (sb, at) in &found {
        match verdict(sb, *at, &live, now, min_age) {
            SweepVerdict::Orphan => orphans.push(sb),
            // Sandboxes named live are not listed (there may be thousands); kept ones are.
            SweepVerdict::Keep(why) if why != "alive" => out.push(DeletedResource {
                kind: "sandbox".into(),
                id: sb.clone(),
                sandbox_id: sb.clone(),
                outcome: "kept".into(),
                error: why,
            }),
            SweepVerdict::Keep(_) => {}
        }
    }
    let total = orphans.len() as u32;
    for (i, sb) in orphans.into_iter().enumerate() {
        let r = if dry_run {
            cleanup_one(cx, sb, true).await?
        } else {
            cleanup_one(cx, sb, false).await?
        };
        cx.ctx.progress(
            i as u32 + 1,
            total,
            format!("orphan sandbox {sb}: {} resources", r.len()),
        );
        out.extend(r);
    }
    Ok(Deleted { resources: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_keeps_live_young_and_ageless_sandboxes() {
        let live: HashSet<&str> = ["sb-live"].into();
        let hour = Duration::from_secs(3600);
        let now = 1_000_000;
        let cases = [
            ("sb-live", Some(0), true),
            ("sb-old", Some(now - 3601), false),
            ("sb-young", Some(now - 60), true),
            ("sb-just", Some(now - 3599), true),
            ("sb-unknown", None, true),
            ("sb-future", Some(now + 60), true),
        ];
        for (sb, at, kept) in cases {
            let v = verdict(sb, at, &live, now, hour);
            assert_eq!(matches!(v, SweepVerdict::Keep(_)), kept, "{sb}: {v:?}");
        }
        assert_eq!(
            verdict("sb-old", Some(0), &live, now, Duration::ZERO),
            SweepVerdict::Orphan
        );
    }
}
