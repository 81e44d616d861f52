//! `es-server`: see `es_server::client`.
fn main() -> std::process::ExitCode {
    es_server::client::main()
}
