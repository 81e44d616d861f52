//! Output of finished SSM invocations: inline from GetCommandInvocation (SSM keeps 24,000
//! characters of stdout and 8,000 of stderr), or in full from the job's S3 bucket, capped and
//! masked by the caller's limits.

use es_proto::v1::{CommandStatus, InstanceOutput, RunCommand, Shell};

use super::{reason_of, Finished, SsmClients};
use crate::commands::{aws_err, cap_text, OutputCaps, Target};

/// SSM's inline output limits in GetCommandInvocation.
pub(super) const SSM_INLINE_STDOUT: usize = 24_000;
const SSM_INLINE_STDERR: usize = 8_000;

/// The S3 key SSM writes a stream to: `<prefix>/<command>/<instance>/<plugin>/0.<plugin>/<stream>`.
pub fn s3_key(rc: &RunCommand, cid: &str, instance: &str, stream: &str) -> String {
    let plugin = if rc.shell == Shell::Powershell as i32 {
        "awsrunPowerShellScript"
    } else {
        "awsrunShellScript"
    };
    let prefix = rc.output_s3_prefix.trim_end_matches('/');
    let key = format!("{cid}/{instance}/{plugin}/0.{plugin}/{stream}");
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}/{key}")
    }
}

/// Reads at most `cap` bytes of an S3 object; answers the text and whether it was cut. A
/// missing object (SSM writes nothing for an empty stream) is empty text.
async fn s3_text(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    cap: usize,
) -> Result<(String, bool), String> {
    let r = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .range(format!("bytes=0-{}", cap))
        .send()
        .await;
    match r {
        Ok(o) => {
            let total = o
                .content_range()
                .and_then(|r| r.rsplit('/').next())
                .and_then(|n| n.parse::<usize>().ok());
            let body = o
                .body
                .collect()
                .await
                .map_err(|e| format!("reading s3://{bucket}/{key}: {e}"))?
                .into_bytes();
            let mut text = String::from_utf8_lossy(&body).into_owned();
            let cut = cap_text(&mut text, cap) || total.is_some_and(|t| t > cap);
            Ok((text, cut))
        }
        Err(e) => {
            use aws_sdk_s3::error::ProvideErrorMetadata;
            if matches!(e.code(), Some("NoSuchKey") | Some("InvalidRange")) {
                Ok((String::new(), false))
            } else {
                Err(format!(
                    "reading s3://{bucket}/{key}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                ))
            }
        }
    }
}

pub(super) async fn fetch_output(
    c: &SsmClients<'_>,
    rc: &RunCommand,
    cid: &str,
    f: Finished,
    t: Option<&Target>,
    caps: OutputCaps,
) -> InstanceOutput {
    let mut o = InstanceOutput {
        instance_id: f.instance_id.clone(),
        app: t.map(|t| t.app.clone()).unwrap_or_default(),
        status: f.status as i32,
        detail: f.detail.clone(),
        exit_code: f.exit_code,
        reason: reason_of(f.status, &f.detail),
        finished_at_us: crate::commands::now_us(),
        ..Default::default()
    };
    // Output exists only where the script ran.
    if !matches!(
        f.status,
        CommandStatus::Success
            | CommandStatus::Failed
            | CommandStatus::TimedOut
            | CommandStatus::Cancelled
    ) {
        o.exit_code = -1;
        return o;
    }
    if let (Some(s3), false) = (c.s3, rc.output_s3_bucket.is_empty()) {
        let bucket = &rc.output_s3_bucket;
        for (stream, url, cap) in [
            ("stdout", &f.stdout_url, caps.stdout),
            ("stderr", &f.stderr_url, caps.stderr),
        ] {
            let key = s3_key(rc, cid, &f.instance_id, stream);
            let shown = if url.is_empty() {
                format!("s3://{bucket}/{key}")
            } else {
                url.clone()
            };
            match s3_text(s3, bucket, &key, cap).await {
                Ok((text, cut)) => {
                    if stream == "stdout" {
                        (o.stdout, o.stdout_truncated, o.stdout_url) = (text, cut, shown);
                    } else {
                        (o.stderr, o.stderr_truncated, o.stderr_url) = (text, cut, shown);
                    }
                }
                Err(e) => {
                    o.reason = format!("output not fetched: {e}");
                }
            }
        }
        return o;
    }
    match c
        .ssm
        .get_command_invocation()
        .command_id(cid)
        .instance_id(&f.instance_id)
        .send()
        .await
    {
        Ok(g) => {
            o.stdout = g.standard_output_content().unwrap_or("").to_owned();
            o.stderr = g.standard_error_content().unwrap_or("").to_owned();
            // At SSM's limit the text was cut by SSM: set an output bucket for the full text.
            o.stdout_truncated = o.stdout.chars().count() >= SSM_INLINE_STDOUT;
            o.stderr_truncated = o.stderr.chars().count() >= SSM_INLINE_STDERR;
            o.stdout_truncated |= cap_text(&mut o.stdout, caps.stdout);
            o.stderr_truncated |= cap_text(&mut o.stderr, caps.stderr);
        }
        Err(e) => {
            o.reason = format!(
                "output not fetched: {}",
                aws_err("SSM GetCommandInvocation", e)
            );
        }
    }
    o
}
