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

use es_proto::v1::{CommandTransport, RunCommand, SshOptions};

use crate::ec2proxy::Hook;
use crate::{ec2proxy, start_agent, start_moto, AgentSpec, Bins, Moto, Proc};

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

/// Sandbox instances played by sshd servers, registered in a moto emulator, and an
/// es-commands agent whose AWS endpoint is the Instance Connect-playing proxy in front of moto.
pub struct Fleet {
    pub moto: Moto,
    pub agent: Proc,
    pub sshds: Vec<Sshd>,
    /// Instance ids, in the order of `sshds`.
    pub ids: Vec<String>,
    pub port: u16,
    /// Keys pushed through Instance Connect.
    pub pushes: Arc<AtomicU64>,
    /// The login user (the one running the tests).
    pub user: String,
}

/// Sandbox instances played by sshd servers: `n` sshds on 127.0.0.(base+i) and a shared port,
/// registered in the emulator at `moto_url` as instances of sandbox `sb` (apps app-0, app-1,
/// ...; private IPs = the sshds' addresses), and an EC2 proxy in front of the emulator that
/// plays Instance Connect for them. An agent whose AWS endpoint is `proxy_url` reaches them.
pub struct Instances {
    pub sshds: Vec<Sshd>,
    /// Instance ids, in the order of `sshds`.
    pub ids: Vec<String>,
    pub port: u16,
    pub proxy_url: String,
    /// Keys pushed through Instance Connect.
    pub pushes: Arc<AtomicU64>,
}

pub async fn play_instances(
    dir: &Path,
    moto_url: &str,
    ec2: &aws_sdk_ec2::Client,
    sb: &str,
    n: usize,
    base: u8,
) -> Instances {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let ips: Vec<String> = (0..n)
        .map(|i| format!("127.0.0.{}", base as usize + i))
        .collect();
    let port = free_port_on(&ips);
    let sshds: Vec<Sshd> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| start_sshd(&dir.join(format!("sshd-{i}")), ip, port))
        .collect();
    // The instances, in a VPC whose range holds the loopback addresses.
    let vpc = ec2
        .create_vpc()
        .cidr_block("127.0.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("127.0.0.0/24")
        .send()
        .await
        .unwrap();
    let subnet_id = subnet.subnet().unwrap().subnet_id().unwrap().to_owned();
    let map = Arc::new(Mutex::new(HashMap::<String, PathBuf>::new()));
    let mut ids = Vec::new();
    for (i, s) in sshds.iter().enumerate() {
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(Tag::builder().key("ReservationId").value(sb).build())
            .tags(
                Tag::builder()
                    .key("AppName")
                    .value(format!("app-{i}"))
                    .build(),
            )
            .build();
        let r = ec2
            .run_instances()
            .image_id(crate::MOTO_AMI)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .subnet_id(&subnet_id)
            .private_ip_address(&s.ip)
            .tag_specifications(tags)
            .send()
            .await
            .unwrap();
        let id = r.instances()[0].instance_id().unwrap().to_owned();
        map.lock().unwrap().insert(id.clone(), s.dir.clone());
        ids.push(id);
    }
    let pushes = Arc::new(AtomicU64::new(0));
    let (proxy_url, _stats) = ec2proxy::start(
        moto_url,
        ec2proxy::ProxyConfig {
            hook: Some(instance_connect(map, pushes.clone())),
            ..Default::default()
        },
    )
    .await;
    Instances {
        sshds,
        ids,
        port,
        proxy_url,
        pushes,
    }
}

/// `n` instances of sandbox `sb` (see `play_instances`) in a new emulator, and an agent
/// `es-commands` with `slots` slots connected to `server_url` that reaches them.
pub async fn start_fleet(
    bins: &Bins,
    dir: &Path,
    server_url: &str,
    sb: &str,
    n: usize,
    base: u8,
    slots: u32,
) -> Fleet {
    let moto = start_moto(dir);
    let ec2 = moto.ec2().await;
    let i = play_instances(dir, &moto.url, &ec2, sb, n, base).await;
    let spec = moto.agent_env_via(
        AgentSpec::new("es-commands", "commands").slots(slots),
        &i.proxy_url,
    );
    let agent = start_agent(bins, dir, server_url, &spec);
    Fleet {
        moto,
        agent,
        sshds: i.sshds,
        ids: i.ids,
        port: i.port,
        pushes: i.pushes,
        user: login_user(),
    }
}

impl Fleet {
    /// A RunCommand of `script` over SSH to this fleet (every app of the sandbox).
    pub fn ssh_job(&self, script: &str) -> RunCommand {
        RunCommand {
            script: script.into(),
            transport: CommandTransport::Ssh as i32,
            ssh: Some(SshOptions {
                user: self.user.clone(),
                port: self.port as u32,
                host_keys: HashMap::new(),
            }),
            ..Default::default()
        }
    }
}
