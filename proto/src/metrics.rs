//! The Prometheus endpoint both daemons serve: `GET /metrics` in the text exposition format
//! (OpenMetrics 1.0 text, which Prometheus scrapes natively), `GET /healthz` for a load balancer.
//! What is measured lives in each daemon; this module only serves what `render` returns.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Renders the current metrics as exposition text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A label set of a metric family, e.g. `[("state", "running")]`.
pub type Labels = Vec<(String, String)>;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The exposition text of `registry` (an encoding failure is logged and yields what was written).
pub fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        log::error!("metrics: encoding failed: {e}");
    }
    out
}

/// Content type of the OpenMetrics text format (what `prometheus_client::encoding::text` writes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 32;
/// A connection is closed after this long, whatever it is doing (a scrape takes milliseconds).
const CONNECTION_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `/metrics` on `listener` until the task is dropped. Each connection gets its own task;
/// a slow scraper never holds up another, and idle or slow clients cannot pile up (bounded
/// connections, a header read timeout and a time limit per connection).
pub async fn serve(listener: TcpListener, render: Render) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(respond(&req, &render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIMIT, conn).await;
        });
    }
}

fn respond(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, render()),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try GET /metrics\n".into(),
        ),
    }
}
