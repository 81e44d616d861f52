//! A TCP proxy for tests that put a network between an agent and the server: it can cut
//! connections that stay idle too long (like a load balancer's idle timeout), be severed on
//! demand, or be partitioned: no byte crosses in either direction and new connections hang
//! (like a link whose packets are dropped) until `heal`, when held bytes are delivered late.
//! This stands in for a network namespace with its veth taken down, and works without root.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running proxy; dropping it does not stop it (call `sever`).
pub struct TcpProxy {
    pub url: String,
    /// Connections closed because they were idle too long.
    pub idle_cuts: Arc<AtomicU64>,
    /// Connections accepted.
    pub accepted: Arc<AtomicU64>,
    cut: CancellationToken,
    partitioned: watch::Sender<bool>,
}

impl TcpProxy {
    /// Closes every connection and stops accepting.
    pub fn sever(&self) {
        self.cut.cancel();
    }

    /// Stops every byte in both directions, on open and new connections, until `heal`.
    pub fn partition(&self) {
        self.partitioned.send_replace(true);
    }

    /// Lets bytes through again; what was held is delivered now (late).
    pub fn heal(&self) {
        self.partitioned.send_replace(false);
    }
}

/// Proxies 127.0.0.1:<free port> to `upstream` (host:port); connections with no byte in either
/// direction for `idle_cut` are closed (a partition does not count as idle).
pub async fn start(upstream: std::net::SocketAddr, idle_cut: Duration) -> TcpProxy {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tcp proxy");
    let addr = listener.local_addr().unwrap();
    let idle_cuts = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let cut = CancellationToken::new();
    let (partitioned, part_rx) = watch::channel(false);
    let (ic, ac, c) = (idle_cuts.clone(), accepted.clone(), cut.clone());
    tokio::spawn(async move {
        loop {
            let sock = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => return },
                _ = c.cancelled() => return,
            };
            ac.fetch_add(1, Ordering::SeqCst);
            let (ic, c, mut part) = (ic.clone(), c.clone(), part_rx.clone());
            tokio::spawn(async move {
                // A connection made during a partition gets no answer until it heals.
                tokio::select! {
                    r = part.wait_for(|p| !*p) => if r.is_err() { return },
                    _ = c.cancelled() => return,
                }
                let Ok(up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = (sock.set_nodelay(true), up.set_nodelay(true));
                let (ar, aw) = sock.into_split();
                let (br, bw) = up.into_split();
                // One connection: closing either direction closes both.
                let conn = c.child_token();
                let last = Arc::new(std::sync::Mutex::new(Instant::now()));
                let idle = Idle {
                    after: idle_cut,
                    last,
                    cuts: ic,
                };
                tokio::join!(
                    pipe(ar, bw, idle.clone(), conn.clone(), part.clone()),
                    pipe(br, aw, idle, conn, part)
                );
            });
        }
    });
    TcpProxy {
        url: format!("http://{addr}"),
        idle_cuts,
        accepted,
        cut,
        partitioned,
    }
}

/// The idle cut of one connection: the last byte in either direction.
#[derive(Clone)]
struct Idle {
    after: Duration,
    last: Arc<std::sync::Mutex<Instant>>,
    cuts: Arc<AtomicU64>,
}

impl Idle {
    fn touch(&self) {
        *self.last.lock().unwrap() = Instant::now();
    }
    fn deadline(&self) -> Instant {
        *self.last.lock().unwrap() + self.after
    }
}

/// Copies one direction. Bytes read while partitioned are held until the partition heals.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    idle: Idle,
    cut: CancellationToken,
    mut part: watch::Receiver<bool>,
) {
    let _close_both = cut.clone().drop_guard();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if *part.borrow() {
            tokio::select! {
                r = part.wait_for(|p| !*p) => if r.is_err() { return },
                _ = cut.cancelled() => return,
            }
            idle.touch();
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = part.changed() => {
                idle.touch();
                continue;
            }
            _ = tokio::time::sleep_until(idle.deadline().into()) => {
                if Instant::now() < idle.deadline() {
                    continue;
                }
                if !cut.is_cancelled() {
                    cut.cancel();
                    idle.cuts.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
            _ = cut.cancelled() => return,
        };
        if *part.borrow() {
            tokio::select! {
                r = part.wait_for(|p| !*p) => if r.is_err() { return },
                _ = cut.cancelled() => return,
            }
            idle.touch();
        }
        idle.touch();
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
