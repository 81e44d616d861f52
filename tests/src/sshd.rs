//! Real OpenSSH servers (Debian's openssh-server) for the es-commands SSH transport tests:
//! each "instance" is an `sshd -D` on its own loopback address (127.0.0.N) and a shared free
//! port, with its own host key. EC2 Instance Connect is played by a proxy hook: a key pushed
//! with `SendSSHPublicKey` for an instance is written to that sshd's authorized_keys with a
//! 60-second `expiry-time`, as the real service makes it valid for 60 seconds.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::ec2proxy::Hook;
use crate::Proc;

/// A running sshd.
pub struct Sshd {
    pub proc: Proc,
    pub ip: String,
    pub port: u16,
    pub dir: PathBuf,
    /// Its host public key, OpenSSH format ("ssh-ed25519 AAAA... comment").
    pub host_key: String,
}

/// The sshd binary, or a panic that says how to install it.
pub fn sshd_path() -> PathBuf {
    let p = PathBuf::from("/usr/sbin/sshd");
    assert!(
        p.exists(),
        "/usr/sbin/sshd not found: install Debian's openssh-server (scripts/test does)"
    );
    p
}

/// A port free on every address in `ips` (tried a few times).
pub fn free_port_on(ips: &[String]) -> u16 {
    for _ in 0..50 {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        if ips
            .iter()
            .all(|ip| TcpListener::bind((ip.as_str(), port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on {ips:?}");
}

/// The user the tests log in as (the one running them).
pub fn login_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Starts an sshd listening on `ip:port` with its files under `dir`.
pub fn start_sshd(dir: &Path, ip: &str, port: u16) -> Sshd {
    std::fs::create_dir_all(dir.join("authorized_keys")).unwrap();
    // Privilege separation directory, needed when sshd starts as root.
    let _ = std::fs::create_dir_all("/run/sshd");
    let key = dir.join("host_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let host_key = std::fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_owned();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {ip}:{port}\nHostKey {key}\nPidFile {pid}\nAuthorizedKeysFile {dir}/authorized_keys/%u\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\nMaxStartups 200\n",
            key = key.display(),
            pid = dir.join("sshd.pid").display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    let log = dir.join("sshd.log");
    let child = Command::new(sshd_path())
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start sshd");
    let proc = Proc::adopt(format!("sshd {ip}"), child, log);
    // Ready when it accepts connections.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect((ip, port)).is_err() {
        assert!(
            std::time::Instant::now() < until,
            "sshd on {ip}:{port} did not start: {}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Sshd {
        proc,
        ip: ip.to_owned(),
        port,
        dir: dir.to_owned(),
        host_key,
    }
}

/// "YYYYMMDDHHMMSSZ", `secs` from now (OpenSSH's `expiry-time` in UTC).
fn expiry(secs: u64) -> String {
    let t = SystemTime::now() + Duration::from_secs(secs);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    let digits: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
    format!("{digits}Z")
}

/// EC2 Instance Connect for the test sshd servers: answers the proxy hook that records each
/// `SendSSHPublicKey` into the authorized_keys of the sshd that plays that instance (and lets
/// the call through to the emulator). `pushes` counts the keys pushed.
pub fn instance_connect(
    instances: Arc<Mutex<HashMap<String, PathBuf>>>,
    pushes: Arc<AtomicU64>,
) -> Hook {
    Hook(Arc::new(move |head: &str, body: &[u8]| {
        if !head.contains("AWSEC2InstanceConnectService.SendSSHPublicKey") {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let (id, user, key) = (
            v["InstanceId"].as_str()?,
            v["InstanceOSUser"].as_str()?,
            v["SSHPublicKey"].as_str()?,
        );
        if let Some(dir) = instances.lock().unwrap().get(id) {
            use std::io::Write;
            let path = dir.join("authorized_keys").join(user);
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()?;
            let _ = writeln!(f, "expiry-time=\"{}\" {key}", expiry(60));
            pushes.fetch_add(1, Ordering::SeqCst);
        }
        None
    }))
}
