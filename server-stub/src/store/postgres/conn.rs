//! Reaching PostgreSQL: the `--db postgres://…` URL, TLS (rustls, the server's certificate
//! always verified), and the connections the store opens from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{pem::PemObject, CertificateDer};
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::{Result, StoreError};

/// Where the system's CA bundle is on Debian (package ca-certificates).
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One PostgreSQL database as the store reaches it.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// The URL without its password, for log lines and errors.
    shown: String,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// The URL with its password (if any) replaced by `***`: the password never reaches a log.
pub fn without_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.split_once("://").and_then(|(scheme, rest)| {
        let (auth, host) = rest.rsplit_once('@')?;
        let user = auth.split_once(':').map_or(auth, |(u, _)| u);
        let masked = if auth.contains(':') { ":***" } else { "" };
        Some(format!("{scheme}://{user}{masked}@{host}"))
    }) {
        Some(b) => b,
        None => base.to_owned(),
    };
    match query {
        None => base,
        Some(q) => {
            let q: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{base}?{}", q.join("&"))
        }
    }
}

impl Database {
    /// Parses `url` (`postgres://user:password@host:port/dbname?sslmode=require`). With TLS
    /// the server's certificate is verified against `ca` (PEM), or the system's CAs when
    /// unset; `sslmode=verify-full` and `verify-ca` are taken as `require` (verification is
    /// never skipped).
    pub fn parse(url: &str, ca: Option<&Path>) -> Result<Database> {
        let shown = without_password(url);
        let bad = |detail: String| StoreError::Config {
            db: shown.clone(),
            detail,
        };
        let normalized = url
            .replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require");
        let mut config: tokio_postgres::Config = normalized.parse().map_err(|e| {
            bad(format!(
                "{e}: give a URL like postgres://es:PASSWORD@db.internal:5432/es?sslmode=require"
            ))
        })?;
        if config.get_dbname().is_none() {
            return Err(bad(
                "no database name: end the URL with /DBNAME (e.g. postgres://es@db:5432/es)".into(),
            ));
        }
        config
            .application_name("es-server")
            .connect_timeout(Duration::from_secs(5))
            // A leader cut off from the database notices within seconds, not after the
            // kernel's two hours (see leader.rs for the server side of it).
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(8));
        let roots = match ca {
            Some(path) => read_cas(path).map_err(|e| bad(format!("--db-ca {}: {e}", path.display())))?,
            None if config.get_ssl_mode() == SslMode::Require => {
                read_cas(Path::new(SYSTEM_CAS)).map_err(|e| {
                    bad(format!(
                        "sslmode=require needs the CA of the database's certificate: set --db-ca (ES_SERVER_DB_CA) ({SYSTEM_CAS}: {e})"
                    ))
                })?
            }
            None => read_cas(Path::new(SYSTEM_CAS)).unwrap_or_default(),
        };
        let mut store = rustls::RootCertStore::empty();
        for cert in roots {
            store
                .add(cert)
                .map_err(|e| bad(format!("a CA certificate is not usable: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(Database {
            config,
            tls: MakeRustlsConnect::new(tls),
            shown,
        })
    }

    /// The URL without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Opens one connection; its driver runs as a task that ends when the client is dropped
    /// or the connection breaks (then the client's calls fail).
    pub async fn connect(&self) -> Result<Client> {
        let (client, connection) = self.config.connect(self.tls.clone()).await.map_err(|e| {
            let mut err = self.error(e);
            if let StoreError::Postgres { message, .. } = &mut err {
                if message.contains("certificate") {
                    message.push_str(
                        ": set --db-ca (ES_SERVER_DB_CA) to the CA that issued the database's certificate",
                    );
                }
            }
            err
        })?;
        let shown = self.shown.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("job store {shown}: connection ended: {e}");
            }
        });
        Ok(client)
    }

    /// A pool of connections for reads.
    pub fn pool(&self, size: usize) -> Result<deadpool_postgres::Pool> {
        let manager = deadpool_postgres::Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Config {
                db: self.shown.clone(),
                detail: e.to_string(),
            })
    }

    /// A driver error as a store error naming the database (never its password).
    pub fn error(&self, e: tokio_postgres::Error) -> StoreError {
        StoreError::Postgres {
            db: self.shown.clone(),
            message: describe(&e),
        }
    }
}

/// The driver's error with the server's message, detail and hint when it has them.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            s
        }
    }
}

fn read_cas(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(PathBuf::from(path))
        .map_err(|e| e.to_string())?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        for (url, shown) in [
            (
                "postgres://es:s3cret@db:5432/es",
                "postgres://es:***@db:5432/es",
            ),
            ("postgres://es@db/es", "postgres://es@db/es"),
            ("postgres://db/es", "postgres://db/es"),
            (
                "postgres://es@db/es?sslmode=require&password=s3cret",
                "postgres://es@db/es?sslmode=require&password=***",
            ),
            ("postgresql://es:p@ss@db/es", "postgresql://es:***@db/es"),
            (
                "postgres://db/es?password=s3cret",
                "postgres://db/es?password=***",
            ),
        ] {
            assert_eq!(without_password(url), shown, "{url}");
        }
    }

    #[test]
    fn a_url_without_a_database_is_refused_with_the_fix() {
        let e = Database::parse("postgres://es@127.0.0.1:5432", None).unwrap_err();
        assert!(e.to_string().contains("/DBNAME"), "{e}");
        let e = Database::parse("postgres://es:pw@127.0.0.1:notaport/es", None).unwrap_err();
        assert!(e.to_string().contains("postgres://es:PASSWORD@"), "{e}");
        assert!(!e.to_string().contains("pw@"), "{e}");
    }
}
