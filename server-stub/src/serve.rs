//! Serving: bind, then (on PostgreSQL) stand by until this replica leads, then recover the
//! jobs and serve until shutdown or deposition. Called by `es-server serve` and by tests.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use es_proto::limits::MAX_MESSAGE;
use es_proto::v1::agent_service_server::AgentServiceServer;
use es_proto::v1::job_service_server::JobServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::replica::{self, Phase};
use crate::store::postgres::{self, Database};
use crate::{
    api, metrics, read_file, retention, store, tls, Db, Dispatcher, Running, ServerConfig,
    ServerError,
};

/// Where the jobs are, once known to be reachable.
enum Backend {
    /// Recovered at start: one server, it leads from the start.
    Sqlite(Arc<Dispatcher>),
    Postgres(Box<Database>),
}

/// Binds, recovers the store and serves until `shutdown` resolves. On PostgreSQL, answers as
/// soon as it listens: as a standby (NOT_SERVING, UNAVAILABLE naming the leader) until it
/// takes the lead; [`Running::dispatcher`] is set once it leads.
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
    let metrics = Arc::new(metrics::ServerMetrics::default());
    let backend = match &config.db {
        Db::Sqlite(path) => {
            let store = store::sqlite::open(path, config.db_sync)?;
            Backend::Sqlite(
                Dispatcher::recover_with(store, config.settings(), metrics.clone()).await?,
            )
        }
        Db::Postgres(url) => {
            let db = Database::parse(url, config.db_ca.as_deref())?;
            postgres::prepare(&db).await?;
            Backend::Postgres(Box::new(db))
        }
    };
    let auth = Arc::new(api::auth::Auth::new(
        tls.is_some(),
        api::auth::AuthFiles {
            tokens: config.tokens.clone(),
            deny: config.deny.clone(),
            agents: config.agents.clone(),
        },
        metrics.auth_failures.clone(),
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

    let (health_reporter, _) = tonic_health::server::health_reporter();
    let stop = CancellationToken::new();
    let background = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cell: Arc<OnceLock<Arc<Dispatcher>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(l) = metrics_listener {
        let (cell, metrics, stop, live) = (
            cell.clone(),
            metrics.clone(),
            stop.clone(),
            Live::new(&background),
        );
        tasks.spawn(async move {
            let _live = live;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = es_proto::metrics::serve(l, Arc::new(move || match cell.get() {
                    Some(d) => {
                        let now = metrics::Snapshot {
                            active: d.active_counts(),
                            agents: d.agents(),
                            leading: true,
                        };
                        d.metrics().render(&now)
                    }
                    None => metrics.render_standby(),
                })) => {}
            }
        });
    }
    {
        let (auth, stop, live) = (auth.clone(), stop.clone(), Live::new(&background));
        tasks.spawn(async move {
            let _live = live;
            api::auth::reload_on_sighup(auth, stop).await
        });
    }
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| replica::default_advertise(addr));
    let d = humantime::format_duration;
    log::info!(
        "es-server listening on {addr} (advertised as {advertise}), store {}; heartbeat {}, lease TTL {}, heartbeat timeout {}, offer timeout {}",
        config.db,
        d(config.heartbeat_interval),
        d(config.lease_ttl),
        d(config.heartbeat_timeout),
        d(config.offer_timeout)
    );
    let leading = Leading {
        config,
        auth,
        metrics,
        health_reporter,
        cell: cell.clone(),
        background: background.clone(),
    };
    // On SQLite this server leads from its first accepted connection (see Phase::split).
    let leads_now = matches!(backend, Backend::Sqlite(_));
    // Our own listener (port 0 support), so socket options are set here: without TCP_NODELAY,
    // small stream messages (offers) wait for delayed ACKs (~40 ms). With TLS, our own
    // handshakes (tls.rs). Connections go to the standby's server or the leader's (replica.rs).
    let task = match tls {
        None => {
            let phase = Phase::split(
                tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(60))),
                leads_now,
                &mut tasks,
                Live::new(&background),
                stop.clone(),
            );
            tokio::spawn(drive(
                backend, leading, phase, advertise, tasks, stop, shutdown,
            ))
        }
        Some(acceptor) => {
            let (stream, accept_loop) =
                tls::incoming(listener, acceptor, leading.metrics.auth_failures.clone());
            let live = Live::new(&background);
            tasks.spawn(async move {
                let _live = live;
                accept_loop.await
            });
            let phase = Phase::split(
                stream,
                leads_now,
                &mut tasks,
                Live::new(&background),
                stop.clone(),
            );
            tokio::spawn(drive(
                backend, leading, phase, advertise, tasks, stop, shutdown,
            ))
        }
    };
    Ok(Running {
        addr,
        dispatcher: cell,
        task,
        background,
    })
}

/// What the leading phase needs, made before the phases so that bad settings fail the start.
struct Leading {
    config: ServerConfig,
    auth: Arc<api::auth::Auth>,
    metrics: Arc<metrics::ServerMetrics>,
    health_reporter: tonic_health::server::HealthReporter,
    cell: Arc<OnceLock<Arc<Dispatcher>>>,
    background: Arc<std::sync::atomic::AtomicUsize>,
}

/// The whole life of a server after `start`: stand by (PostgreSQL), lead, and at the end join
/// everything it started, then the store, then (PostgreSQL) free the leader lock.
async fn drive<IO>(
    backend: Backend,
    leading: Leading,
    phase: Phase<IO>,
    advertise: String,
    mut tasks: tokio::task::JoinSet<()>,
    stop: CancellationToken,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError>
where
    IO: replica::Conn,
{
    // The outside `shutdown` as a token both phases watch; joined below.
    let quit = CancellationToken::new();
    let watcher = {
        let quit = quit.clone();
        tokio::spawn(async move {
            shutdown.await;
            quit.cancel();
        })
    };
    let release = CancellationToken::new();
    let Phase {
        switch,
        standby,
        leader: leader_conns,
    } = phase;
    let mut keeper_task = None;
    let res = async {
        let (dispatcher, leadership) = match &backend {
            Backend::Sqlite(d) => (d.clone(), None),
            Backend::Postgres(db) => {
                let here = advertise.clone();
                let won = replica::stand_by(
                    db,
                    standby,
                    &switch,
                    &leading.health_reporter,
                    advertise,
                    quit.clone(),
                    release.clone(),
                )
                .await;
                let Some((l, keeper)) = won else {
                    return Ok(());
                };
                replica::status(&format!(
                    "leading the job store {} (epoch {}), serving on {here}",
                    db.shown(),
                    l.epoch()
                ));
                keeper_task = Some(keeper);
                let store: store::Store = Arc::new(postgres::PgStore::open(db, l.clone())?);
                let recovered = Dispatcher::recover_with(
                    store.clone(),
                    leading.config.settings(),
                    leading.metrics.clone(),
                )
                .await;
                match recovered {
                    Ok(d) => (d, Some(l)),
                    Err(e) => {
                        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
                        return Err(e.into());
                    }
                }
            }
        };
        switch.lead();
        let deposed = leadership.as_ref().map(|l| l.deposed()).unwrap_or_default();
        let store = dispatcher.store().clone();
        let served = lead(
            dispatcher,
            &leading,
            leader_conns,
            &mut tasks,
            &stop,
            &quit,
            &deposed,
        )
        .await;
        // Background tasks first (they use the store), then the store after committing what
        // was queued; the leader lock last (below).
        stop.cancel();
        while tasks.join_next().await.is_some() {}
        let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        served?;
        match leadership.and_then(|l| l.deposed_reason()) {
            Some(why) => Err(ServerError::Deposed(why)),
            None => Ok(()),
        }
    }
    .await;
    release.cancel();
    if let Some(k) = keeper_task {
        let _ = k.await;
    }
    watcher.abort();
    let _ = watcher.await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    res
}

/// Leads: serves the recovered jobs until `quit` or deposition.
async fn lead<IO>(
    dispatcher: Arc<Dispatcher>,
    l: &Leading,
    conns: replica::Conns<IO>,
    tasks: &mut tokio::task::JoinSet<()>,
    stop: &CancellationToken,
    quit: &CancellationToken,
    deposed: &CancellationToken,
) -> Result<(), ServerError>
where
    IO: replica::Conn,
{
    let _ = l.cell.set(dispatcher.clone());
    spawn_background(
        tasks,
        &l.background,
        dispatcher.clone(),
        &l.config,
        stop.clone(),
    );
    replica::set_all(&l.health_reporter, tonic_health::ServingStatus::Serving).await;
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
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(l.health_reporter.clone()),
        ))
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            AgentServiceServer::new(api::AgentApi {
                d: dispatcher.clone(),
                auth: l.auth.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            JobServiceServer::new(api::JobApi {
                d: dispatcher.clone(),
                auth: l.auth.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        );
    let reporter = l.health_reporter.clone();
    let (quit, deposed) = (quit.clone(), deposed.clone());
    let streams = dispatcher.clone();
    let shutdown = async move {
        tokio::select! {
            _ = quit.cancelled() => {}
            _ = deposed.cancelled() => {}
        }
        replica::set_all(&reporter, tonic_health::ServingStatus::NotServing).await;
        streams.close_streams();
    };
    router.serve_with_incoming_shutdown(conns, shutdown).await?;
    Ok(())
}

/// Counts a background task while it lives (see [`Running::background`]).
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
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => d.tick().await,
                    _ = pings.tick() => d.ping_streams(),
                }
            }
        }
    };
    tasks.spawn(reaper);
    // Its own task: lease expiry (the reaper's tick) never waits for a purge.
    let (store, live, stop_purging) = (d.store().clone(), Live::new(background), stop.clone());
    tasks.spawn(async move {
        let _live = live;
        retention::run(store, retention, stop_purging).await;
    });
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
