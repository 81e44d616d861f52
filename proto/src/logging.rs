//! Logging: journald (with structured fields such as `JOB_ID`, `AGENT`) when the process runs
//! under systemd with its stderr connected to the journal; plain stderr otherwise.
//! The level comes from `RUST_LOG` (default `info`).

/// Installs the logger once; later calls are ignored. `fields` go on every journal entry (the
/// agent adds `AGENT` and `ROLE`, so `journalctl AGENT=es-shells` needs no unit name).
pub fn init(identifier: &str, fields: &[(&str, &str)]) {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|l| l.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Info);
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            let logger = logger
                .with_syslog_identifier(identifier.to_owned())
                .with_extra_fields(fields.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            if logger.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .parse_default_env()
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .try_init();
}
