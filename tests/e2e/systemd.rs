//! The packages under a real systemd (PID 1 of a booted Debian root, see es_tests::machine),
//! set up by following docs/operations.md: every command the test runs from a `guide` block is
//! checked to appear in the guide word for word, so the guide cannot drift from what works.
//! Root only (CI runs as root); skipped with the reason otherwise.

use std::path::Path;
use std::time::Duration;

use es_tests::machine::{root_fs, Machine};

use crate::packaging::debs;

/// The guide's commands: each line of `script` (but comments) must be in docs/operations.md.
fn guide(m: &Machine, script: &str) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    for line in script.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(". ") {
            continue;
        }
        assert!(
            text.contains(line),
            "docs/operations.md does not say {line:?}: keep the guide and this test in step"
        );
    }
    m.ok(&format!("{CLIENT_ENV}\n{script}"))
}

/// Section 4's client environment, sourced before each command (written by the test below
/// from the guide's own lines).
const CLIENT_ENV: &str = "if [ -f /root/es-client.env ]; then . /root/es-client.env; fi";

/// A unit's property (`systemctl show -p NAME --value`).
fn prop(m: &Machine, unit: &str, name: &str) -> String {
    m.ok(&format!("systemctl show -p {name} --value {unit}"))
        .trim()
        .to_owned()
}

/// The line of `es-server agents` for `name` once it is healthy under a session other than
/// `old` (empty: any).
fn healthy(m: &Machine, name: &str) -> String {
    m.wait_ok(
        &format!("{name} healthy"),
        Duration::from_secs(60),
        &format!("{CLIENT_ENV}\nes-server agents | grep '^{name} ' | grep healthy"),
    )
}

/// A job's id from `es-server submit --json`.
fn submit(m: &Machine, args: &str) -> String {
    let out = m.ok(&format!("{CLIENT_ENV}\nes-server submit {args} --json"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["job"]["id"].as_str().expect("job id").to_owned()
}

fn state(m: &Machine, id: &str) -> String {
    let out = m.ok(&format!("{CLIENT_ENV}\nes-server get {id} --json"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["state"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn packages_follow_the_operator_guide_under_systemd() {
    if unsafe { libc::geteuid() } != 0 {
        es_tests::skipped(
            "systemd::packages_follow_the_operator_guide_under_systemd",
            "not root: booting systemd as PID 1 in new namespaces needs root (CI runs as root)",
        );
        return;
    }
    let _turn = crate::shared_turn();
    let root = root_fs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .unwrap_or_else(|e| panic!("the test's Debian root: {e}"));
    let m = Machine::boot(&root);
    for (_, deb) in debs() {
        m.put(
            deb,
            &format!("/root/{}", deb.file_name().unwrap().to_string_lossy()),
        );
    }

    // 1. Install.
    guide(
        &m,
        "apt install ./es-agent_*.deb\napt install ./es-server_*.deb",
    );
    assert!(m.ok("id es-agent; id es-server").contains("es-server"));

    // 2. Certificates and tokens: the guide's openssl block as written.
    let guide_md = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    let pki = sh_block_after(&guide_md, "Any CA works. This example uses `openssl`:");
    guide(&m, &pki);
    guide(
        &m,
        "install -d -o root -g es-server -m 0750 /etc/es-server/tls
install -o root -g es-server -m 0640 server.pem server.key /etc/es-server/tls/
install -o root -g es-server -m 0640 ca.pem /etc/es-server/tls/client-ca.pem
install -d -o root -g es-agent -m 0750 /etc/es-agent/tls
install -o root -g es-agent -m 0640 ca.pem /etc/es-agent/tls/ca.pem
install -o root -g es-agent -m 0640 es-shells.pem es-shells.key /etc/es-agent/tls/
install -o root -g es-agent -m 0640 es-commands.pem es-commands.key /etc/es-agent/tls/",
    );
    let agents_file = sh_block_after(
        &guide_md,
        "refused at registration with what the file allows.",
    );
    guide(&m, &agents_file);
    guide(
        &m,
        "install -o root -g es-server -m 0640 /dev/null /etc/es-server/tokens",
    );
    let token = guide(&m, "es-server token quali-server --scope submit");
    let line = token
        .lines()
        .skip_while(|l| !l.contains("line for the server"))
        .nth(1)
        .expect("the tokens-file line")
        .trim()
        .to_owned();
    let secret = token
        .lines()
        .find(|l| l.trim().starts_with("es_"))
        .expect("the token")
        .trim()
        .to_owned();
    m.ok(&format!("echo '{line}' >> /etc/es-server/tokens"));
    assert_eq!(
        m.ok("stat -c '%U:%G %a' /etc/es-server/tokens").trim(),
        "root:es-server 640"
    );
    // The env file: tokens and agents files on, as the guide says; es-server.internal resolves.
    m.ok("sed -i -e 's|^#ES_SERVER_TOKENS=|ES_SERVER_TOKENS=|' -e 's|^#ES_SERVER_AGENTS=|ES_SERVER_AGENTS=|' /etc/es-server/es-server.env
echo '127.0.0.1 es-server.internal' >> /etc/hosts");

    // 3. Configure: two agents on this host, from the reference file.
    guide(
        &m,
        "cp /etc/es-agent/es-agent.toml /etc/es-agent/es-shells.toml
sed -e 's/es-shells/es-commands/g' -e 's/^role = \"shells\"/role = \"commands\"/' /etc/es-agent/es-agent.toml > /etc/es-agent/es-commands.toml
chgrp es-agent /etc/es-agent/es-*.toml; chmod 0640 /etc/es-agent/es-*.toml
es-agent --config /etc/es-agent/es-shells.toml check-config",
    );
    // check-config refuses a name that is not the certificate's CN.
    let bad = m.sh("ES_AGENT_NAME=es-shells-us-east-1 es-agent --config /etc/es-agent/es-shells.toml check-config");
    assert_eq!(bad.status.code(), Some(64), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("differs from the CN \"es-shells\""));

    // 4. Start: Type=notify, so `systemctl start` returns once each is ready.
    guide(
        &m,
        "systemctl enable --now es-server
systemctl enable --now es-agent@es-shells
systemctl enable --now es-agent@es-commands",
    );
    for unit in ["es-server", "es-agent@es-shells", "es-agent@es-commands"] {
        assert_eq!(prop(&m, unit, "Type"), "notify");
        assert_eq!(prop(&m, unit, "ActiveState"), "active", "{unit}");
        assert_eq!(prop(&m, unit, "SubState"), "running", "{unit}");
    }
    assert!(m.ok("ls -ld /var/lib/es-server").starts_with("drwx------"));
    // The client environment, from the guide's lines (the ops-oncall admin certificate).
    let env_lines: Vec<String> =
        sh_block_after(&guide_md, "Put them in the shell's environment (or")
            .lines()
            .map(|l| l.split("   #").next().unwrap().trim_end().to_owned())
            .collect();
    m.ok(&format!(
        "cat > /root/es-client.env <<'EOF'\n{}\nEOF",
        env_lines.join("\n")
    ));
    let hello = guide(
        &m,
        "es-server submit --role shells --selector us-east-1 --echo hello --wait",
    );
    assert!(hello.contains("succeeded"), "{hello}");
    // A submitter's token works as well as the certificate.
    m.ok(&format!(
        "{CLIENT_ENV}\nunset ES_CERT ES_CERT_KEY\nES_TOKEN={secret} es-server jobs --state succeeded | grep -q echo"
    ));

    // 5. Health: both agents, healthy, with their version.
    let agents = guide(&m, "es-server agents");
    assert!(agents.contains("VERSION"), "{agents}");
    healthy(&m, "es-shells");
    healthy(&m, "es-commands");

    // 6. Logs: one job's lines in the journal carry its fields.
    let job = submit(
        &m,
        "--role commands --selector us-east-1 --sandbox sb-journal --echo logged",
    );
    m.wait_ok(
        "the job to finish",
        Duration::from_secs(60),
        &format!("{CLIENT_ENV}\nes-server get {job} --json | grep -q '\"state\": *\"succeeded\"'"),
    );
    let lines = m.wait_ok(
        "the job's lines in the journal",
        Duration::from_secs(30),
        &format!("journalctl -u es-server -u 'es-agent@*' JOB_ID={job} -o json | grep -q AGENT && journalctl -u es-server -u 'es-agent@*' JOB_ID={job} -o json"),
    );
    let fields: Vec<serde_json::Value> = lines
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        fields.iter().any(|f| f["AGENT"] == "es-commands"
            && f["ROLE"] == "commands"
            && f["SANDBOX_ID"] == "sb-journal"
            && f["JOB_ID"] == job.as_str()),
        "{lines}"
    );
    let audit = m.ok(&format!("{CLIENT_ENV}\nes-server audit --job {job}"));
    assert!(
        audit.contains("submit") && audit.contains("ops-oncall"),
        "{audit}"
    );
    more_under_systemd(&m, &guide_md);
}

/// What the guide promises of the units: the watchdog, a draining stop, no restart of a bad
/// configuration; then its certificate rotation with a CA change and its upgrade with a drain.
fn more_under_systemd(m: &Machine, guide_md: &str) {
    // The watchdog restarts a hung agent (a short WatchdogSec for the test, by a drop-in).
    m.ok("mkdir -p /etc/systemd/system/es-agent@es-commands.service.d
printf '[Service]\nWatchdogSec=5s\nTimeoutAbortSec=3s\n' > /etc/systemd/system/es-agent@es-commands.service.d/watchdog.conf
systemctl daemon-reload
systemctl restart es-agent@es-commands");
    let hung = prop(m, "es-agent@es-commands", "MainPID");
    m.ok(&format!("kill -STOP {hung}"));
    m.wait_ok(
        "the watchdog to restart the hung agent",
        Duration::from_secs(60),
        &format!(
            "test \"$(systemctl show -p NRestarts --value es-agent@es-commands)\" -ge 1
test \"$(systemctl show -p MainPID --value es-agent@es-commands)\" != {hung}
test \"$(systemctl show -p ActiveState --value es-agent@es-commands)\" = active"
        ),
    );
    assert!(m
        .ok("journalctl -u es-agent@es-commands --no-pager")
        .contains("Watchdog timeout"));
    healthy(m, "es-commands");

    // `systemctl stop` drains: the job in flight finishes before the agent stops.
    let job = submit(m, "--role shells --selector us-east-1 --sleep 4s --steps 2");
    m.wait_ok(
        "the sleep job to run",
        Duration::from_secs(30),
        &format!("{CLIENT_ENV}\nes-server get {job} --json | grep -q '\"state\": *\"running\"'"),
    );
    m.ok("systemctl stop es-agent@es-shells");
    assert_eq!(state(m, &job), "succeeded");
    assert_eq!(prop(m, "es-agent@es-shells", "ActiveState"), "inactive");
    m.ok("systemctl start es-agent@es-shells");

    // A bad configuration exits 64 and is not restarted.
    m.ok("printf 'name = \"bad\"\\nrole = \"nope\"\\n' > /etc/es-agent/bad.toml");
    assert!(!m.sh("systemctl start es-agent@bad").status.success());
    std::thread::sleep(Duration::from_secs(7)); // past RestartSec=5s
    assert_eq!(prop(m, "es-agent@bad", "ExecMainStatus"), "64");
    assert_eq!(prop(m, "es-agent@bad", "NRestarts"), "0");
    assert_eq!(prop(m, "es-agent@bad", "ActiveState"), "failed");

    // 7. A certificate rotation with a CA change, in the guide's order; the second agent on
    // this host gets the same steps ("each agent"). Both stay connected throughout.
    let rotate = sh_block_after(guide_md, "(`UnknownCA`). Three steps");
    let (trust, reissue) = rotate.split_once("# 3.").expect("the guide's step 3");
    guide(m, trust);
    m.ok("systemctl restart es-agent@es-commands");
    healthy(m, "es-shells");
    healthy(m, "es-commands");
    guide(m, &format!("# 3.{reissue}"));
    m.ok("openssl x509 -req -in es-commands.csr -CA ca2.pem -CAkey ca2.key -CAcreateserial -days 365 -extfile client.ext -out es-commands.pem
install -o root -g es-agent -m 0640 es-commands.pem es-commands.key /etc/es-agent/tls/
systemctl restart es-agent@es-commands");
    assert!(m
        .ok("openssl x509 -noout -issuer -in /etc/es-agent/tls/es-shells.pem")
        .contains("es client CA 2"));
    healthy(m, "es-shells");
    healthy(m, "es-commands");
    let after = guide(
        m,
        "es-server submit --role shells --selector us-east-1 --echo hello --wait",
    );
    assert!(after.contains("succeeded"), "{after}");

    // 8. An upgrade with a drain: the drain returns once the job in flight is done, and systemd
    // starts the agent again by itself.
    let before = prop(m, "es-agent@es-shells", "MainPID");
    let job = submit(m, "--role shells --selector us-east-1 --sleep 3s --steps 2");
    m.wait_ok(
        "the sleep job to run",
        Duration::from_secs(30),
        &format!("{CLIENT_ENV}\nes-server get {job} --json | grep -q '\"state\": *\"running\"'"),
    );
    guide(m, "apt install ./es-agent_*.deb");
    let drained = guide(m, "es-server drain es-shells");
    assert!(drained.contains("drained and gone"), "{drained}");
    assert_eq!(
        state(m, &job),
        "succeeded",
        "drain returned before the job was done"
    );
    m.wait_ok(
        "systemd to start the drained agent again",
        Duration::from_secs(30),
        &format!(
            "test \"$(systemctl show -p ActiveState --value es-agent@es-shells)\" = active
test \"$(systemctl show -p MainPID --value es-agent@es-shells)\" != {before}"
        ),
    );
    healthy(m, "es-shells");
    guide(m, "es-server agents");
}

/// The first ```sh block after `marker` in the guide.
fn sh_block_after(guide: &str, marker: &str) -> String {
    let at = guide
        .find(marker)
        .unwrap_or_else(|| panic!("docs/operations.md no longer says {marker:?}"));
    let rest = &guide[at..];
    let start = rest.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = rest[start..].find("```").expect("its end");
    rest[start..start + end].to_owned()
}
