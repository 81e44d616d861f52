//! `es-server`: parses the command line and hands over to the library.
use std::process::ExitCode;

use clap::Parser;
use es_server::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("es-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(config) => {
            es_server::logging::init("es-server");
            rt.block_on(serve(config))
        }
        other => rt.block_on(cli::run_client(other)),
    }
}

async fn serve(config: es_server::ServerConfig) -> ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("es-server: invalid configuration: {e}");
        return ExitCode::from(cli::EXIT_USAGE);
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        log::info!("shutting down");
    };
    let running = match es_server::start(config, shutdown).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("es-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Tests and scripts read the bound address from this line (useful with port 0).
    println!("es-server listening on {}", running.addr);
    match running.task.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
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
