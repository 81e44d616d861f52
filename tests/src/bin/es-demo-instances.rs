//! For scripts/demo: sandbox instances that es-commands can reach over SSH. Starts sshd
//! servers on loopback addresses, registers them in the EC2 emulator as instances of a sandbox,
//! and serves an EC2 endpoint in front of the emulator that plays EC2 Instance Connect for them
//! (see es_tests::sshd::play_instances). Prints one line of shell assignments (EC2_PROXY, SSH_PORT,
//! SSH_USER, SSHD_PIDS) and writes their host keys to DIR/host_keys, then serves until killed.
//!
//! es-demo-instances MOTO_URL SANDBOX COUNT DIR

use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, moto, sb, n, dir] = args.as_slice() else {
        eprintln!("usage: es-demo-instances MOTO_URL SANDBOX COUNT DIR");
        std::process::exit(64);
    };
    let n: usize = n.parse().expect("COUNT is a number");
    let conf = aws_sdk_ec2::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(moto)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "demo"))
        .build();
    let ec2 = aws_sdk_ec2::Client::from_conf(conf);
    let i = es_tests::sshd::play_instances(std::path::Path::new(dir), moto, &ec2, sb, n, 20).await;
    // Their host keys, "IP=KEY" a line, for `sandbox run --host-key`.
    let keys: String = i
        .sshds
        .iter()
        .map(|s| format!("{}={}\n", s.ip, s.host_key))
        .collect();
    std::fs::write(std::path::Path::new(dir).join("host_keys"), keys).expect("write host_keys");
    let pids: Vec<String> = i.sshds.iter().map(|s| s.proc.pid().to_string()).collect();
    println!(
        "EC2_PROXY={} SSH_PORT={} SSH_USER={} SSHD_PIDS={}",
        i.proxy_url,
        i.port,
        es_tests::sshd::login_user(),
        pids.join(",")
    );
    // Serve the proxy until the demo kills this process (it kills the sshds by their PIDS).
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
