//! `es-agent`: see `es_agent::cli`.
fn main() -> std::process::ExitCode {
    es_agent::cli::main()
}
