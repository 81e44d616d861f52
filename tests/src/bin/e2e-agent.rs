//! The es-agent entry point, built inside this package so the end-to-end tests always run the
//! current code (`CARGO_BIN_EXE_e2e-agent`).
fn main() -> std::process::ExitCode {
    es_agent::cli::main()
}
