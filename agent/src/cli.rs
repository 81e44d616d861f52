//! The `es-agent` command line: loads the configuration, installs signal handlers, runs the agent.
//!
//! Exit codes: 0 after a drain, 64 (EX_USAGE) for a bad configuration (the key is named, or
//! the TLS files cannot be used), 1 when the server refuses the agent (e.g. its certificate is for
//! another name or role) or the agent cannot start.
use std::path::PathBuf;
use std::process::ExitCode;

use crate::{AgentConfig, Signals};
use clap::{Parser, Subcommand};

const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "es-agent",
    version,
    about = "Execution-server agent (es-shells / es-commands)"
)]
struct Cli {
    /// Configuration file (TOML). ES_AGENT_<KEY> variables override its keys.
    #[arg(long, short, global = true, env = "ES_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Print the effective configuration and exit (64 if it is invalid).
    CheckConfig,
}

/// Entry point of the `es-agent` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match AgentConfig::load(cli.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("es-agent: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(Cmd::CheckConfig) = cli.command {
        // `check-config | head` ends quietly (SIGPIPE), not with a println! panic.
        sigpipe::reset();
        print!("{}", cfg.describe());
        // Who the agent would act as in AWS. The configuration is valid either way (exit 0);
        // missing credentials are a warning with the fix.
        let who = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(crate::aws::identity::check(cfg.aws_settings())));
        match who {
            Ok(id) => println!("# AWS identity: {id}"),
            Err(problem) => eprintln!("es-agent: warning: cannot use AWS: {problem}"),
        }
        return ExitCode::SUCCESS;
    }
    crate::logging::init(
        &cfg.name,
        &[("AGENT", cfg.name.as_str()), ("ROLE", cfg.role().name())],
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("es-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let signals = Signals::default();
        let s = signals.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                log::error!("cannot install signal handlers");
                return;
            };
            let mut count = 0;
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                count += 1;
                if count == 1 {
                    log::info!(
                        "signal received: draining (send it again to cancel in-flight jobs)"
                    );
                    s.drain.cancel();
                } else {
                    s.force.cancel();
                }
            }
        });
        match crate::run(cfg, signals).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("es-agent: {e}");
                // Unusable settings, or a registration the server refuses, are configuration
                // errors: systemd does not restart on 64.
                if matches!(
                    e,
                    crate::AgentError::Server(..) | crate::AgentError::Refused(..)
                ) {
                    ExitCode::from(EXIT_USAGE)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
}
