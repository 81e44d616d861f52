//! The SSH transport, for instances the Management VPC reaches over the peering.
//!
//! Per job: a fresh Ed25519 key (never written to disk). Per instance: the public key is pushed
//! with EC2 Instance Connect `SendSSHPublicKey` (valid 60 s), then the agent connects to the
//! private IP at once, checks the host key (the job's `ssh.host_keys`, else the agent's
//! known_hosts file; unknown keys are accepted and their fingerprint reported, unless the agent
//! requires known keys), authenticates with the key, and runs the fixed remote command of
//! `script::render_ssh` with the script on its standard input. Closing standard input (cancel,
//! execution timeout) makes the remote watchdog kill the script's process group.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_proto::v1::{CommandStatus, InstanceOutput, Job, RunCommand};
use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::ChannelMsg;
use tokio_util::sync::CancellationToken;

use super::{
    cap_text, not_run, now_us, resolve_count, script, OutputCaps, Reporter, Target,
    DEFAULT_EXECUTION_TIMEOUT_S, DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_ERRORS,
    DEFAULT_SSH_CONNECT_TIMEOUT_S,
};

/// Agent-wide SSH settings (from its configuration).
#[derive(Debug, Clone, Default)]
pub struct SshSettings {
    /// OpenSSH known_hosts file with the sandbox instances' host keys, if any.
    pub known_hosts: Option<PathBuf>,
    /// Refuse hosts whose key is not known (job or known_hosts).
    pub require_known_host_key: bool,
}

/// Most output kept in memory per stream for the S3 copy.
const FULL_OUTPUT_CAP: usize = 16 * 1024 * 1024;
/// After stdin is closed (cancel, timeout), how long the remote side has to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What the host key check saw.
#[derive(Default)]
struct HostKeyNote {
    refused: Option<String>,
    unverified: Option<String>,
}

struct Handler {
    expected: Option<PublicKey>,
    known_hosts: Option<PathBuf>,
    require_known: bool,
    /// The job carries secret variables: they go only to a host whose key is verified.
    has_secrets: bool,
    host: String,
    port: u16,
    note: Arc<Mutex<HostKeyNote>>,
}

impl client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        let fp = key.fingerprint(HashAlg::Sha256).to_string();
        let mut note = self.note.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(want) = &self.expected {
            if want.key_data() == key.key_data() {
                return Ok(true);
            }
            note.refused = Some(format!(
                "host key mismatch: the job expects {}, the host presented {fp}",
                want.fingerprint(HashAlg::Sha256)
            ));
            return Ok(false);
        }
        if let Some(path) = &self.known_hosts {
            match russh::keys::check_known_hosts_path(&self.host, self.port, key, path) {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(russh::keys::Error::KeyChanged { line }) => {
                    note.refused = Some(format!(
                        "host key mismatch: {} line {line} has another key for {}; the host presented {fp}",
                        path.display(),
                        self.host
                    ));
                    return Ok(false);
                }
                Err(e) => {
                    note.refused = Some(format!("cannot read {}: {e}", path.display()));
                    return Ok(false);
                }
            }
        }
        if self.require_known {
            note.refused = Some(format!(
                "host key {fp} is not known (give it in ssh.host_keys or the agent's known_hosts)"
            ));
            return Ok(false);
        }
        if self.has_secrets {
            note.refused = Some(format!(
                "host key {fp} is not verified and the job has secret variables: they are sent only to a host whose key is pinned (ssh.host_keys, --host-key) or in the agent's known_hosts"
            ));
            return Ok(false);
        }
        note.unverified = Some(format!("host key not verified: {fp}"));
        Ok(true)
    }
}

/// Runs `rc` on `targets` over SSH; every target gets an output.
#[allow(clippy::too_many_arguments)]
pub async fn run_ssh(
    eic: &aws_sdk_ec2instanceconnect::Client,
    s3: Option<&aws_sdk_s3::Client>,
    settings: &SshSettings,
    job: &Job,
    rc: &RunCommand,
    targets: &[Target],
    caps: OutputCaps,
    report: &Reporter<'_>,
    cancel: &CancellationToken,
) -> Vec<InstanceOutput> {
    let key = match PrivateKey::random(
        &mut russh::keys::ssh_key::rand_core::OsRng,
        russh::keys::Algorithm::Ed25519,
    ) {
        Ok(k) => Arc::new(k),
        Err(e) => {
            return targets
                .iter()
                .map(|t| {
                    let mut o = not_run(
                        t,
                        CommandStatus::Undeliverable,
                        format!("cannot make a key: {e}"),
                    );
                    report.finished(&mut o);
                    o
                })
                .collect()
        }
    };
    let n = targets.len();
    let limit = resolve_count(&rc.max_concurrency, n, DEFAULT_MAX_CONCURRENCY).max(1);
    let max_errors = resolve_count(&rc.max_errors, n, DEFAULT_MAX_ERRORS);
    let permits = Arc::new(tokio::sync::Semaphore::new(limit));
    let errors = AtomicUsize::new(0);
    let run = |t: &Target| {
        let (permits, key, errors) = (permits.clone(), key.clone(), &errors);
        let t = t.clone();
        async move {
            let _permit = permits.acquire_owned().await.expect("semaphore open");
            let mut o = if cancel.is_cancelled() {
                not_run(&t, CommandStatus::Cancelled, "cancelled before it started")
            } else if errors.load(Ordering::SeqCst) > max_errors {
                not_run(
                    &t,
                    CommandStatus::Cancelled,
                    format!("not started: more than max_errors ({max_errors}) instances failed"),
                )
            } else {
                run_one(eic, s3, settings, job, rc, &t, key, caps, cancel).await
            };
            if o.status != CommandStatus::Success as i32 {
                errors.fetch_add(1, Ordering::SeqCst);
            }
            report.finished(&mut o);
            o
        }
    };
    futures::future::join_all(targets.iter().map(run)).await
}

#[allow(clippy::too_many_arguments)]
async fn run_one(
    eic: &aws_sdk_ec2instanceconnect::Client,
    s3: Option<&aws_sdk_s3::Client>,
    settings: &SshSettings,
    job: &Job,
    rc: &RunCommand,
    t: &Target,
    key: Arc<PrivateKey>,
    caps: OutputCaps,
    cancel: &CancellationToken,
) -> InstanceOutput {
    let opts = rc.ssh.clone().unwrap_or_default();
    let user = if opts.user.is_empty() {
        "ec2-user".to_owned()
    } else {
        opts.user.clone()
    };
    let port = if opts.port == 0 { 22 } else { opts.port as u16 };
    let connect_timeout = Duration::from_secs(if rc.delivery_timeout_s == 0 {
        DEFAULT_SSH_CONNECT_TIMEOUT_S
    } else {
        rc.delivery_timeout_s
    } as u64);
    let exec_timeout = Duration::from_secs(if rc.execution_timeout_s == 0 {
        DEFAULT_EXECUTION_TIMEOUT_S
    } else {
        rc.execution_timeout_s
    } as u64);
    let undeliverable = |why: String| not_run(t, CommandStatus::Undeliverable, why);
    if t.private_ip.is_empty() {
        return undeliverable("the instance has no private IP address".into());
    }
    let started = now_us();

    // 1. Authorize the job's key on the instance for 60 s.
    let public = match key.public_key().to_openssh() {
        Ok(p) => p,
        Err(e) => return undeliverable(format!("cannot encode the key: {e}")),
    };
    if let Err(e) = eic
        .send_ssh_public_key()
        .instance_id(&t.instance_id)
        .instance_os_user(&user)
        .ssh_public_key(public)
        .send()
        .await
    {
        return undeliverable(format!(
            "EC2 Instance Connect did not take the key: {}",
            super::aws_err("EC2InstanceConnect SendSSHPublicKey", e)
        ));
    }

    // 2. Connect and check the host key. A pinned key that does not parse is an error, never
    // "no key pinned" (which would accept any host).
    let pinned = opts
        .host_keys
        .get(&t.instance_id)
        .map(|k| (t.instance_id.as_str(), k))
        .or_else(|| {
            opts.host_keys
                .get(&t.private_ip)
                .map(|k| (t.private_ip.as_str(), k))
        });
    let expected = match pinned {
        None => None,
        Some((by, k)) => match PublicKey::from_openssh(k.trim()) {
            Ok(k) => Some(k),
            Err(e) => {
                return undeliverable(format!(
                "ssh.host_keys[{by}] is not a valid OpenSSH public key ({e}): fix the pinned key"
            ))
            }
        },
    };
    let note = Arc::new(Mutex::new(HostKeyNote::default()));
    let handler = Handler {
        expected,
        known_hosts: settings.known_hosts.clone(),
        require_known: settings.require_known_host_key,
        has_secrets: rc.env.iter().any(|v| v.secret),
        host: t.private_ip.clone(),
        port,
        note: note.clone(),
    };
    let config = Arc::new(client::Config {
        keepalive_interval: Some(Duration::from_secs(15)),
        ..Default::default()
    });
    let addr = (t.private_ip.clone(), port);
    let connected = tokio::select! {
        r = tokio::time::timeout(connect_timeout, client::connect(config, addr, handler)) => r,
        _ = cancel.cancelled() => return not_run(t, CommandStatus::Cancelled, "cancelled while connecting"),
    };
    let refused = |note: &Arc<Mutex<HostKeyNote>>| {
        note.lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused
            .clone()
    };
    let mut session = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return undeliverable(
                refused(&note)
                    .unwrap_or_else(|| format!("cannot connect to {}:{port}: {e}", t.private_ip)),
            )
        }
        Err(_) => {
            return not_run(
                t,
                CommandStatus::DeliveryTimedOut,
                format!(
                    "no SSH session with {}:{port} within {} s",
                    t.private_ip,
                    connect_timeout.as_secs()
                ),
            )
        }
    };
    let unverified = note
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unverified
        .clone();

    // 3. Authenticate with the pushed key.
    let auth = session
        .authenticate_publickey(&user, PrivateKeyWithHashAlg::new(key, None))
        .await;
    match auth {
        Ok(r) if r.success() => {}
        Ok(_) => {
            return undeliverable(format!(
                "the key was not accepted for user {user} (is ec2-instance-connect installed on the instance, and is the user right?)"
            ))
        }
        Err(e) => return undeliverable(format!("authentication failed: {e}")),
    }

    // 4. Run.
    let (command, stdin) = script::render_ssh(rc);
    let mut channel = match session.channel_open_session().await {
        Ok(c) => c,
        Err(e) => return undeliverable(format!("cannot open a session channel: {e}")),
    };
    if let Err(e) = channel.exec(true, command).await {
        return undeliverable(format!("exec refused: {e}"));
    }
    if let Err(e) = channel.data(&stdin[..]).await {
        return undeliverable(format!("cannot send the script: {e}"));
    }
    let keep_full = s3.is_some() && !rc.output_s3_bucket.is_empty();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_cut, mut err_cut) = (false, false);
    let mut exit: Option<u32> = None;
    let mut signal: Option<String> = None;
    let mut stopped: Option<CommandStatus> = None;
    let timer = tokio::time::sleep(exec_timeout);
    tokio::pin!(timer);
    let mut grace_until: Option<tokio::time::Instant> = None;
    loop {
        let grace = async {
            match grace_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = channel.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    let keep = if keep_full { FULL_OUTPUT_CAP } else { caps.stdout };
                    append(&mut out, &data, keep, &mut out_cut);
                }
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    let keep = if keep_full { FULL_OUTPUT_CAP } else { caps.stderr };
                    append(&mut err, &data, keep, &mut err_cut);
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => exit = Some(exit_status),
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    signal = Some(format!("{signal_name:?}"));
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            },
            _ = &mut timer, if stopped.is_none() => {
                stopped = Some(CommandStatus::TimedOut);
                let _ = channel.eof().await;
                grace_until = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
            _ = cancel.cancelled(), if stopped.is_none() => {
                stopped = Some(CommandStatus::Cancelled);
                let _ = channel.eof().await;
                grace_until = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
            _ = grace => break,
        }
    }
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;

    let mut o = InstanceOutput {
        instance_id: t.instance_id.clone(),
        app: t.app.clone(),
        started_at_us: started,
        finished_at_us: now_us(),
        ..Default::default()
    };
    let (status, detail, code) = match (stopped, exit, &signal) {
        (Some(s), _, _) => (s, "stopped by the agent".to_owned(), -1),
        (None, Some(0), _) => (CommandStatus::Success, "exit 0".to_owned(), 0),
        (None, Some(c), _) => (CommandStatus::Failed, format!("exit {c}"), c as i32),
        (None, None, Some(sig)) => (CommandStatus::Failed, format!("signal {sig}"), -1),
        (None, None, None) => (
            CommandStatus::Failed,
            "connection closed without an exit status".to_owned(),
            -1,
        ),
    };
    o.status = status as i32;
    o.detail = detail;
    o.exit_code = code;
    o.reason = match status {
        CommandStatus::TimedOut => format!(
            "the script ran past its execution timeout ({} s) and was stopped",
            exec_timeout.as_secs()
        ),
        CommandStatus::Cancelled => "cancelled; the script was stopped".into(),
        _ => unverified.unwrap_or_default(),
    };
    // Secrets are masked in the whole text before anything is stored or cut: a secret cut at
    // the limit must not leave its start behind, and the S3 copy is read by others too.
    let scrub = super::Scrubber::new(rc);
    let out = scrub.bytes(&out);
    let err = scrub.bytes(&err);
    if keep_full {
        let s3 = s3.expect("checked");
        for (stream, bytes) in [("stdout", &out), ("stderr", &err)] {
            let prefix = rc.output_s3_prefix.trim_end_matches('/');
            let key = if prefix.is_empty() {
                format!("{}/{}/{stream}", job.id, t.instance_id)
            } else {
                format!("{prefix}/{}/{}/{stream}", job.id, t.instance_id)
            };
            let put = s3
                .put_object()
                .bucket(&rc.output_s3_bucket)
                .key(&key)
                .body(bytes.clone().into())
                .send()
                .await;
            let url = format!("s3://{}/{key}", rc.output_s3_bucket);
            match put {
                Ok(_) if stream == "stdout" => o.stdout_url = url,
                Ok(_) => o.stderr_url = url,
                Err(e) => {
                    o.reason = format!(
                        "output not stored in S3: {}",
                        super::aws_err("S3 PutObject", e)
                    )
                }
            }
        }
    }
    o.stdout = String::from_utf8_lossy(&out).into_owned();
    o.stderr = String::from_utf8_lossy(&err).into_owned();
    o.stdout_truncated = out_cut | cap_text(&mut o.stdout, caps.stdout);
    o.stderr_truncated = err_cut | cap_text(&mut o.stderr, caps.stderr);
    o
}

/// Appends at most up to `keep` bytes in all; marks the cut.
fn append(buf: &mut Vec<u8>, data: &[u8], keep: usize, cut: &mut bool) {
    let room = keep.saturating_sub(buf.len());
    if data.len() > room {
        *cut = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}
