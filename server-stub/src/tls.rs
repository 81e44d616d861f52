//! The server's TLS handshakes, done here rather than inside tonic, so that a refused one (a
//! client certificate from another CA or expired, a plaintext client, a stalled handshake) is
//! logged with the client's address and the reason, and counted in
//! `es_server_auth_failures_total{kind="handshake"}`; tonic drops them in silence. Connections
//! that complete are handed to tonic, which reads the peer's certificates from them as before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use es_proto::metrics::{labels, Labels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// A client that has not finished its handshake by then is dropped (and logged).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The acceptor: the server's chain and key, client certificates verified against the client
/// CA when presented (submitters may use a token instead: api/auth decides), HTTP/2 only.
pub fn acceptor(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--tls-cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("--tls-key: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| format!("--client-ca: {e}"))?)
            .map_err(|e| format!("--client-ca: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("--client-ca: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert and --tls-key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The connections whose handshakes succeeded, as tonic takes them.
pub type Connections = ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>;

/// The connections whose handshakes succeeded. Accepts until tonic drops the stream (server
/// shutdown); each handshake runs in its own task, bounded by `HANDSHAKE_TIMEOUT`.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    failures: Family<Labels, Counter>,
) -> (Connections, impl std::future::Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(64);
    let accept_loop = async move {
        loop {
            let (tcp, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: wait rather than spin.
                        log::warn!("cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // Small stream messages (offers) must not wait for delayed ACKs; TCP keepalive as on
            // the plaintext path (tonic's TcpIncoming), so half-open connections are found.
            let _ = tcp.set_nodelay(true);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(
                &socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)),
            );
            let (acceptor, tx, failures) = (acceptor.clone(), tx.clone(), failures.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => refused(&failures, addr, &e.to_string()),
                    Err(_) => refused(
                        &failures,
                        addr,
                        &format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                    ),
                }
            });
        }
    };
    (ReceiverStream::new(rx), accept_loop)
}

fn refused(failures: &Family<Labels, Counter>, addr: SocketAddr, why: &str) {
    let reason = reason(why);
    log::warn!("refused TLS handshake from {addr}: {why}");
    failures
        .get_or_create(&labels(&[("kind", "handshake"), ("reason", reason)]))
        .inc();
}

/// A short label for a handshake error (rustls' text), for the metric.
fn reason(why: &str) -> &'static str {
    let w = why.to_ascii_lowercase();
    if w.contains("unknownissuer") || w.contains("unknown ca") || w.contains("unknownca") {
        "unknown_ca"
    } else if w.contains("expired") || w.contains("notvalidyet") {
        "expired"
    } else if w.contains("corrupt message") || w.contains("invalidcontenttype") {
        "not_tls"
    } else if w.contains("no handshake within") {
        "timeout"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::reason;

    #[test]
    fn handshake_errors_get_a_short_reason() {
        for (why, want) in [
            ("invalid peer certificate: UnknownIssuer", "unknown_ca"),
            ("invalid peer certificate: Expired", "expired"),
            (
                "received corrupt message of type InvalidContentType",
                "not_tls",
            ),
            ("no handshake within 10 s", "timeout"),
            ("peer is incompatible: NoCipherSuitesInCommon", "other"),
        ] {
            assert_eq!(reason(why), want, "{why}");
        }
    }
}
