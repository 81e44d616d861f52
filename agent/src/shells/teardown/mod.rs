//! CleanupSandbox and SweepOrphans: find every resource by its `ReservationId` tag (never from
//! memory) and delete it kind by kind in the order of `es_proto::resources::EC2_KINDS`:
//!
//! instances (terminate, wait) → images → snapshots → the key pair (its SSM parameter first) → detached volumes → Elastic IPs → network interfaces → routes
//! through the sandbox's peering (in the Management VPC too) → peering → security groups
//! (cross-references revoked first) → subnets → route tables (associations first) → internet
//! gateway (detached first) → the sandbox VPC (dedicated mode only; shared and Management VPCs
//! carry no sandbox tag). How each kind is listed and deleted is in `kinds.rs`.
//!
//! `DependencyViolation` and `*.NotFound` right after a delete are retried with backoff; a
//! resource already gone counts as deleted. A second cleanup finds nothing: a quick no-op.

mod kinds;
mod list;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use aws_sdk_ec2::Client;
use es_proto::resources::{tagged_ec2_kinds, EC2_KINDS};
use es_proto::v1::{Deleted, DeletedResource};

use super::ec2::{sandbox_filter, tag_value};
use super::{Cx, Result, TAG_CREATED_AT, TAG_SANDBOX};

pub(crate) use kinds::release_address;

/// Everything tagged with the sandbox, deleted in dependency order.
pub(crate) async fn cleanup(cx: &Cx<'_>) -> Result<Deleted> {
    let out = cleanup_passes(cx, cx.sandbox).await?;
    Ok(Deleted { resources: out })
}

/// Passes until one finds nothing more (at most 5): a listing that pages, or a resource that
/// became visible late, is caught by the next pass. A clean sandbox costs one pass.
async fn cleanup_passes(cx: &Cx<'_>, sb: &str) -> Result<Vec<DeletedResource>> {
    let mut out = Vec::new();
    for _ in 0..5 {
        let pass = cleanup_one(cx.ec2, sb, false, cx).await?;
        let found = pass.len();
        let failed = pass.iter().any(|r| r.outcome == "failed");
        out.extend(pass);
        if found == 0 || failed {
            break;
        }
    }
    Ok(out)
}

/// One pass over every kind in deletion order; progress names each kind that had resources.
async fn cleanup_one(
    ec2: &Client,
    sb: &str,
    dry_run: bool,
    cx: &Cx<'_>,
) -> Result<Vec<DeletedResource>> {
    let f = sandbox_filter(sb);
    let mut pass = kinds::Pass::default();
    let mut out = Vec::new();
    let steps = EC2_KINDS.len() as u32;
    for (i, k) in EC2_KINDS.iter().enumerate() {
        let got = kinds::delete(ec2, &cx.keys, k.kind, sb, &f, dry_run, &mut pass).await?;
        if !dry_run && !got.is_empty() {
            let failed = got.iter().filter(|r| r.outcome == "failed").count();
            let mut line = format!("{}: {} deleted", k.name, got.len() - failed);
            if failed > 0 {
                line.push_str(&format!(", {failed} failed"));
            }
            cx.ctx.progress(i as u32 + 1, steps, line);
        }
        out.extend(got);
    }
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
            cleanup_one(cx.ec2, sb, true, cx).await?
        } else {
            cleanup_passes(cx, sb).await?
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
