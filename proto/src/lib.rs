//! Generated gRPC code for the `es.v1` protocol, plus small helpers shared by both sides
//! (role names, state names). Domain logic lives in the server and agent crates.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod cert;
pub mod kinds;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod resources;
pub mod sealed;

pub mod v1 {
    tonic::include_proto!("es.v1");
}

/// Encoded `FileDescriptorSet` of es.v1, for server reflection (so `grpcurl` works).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("es_descriptor");

pub use v1::{JobState, Role};

/// An error with its causes, e.g. "transport error: ...: invalid peer certificate: UnknownIssuer"
/// (TLS refusals are only named deep in the chain).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

impl Role {
    /// Parses `shells` / `commands` (case-insensitive; `es-` prefix allowed).
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim().to_ascii_lowercase().trim_start_matches("es-") {
            "shells" => Some(Role::Shells),
            "commands" => Some(Role::Commands),
            _ => None,
        }
    }

    /// Short lowercase name (`shells`, `commands`, `unspecified`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Shells => "shells",
            Role::Commands => "commands",
            Role::Unspecified => "unspecified",
        }
    }
}

impl JobState {
    /// True for SUCCEEDED, FAILED, CANCELLED, TIMED_OUT.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }

    /// Short lowercase name (`queued`, `running`, ...).
    pub fn name(self) -> &'static str {
        match self {
            JobState::Unspecified => "unspecified",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
        }
    }

    /// Parses a short name as printed by [`JobState::name`].
    pub fn parse(s: &str) -> Option<JobState> {
        let s = s.trim().to_ascii_lowercase().replace('-', "_");
        [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
            JobState::TimedOut,
        ]
        .into_iter()
        .find(|st| st.name() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_and_state_names_round_trip() {
        assert_eq!(Role::parse("es-Shells"), Some(Role::Shells));
        assert_eq!(Role::parse("commands"), Some(Role::Commands));
        assert_eq!(Role::parse("shell"), None);
        for st in [JobState::Queued, JobState::TimedOut, JobState::Cancelled] {
            assert_eq!(JobState::parse(st.name()), Some(st));
        }
        assert!(JobState::Failed.is_terminal());
        assert!(!JobState::Running.is_terminal());
    }
}
