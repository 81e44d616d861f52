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
pub mod store;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use es_proto::limits::MAX_MESSAGE;
use es_proto::v1::agent_service_server::AgentServiceServer;
use es_proto::v1::job_service_server::JobServiceServer;
use tokio::net::TcpListener;

pub use dispatch::{Dispatcher, Settings};

/// Everything `es-server serve` can be told.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// Address to listen on (use port 0 for any free port; the bound address is printed).
    #[arg(long, env = "ES_SERVER_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// SQLite file of the job store (created if missing).
    #[arg(long, env = "ES_SERVER_DB", default_value = "es-server.db")]
    pub db: PathBuf,
    /// `normal` survives a server crash; `full` also survives power loss (slower).
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
        c.db = db;
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

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
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

fn read_file(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::File {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// A running server: its bound address and the dispatcher (for in-process tests).
pub struct Running {
    pub addr: SocketAddr,
    pub dispatcher: Arc<Dispatcher>,
    /// Ends after the gRPC server, every background task it started (reaper, pings, probes,
    /// retention, metrics, SIGHUP) and the store's writer and checkpoint threads have stopped.
    pub task: tokio::task::JoinHandle<Result<(), ServerError>>,
    /// Background tasks alive now (0 once `task` has ended).
    pub background: Arc<std::sync::atomic::AtomicUsize>,
}

/// Binds, recovers the store and serves until `shutdown` resolves.
pub async fn start(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Running, ServerError> {
    config.validate().map_err(ServerError::Config)?;
    let tls = match config.tls().map_err(ServerError::Config)? {
        // Submitters may use a token instead of a certificate; agents are refused without one
        // (api/auth). Handshakes are ours (tls.rs), so that refused ones are logged.
        Some((cert, key, ca)) => Some(
            tls::acceptor(
                &read_file("--tls-cert", cert)?,
                &read_file("--tls-key", key)?,
                &read_file("--client-ca", ca)?,
            )
            .map_err(ServerError::Config)?,
        ),
        None => {
            log::warn!("INSECURE: serving plaintext without client certificates (--insecure); agents are trusted as they describe themselves");
            if !config.listen.ip().is_loopback() {
                log::warn!("INSECURE ON A NETWORK ({}): anyone who reaches it can register as any agent (--insecure-on-network)", config.listen);
            }
            None
        }
    };
    let store = store::sqlite::open(&config.db, config.db_sync)?;
    let dispatcher = Dispatcher::recover(store, config.settings()).await?;
    let auth = Arc::new(api::auth::Auth::new(
        tls.is_some(),
        api::auth::AuthFiles {
            tokens: config.tokens.clone(),
            deny: config.deny.clone(),
            agents: config.agents.clone(),
        },
        dispatcher.metrics().auth_failures.clone(),
    )?);
    if tls.is_some() && config.agents.is_none() {
        log::warn!("no --agents file: any agent certificate may register for any selector of its role (bind names to selectors with --agents)");
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServiceServer<api::AgentApi>>()
        .await;
    health_reporter
        .set_serving::<JobServiceServer<api::JobApi>>()
        .await;
    // Reflection in both versions: v1, and v1alpha for the clients that speak only that one
    // (Python's grpcio-reflection, several GUI clients), which get UNIMPLEMENTED otherwise.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(es_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let mut metrics_listener = None;
    if let Some(m) = config.metrics_listen {
        let l = TcpListener::bind(m)
            .await
            .map_err(|source| ServerError::Bind { addr: m, source })?;
        let bound = l
            .local_addr()
            .map_err(|source| ServerError::Bind { addr: m, source })?;
        log::info!("metrics on http://{bound}/metrics");
        metrics_listener = Some(l);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let background = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    spawn_background(
        &mut tasks,
        &background,
        dispatcher.clone(),
        &config,
        stop.clone(),
    );
    if let Some(l) = metrics_listener {
        let (d, stop, live) = (dispatcher.clone(), stop.clone(), Live::new(&background));
        tasks.spawn(async move {
            let _live = live;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = es_proto::metrics::serve(l, Arc::new(move || {
                    let now = metrics::Snapshot {
                        active: d.active_counts(),
                        agents: d.agents(),
                    };
                    d.metrics().render(&now)
                })) => {}
            }
        });
    }

    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            AgentServiceServer::new(api::AgentApi {
                d: dispatcher.clone(),
                auth: auth.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            JobServiceServer::new(api::JobApi {
                d: dispatcher.clone(),
                auth: auth.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        );
    {
        let (stop, live) = (stop.clone(), Live::new(&background));
        tasks.spawn(async move {
            let _live = live;
            api::auth::reload_on_sighup(auth, stop).await
        });
    }
    // Our own listener (port 0 support), so socket options are set here: without TCP_NODELAY,
    // small stream messages (offers) wait for delayed ACKs (~40 ms). With TLS, our own
    // handshakes (tls.rs), whose accept loop ends when tonic drops the stream at shutdown.
    let incoming = match tls {
        None => Incoming::Plain(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
        ),
        Some(acceptor) => {
            let (stream, accept_loop) = tls::incoming(
                listener,
                acceptor,
                dispatcher.metrics().auth_failures.clone(),
            );
            let live = Live::new(&background);
            tasks.spawn(async move {
                let _live = live;
                accept_loop.await
            });
            Incoming::Tls(stream)
        }
    };
    // The timings in force, so benchmarks and operators read them rather than assume defaults.
    let d = humantime::format_duration;
    log::info!(
        "es-server listening on {addr}, store {}; heartbeat {}, lease TTL {}, heartbeat timeout {}, offer timeout {}",
        config.db.display(),
        d(config.heartbeat_interval),
        d(config.lease_ttl),
        d(config.heartbeat_timeout),
        d(config.offer_timeout)
    );
    let dispatcher_for_task = dispatcher.clone();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            shutdown.await;
            health_reporter
                .set_not_serving::<AgentServiceServer<api::AgentApi>>()
                .await;
        };
        let res = match incoming {
            Incoming::Plain(tcp) => router.serve_with_incoming_shutdown(tcp, shutdown).await,
            Incoming::Tls(tls) => router.serve_with_incoming_shutdown(tls, shutdown).await,
        };
        // Shutdown joins everything it started: background tasks first (they use the store),
        // then the store's threads, after committing what was queued.
        stop.cancel();
        while tasks.join_next().await.is_some() {}
        let store = dispatcher_for_task.store().clone();
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        res.map_err(ServerError::from)
    });
    Ok(Running {
        addr,
        dispatcher,
        task,
        background,
    })
}

/// Counts a background task while it lives (see [`Running::background`]).
/// The connections tonic serves: accepted as they are (plaintext), or after our handshake.
enum Incoming {
    Plain(tonic::transport::server::TcpIncoming),
    Tls(tls::Connections),
}

struct Live(Arc<std::sync::atomic::AtomicUsize>);

impl Live {
    fn new(n: &Arc<std::sync::atomic::AtomicUsize>) -> Live {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Live(n.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn spawn_background(
    tasks: &mut tokio::task::JoinSet<()>,
    background: &Arc<std::sync::atomic::AtomicUsize>,
    d: Arc<Dispatcher>,
    config: &ServerConfig,
    stop: tokio_util::sync::CancellationToken,
) {
    let tick = d.settings.tick;
    let ping = d.settings.stream_ping;
    let (probe_every, retention) = (config.probe_interval, config.retention);
    let reaper = {
        let d = d.clone();
        let stop = stop.clone();
        let live = Live::new(background);
        async move {
            let _live = live;
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pings = tokio::time::interval(ping);
            let mut purge = tokio::time::interval(
                (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
            );
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => d.tick().await,
                    _ = pings.tick() => d.ping_streams(),
                    _ = purge.tick() => {
                        let before = dispatch::now_us() - retention.as_micros() as i64;
                        match d.store().purge(before).await {
                            Ok(0) => {}
                            Ok(n) => log::info!("retention: deleted {n} finished jobs"),
                            Err(e) => log::error!("retention: {e}"),
                        }
                    }
                }
            }
        }
    };
    tasks.spawn(reaper);
    let live = Live::new(background);
    tasks.spawn(async move {
        let _live = live;
        let mut every = tokio::time::interval(probe_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Probes in flight, joined (each ends within its timeout) when the server stops.
        let mut probes_running = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    while probes_running.join_next().await.is_some() {}
                    return;
                }
                _ = every.tick() => {}
            }
            while probes_running.try_join_next().is_some() {}
            let timeout = probe_every.min(Duration::from_secs(2));
            let probes = d.probe_targets().into_iter().map(|(name, session, addr)| {
                let d = d.clone();
                async move {
                    let res = probe(&addr, timeout).await;
                    d.set_probe(&name, &session, res);
                }
            });
            for p in probes {
                probes_running.spawn(p);
            }
        }
    });
}

/// One grpc.health.v1 check of `addr` (overall server health, service "").
pub async fn probe(addr: &str, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| format!("connect to {addr} timed out"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| format!("{addr}: {}", s.message()))?;
    match resp.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("{addr} reports {}", other.as_str_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

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
        // Reaper (with pings and retention), probes, metrics, SIGHUP: all counted while alive.
        assert_eq!(running.background.load(Ordering::SeqCst), 4);
        let store = running.dispatcher.store().clone();
        assert!(store.threads_running());
        // A write accepted just before the stop is committed, not lost.
        let (job, created) = running
            .dispatcher
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
