//! A Debian machine with systemd as PID 1, for testing the packages under the real service
//! manager: a debootstrap root (built once, kept under `target/`), booted in new PID, mount and
//! network namespaces on an overlay of that root, entered with `nsenter`. Root only.
//!
//! Why these steps: systemd must be PID 1 of its namespace (`unshare --pid --fork`), and the
//! root must be switched with `pivot_root`, not `chroot`: the kernel refuses a new user
//! namespace to a chrooted process (unshare(2): EPERM "the caller is in a chroot
//! environment"), so every unit with `PrivateUsers=yes` would fail with status 217/USER. The
//! network namespace has only loopback: nothing the machine serves is reachable from outside,
//! and its fixed ports (7700) clash with nothing. Dropping the machine kills its PID 1, which
//! ends every process in it; its mounts go with its mount namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// What the root holds beyond the minimal base: systemd itself, openssl for the operator
/// guide's certificate commands, and ca-certificates (es-agent depends on it; the machine has
/// no network to fetch it from). A change here rebuilds the root (the stamp file records it).
const INCLUDE: &str = "systemd,systemd-sysv,dbus,openssl,ca-certificates";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// The debootstrap root under `target/`, built when missing (about a minute and a half; it
/// needs debootstrap and Debian's mirror). Built beside and renamed: never half-made.
pub fn root_fs(target: &Path) -> Result<PathBuf, String> {
    let root = target.join("es-systemd-root");
    let stamp = format!("{SUITE} {INCLUDE}\n");
    let stamp_file = target.join("es-systemd-root.stamp");
    if root.join("lib/systemd/systemd").is_file()
        && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str())
    {
        return Ok(root);
    }
    if Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err(
            "debootstrap is not installed (apt-get install debootstrap; scripts/test does)".into(),
        );
    }
    let building = target.join("es-systemd-root.building");
    let _ = std::fs::remove_dir_all(&building);
    let _ = std::fs::remove_dir_all(&root);
    eprintln!(
        "== debootstrap {SUITE} ({INCLUDE}) into {} (once)",
        root.display()
    );
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&building)
        .arg(MIRROR)
        .output()
        .map_err(|e| format!("debootstrap: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "debootstrap failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    std::fs::rename(&building, &root).map_err(|e| e.to_string())?;
    std::fs::write(&stamp_file, stamp).map_err(|e| e.to_string())?;
    Ok(root)
}

/// A booted machine. Dropped: its PID 1 is killed, and with it everything inside.
pub struct Machine {
    /// The host's PID of the machine's systemd.
    pub pid: i32,
    unshare: Child,
    _dir: tempfile::TempDir,
}

impl Machine {
    /// Boots systemd on an overlay of `root` (changes go to a temporary directory) and waits
    /// until it is up (`systemctl is-system-running --wait`).
    pub fn boot(root: &Path) -> Machine {
        let dir = tempfile::tempdir().expect("temp dir");
        for d in ["upper", "work", "root"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let script = format!(
            r#"set -e
D={dir}
R=$D/root
mount -t overlay overlay -o lowerdir={lower},upperdir=$D/upper,workdir=$D/work $R
mount -t proc proc $R/proc
mount --rbind /sys $R/sys
mount -t tmpfs tmpfs $R/run
mount -t tmpfs tmpfs $R/tmp
mount --rbind /dev $R/dev
ip link set lo up
mkdir -p $R/.oldroot
cd $R
pivot_root . .oldroot
umount -l /.oldroot
export container=es-test
exec /lib/systemd/systemd --system
"#,
            dir = dir.path().display(),
            lower = root.display()
        );
        let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--net",
                "--propagation",
                "private",
            ])
            .args(["bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare");
        // Its only child is the machine's PID 1.
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        let until = Instant::now() + Duration::from_secs(30);
        let pid = loop {
            let pid: Option<i32> = std::fs::read_to_string(&children)
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()));
            if let Some(pid) = pid.filter(|p| {
                std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e.ends_with("systemd"))
            }) {
                break pid;
            }
            assert!(
                Instant::now() < until,
                "systemd did not start: {}",
                std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let m = Machine {
            pid,
            unshare,
            _dir: dir,
        };
        m.wait_ok(
            "systemd's private socket",
            Duration::from_secs(60),
            "test -S /run/systemd/private",
        );
        let up = m.sh("timeout 120 systemctl is-system-running --wait || true");
        let state = String::from_utf8_lossy(&up.stdout).trim().to_owned();
        assert!(
            state == "running",
            "the machine did not come up: {state}\n{}",
            m.ok("systemctl --failed --no-pager; journalctl -b --no-pager | tail -40")
        );
        m
    }

    /// Runs a shell script inside (as root, in /root, `set -e`), bounded by `timeout`.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-a", "-r", "-w", "--"])
            .args(["timeout", "300", "/bin/sh", "-c"])
            .arg(format!("cd /root && set -e\n{script}"))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .expect("nsenter")
    }

    /// Runs a script that must succeed; answers its standard output.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the machine: {script}\nexit {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Copies a host file to `to` inside (a path of the machine).
    pub fn put(&self, from: &Path, to: &str) {
        let dest =
            PathBuf::from(format!("/proc/{}/root", self.pid)).join(to.trim_start_matches('/'));
        std::fs::copy(from, &dest)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), dest.display()));
    }

    /// Polls a script until it succeeds; panics with its last output after `timeout`.
    pub fn wait_ok(&self, what: &str, timeout: Duration, script: &str) -> String {
        let until = Instant::now() + timeout;
        loop {
            let out = self.sh(script);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < until,
                "{what}: still failing after {timeout:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SIGKILL to a PID namespace's init ends every process in it.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}
