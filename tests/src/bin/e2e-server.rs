//! The es-server entry point, built inside this package so the end-to-end tests always run the
//! current code (`CARGO_BIN_EXE_e2e-server`).
fn main() -> std::process::ExitCode {
    es_server::client::main()
}
