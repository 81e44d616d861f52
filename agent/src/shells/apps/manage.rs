//! AddTags (on everything an app owns) and GetConsoleOutput (boot diagnostics).

use aws_sdk_ec2::types::Tag;
use es_proto::v1::{AppList, AppResult, ConsoleOutput};

use crate::shells::ec2::{aws_err, tag_value};
use crate::shells::{Cx, Result, ShellsError, TAG_APP};

use super::*;

/// Most console output kept in a result: the newest part.
const MAX_CONSOLE: usize = 64 * 1024;

/// The ids of everything app instance `i` owns: the instance, its EBS volumes, its network
/// interfaces (the Elastic IP is added by the caller: it is found by tag, not on the instance).
fn owned_ids(i: &aws_sdk_ec2::types::Instance) -> Vec<String> {
    i.instance_id()
        .map(str::to_owned)
        .into_iter()
        .chain(
            i.block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs().and_then(|e| e.volume_id()).map(str::to_owned)),
        )
        .chain(
            i.network_interfaces()
                .iter()
                .filter_map(|n| n.network_interface_id().map(str::to_owned)),
        )
        .collect()
}

/// Tags every resource of the named apps (all apps when none is named) in as few CreateTags
/// calls as there are thousand resources.
pub(crate) async fn add_tags(
    cx: &Cx<'_>,
    apps: &[String],
    new: &std::collections::HashMap<String, String>,
) -> Result<AppList> {
    let all = live_apps(cx, apps, "spec.add_tags.apps").await?;
    if all.is_empty() {
        return Err(ShellsError::NoNetwork(format!(
            "sandbox {} has no apps to tag",
            cx.sandbox
        )));
    }
    let mut ids = Vec::new();
    for i in &all {
        let app = tag_value(i.tags(), TAG_APP).unwrap_or_default();
        let mine = owned_ids(i);
        let eips: Vec<String> = app_addresses(cx, app)
            .await?
            .iter()
            .filter_map(|a| a.allocation_id().map(str::to_owned))
            .collect();
        cx.ctx.log(format!(
            "app {app}: {} resources (instance, {} volumes, {} network interfaces, {} Elastic IPs)",
            mine.len() + eips.len(),
            i.block_device_mappings().len(),
            i.network_interfaces().len(),
            eips.len()
        ));
        ids.extend(mine);
        ids.extend(eips);
    }
    let mut tags: Vec<Tag> = new
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    tags.sort_by(|a, b| a.key().cmp(&b.key()));
    for chunk in ids.chunks(1000) {
        cx.ec2
            .create_tags()
            .set_resources(Some(chunk.to_vec()))
            .set_tags(Some(tags.clone()))
            .send()
            .await
            .map_err(|e| aws_err("CreateTags", e))?;
    }
    cx.ctx.progress(
        1,
        1,
        format!(
            "{} tags on {} resources of {} apps",
            tags.len(),
            ids.len(),
            all.len()
        ),
    );
    let mut out: Vec<AppResult> = all.iter().map(app_result).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(AppList { apps: out })
}

/// The console output of `app`, decoded, the newest [`MAX_CONSOLE`] bytes of it.
pub(crate) async fn console_output(cx: &Cx<'_>, app: &str, latest: bool) -> Result<ConsoleOutput> {
    let found = live_apps(cx, &[app.to_owned()], "spec.console_output.app").await?;
    let Some(id) = found.first().and_then(|i| i.instance_id()) else {
        return Err(no_app(cx, "spec.console_output.app", app));
    };
    let mut req = cx.ec2.get_console_output().instance_id(id);
    if latest {
        req = req.latest(true);
    }
    let r = req
        .send()
        .await
        .map_err(|e| aws_err("GetConsoleOutput", e))?;
    let raw = r
        .output()
        .map(|b64| {
            aws_smithy_types::base64::decode(b64).unwrap_or_else(|_| b64.as_bytes().to_vec())
        })
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (output, truncated) = newest(&text, MAX_CONSOLE);
    Ok(ConsoleOutput {
        app: app.to_owned(),
        instance_id: id.to_owned(),
        output: output.to_owned(),
        timestamp: r.timestamp().map(|t| t.secs()).unwrap_or(0),
        truncated,
    })
}

/// The last `max` bytes of `text` (on a character boundary), and whether anything was cut.
fn newest(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    (&text[start..], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_output_keeps_the_newest_part_on_a_character_boundary() {
        assert_eq!(newest("boot ok", 64), ("boot ok", false));
        assert_eq!(newest("abcdef", 3), ("def", true));
        // "é" is two bytes: a cut inside it moves forward.
        assert_eq!(newest("aéb", 2), ("b", true));
    }
}
