//! End-to-end tests: real es-server and es-agent processes on 127.0.0.1 (port 0), real SQLite
//! files in temporary directories. One test binary, so the workspace links it once.

mod bad_input;
mod commands;
mod dispatch;
mod drain;
mod durability;
mod fallback;
mod faults;
mod hostile;
mod leases;
mod ops;
mod packaging;
mod security;
mod shells;

use std::time::Duration;

use es_tests::*;

pub fn bins() -> Bins {
    Bins {
        server: env!("CARGO_BIN_EXE_e2e-server").into(),
        agent: env!("CARGO_BIN_EXE_e2e-agent").into(),
    }
}

/// A temporary directory with a server in it.
pub struct Env {
    // Dropped first (fields drop in order), so its log can still be read on a failure.
    pub server: Server,
    pub dir: tempfile::TempDir,
}

impl Env {
    /// A server with the quick test timings ([`FAST`]) plus `args`.
    pub fn start(args: &[&str]) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut all: Vec<&str> = FAST.to_vec();
        all.extend_from_slice(args);
        let server = start_server(
            &bins(),
            dir.path(),
            &dir.path().join("es.db"),
            "127.0.0.1:0",
            &all,
        );
        Env { dir, server }
    }

    pub fn agent(&self, spec: &AgentSpec) -> Proc {
        start_agent(&bins(), self.dir.path(), &self.server.url(), spec)
    }
}

pub const LONG: Duration = Duration::from_secs(30);
