//! Why the agent stops with an error (the process exits 1, or 64 for bad configuration).

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Registration refused (name, role or selector not allowed for this certificate): only a
    /// change of configuration here or on the server fixes it, so it exits 64 like a bad file
    /// and systemd does not restart it every few seconds.
    #[error("the server refused this agent: {0} (fix name, role or selector here, or the server's agents file, then start it again)")]
    Refused(String),
    /// The server URL or the TLS files (`server`, `tls_ca`, `tls_cert`, `tls_key`) are unusable.
    #[error(
        "cannot set up the connection to {0:?} (check server, tls_ca, tls_cert, tls_key): {1}"
    )]
    Server(String, String),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve health on {addr}: {source}")]
    Health {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}
