//! End-to-end tests: real es-server and es-agent processes on 127.0.0.1 (port 0), real SQLite
//! files in temporary directories. One test binary, so the workspace links it once.

mod apps;
mod bad_input;
mod commands;
mod dispatch;
mod drain;
mod durability;
mod fallback;
mod faults;
mod hostile;
mod keys;
mod leases;
mod ops;
mod packaging;
mod replicas;
mod retention;
mod security;
mod shells;
mod systemd;
mod teardown;

use std::time::Duration;

use es_tests::*;

pub fn bins() -> Bins {
    Bins {
        server: env!("CARGO_BIN_EXE_e2e-server").into(),
        agent: env!("CARGO_BIN_EXE_e2e-agent").into(),
    }
}

/// Whose turn it is: tests share the machine (cargo runs two at once on 2 cores), except those
/// whose assertions depend on timing under load (the 10,000-job run requires zero lease
/// expiries with a 1.5 s TTL), which run alone.
static TURN: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A test's hold on the machine: shared with other tests, or alone.
pub enum Turn {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

/// Runs beside other tests (what `Env::start` takes; tests without an `Env` take it too).
pub fn shared_turn() -> Turn {
    Turn::Shared(TURN.read().unwrap_or_else(|p| p.into_inner()))
}

/// Waits until no other test runs, then keeps the machine to itself until dropped.
pub fn alone_turn() -> Turn {
    Turn::Alone(TURN.write().unwrap_or_else(|p| p.into_inner()))
}

/// A temporary directory with a server in it.
pub struct Env {
    // Dropped first (fields drop in order), so its log can still be read on a failure.
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub _turn: Turn,
}

impl Env {
    /// A server with the quick test timings ([`FAST`]) plus `args`, beside other tests.
    pub fn start(args: &[&str]) -> Env {
        Env::start_with(args, shared_turn())
    }

    /// As [`Env::start`], with no other test running until it is dropped.
    pub fn start_alone(args: &[&str]) -> Env {
        Env::start_with(args, alone_turn())
    }

    fn start_with(args: &[&str], turn: Turn) -> Env {
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
        Env {
            dir,
            server,
            _turn: turn,
        }
    }

    pub fn agent(&self, spec: &AgentSpec) -> Proc {
        start_agent(&bins(), self.dir.path(), &self.server.url(), spec)
    }
}

pub const LONG: Duration = Duration::from_secs(30);
