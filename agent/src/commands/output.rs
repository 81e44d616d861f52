//! What es-commands reports: secret values masked ([`Scrubber`]), inline output capped within
//! the result's budget ([`OutputCaps`]), progress as each instance finishes ([`Reporter`]), and
//! the job's result from the per-instance outputs ([`summarize`]).

use std::collections::{BTreeMap, HashMap};

use es_proto::v1::{
    CommandStatus, CommandsResult, InstanceOutput, JobResult, JobState, RunCommand,
};

use crate::job::JobCtx;

/// What replaces a secret value wherever it would be shown.
pub const MASK: &str = "***";

/// Inline output kept per instance and stream. SSM's own inline limits are 24,000 characters of
/// stdout and 8,000 of stderr; with an S3 bucket the full text is fetched, up to 256 KiB per
/// stream. A job's result stays under a 3 MiB budget: with many targets each gets a share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputCaps {
    pub stdout: usize,
    pub stderr: usize,
}

pub(crate) const RESULT_BUDGET: usize = 3 * 1024 * 1024;

impl OutputCaps {
    pub fn new(targets: usize, full_output: bool) -> OutputCaps {
        let (o, e) = if full_output {
            (256 * 1024, 256 * 1024)
        } else {
            (24_000, 8_000)
        };
        let n = targets.max(1);
        if n * (o + e) <= RESULT_BUDGET {
            return OutputCaps {
                stdout: o,
                stderr: e,
            };
        }
        let share = RESULT_BUDGET / n;
        OutputCaps {
            stdout: (share * o / (o + e)).max(1024),
            stderr: (share * e / (o + e)).max(512),
        }
    }
}

/// Keeps at most `cap` bytes of `text` (on a char boundary); answers whether it cut.
pub fn cap_text(text: &mut String, cap: usize) -> bool {
    if text.len() <= cap {
        return false;
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

/// Masks secret values in every string of a result.
pub struct Scrubber {
    secrets: Vec<String>,
}

impl Scrubber {
    pub fn new(rc: &RunCommand) -> Scrubber {
        let mut secrets: Vec<String> = rc
            .env
            .iter()
            .filter(|v| v.secret && !v.value.is_empty())
            .map(|v| v.value.clone())
            .collect();
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Scrubber { secrets }
    }

    pub fn text(&self, s: &str) -> String {
        let mut out = s.to_owned();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MASK);
            }
        }
        out
    }

    /// Masks secrets in raw output bytes (invalid UTF-8 is kept as it is around them).
    pub fn bytes(&self, b: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return b.to_vec();
        }
        let mut out = b.to_vec();
        for secret in &self.secrets {
            let needle = secret.as_bytes();
            let mut res = Vec::with_capacity(out.len());
            let mut i = 0;
            while i < out.len() {
                if out[i..].starts_with(needle) {
                    res.extend_from_slice(MASK.as_bytes());
                    i += needle.len();
                } else {
                    res.push(out[i]);
                    i += 1;
                }
            }
            out = res;
        }
        out
    }

    /// Masks a secret's beginning left at the end of a text that was cut (by SSM's inline
    /// limit or ours): `...password=hun` must not show `hun` of `hunter2`.
    pub fn tail(&self, s: &mut String) {
        for secret in &self.secrets {
            let longest = (1..secret.len())
                .rev()
                .filter(|n| secret.is_char_boundary(*n))
                .find(|n| s.ends_with(&secret[..*n]));
            if let Some(n) = longest {
                s.truncate(s.len() - n);
                s.push_str(MASK);
                return;
            }
        }
    }

    pub fn output(&self, o: &mut InstanceOutput) {
        for f in [&mut o.stdout, &mut o.stderr, &mut o.reason, &mut o.detail] {
            *f = self.text(f);
        }
        if o.stdout_truncated {
            self.tail(&mut o.stdout);
        }
        if o.stderr_truncated {
            self.tail(&mut o.stderr);
        }
    }
}

/// What a transport reports as each instance finishes.
pub struct Reporter<'a> {
    ctx: &'a JobCtx,
    scrub: &'a Scrubber,
    total: u32,
    done: std::sync::atomic::AtomicU32,
}

impl<'a> Reporter<'a> {
    pub fn new(ctx: &'a JobCtx, scrub: &'a Scrubber, total: usize) -> Reporter<'a> {
        Reporter {
            ctx,
            scrub,
            total: total as u32,
            done: Default::default(),
        }
    }

    /// Scrubs `o` and reports it as a progress event.
    pub fn finished(&self, o: &mut InstanceOutput) {
        self.scrub.output(o);
        let done = self.done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let who = if o.app.is_empty() {
            o.instance_id.clone()
        } else {
            format!("{} ({})", o.instance_id, o.app)
        };
        let exit = if o.exit_code >= 0 {
            format!(", exit {}", o.exit_code)
        } else {
            String::new()
        };
        let why = if o.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", o.reason)
        };
        self.ctx.progress(
            done,
            self.total,
            format!("{who}: {}{exit}{why}", status_word(o.status)),
        );
    }
}

pub fn status_word(s: i32) -> &'static str {
    match CommandStatus::try_from(s).unwrap_or_default() {
        CommandStatus::Unspecified => "unknown",
        CommandStatus::Pending => "pending",
        CommandStatus::InProgress => "in progress",
        CommandStatus::Success => "success",
        CommandStatus::Failed => "failed",
        CommandStatus::TimedOut => "timed out",
        CommandStatus::DeliveryTimedOut => "delivery timed out",
        CommandStatus::Undeliverable => "undeliverable",
        CommandStatus::Cancelled => "cancelled",
        CommandStatus::Terminated => "terminated",
    }
}

pub(crate) fn display_target(o: &InstanceOutput) -> String {
    match (o.instance_id.is_empty(), o.app.is_empty()) {
        (false, true) => o.instance_id.clone(),
        (true, false) => format!("app {}", o.app),
        _ => format!("{} ({})", o.instance_id, o.app),
    }
}

/// The job's result from the per-instance outputs.
pub fn summarize(
    mut instances: Vec<InstanceOutput>,
    command_ids: Vec<String>,
    ctx: &JobCtx,
) -> JobResult {
    instances.sort_by(|a, b| (&a.app, &a.instance_id).cmp(&(&b.app, &b.instance_id)));
    let mut by: BTreeMap<&'static str, usize> = BTreeMap::new();
    for i in &instances {
        *by.entry(status_word(i.status)).or_default() += 1;
    }
    let counts: Vec<String> = by.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let bad: Vec<String> = instances
        .iter()
        .filter(|i| i.status != CommandStatus::Success as i32)
        .map(|i| {
            let mut s = format!("{} {}", display_target(i), status_word(i.status));
            if i.exit_code >= 0 {
                s.push_str(&format!(" (exit {})", i.exit_code));
            }
            if !i.reason.is_empty() {
                s.push_str(&format!(": {}", i.reason));
            }
            s
        })
        .collect();
    let state = if bad.is_empty() {
        JobState::Succeeded
    } else if ctx.cancel.is_cancelled() {
        JobState::Cancelled
    } else {
        JobState::Failed
    };
    let shown = bad.iter().take(10).cloned().collect::<Vec<_>>().join("; ");
    let more = if bad.len() > 10 {
        format!("; and {} more", bad.len() - 10)
    } else {
        String::new()
    };
    JobResult {
        state: state as i32,
        output: format!("{} instances: {}", instances.len(), counts.join(", ")),
        error: if bad.is_empty() {
            String::new()
        } else {
            format!(
                "{} of {} instances did not succeed: {shown}{more}",
                bad.len(),
                instances.len()
            )
        },
        shells: None,
        commands: Some(CommandsResult {
            instances,
            command_ids,
            api_calls: HashMap::new(),
        }),
    }
}
