//! `es-server`: see `es_server::cli`.
fn main() -> std::process::ExitCode {
    es_server::cli::main()
}
