//! A TCP proxy for tests that put a network between an agent and the server: it can cut
//! connections that stay idle too long (like a load balancer's idle timeout) and can be severed
//! on demand (a network partition when namespaces are not available).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running proxy; dropping it does not stop it (call `sever`).
pub struct TcpProxy {
    pub url: String,
    /// Connections closed because they were idle too long.
    pub idle_cuts: Arc<AtomicU64>,
    /// Connections accepted.
    pub accepted: Arc<AtomicU64>,
    cut: CancellationToken,
}

impl TcpProxy {
    /// Closes every connection and stops accepting.
    pub fn sever(&self) {
        self.cut.cancel();
    }
}

/// Proxies 127.0.0.1:<free port> to `upstream` (host:port); connections with no byte in either
/// direction for `idle_cut` are closed.
pub async fn start(upstream: std::net::SocketAddr, idle_cut: Duration) -> TcpProxy {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tcp proxy");
    let addr = listener.local_addr().unwrap();
    let idle_cuts = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let cut = CancellationToken::new();
    let (ic, ac, c) = (idle_cuts.clone(), accepted.clone(), cut.clone());
    tokio::spawn(async move {
        loop {
            let sock = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => return },
                _ = c.cancelled() => return,
            };
            ac.fetch_add(1, Ordering::SeqCst);
            let (ic, c) = (ic.clone(), c.clone());
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = (sock.set_nodelay(true), up.set_nodelay(true));
                pipe(sock, up, idle_cut, ic, c).await;
            });
        }
    });
    TcpProxy {
        url: format!("http://{addr}"),
        idle_cuts,
        accepted,
        cut,
    }
}

async fn pipe(
    a: TcpStream,
    b: TcpStream,
    idle: Duration,
    cuts: Arc<AtomicU64>,
    cut: CancellationToken,
) {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let mut buf_a = vec![0u8; 16 * 1024];
    let mut buf_b = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = ar.read(&mut buf_a) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => if bw.write_all(&buf_a[..n]).await.is_err() { return },
            },
            r = br.read(&mut buf_b) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => if aw.write_all(&buf_b[..n]).await.is_err() { return },
            },
            _ = tokio::time::sleep(idle) => {
                cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
            _ = cut.cancelled() => return,
        }
    }
}
