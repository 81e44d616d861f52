//! Replicas on one PostgreSQL database: the standby phase. A standby listens from the start
//! (so systemd and load balancers see it up), reports NOT_SERVING on grpc.health.v1 and answers
//! every other call UNAVAILABLE naming the leader, while it asks for the leader lock
//! (store/postgres/leader.rs). Once it leads, new connections go to the leader's server and
//! the standby's server closes its own (clients reconnect, and reach the leader's).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::store::postgres::{leader, Database, Leadership};

/// What tonic serves: a plaintext or TLS connection it can read the peer of.
pub trait Conn:
    tokio::io::AsyncRead
    + tokio::io::AsyncWrite
    + tonic::transport::server::Connected
    + Unpin
    + Send
    + 'static
{
}

impl<T> Conn for T where
    T: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static
{
}

/// Connections waiting for a server to take them.
pub type Conns<IO> = futures::stream::Map<ReceiverStream<IO>, fn(IO) -> std::io::Result<IO>>;

/// Where accepted connections go: the standby's server until this replica leads, then the
/// leader's.
pub struct Phase<IO> {
    pub switch: Switch,
    pub standby: Conns<IO>,
    pub leader: Conns<IO>,
}

impl<IO: Send + 'static> Phase<IO> {
    /// Forwards what `incoming` accepts (failed accepts are dropped: the accept loops log
    /// them) until `stop`. `leads` is true for a server that leads from the start (SQLite):
    /// set before the first accept, so no connection ever waits for a standby's server that
    /// such a server never runs (a client connecting as soon as the server logged that it
    /// listens hung there when the accept ran before the server's first step).
    pub fn split<E: Send + 'static>(
        incoming: impl Stream<Item = Result<IO, E>> + Send + 'static,
        leads: bool,
        tasks: &mut tokio::task::JoinSet<()>,
        live: impl Send + 'static,
        stop: CancellationToken,
    ) -> Phase<IO> {
        let (standby_tx, standby_rx) = mpsc::channel::<IO>(1024);
        let (leader_tx, leader_rx) = mpsc::channel::<IO>(1024);
        let leading = Arc::new(AtomicBool::new(leads));
        let now_leading = leading.clone();
        tasks.spawn(async move {
            let _live = live;
            let mut incoming = std::pin::pin!(incoming);
            loop {
                let conn = tokio::select! {
                    _ = stop.cancelled() => return,
                    c = incoming.next() => c,
                };
                match conn {
                    None => return,
                    Some(Err(_)) => {}
                    Some(Ok(io)) => {
                        let to = if now_leading.load(Ordering::SeqCst) {
                            &leader_tx
                        } else {
                            &standby_tx
                        };
                        let _ = to.send(io).await;
                    }
                }
            }
        });
        let ok: fn(IO) -> std::io::Result<IO> = Ok;
        Phase {
            switch: Switch(leading),
            standby: ReceiverStream::new(standby_rx).map(ok),
            leader: ReceiverStream::new(leader_rx).map(ok),
        }
    }
}

/// Turns the flow of connections to the leader's server.
pub struct Switch(Arc<AtomicBool>);

impl Switch {
    /// From now on, connections go to the leader's server.
    pub fn lead(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The address this replica is reached at, when `--advertise` is not given: the bound one, or
/// the host's name with the port when bound to every interface.
pub fn default_advertise(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// This replica's name in the leader row: host and process.
fn me() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host} pid {}", std::process::id())
}

/// Serves as a standby until this replica leads (answers its leadership and the task keeping
/// it; `release` ends that task, freeing the lock) or `quit` fires (`None`).
pub async fn stand_by<IO>(
    db: &Database,
    conns: Conns<IO>,
    switch: &Switch,
    reporter: &HealthReporter,
    advertise: String,
    quit: CancellationToken,
    release: CancellationToken,
) -> Option<(Arc<Leadership>, tokio::task::JoinHandle<()>)>
where
    IO: Conn,
{
    set_all(reporter, ServingStatus::NotServing).await;
    let (seen_tx, seen_rx) = watch::channel(String::new());
    status(&format!(
        "standby on {advertise}: waiting to lead the job store"
    ));
    // systemd's status line names the leader as this standby sees it; ends with the campaign.
    let mut seen = seen_rx.clone();
    let here = advertise.clone();
    let said = tokio::spawn(async move {
        while seen.changed().await.is_ok() {
            let leader = seen.borrow_and_update().clone();
            if !leader.is_empty() {
                status(&format!("standby on {here}: the leader is {leader}"));
            }
        }
    });
    let promoted = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .layer(tower::layer::layer_fn(move |inner| Gate {
            inner,
            leader: seen_rx.clone(),
        }))
        .add_service(HealthServer::new(HealthService::from_health_reporter(
            reporter.clone(),
        )))
        .serve_with_incoming_shutdown(conns, promoted.clone().cancelled_owned());
    let server = tokio::spawn(async move {
        if let Err(e) = server.await {
            log::error!("standby: serving failed: {e}");
        }
    });
    log::info!("standby: waiting to lead the job store {}", db.shown());
    let won = tokio::select! {
        won = leader::campaign(db.clone(), me(), advertise, seen_tx, release) => won,
        _ = quit.cancelled() => None,
    };
    let _ = said.await;
    if won.is_some() {
        // New connections wait for the leader's server from now on, not for this one.
        switch.lead();
    }
    promoted.cancel();
    // Closing waits for calls in flight; a health Watch would hold it open, so not for long.
    let mut server = server;
    if tokio::time::timeout(Duration::from_secs(2), &mut server)
        .await
        .is_err()
    {
        server.abort();
        let _ = server.await;
    }
    won
}

/// systemd's status line of this server (`systemctl status es-server`); nothing when not
/// under systemd (no NOTIFY_SOCKET).
pub fn status(text: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(text)]);
}

/// Sets every service this server reports ("" = the whole server) to `status`.
pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    use es_proto::v1::agent_service_server::AgentServiceServer;
    use es_proto::v1::job_service_server::JobServiceServer;
    use tonic::server::NamedService;
    for name in [
        "",
        <AgentServiceServer<crate::api::AgentApi> as NamedService>::NAME,
        <JobServiceServer<crate::api::JobApi> as NamedService>::NAME,
    ] {
        reporter.set_service_status(name, status).await;
    }
}

/// The standby's gate: health checks pass through; every other call is answered UNAVAILABLE
/// with who leads, so a client tries its next address.
#[derive(Clone)]
struct Gate<S> {
    inner: S,
    leader: watch::Receiver<String>,
}

/// The UNAVAILABLE message of a standby.
pub fn standby_message(leader: &str) -> String {
    if leader.is_empty() {
        "this es-server is a standby and no leader is known yet: try again shortly, or another address".into()
    } else {
        format!("this es-server is a standby; the leader is {leader}: use its address")
    }
}

impl<S> tower::Service<http::Request<Body>> for Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path().starts_with("/grpc.health.v1.") {
            return Box::pin(self.inner.call(req));
        }
        let status = tonic::Status::unavailable(standby_message(&self.leader.borrow()));
        Box::pin(async move { Ok(status.into_http()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which server each connection goes to: a server that leads from the start never hands
    /// one to the standby's server (it runs none), a replica does until it leads.
    #[tokio::test]
    async fn connections_go_to_the_standby_until_the_replica_leads() {
        for (leads_from_start, lead_after_first, want) in [
            (true, false, ["leader", "leader"]),
            (false, false, ["standby", "standby"]),
            (false, true, ["standby", "leader"]),
        ] {
            let (tx, rx) = mpsc::channel::<Result<u32, ()>>(1);
            let mut tasks = tokio::task::JoinSet::new();
            let stop = CancellationToken::new();
            let mut phase = Phase::split(
                ReceiverStream::new(rx),
                leads_from_start,
                &mut tasks,
                (),
                stop.clone(),
            );
            let mut got = Vec::new();
            for n in 0..2u32 {
                if n == 1 && lead_after_first {
                    phase.switch.lead();
                }
                tx.send(Ok(n)).await.unwrap();
                got.push(tokio::select! {
                    Some(Ok(c)) = phase.standby.next() => { assert_eq!(c, n); "standby" }
                    Some(Ok(c)) = phase.leader.next() => { assert_eq!(c, n); "leader" }
                });
            }
            assert_eq!(got, want, "leads from start {leads_from_start}");
            stop.cancel();
            while tasks.join_next().await.is_some() {}
        }
    }

    #[test]
    fn a_standby_names_the_leader_when_it_knows_it() {
        assert!(standby_message("").contains("no leader is known yet"));
        let m = standby_message("db-1 pid 7 at 10.0.0.5:7700 (epoch 3)");
        assert!(
            m.contains("the leader is db-1 pid 7 at 10.0.0.5:7700"),
            "{m}"
        );
    }
}
