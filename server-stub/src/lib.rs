//! es-server: the reference server side of the execution-server agents.
//!
//! It stores jobs durably (SQLite), routes each job to a healthy agent of the right role and
//! selector value (primaries before fallbacks), leases it with a fencing epoch, and serves
//! submitters. Agents dial in; the server never needs a way out to them except the optional
//! grpc.health.v1 probe of an agent's published health address.
//!
//! Layers, top down: `api/` (gRPC services, auth, validation) calls `dispatch/` (queues, offers,
//! leases, agents, the reaper), which writes through the `store/` trait (SQLite today);
//! `client/` is the operator's command line (it only speaks gRPC to a server); `metrics.rs`
//! renders a snapshot. `main.rs` only calls [`client::main`]; [`run`] is what tests call
//! in-process.

pub mod api;
pub mod client;
pub mod dispatch;
pub use es_proto::logging;
pub mod metrics;
mod replica;
pub mod retention;
mod serve;
pub mod store;
mod tls;

pub use serve::{probe, start};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use dispatch::{Dispatcher, Settings};

/// Everything `es-server serve` can be told.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// Address to listen on (use port 0 for any free port; the bound address is printed).
    #[arg(long, env = "ES_SERVER_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// The job store: a SQLite file (created if missing; one server), or a PostgreSQL URL
    /// `postgres://USER:PASSWORD@HOST:PORT/DB?sslmode=require` shared by replicas, one of
    /// which leads (the others stand by).
    #[arg(long, env = "ES_SERVER_DB", default_value = "es-server.db")]
    pub db: Db,
    /// CA (PEM) that issued the PostgreSQL server's certificate (with `sslmode=require`);
    /// unset: the system's CAs.
    #[arg(long, env = "ES_SERVER_DB_CA")]
    pub db_ca: Option<PathBuf>,
    /// The address clients reach this replica at, which standbys name when they refuse a call
    /// (default: the listening address, or this host's name and port).
    #[arg(long, env = "ES_SERVER_ADVERTISE")]
    pub advertise: Option<String>,
    /// SQLite: `normal` survives a server crash; `full` also survives power loss (slower).
    #[arg(long, env = "ES_SERVER_DB_SYNC", value_enum, default_value_t = store::Sync::Normal)]
    pub db_sync: store::Sync,
    /// How often agents heartbeat and renew leases.
    #[arg(long, env = "ES_SERVER_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// A lease not renewed for this long expires and the job is offered again.
    #[arg(long, env = "ES_SERVER_LEASE_TTL", default_value = "4s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// An agent without heartbeats for this long gets no new work.
    #[arg(long, env = "ES_SERVER_HEARTBEAT_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,
    /// An offer not acquired within this time goes to another agent.
    #[arg(long, env = "ES_SERVER_OFFER_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub offer_timeout: Duration,
    /// Time a cancelled or timed-out job has to stop before it is fenced.
    #[arg(long, env = "ES_SERVER_CANCEL_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub cancel_grace: Duration,
    /// Longest a long-poll is held open.
    #[arg(long, env = "ES_SERVER_POLL_WAIT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub poll_wait: Duration,
    /// Job timeout when the submitter gives none.
    #[arg(long, env = "ES_SERVER_DEFAULT_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub default_timeout: Duration,
    /// Attempts when the submitter gives none.
    #[arg(long, env = "ES_SERVER_DEFAULT_MAX_ATTEMPTS", default_value_t = 3)]
    pub default_max_attempts: u32,
    /// Finished jobs older than this are deleted.
    #[arg(long, env = "ES_SERVER_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// How often agents' health addresses are probed (grpc.health.v1).
    #[arg(long, env = "ES_SERVER_PROBE_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,
    /// Application keepalive on idle agent streams (below a load balancer's idle cut, 350 s on AWS).
    #[arg(long, env = "ES_SERVER_STREAM_PING", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stream_ping: Duration,
    /// Certificate chain the server presents (PEM). With --tls-key and --client-ca: mutual TLS.
    #[arg(long, env = "ES_SERVER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "ES_SERVER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that issues the agents' and submitters' client certificates (subject CN = name,
    /// OU = shells, commands or submitter).
    #[arg(long, env = "ES_SERVER_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext without client certificates (demos, tests, a trusted loopback): agents
    /// are trusted as they describe themselves. Logs a warning. Refused on a non-loopback
    /// --listen address unless --insecure-on-network is given too.
    #[arg(long, env = "ES_SERVER_INSECURE")]
    pub insecure: bool,
    /// With --insecure on a non-loopback address: anyone who reaches the port can register as
    /// any agent and receive its jobs (with their secret variables). For isolated labs only.
    #[arg(long, env = "ES_SERVER_INSECURE_ON_NETWORK")]
    pub insecure_on_network: bool,
    /// Revoked credentials: `serial HEX` (certificate), `digest SHA256HEX` (token), `name NAME`
    /// (every credential of that agent or submitter). Read again on SIGHUP.
    #[arg(long, env = "ES_SERVER_DENY")]
    pub deny: Option<PathBuf>,
    /// Which agent may register as what: `NAME ROLE SELECTOR[,SELECTOR...]` per line (`*` any
    /// selector, `-` the empty one). Unset: any selector (logged as a warning with TLS). Read
    /// again on SIGHUP.
    #[arg(long, env = "ES_SERVER_AGENTS")]
    pub agents: Option<PathBuf>,
    /// Unfinished (queued or running) jobs one submitter may have; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "ES_SERVER_MAX_QUEUED_PER_SUBMITTER", default_value_t = es_proto::limits::DEFAULT_MAX_QUEUED_PER_SUBMITTER)]
    pub max_queued_per_submitter: usize,
    /// Submitter tokens (`NAME SHA256HEX [read|submit|admin]` per line; `es-server token NAME`
    /// makes one). When set, every submitter call needs a token or a submitter certificate.
    /// Read again on SIGHUP.
    #[arg(long, env = "ES_SERVER_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`), e.g. 0.0.0.0:9700.
    /// Unset: no metrics endpoint.
    #[arg(long, env = "ES_SERVER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl ServerConfig {
    /// Defaults of every setting, listening on `listen` with the store at `db`, plaintext
    /// (`insecure`): for in-process use in tests and benchmarks.
    pub fn new(listen: SocketAddr, db: PathBuf) -> ServerConfig {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            c: ServerConfig,
        }
        let mut c = P::try_parse_from(["es-server"]).expect("defaults parse").c;
        c.listen = listen;
        c.db = Db::Sqlite(db);
        c.insecure = true;
        c
    }

    /// The TLS files, when TLS is configured; errors name the missing flag.
    pub fn tls(&self) -> Result<Option<(&PathBuf, &PathBuf, &PathBuf)>, String> {
        match (&self.tls_cert, &self.tls_key, &self.client_ca, self.insecure) {
            (None, None, None, true) => Ok(None),
            (None, None, None, false) => Err(
                "no TLS configured: set --tls-cert, --tls-key and --client-ca (ES_SERVER_TLS_CERT, ES_SERVER_TLS_KEY, ES_SERVER_CLIENT_CA), or --insecure for plaintext".into(),
            ),
            (Some(_), Some(_), Some(_), true) => Err(
                "--insecure and --tls-cert/--tls-key/--client-ca exclude each other: drop --insecure to serve mutual TLS".into(),
            ),
            (Some(c), Some(k), Some(ca), false) => Ok(Some((c, k, ca))),
            (c, k, ca, _) => {
                let missing: Vec<&str> = [("--tls-cert", c.is_none()), ("--tls-key", k.is_none()), ("--client-ca", ca.is_none())]
                    .into_iter()
                    .filter_map(|(f, m)| m.then_some(f))
                    .collect();
                Err(format!(
                    "mutual TLS needs --tls-cert, --tls-key and --client-ca together: {} missing",
                    missing.join(", ")
                ))
            }
        }
    }

    /// Checks that the timings fit together; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        let ms = |d: Duration| d.as_millis();
        if self.heartbeat_interval.is_zero() {
            return Err("--heartbeat-interval must be above 0".into());
        }
        if self.lease_ttl < self.heartbeat_interval * 2 {
            return Err(format!(
                "--lease-ttl ({} ms) must be at least twice --heartbeat-interval ({} ms), or busy agents lose leases",
                ms(self.lease_ttl),
                ms(self.heartbeat_interval)
            ));
        }
        if self.heartbeat_timeout < self.heartbeat_interval {
            return Err(format!(
                "--heartbeat-timeout ({} ms) must be at least --heartbeat-interval ({} ms)",
                ms(self.heartbeat_timeout),
                ms(self.heartbeat_interval)
            ));
        }
        if self.default_max_attempts == 0 || self.default_max_attempts > 100 {
            return Err("--default-max-attempts must be between 1 and 100".into());
        }
        if self.offer_timeout.is_zero() || self.poll_wait.is_zero() || self.stream_ping.is_zero() {
            return Err("--offer-timeout, --poll-wait and --stream-ping must be above 0".into());
        }
        if self.max_queued_per_submitter == 0 {
            return Err("--max-queued-per-submitter must be above 0".into());
        }
        if self.insecure && !self.listen.ip().is_loopback() && !self.insecure_on_network {
            return Err(format!(
                "--insecure on {}: anyone who reaches this address could register as any agent and receive its jobs. \
                 Serve mutual TLS (--tls-cert, --tls-key, --client-ca), listen on 127.0.0.1, or, for an isolated lab, add --insecure-on-network",
                self.listen
            ));
        }
        match (&self.db, self.db_sync, &self.db_ca) {
            (Db::Postgres(_), store::Sync::Full, _) => {
                return Err("--db-sync full applies to a SQLite --db: on PostgreSQL a commit is as durable as the database's synchronous_commit (and its standbys) make it; set it there and drop --db-sync".into());
            }
            (Db::Sqlite(_), _, Some(_)) => {
                return Err("--db-ca applies to a postgres:// --db (the CA of the database's TLS certificate); drop it, or give --db a postgres:// URL".into());
            }
            _ => {}
        }
        self.tls()?;
        Ok(())
    }

    pub fn settings(&self) -> Settings {
        Settings {
            heartbeat_interval: self.heartbeat_interval,
            lease_ttl: self.lease_ttl,
            heartbeat_timeout: self.heartbeat_timeout,
            poll_wait: self.poll_wait,
            offer_timeout: self.offer_timeout,
            cancel_grace: self.cancel_grace,
            default_timeout: self.default_timeout,
            default_max_attempts: self.default_max_attempts,
            tick: (self.heartbeat_interval / 10)
                .clamp(Duration::from_millis(20), Duration::from_millis(250)),
            stream_ping: self.stream_ping,
            max_queued_per_submitter: self.max_queued_per_submitter,
        }
    }
}

/// Where the jobs are kept (`--db`).
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(PathBuf),
    /// A PostgreSQL URL (kept with its password; shown without it).
    Postgres(String),
}

impl std::str::FromStr for Db {
    type Err = String;
    fn from_str(s: &str) -> Result<Db, String> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Db::Postgres(s.to_owned()))
        } else if s.contains("://") {
            Err(format!(
                "{:?}: give a SQLite file path or a postgres:// URL",
                store::postgres::conn::without_password(s)
            ))
        } else {
            Ok(Db::Sqlite(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Sqlite(p) => write!(f, "{}", p.display()),
            Db::Postgres(url) => f.write_str(&store::postgres::conn::without_password(url)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another replica leads the job store now; this one stopped serving (systemd restarts it
    /// as a standby).
    #[error("{0}; stopped leading (restart this server to stand by)")]
    Deposed(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Dispatch(#[from] dispatch::DispatchError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("{flag} {path}: {source}")]
    File {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Auth(#[from] api::auth::AuthError),
}

pub(crate) fn read_file(
    flag: &'static str,
    path: &std::path::Path,
) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::File {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// A running server: its bound address and the dispatcher (for in-process tests).
pub struct Running {
    pub addr: SocketAddr,
    /// Set once this server leads (at once on SQLite).
    pub dispatcher: Arc<std::sync::OnceLock<Arc<Dispatcher>>>,
    /// Ends after the gRPC server, every background task it started (reaper, pings, probes,
    /// retention, metrics, SIGHUP) and the store's writer and checkpoint threads have stopped.
    pub task: tokio::task::JoinHandle<Result<(), ServerError>>,
    /// Background tasks alive now (0 once `task` has ended).
    pub background: Arc<std::sync::atomic::AtomicUsize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// Store settings that do not apply to the store given are refused, naming the setting.
    #[test]
    fn store_settings_must_apply_to_the_store() {
        let pg = Db::Postgres("postgres://es@db:5432/es".into());
        let sqlite = Db::Sqlite("/var/lib/es-server/es.db".into());
        let table: &[(&Db, store::Sync, Option<&str>, Option<&str>)] = &[
            (&sqlite, store::Sync::Full, None, None),
            (
                &sqlite,
                store::Sync::Normal,
                Some("/ca.pem"),
                Some("--db-ca"),
            ),
            (&pg, store::Sync::Normal, Some("/ca.pem"), None),
            (&pg, store::Sync::Full, None, Some("--db-sync full")),
        ];
        for (db, sync, ca, refused) in table {
            let mut c = ServerConfig::new("127.0.0.1:0".parse().unwrap(), "/x.db".into());
            c.db = (*db).clone();
            c.db_sync = *sync;
            c.db_ca = ca.map(PathBuf::from);
            match (c.validate(), refused) {
                (Ok(()), None) => {}
                (Err(e), Some(field)) => assert!(e.starts_with(field), "{e}"),
                (got, want) => panic!("{db:?} {sync:?} {ca:?}: {got:?}, expected {want:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_returns_only_after_everything_it_started_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("es.db");
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), db.clone());
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        config.probe_interval = Duration::from_millis(50);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = start(config, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        // Reaper (with pings), retention, probes, metrics, SIGHUP, the connection forwarder:
        // all counted while alive (the first three start as the server leads).
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while running.background.load(Ordering::SeqCst) < 6 && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(running.background.load(Ordering::SeqCst), 6);
        let dispatcher = running.dispatcher.get().unwrap().clone();
        let store = dispatcher.store().clone();
        assert!(store.threads_running());
        // A write accepted just before the stop is committed, not lost.
        let (job, created) = dispatcher
            .submit(es_proto::v1::Job {
                id: "last-before-stop".into(),
                role: es_proto::Role::Shells as i32,
                spec: Some(es_proto::v1::JobSpec {
                    kind: Some(es_proto::v1::job_spec::Kind::Echo(Default::default())),
                    target: None,
                }),
                submitted_by: "test".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(created);
        stop.send(()).unwrap();
        running.task.await.unwrap().unwrap();
        assert_eq!(
            running.background.load(Ordering::SeqCst),
            0,
            "every background task ended before run() returned"
        );
        assert!(!store.threads_running(), "the store's threads were joined");
        assert!(
            store.audit(vec![]).await.is_err(),
            "the writer is gone: later writes are refused, not lost silently"
        );
        let reopened = store::sqlite::open(&db, store::Sync::Normal).unwrap();
        assert_eq!(reopened.get(&job.id).await.unwrap().unwrap().id, job.id);
        reopened.shutdown();
    }
}
