//! Size limits of the protocol, shared by the server, the agents and the CLI. One table: every
//! limit a caller can hit is here (docs/limits.md lists them for operators) and the server's
//! validation refuses anything larger with `INVALID_ARGUMENT` naming the field.
//!
//! Why these numbers: a job read back (`Get`) holds its spec and its result, and must fit one
//! gRPC message with room to spare, so spec (256 KiB) + result (3 MiB) < the 4 MiB message
//! limit. Lists and audit trails are paged by size for the same reason.

/// Largest gRPC message either side accepts (decoding) or sends (encoding).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// Budget of one List or Audit answer: it stops early (with a page token) before this.
pub const PAGE_BUDGET: usize = 3 * 1024 * 1024;
/// A job's whole spec, encoded.
pub const MAX_SPEC: usize = 256 * 1024;
/// A job's result, encoded (the agent caps outputs to stay below it).
pub const MAX_RESULT: usize = 3 * 1024 * 1024;
/// Free text a caller attaches: cancel, drain and going-away reasons, fail messages.
pub const MAX_REASON: usize = 1024;
/// An IAM role ARN (`spec.target.role_arn`, instance profiles).
pub const MAX_ARN: usize = 2048;
/// Names and ids (agents, selectors, sandboxes, submitters).
pub const MAX_NAME: usize = 128;
/// An idempotency key.
pub const MAX_KEY: usize = 256;
/// Entries of a list of app names (power, IPs, details).
pub const MAX_APP_NAMES: usize = 255;
/// Sandboxes named live in one sweep.
pub const MAX_LIVE_SANDBOXES: usize = 10_000;
/// Tags a submitter may add to an app (EC2 allows 50 per resource; es-shells adds its own).
pub const MAX_APP_TAGS: usize = 40;
/// A tag key and a tag value (EC2's limits).
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 256;
/// Queued jobs one submitter may have at once (server default; `--max-queued-per-submitter`).
pub const DEFAULT_MAX_QUEUED_PER_SUBMITTER: usize = 10_000;

// A job read back (spec + result) and a page of a list fit one message: checked at compile time.
const _: () = assert!(MAX_SPEC + MAX_RESULT < MAX_MESSAGE);
const _: () = assert!(PAGE_BUDGET < MAX_MESSAGE);

/// Cuts `text` to at most `cap` bytes on a char boundary, marking the cut.
pub fn clip(text: &str, cap: usize) -> String {
    if text.len() <= cap {
        return text.to_owned();
    }
    let mut end = cap.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_on_a_char_boundary() {
        assert_eq!(clip("short", 10), "short");
        let c = clip(&"é".repeat(100), 10);
        assert!(c.len() <= 10 && c.ends_with("..."), "{c}");
    }
}
