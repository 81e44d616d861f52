//! A small HTTP/1.1 proxy in front of the moto EC2 emulator that makes it behave more like a
//! region: a fixed latency per call, EC2-style token buckets (RequestLimitExceeded when a
//! bucket is empty) and, for fault tests, a share of throttled or 5xx answers. It counts calls
//! by action, independently of the agent's own counter.
//!
//! Token buckets (per account and region in EC2; here per proxy), modelled on the EC2
//! documentation's defaults: non-mutating actions (Describe*) 100 tokens refilling 20/s;
//! mutating actions 50 refilling 5/s; RunInstances requests 1000 refilling 2/s, plus the
//! RunInstances resource bucket of 1000 instances refilling 2/s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sees each request (head, body) before it is forwarded; answers a reply to send instead, if any.
#[derive(Clone)]
pub struct Hook(pub Arc<HookFn>);

/// (request head, request body) -> a reply to send instead of forwarding, if any.
pub type HookFn = dyn Fn(&str, &[u8]) -> Option<Vec<u8>> + Send + Sync;

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// Called for every request (e.g. to play EC2 Instance Connect for test sshd servers).
    pub hook: Option<Hook>,
    /// Added before each call is forwarded.
    pub latency: Duration,
    /// Enforce the EC2 token buckets.
    pub buckets: bool,
    /// With `buckets`: the buckets never refill (a control whose outcome does not depend on how
    /// fast the machine sends the burst).
    pub no_refill: bool,
    /// Share (0..=100) of calls answered RequestLimitExceeded at random.
    pub throttle_percent: u32,
    /// Share (0..=100) of calls answered 503 InternalError at random.
    pub error_percent: u32,
    /// Answer every call of this action with HTTP 400 and this error code (a "real" error).
    pub fail: Option<(String, String)>,
    /// 5xx bursts: every `.0` (from the proxy's start), all calls for `.1` answer 500.
    pub burst: Option<(Duration, Duration)>,
    /// Latency spikes: a share `.0` (0..=100) of calls waits `.1` more before it is forwarded.
    pub spike: Option<(u32, Duration)>,
}

#[derive(Debug)]
struct Bucket {
    size: f64,
    refill: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(size: f64, refill: f64) -> Bucket {
        Bucket {
            size,
            refill,
            tokens: size,
            at: Instant::now(),
        }
    }
    fn take(&mut self, n: f64) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.refill).min(self.size);
        self.at = now;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// What went through the proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub calls: Mutex<HashMap<String, u64>>,
    pub throttled: Mutex<HashMap<String, u64>>,
    pub errors: Mutex<u64>,
    /// Calls answered 500 inside a burst.
    pub burst_errors: Mutex<u64>,
    /// Calls delayed by a spike.
    pub spiked: Mutex<u64>,
    /// Every call forwarded to the emulator, in the order answered: what the longest chain of
    /// calls that followed one another is computed from ([`longest_chain`]).
    pub spans: Mutex<Vec<Span>>,
    /// Replaces the configured latency from now on when set (a benchmark's baseline run).
    pub latency_override: Mutex<Option<Duration>>,
}

/// One call through the proxy: when it arrived, when it was answered, its operation.
#[derive(Debug, Clone)]
pub struct Span {
    pub start: Instant,
    pub end: Instant,
    pub op: String,
}

/// The longest sequence of calls in `spans` where each one arrived only after the one before it
/// was answered: the dependent chain a job's calls formed, as seen from outside the agent (an
/// upper bound of its true critical path: two independent calls may also follow one another).
/// Answers the chain's operations, first to last.
pub fn longest_chain(spans: &[Span]) -> Vec<String> {
    let mut by_end: Vec<&Span> = spans.iter().collect();
    by_end.sort_by_key(|s| s.end);
    // best[i]: the length of the longest chain ending with call i, and the call before it.
    let mut best: Vec<(usize, Option<usize>)> = Vec::with_capacity(by_end.len());
    for i in 0..by_end.len() {
        let before = (0..i)
            .filter(|&j| by_end[j].end <= by_end[i].start)
            .max_by_key(|&j| best[j].0);
        best.push((before.map_or(0, |j| best[j].0) + 1, before));
    }
    let mut at = (0..best.len()).max_by_key(|&i| best[i].0);
    let mut chain = Vec::new();
    while let Some(i) = at {
        chain.push(by_end[i].op.clone());
        at = best[i].1;
    }
    chain.reverse();
    chain
}

impl ProxyStats {
    pub fn calls(&self) -> HashMap<String, u64> {
        self.calls.lock().unwrap().clone()
    }
    pub fn throttled_total(&self) -> u64 {
        self.throttled.lock().unwrap().values().sum()
    }
}

struct State {
    cfg: ProxyConfig,
    upstream: SocketAddr,
    buckets: Mutex<HashMap<String, Bucket>>,
    run_resource: Mutex<Bucket>,
    stats: Arc<ProxyStats>,
    started: Instant,
}

/// Starts the proxy on 127.0.0.1 (port picked by the OS); answers its URL and its counters.
/// It runs until the runtime stops.
pub async fn start(upstream_url: &str, cfg: ProxyConfig) -> (String, Arc<ProxyStats>) {
    let upstream: SocketAddr = upstream_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("upstream host:port");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(ProxyStats::default());
    let state = Arc::new(State {
        cfg,
        upstream,
        buckets: Mutex::new(HashMap::new()),
        run_resource: Mutex::new(Bucket::new(1000.0, 2.0)),
        stats: stats.clone(),
        started: Instant::now(),
    });
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let _ = serve(sock, state).await;
            });
        }
    });
    (format!("http://{addr}"), stats)
}

/// Reads one HTTP/1.1 message (headers + Content-Length body). None at EOF.
async fn read_message(sock: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 8192];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[header_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Ok(Some((head, body)))
}

/// The operation of a request: `Action=` of an EC2/STS query, or the `X-Amz-Target` header of a
/// JSON protocol call (SSM: `AmazonSSM.PutParameter`); and its MaxCount (instances asked for).
fn action(head: &str, body: &[u8]) -> (String, u32) {
    let text = String::from_utf8_lossy(body);
    let target = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("x-amz-target")
            .then(|| v.trim().rsplit('.').next().unwrap_or_default().to_owned())
    });
    let mut action = target.unwrap_or_else(|| String::from("Unknown"));
    let mut count = 1;
    for pair in text.split('&') {
        if let Some(v) = pair.strip_prefix("Action=") {
            action = v.to_owned();
        }
        if let Some(v) = pair.strip_prefix("MaxCount=") {
            count = v.parse().unwrap_or(1);
        }
    }
    (action, count)
}

/// A whole HTTP response carrying an EC2 error (for hooks that answer in EC2's place).
pub fn ec2_error(status: &str, code: &str, message: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>es-proxy</RequestID></Response>"
    );
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn serve(mut sock: TcpStream, st: Arc<State>) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let Some((head, body)) = read_message(&mut sock).await? else {
        return Ok(());
    };
    let (act, count) = action(&head, &body);
    // Every call is counted, those a hook answers in EC2's place too.
    *st.stats
        .calls
        .lock()
        .unwrap()
        .entry(act.clone())
        .or_default() += 1;
    if let Some(reply) = st.cfg.hook.as_ref().and_then(|h| (h.0)(&head, &body)) {
        sock.write_all(&reply).await?;
        return sock.shutdown().await;
    }
    let arrived = Instant::now();
    let roll = |pct: u32| pct > 0 && rand::random_range(0..100) < pct;
    let mut delay = st
        .stats
        .latency_override
        .lock()
        .unwrap()
        .unwrap_or(st.cfg.latency);
    if let Some((pct, extra)) = st.cfg.spike {
        if roll(pct) {
            *st.stats.spiked.lock().unwrap() += 1;
            delay += extra;
        }
    }
    tokio::time::sleep(delay).await;
    let in_burst = st.cfg.burst.is_some_and(|(every, length)| {
        let t = st.started.elapsed().as_nanos() % every.as_nanos().max(1);
        t < length.as_nanos()
    });

    let mut throttled = roll(st.cfg.throttle_percent);
    if !throttled && st.cfg.buckets {
        let (size, mut refill) = if act == "RunInstances" {
            (1000.0, 2.0)
        } else if act.starts_with("Describe") {
            (100.0, 20.0)
        } else {
            (50.0, 5.0)
        };
        if st.cfg.no_refill {
            refill = 0.0;
        }
        let ok = st
            .buckets
            .lock()
            .unwrap()
            .entry(act.clone())
            .or_insert_with(|| Bucket::new(size, refill))
            .take(1.0);
        throttled =
            !ok || (act == "RunInstances" && !st.run_resource.lock().unwrap().take(count as f64));
    }
    let fail = st
        .cfg
        .fail
        .as_ref()
        .filter(|(a, _)| *a == act)
        .map(|(_, code)| code.clone());
    let reply = if let Some(code) = fail {
        ec2_error("400 Bad Request", &code, "injected by the test proxy")
    } else if in_burst {
        *st.stats.burst_errors.lock().unwrap() += 1;
        ec2_error(
            "500 Internal Server Error",
            "InternalError",
            "An internal error has occurred.",
        )
    } else if throttled {
        *st.stats
            .throttled
            .lock()
            .unwrap()
            .entry(act.clone())
            .or_default() += 1;
        ec2_error(
            "503 Service Unavailable",
            "RequestLimitExceeded",
            "Request limit exceeded.",
        )
    } else if roll(st.cfg.error_percent) {
        *st.stats.errors.lock().unwrap() += 1;
        ec2_error(
            "503 Service Unavailable",
            "InternalError",
            "An internal error has occurred.",
        )
    } else {
        // Forward with `Connection: close` and read the answer to the end.
        let mut up = TcpStream::connect(st.upstream).await?;
        let _ = up.set_nodelay(true);
        let mut fwd = String::new();
        for line in head.split("\r\n").filter(|l| !l.is_empty()) {
            if line.to_ascii_lowercase().starts_with("connection:") {
                continue;
            }
            fwd.push_str(line);
            fwd.push_str("\r\n");
        }
        fwd.push_str("Connection: close\r\n\r\n");
        up.write_all(fwd.as_bytes()).await?;
        up.write_all(&body).await?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp).await?;
        resp
    };
    sock.write_all(&reply).await?;
    st.stats.spans.lock().unwrap().push(Span {
        start: arrived,
        end: Instant::now(),
        op: act,
    });
    sock.shutdown().await
}
