//! Test kit for the end-to-end tests and the benchmark: starts real `es-server` and `es-agent`
//! processes on loopback (port 0), talks to them over gRPC, and kills them when dropped so a
//! failed test leaves nothing running. On a panic, the tail of each process's log is printed.

pub mod ec2proxy;
pub mod machine;
pub mod pg;
pub mod pki;
pub mod sshd;
pub mod tcpproxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use es_proto::v1::job_service_client::JobServiceClient;
use es_proto::v1::*;
use tonic::transport::Channel;

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    pub server: PathBuf,
    pub agent: PathBuf,
}

impl Bins {
    /// `es-server` and `es-agent` next to the running program (the benchmarks), unless given;
    /// panics with the build command when they are missing.
    pub fn beside_current_exe(server: Option<PathBuf>, agent: Option<PathBuf>) -> Bins {
        let dir = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_owned))
            .expect("directory of the running program");
        let bins = Bins {
            server: server.unwrap_or_else(|| dir.join("es-server")),
            agent: agent.unwrap_or_else(|| dir.join("es-agent")),
        };
        for b in [&bins.server, &bins.agent] {
            assert!(
                b.exists(),
                "{} not found: run `cargo build --release --workspace --bins` first",
                b.display()
            );
        }
        bins
    }
}

/// A child process that is killed (SIGCONT + SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Takes charge of a child started elsewhere (killed when dropped; `log` shown on a panic).
    pub fn adopt(name: String, child: Child, log: PathBuf) -> Proc {
        Proc {
            name,
            child,
            log,
            exited: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        if self.exited.is_none() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM)
    }
    pub fn sigstop(&self) {
        self.signal(libc::SIGSTOP)
    }
    pub fn sigcont(&self) {
        self.signal(libc::SIGCONT)
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGKILL);
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        while self.exited.is_none() && Instant::now() < until {
            self.exited = self.child.try_wait().ok().flatten();
            if self.exited.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.exited
    }

    /// Waits until the log holds `text` (panics with the log after `timeout`).
    pub fn wait_log(&self, text: &str, timeout: Duration) {
        let until = Instant::now() + timeout;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < until,
                "{} did not log {text:?} within {timeout:?}: {}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory in KiB (Linux /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid())
    }
}

/// Records that test `test` could not check something on this machine, and why: printed as
/// "skipped: ..." and appended to the file named by `ES_TESTS_SKIPPED`, which `scripts/test`
/// lists at the end as skipped (not passed). The test then returns without asserting.
pub fn skipped(test: &str, why: &str) {
    eprintln!("skipped: {test}: {why}");
    if let Ok(path) = std::env::var("ES_TESTS_SKIPPED") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn hwm_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "----- last lines of {} ({}) -----",
                self.name,
                self.log.display()
            );
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A running es-server process.
pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub db: PathBuf,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> JobServiceClient<Channel> {
        connect(&self.url()).await
    }
}

/// Connects a submitter client, retrying briefly while the server starts. A call that gets no
/// answer in 2 minutes fails (status "Timeout expired") instead of hanging
/// the test run: a connection the server never served once hung a test for 15 minutes. The
/// limit is on the answer's start, so Watch streams may run longer.
pub async fn connect(url: &str) -> JobServiceClient<Channel> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match Channel::from_shared(url.to_owned())
            .unwrap()
            .timeout(Duration::from_secs(120))
            .connect()
            .await
        {
            Ok(ch) => return JobServiceClient::new(ch),
            Err(e) if Instant::now() > until => panic!("cannot connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A TLS channel to `addr`: trusts `ca`, presents `identity` (if any). Errors are returned,
/// not panicked on: tests check refusals.
pub async fn tls_channel(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<&pki::CertFiles>,
) -> Result<Channel, String> {
    let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(ca).map_err(|e| e.to_string())?),
    );
    if let Some(id) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(&id.cert).map_err(|e| e.to_string())?,
            std::fs::read(&id.key).map_err(|e| e.to_string())?,
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A submitter client for a TLS server: trusts `ca`, presents `identity` (if any) and sends
/// `token` (if any).
pub async fn tls_client(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<&pki::CertFiles>,
    token: Option<&str>,
) -> Result<es_server::client::Client, String> {
    let ch = tls_channel(addr, ca, identity).await?;
    let token = token.map(|t| format!("Bearer {t}").parse().expect("ascii token"));
    Ok(JobServiceClient::with_interceptor(
        ch,
        es_server::client::Credentials(token),
    ))
}

/// The `Action` names of an IAM policy document in `packaging/iam/` (e.g. `ec2:RunInstances`).
pub fn policy_actions(file: &str) -> std::collections::BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/iam")
        .join(file);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("policy file"))
            .expect("policy JSON");
    let mut out = std::collections::BTreeSet::new();
    for st in doc["Statement"].as_array().expect("Statement list") {
        if st["Effect"] != "Allow" {
            continue;
        }
        match &st["Action"] {
            serde_json::Value::String(a) => {
                out.insert(a.clone());
            }
            serde_json::Value::Array(a) => {
                out.extend(a.iter().filter_map(|x| x.as_str().map(str::to_owned)));
            }
            _ => {}
        }
    }
    out
}

/// Panics unless every operation in `ops` (SDK operation names, e.g. `RunInstances`) is
/// allowed by the policy `file` under `prefix` (e.g. `ec2`).
pub fn assert_policy_allows<'a>(
    file: &str,
    prefix: &str,
    ops: impl IntoIterator<Item = &'a String>,
) {
    let actions = policy_actions(file);
    let missing: Vec<String> = ops
        .into_iter()
        .map(|op| format!("{prefix}:{op}"))
        .filter(|a| !actions.contains(a))
        .collect();
    assert!(
        missing.is_empty(),
        "packaging/iam/{file} does not allow {missing:?}, which the agent called"
    );
}

/// Scrapes `GET /metrics` at `addr` (plain HTTP/1.1 over a TCP socket).
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read metrics");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the sample `name{labels}` (exact text before the value) in exposition `text`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Test timings: short enough for quick tests, long enough for a loaded 2-core machine.
pub const FAST: &[&str] = &[
    "--heartbeat-interval",
    "250ms",
    "--lease-ttl",
    "1500ms",
    "--heartbeat-timeout",
    "1s",
    "--offer-timeout",
    "1s",
    "--cancel-grace",
    "1s",
    "--probe-interval",
    "250ms",
];

/// With `ES_TEST_STORE=postgres`, [`start_server`] keeps each test's jobs in PostgreSQL
/// instead of SQLite: one cluster per test directory, one database per SQLite file name, so a
/// test that restarts its server on the same file finds its jobs again.
fn store_arg(dir: &Path, db: &Path) -> String {
    if std::env::var("ES_TEST_STORE").as_deref() != Ok("postgres") {
        return db.display().to_string();
    }
    static CLUSTERS: std::sync::Mutex<Vec<(PathBuf, pg::Cluster)>> =
        std::sync::Mutex::new(Vec::new());
    let mut clusters = CLUSTERS.lock().unwrap_or_else(|p| p.into_inner());
    // Clusters of tests that have ended (their directory is gone) are stopped.
    clusters.retain(|(d, _)| d.exists());
    let name: String = db
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("es")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if let Some((_, c)) = clusters.iter().find(|(d, _)| d == dir) {
        let url = c.url(&name);
        if c.psql(
            "postgres",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
        )
        .is_empty()
        {
            c.create_db(&name);
        }
        return url;
    }
    let c = pg::Cluster::start();
    let url = c.create_db(&name);
    clusters.push((dir.to_owned(), c));
    url
}

/// A job store opened in this process, of the kind `ES_TEST_STORE` names: SQLite in `dir`, or
/// PostgreSQL on a cluster of its own (returned: the store lives while it does).
pub async fn open_store(dir: &Path) -> (es_server::store::Store, Option<pg::Cluster>) {
    if std::env::var("ES_TEST_STORE").as_deref() != Ok("postgres") {
        let path = dir.join("es.db");
        let store = es_server::store::sqlite::open(&path, es_server::store::Sync::Normal);
        return (store.unwrap(), None);
    }
    let cluster = pg::Cluster::start();
    let url = cluster.create_db("es");
    (pg::open_store(&url).await, Some(cluster))
}

/// Starts `es-server serve` on `listen` (e.g. `127.0.0.1:0`) with the store at `db`; plaintext
/// (`--insecure`) unless `args` configure TLS.
pub fn start_server(bins: &Bins, dir: &Path, db: &Path, listen: &str, args: &[&str]) -> Server {
    let store = store_arg(dir, db);
    let server = start_server_on(bins, dir, &store, db, listen, args);
    if store.starts_with("postgres://") {
        // Alone on its database it leads at once; the tests expect a serving server.
        server
            .proc
            .wait_log("leading the job store", Duration::from_secs(30));
    }
    server
}

/// [`start_server`] with `--db` given as it is (a file or a postgres:// URL).
pub fn start_server_on(
    bins: &Bins,
    dir: &Path,
    store: &str,
    db: &Path,
    listen: &str,
    args: &[&str],
) -> Server {
    start_server_env(bins, dir, store, db, listen, args, &[])
}

/// Like [`start_server_on`], with extra environment variables.
pub fn start_server_env(
    bins: &Bins,
    dir: &Path,
    store: &str,
    db: &Path,
    listen: &str,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> Server {
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let log = dir.join(format!("server-{n}.log"));
    let mut child = Command::new(&bins.server)
        .arg("serve")
        .arg("--listen")
        .arg(listen)
        .arg("--db")
        .arg(store)
        .args((!args.contains(&"--tls-cert")).then_some("--insecure"))
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("server log"))
        .spawn()
        .expect("spawn es-server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    let mut proc = Proc {
        name: "es-server".into(),
        child,
        log,
        exited: None,
    };
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(l) => l,
        Err(_) => {
            let status = proc.wait_exit(Duration::from_millis(100));
            panic!("es-server did not start ({status:?}): {}", proc.log());
        }
    };
    let addr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line from es-server: {line:?}"));
    Server {
        proc,
        addr,
        db: db.to_owned(),
    }
}

/// What an agent process is started with.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    pub role: &'static str,
    pub selector: String,
    pub slots: u32,
    pub fallback: bool,
    pub health: bool,
    pub transport: &'static str,
    pub env: Vec<(String, String)>,
}

impl AgentSpec {
    pub fn new(name: &str, role: &'static str) -> AgentSpec {
        AgentSpec {
            name: name.into(),
            role,
            selector: String::new(),
            slots: 4,
            fallback: false,
            health: false,
            transport: "stream",
            env: vec![],
        }
    }
    pub fn slots(mut self, n: u32) -> Self {
        self.slots = n;
        self
    }
    pub fn fallback(mut self) -> Self {
        self.fallback = true;
        self
    }
    pub fn health(mut self) -> Self {
        self.health = true;
        self
    }
    pub fn poll(mut self) -> Self {
        self.transport = "poll";
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// Starts an es-agent process configured through its environment.
pub fn start_agent(bins: &Bins, dir: &Path, server_url: &str, spec: &AgentSpec) -> Proc {
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let log = dir.join(format!("{}-{n}.log", spec.name));
    let file = std::fs::File::create(&log).expect("agent log");
    let mut cmd = Command::new(&bins.agent);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("ES_AGENT_NAME", &spec.name)
        .env("ES_AGENT_ROLE", spec.role)
        .env("ES_AGENT_SERVER", server_url)
        .env("ES_AGENT_SLOTS", spec.slots.to_string())
        .env("ES_AGENT_SELECTOR", &spec.selector)
        .env("ES_AGENT_FALLBACK", spec.fallback.to_string())
        .env("ES_AGENT_TRANSPORT", spec.transport)
        // Never the instance-metadata address from a test (it is not loopback).
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("ES_AGENT_BACKOFF_BASE", "50ms")
        .env("ES_AGENT_BACKOFF_CAP", "1s")
        .env(
            "ES_AGENT_INSECURE",
            server_url.starts_with("http://").to_string(),
        );
    if spec.health {
        cmd.env("ES_AGENT_HEALTH_ADDR", "127.0.0.1:0");
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("spawn es-agent");
    Proc {
        name: spec.name.clone(),
        child,
        log,
        exited: None,
    }
}

/// Polls `check` every 25 ms until it is true; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > until {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn role(r: &str) -> i32 {
    es_proto::Role::parse(r).expect("role") as i32
}

pub fn echo(message: &str) -> JobSpec {
    JobSpec {
        target: None,
        kind: Some(job_spec::Kind::Echo(EchoJob {
            message: message.into(),
        })),
    }
}

pub fn sleep(ms: u64) -> JobSpec {
    JobSpec {
        target: None,
        kind: Some(job_spec::Kind::Sleep(SleepJob {
            duration_ms: ms,
            steps: 0,
            ..Default::default()
        })),
    }
}

/// A submission of `spec` for role `r` (empty selector).
pub fn submission(r: &str, spec: JobSpec) -> SubmitRequest {
    SubmitRequest {
        role: role(r),
        spec: Some(spec),
        ..Default::default()
    }
}

pub async fn submit(c: &mut JobServiceClient<Channel>, req: SubmitRequest) -> Job {
    c.submit(req)
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job")
}

/// Every stored event of a finished job, in order (up to its result).
pub async fn job_events(c: &mut JobServiceClient<Channel>, id: &str) -> Vec<JobEvent> {
    let mut stream = c
        .watch(WatchRequest {
            job_id: id.into(),
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(ev))) =
        tokio::time::timeout(Duration::from_secs(30), stream.message()).await
    {
        let last = matches!(ev.event, Some(job_event::Event::Result(_)));
        out.push(ev);
        if last {
            break;
        }
    }
    out
}

/// A RunCommand submission for sandbox `sb` (role commands).
pub fn commands_req(sb: &str, rc: RunCommand) -> SubmitRequest {
    SubmitRequest {
        role: role("commands"),
        sandbox_id: sb.into(),
        spec: Some(JobSpec {
            kind: Some(job_spec::Kind::RunCommand(rc)),
            target: None,
        }),
        ..Default::default()
    }
}

pub async fn get(c: &mut JobServiceClient<Channel>, id: &str) -> Job {
    c.get(GetRequest { job_id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

/// Waits until the job is in `state`; answers it.
pub async fn wait_state(
    c: &mut JobServiceClient<Channel>,
    id: &str,
    state: JobState,
    timeout: Duration,
) -> Job {
    let until = Instant::now() + timeout;
    loop {
        let j = get(c, id).await;
        if j.state == state as i32 {
            return j;
        }
        if Instant::now() > until {
            panic!(
                "job {id} is {:?}, not {state:?}, after {timeout:?}: {j:?}",
                JobState::try_from(j.state)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the job is finished; answers it.
pub async fn wait_done(c: &mut JobServiceClient<Channel>, id: &str, timeout: Duration) -> Job {
    let until = Instant::now() + timeout;
    loop {
        let j = get(c, id).await;
        if JobState::try_from(j.state)
            .unwrap_or_default()
            .is_terminal()
        {
            return j;
        }
        if Instant::now() > until {
            panic!("job {id} not finished after {timeout:?}: {j:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn agents(c: &mut JobServiceClient<Channel>) -> Vec<AgentStatus> {
    c.agents(AgentsRequest {})
        .await
        .expect("agents")
        .into_inner()
        .agents
}

/// Waits until the named agents are all registered and healthy.
pub async fn wait_healthy(c: &mut JobServiceClient<Channel>, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let c2 = c.clone();
    wait_until(
        &format!("agents {names:?} healthy"),
        Duration::from_secs(30),
        move || {
            let mut c = c2.clone();
            let names = names.clone();
            async move {
                let list = agents(&mut c).await;
                names.iter().all(|n| {
                    list.iter().any(|a| {
                        a.healthy
                            && !a.draining
                            && a.identity.as_ref().is_some_and(|i| &i.name == n)
                    })
                })
            }
        },
    )
    .await;
}

/// Percentile (0..=100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// A moto server (AWS emulator) on a free loopback port, killed when dropped.
/// An Amazon Linux AMI of moto's bundled image list (the same id in every region): root device
/// /dev/xvda, 15 GiB. Apps boot from images that exist, as in AWS: the agent reads the image's
/// root device and size (DescribeImages) before it launches.
pub const MOTO_AMI: &str = "ami-760aaa0f";
/// A Windows Server AMI of moto's bundled image list (platform windows, root /dev/sda1).
pub const MOTO_WINDOWS_AMI: &str = "ami-03cf127a";

pub struct Moto {
    pub proc: Proc,
    pub url: String,
}

/// Starts `moto_server` (PyPI `moto[server]`) on 127.0.0.1 with a port picked by the OS.
pub fn start_moto(dir: &Path) -> Moto {
    let log = dir.join("moto.log");
    let mut child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moto_server: install it with `pip install 'moto[server]'`");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&log2).ok();
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(url) = line.split("Running on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                    sent = true;
                }
            }
            if let Some(f) = f.as_mut() {
                let _ = writeln!(f, "{line}");
            }
        }
    });
    let proc = Proc {
        name: "moto".into(),
        child,
        log,
        exited: None,
    };
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("moto_server did not start: {}", proc.log()));
    Moto { proc, url }
}

impl Moto {
    /// An EC2 client on the emulator (us-east-1, dummy credentials).
    /// An SSM client of the test's own (Parameter Store: sandbox private keys).
    pub async fn ssm(&self) -> aws_sdk_ssm::Client {
        let creds =
            aws_sdk_ssm::config::Credentials::new("testing", "testing", None, None, "es-tests");
        let conf = aws_sdk_ssm::config::Builder::new()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(aws_sdk_ssm::config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(creds)
            .build();
        aws_sdk_ssm::Client::from_conf(conf)
    }

    pub async fn ec2(&self) -> aws_sdk_ec2::Client {
        let creds =
            aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "es-tests");
        let conf = aws_sdk_ec2::config::Builder::new()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(creds)
            .build();
        aws_sdk_ec2::Client::from_conf(conf)
    }

    /// Creates a Management VPC (10.0.0.0/16) in the emulator; answers its id and its main
    /// route table.
    pub async fn management_vpc(&self) -> (String, String) {
        let ec2 = self.ec2().await;
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.0.0.0/16")
            .send()
            .await
            .unwrap();
        let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
        let filter = aws_sdk_ec2::types::Filter::builder()
            .name("vpc-id")
            .values(&vpc_id)
            .build();
        let rts = ec2
            .describe_route_tables()
            .filters(filter)
            .send()
            .await
            .unwrap();
        let rt = rts.route_tables()[0].route_table_id().unwrap().to_owned();
        (vpc_id, rt)
    }

    /// Environment for an es-shells agent that talks to this emulator.
    pub fn agent_env(&self, spec: AgentSpec) -> AgentSpec {
        self.agent_env_via(spec, &self.url)
    }

    /// Environment for an agent that talks to this emulator through `endpoint` (a proxy).
    pub fn agent_env_via(&self, spec: AgentSpec, endpoint: &str) -> AgentSpec {
        spec.env("ES_AGENT_AWS_ENDPOINT_URL", endpoint)
            .env("ES_AGENT_AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
    }
}

/// The EC2 filter `tag:ReservationId = sandbox`.
pub fn sandbox_tag_filter(sandbox: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name("tag:ReservationId")
        .values(sandbox)
        .build()
}

/// Every resource still tagged `ReservationId=<sandbox>`, as "kind id", for every tagged kind of
/// `es_proto::resources::EC2_KINDS` (instances that are not terminated, EBS volumes, Elastic IPs,
/// network interfaces, live peering connections, security groups, subnets, route tables,
/// internet gateways, VPCs). Listed here with the SDK's own calls, not the agent's code, so a
/// lookup bug of the agent cannot hide a leak; the match is exhaustive, so a kind added to the
/// table fails to compile until this check sees it too.
pub async fn tagged_resources(ec2: &aws_sdk_ec2::Client, sandbox: &str) -> Vec<String> {
    use es_proto::resources::{Ec2Kind, EC2_KINDS};
    let f = sandbox_tag_filter(sandbox);
    let mut out = Vec::new();
    for k in EC2_KINDS {
        let name = k.name;
        let mut add = |id: Option<&str>| out.push(format!("{name} {}", id.unwrap_or_default()));
        match k.kind {
            Ec2Kind::Instance => {
                // Every page: EC2 pages these (and moto does, at 100, even with filters).
                let mut pages = ec2
                    .describe_instances()
                    .filters(f.clone())
                    .into_paginator()
                    .send();
                while let Some(r) = pages.next().await {
                    for i in r.unwrap().reservations().iter().flat_map(|r| r.instances()) {
                        if i.state().and_then(|s| s.name()).map(|n| n.as_str())
                            != Some("terminated")
                        {
                            add(i.instance_id());
                        }
                    }
                }
            }
            Ec2Kind::Image => {
                let r = ec2
                    .describe_images()
                    .owners("self")
                    .filters(f.clone())
                    .send()
                    .await
                    .unwrap();
                for i in r.images() {
                    add(i.image_id());
                }
            }
            Ec2Kind::Snapshot => {
                let r = ec2
                    .describe_snapshots()
                    .owner_ids("self")
                    .filters(f.clone())
                    .send()
                    .await
                    .unwrap();
                for x in r.snapshots() {
                    add(x.snapshot_id());
                }
            }
            Ec2Kind::KeyPair => {
                let r = ec2
                    .describe_key_pairs()
                    .filters(f.clone())
                    .send()
                    .await
                    .unwrap();
                for k in r.key_pairs() {
                    add(k.key_name());
                }
            }
            Ec2Kind::Volume => {
                let mut pages = ec2
                    .describe_volumes()
                    .filters(f.clone())
                    .into_paginator()
                    .send();
                while let Some(r) = pages.next().await {
                    for v in r.unwrap().volumes() {
                        add(v.volume_id());
                    }
                }
            }
            Ec2Kind::ElasticIp => {
                let r = ec2.describe_addresses().filters(f.clone()).send().await;
                for a in r.unwrap().addresses() {
                    add(a.allocation_id());
                }
            }
            Ec2Kind::NetworkInterface => {
                let mut pages = ec2
                    .describe_network_interfaces()
                    .filters(f.clone())
                    .into_paginator()
                    .send();
                while let Some(r) = pages.next().await {
                    for n in r.unwrap().network_interfaces() {
                        add(n.network_interface_id());
                    }
                }
            }
            // Routes carry no tags: the tests that peer check the Management VPC's route table.
            Ec2Kind::PeeringRoute => {}
            Ec2Kind::VpcPeering => {
                let r = ec2
                    .describe_vpc_peering_connections()
                    .filters(f.clone())
                    .send()
                    .await;
                for p in r.unwrap().vpc_peering_connections() {
                    let status = p
                        .status()
                        .and_then(|s| s.code())
                        .map(|c| c.as_str().to_owned())
                        .unwrap_or_default();
                    // moto ignores the tag filter on this call: check the tag here.
                    let tagged = p
                        .tags()
                        .iter()
                        .any(|t| t.key() == Some("ReservationId") && t.value() == Some(sandbox));
                    if tagged && status != "deleted" && status != "rejected" {
                        out.push(format!(
                            "{name} {} ({status})",
                            p.vpc_peering_connection_id().unwrap_or_default()
                        ));
                    }
                }
            }
            Ec2Kind::SecurityGroup => {
                let r = ec2
                    .describe_security_groups()
                    .filters(f.clone())
                    .send()
                    .await;
                for g in r.unwrap().security_groups() {
                    add(g.group_id());
                }
            }
            Ec2Kind::Subnet => {
                let r = ec2.describe_subnets().filters(f.clone()).send().await;
                for s in r.unwrap().subnets() {
                    add(s.subnet_id());
                }
            }
            Ec2Kind::RouteTable => {
                let r = ec2.describe_route_tables().filters(f.clone()).send().await;
                for t in r.unwrap().route_tables() {
                    add(t.route_table_id());
                }
            }
            Ec2Kind::InternetGateway => {
                let r = ec2
                    .describe_internet_gateways()
                    .filters(f.clone())
                    .send()
                    .await;
                for g in r.unwrap().internet_gateways() {
                    add(g.internet_gateway_id());
                }
            }
            Ec2Kind::Vpc => {
                let r = ec2.describe_vpcs().filters(f.clone()).send().await;
                for v in r.unwrap().vpcs() {
                    add(v.vpc_id());
                }
            }
            Ec2Kind::NatGateway => {
                let r = ec2.describe_nat_gateways().filter(f.clone()).send().await;
                for n in r.unwrap().nat_gateways() {
                    if n.state().map(|s| s.as_str()) != Some("deleted") {
                        add(n.nat_gateway_id());
                    }
                }
            }
            Ec2Kind::VpcEndpoint => {
                let r = ec2.describe_vpc_endpoints().filters(f.clone()).send().await;
                for e in r.unwrap().vpc_endpoints() {
                    let state = e.state().map(|s| s.as_str().to_ascii_lowercase());
                    if !matches!(state.as_deref(), Some("deleted" | "deleting")) {
                        add(e.vpc_endpoint_id());
                    }
                }
            }
            Ec2Kind::EgressOnlyInternetGateway => {
                let r = ec2
                    .describe_egress_only_internet_gateways()
                    .filters(f.clone())
                    .send()
                    .await;
                for g in r.unwrap().egress_only_internet_gateways() {
                    add(g.egress_only_internet_gateway_id());
                }
            }
            Ec2Kind::LaunchTemplate => {
                let r = ec2
                    .describe_launch_templates()
                    .filters(f.clone())
                    .send()
                    .await;
                for l in r.unwrap().launch_templates() {
                    add(l.launch_template_id());
                }
            }
            Ec2Kind::TransitGatewayAttachment => {
                let r = ec2
                    .describe_transit_gateway_vpc_attachments()
                    .filters(f.clone())
                    .send()
                    .await;
                for a in r.unwrap().transit_gateway_vpc_attachments() {
                    let state = a.state().map(|s| s.as_str());
                    if !matches!(state, Some("deleted" | "deleting")) {
                        add(a.transit_gateway_attachment_id());
                    }
                }
            }
            Ec2Kind::FlowLog => {
                let r = ec2.describe_flow_logs().filter(f.clone()).send().await;
                for l in r.unwrap().flow_logs() {
                    add(l.flow_log_id());
                }
            }
            Ec2Kind::NetworkAcl => {
                let r = ec2.describe_network_acls().filters(f.clone()).send().await;
                for a in r.unwrap().network_acls() {
                    add(a.network_acl_id());
                }
            }
            Ec2Kind::DhcpOptions => {
                let r = ec2.describe_dhcp_options().filters(f.clone()).send().await;
                for d in r.unwrap().dhcp_options() {
                    add(d.dhcp_options_id());
                }
            }
        }
    }
    out
}
