//! The `es-server` command line: `serve`, and the submitter and operator commands that talk to
//! a running server. `args.rs` is what clap reads, `commands.rs` one function per subcommand,
//! `sandbox.rs` the `sandbox` subcommands with their blueprints (`blueprint.rs`), `render.rs`
//! the tables and JSON, `conn.rs` the connection, exit codes and errors.

pub mod args;
pub mod blueprint;
pub mod commands;
pub mod conn;
pub mod follow;
pub mod render;
pub mod run_args;
pub mod sandbox;
pub mod sandbox_args;
pub mod secrets;

use std::process::ExitCode;

use clap::Parser;

pub use args::{Cli, ClientOpts, Command, SubmitArgs};
pub use conn::{CliError, Client, Credentials, EXIT_UNAVAILABLE, EXIT_USAGE};

/// Runs a client command; answers the process exit code.
pub async fn run_client(cmd: Command) -> ExitCode {
    match commands::run(cmd).await {
        Ok(code) => code,
        Err(CliError { code, message }) => {
            eprintln!("es-server: {message}");
            ExitCode::from(code)
        }
    }
}

/// Entry point of the `es-server` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("es-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(config) => {
            crate::logging::init("es-server", &[]);
            rt.block_on(serve(config))
        }
        other => {
            // A client command's output piped into `head` ends it like any Unix tool (killed by
            // SIGPIPE, nothing printed) instead of a println! panic with exit 101. Not for
            // `serve`: a server must never die of a peer's closed socket.
            sigpipe::reset();
            rt.block_on(run_client(other))
        }
    }
}

/// A leader that another replica deposed exits with this (EX_TEMPFAIL).
pub const EXIT_DEPOSED: u8 = 75;

async fn serve(config: crate::ServerConfig) -> ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("es-server: invalid configuration: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        log::info!("shutting down");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    };
    // A replica on PostgreSQL says itself whether it stands by or leads (replica::status).
    let replica = matches!(config.db, crate::Db::Postgres(_));
    let running = match crate::start(config, shutdown).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("es-server: {e}");
            return match e {
                crate::ServerError::Config(_)
                | crate::ServerError::Store(crate::store::StoreError::Config { .. })
                | crate::ServerError::File { .. }
                | crate::ServerError::Auth(_) => ExitCode::from(EXIT_USAGE),
                _ => ExitCode::FAILURE,
            };
        }
    };
    // Tests and scripts read the bound address from this line (useful with port 0).
    println!("es-server listening on {}", running.addr);
    // systemd (Type=notify): started once the store is open and the port bound. Without
    // NOTIFY_SOCKET (not under systemd) this does nothing.
    let serving = format!("serving on {}", running.addr);
    let mut states = vec![sd_notify::NotifyState::Ready];
    if !replica {
        states.push(sd_notify::NotifyState::Status(&serving));
    }
    let _ = sd_notify::notify(false, &states);
    match running.task.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        // EX_TEMPFAIL: systemd restarts it (Restart=always), and it stands by.
        Ok(Err(e @ crate::ServerError::Deposed(_))) => {
            eprintln!("es-server: {e}");
            ExitCode::from(EXIT_DEPOSED)
        }
        Ok(Err(e)) => {
            eprintln!("es-server: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("es-server: {e}");
            ExitCode::FAILURE
        }
    }
}
