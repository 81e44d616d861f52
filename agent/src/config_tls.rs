//! The agent's TLS settings: the files an https:// server needs, checked at start (readable,
//! and a certificate whose CN and OU are this agent's name and role), and the client TLS
//! configuration built from them.

use crate::config::{bad, AgentConfig, ConfigError};

impl AgentConfig {
    pub(crate) fn validate_tls(&self) -> Result<(), ConfigError> {
        let files = [
            ("tls_ca", &self.tls_ca),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
        ];
        if self.server.trim_start().starts_with("http://") {
            if !self.insecure {
                return Err(bad(
                    "server",
                    format!(
                        "{:?} is plaintext: use https:// with tls_ca, tls_cert and tls_key, or set insecure = true to accept plaintext",
                        self.server
                    ),
                ));
            }
            if let Some((k, _)) = files.iter().find(|(_, v)| !v.is_empty()) {
                return Err(bad(
                    k,
                    "is set but server is http:// (plaintext): use an https:// server URL",
                ));
            }
            return Ok(());
        }
        if self.insecure {
            return Err(bad(
                "insecure",
                "is true but server is https://: drop insecure (TLS is used)",
            ));
        }
        for (k, v) in files {
            if v.is_empty() {
                return Err(bad(
                    k,
                    "is empty: an https:// server needs tls_ca, tls_cert and tls_key",
                ));
            }
            if std::fs::File::open(v).is_err() {
                return Err(bad(
                    k,
                    format!("{v:?} cannot be read (missing, or not readable by this user)"),
                ));
            }
        }
        // The server accepts an agent only under its certificate's CN (name) and OU (role):
        // say so here, naming both, rather than be refused at every start.
        let pem = std::fs::read(&self.tls_cert).unwrap_or_default();
        let (cn, ou) = es_proto::cert::pem_subject(&pem)
            .map_err(|e| bad("tls_cert", format!("{:?}: {e}", self.tls_cert)))?;
        if cn != self.name {
            return Err(bad(
                "name",
                format!(
                    "{:?} differs from the CN {cn:?} of tls_cert {:?}: the server accepts this agent only as {cn:?} (set name = {cn:?}, or use that agent's certificate)",
                    self.name, self.tls_cert
                ),
            ));
        }
        if ou != self.role {
            return Err(bad(
                "role",
                format!(
                    "{:?} differs from the OU {ou:?} of tls_cert {:?}: the certificate is for role {ou:?}",
                    self.role, self.tls_cert
                ),
            ));
        }
        Ok(())
    }

    /// The TLS settings of the connection to the server, or `None` for plaintext.
    pub fn client_tls(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, ConfigError> {
        if !self.server.trim_start().starts_with("https://") {
            return Ok(None);
        }
        let read = |k: &str, p: &str| std::fs::read(p).map_err(|e| bad(k, format!("{p:?}: {e}")));
        Ok(Some(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(
                    "tls_ca",
                    &self.tls_ca,
                )?))
                .identity(tonic::transport::Identity::from_pem(
                    read("tls_cert", &self.tls_cert)?,
                    read("tls_key", &self.tls_key)?,
                )),
        ))
    }
}
