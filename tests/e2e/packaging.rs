//! What ships in `packaging/`: the systemd units (`systemd-analyze verify` clean, exposure score
//! at most 2.0), the server's environment file (every setting documented), the IAM policies and
//! their CloudFormation twin (identical statements, `cfn-lint` clean), and the .deb packages.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{name} is not installed; scripts/test installs it (see README, Tests)")
    })
}

/// A copy of `unit` named `as_name` whose ExecStart runs `exe` (verify wants an existing
/// executable; the packaged path /usr/bin/... does not exist on a build machine).
fn unit_copy(dir: &Path, unit: &str, as_name: &str, from: &str, exe: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("packaging/systemd").join(unit)).unwrap();
    assert!(text.contains(&format!("ExecStart={from} ")), "{unit}");
    let text = text.replace(
        &format!("ExecStart={from} "),
        &format!("ExecStart={} ", exe.display()),
    );
    let path = dir.join(as_name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn systemd_units_verify_clean_with_exposure_at_most_2() {
    let _turn = crate::shared_turn();
    let analyze = tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let bins = crate::bins();
    let mut units = vec![unit_copy(
        dir.path(),
        "es-server.service",
        "es-server.service",
        "/usr/bin/es-server",
        &bins.server,
    )];
    for name in ["es-shells", "es-shells-b", "es-commands", "es-commands-b"] {
        units.push(unit_copy(
            dir.path(),
            "es-agent@.service",
            &format!("es-agent@{name}.service"),
            "/usr/bin/es-agent",
            &bins.agent,
        ));
    }
    for u in &units {
        let out = Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(u)
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        // verify exits 0 on mere warnings (unknown keys, bad values): require silence too.
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "{}: {out:?}",
            u.display()
        );
        let out = Command::new(&analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(u)
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|r| r.split(": ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure score for {}: {out:?}", u.display()));
        assert!(
            score <= 2.0,
            "{}: exposure {score} > 2.0\n{text}",
            u.display()
        );
    }
    // The agent's stop timeout outlasts the default drain and cancel graces (60 s + 10 s).
    let unit = std::fs::read_to_string(repo().join("packaging/systemd/es-agent@.service")).unwrap();
    for line in [
        "Type=notify",
        "TimeoutStopSec=90s",
        "WatchdogSec=",
        "Restart=always",
        "RestartPreventExitStatus=2 64",
    ] {
        assert!(unit.contains(line), "es-agent@.service lacks {line}");
    }
    // Both daemons are bounded in memory (a flood of input cannot take the host down), and the
    // server reloads its credentials on `systemctl reload` (SIGHUP).
    let server =
        std::fs::read_to_string(repo().join("packaging/systemd/es-server.service")).unwrap();
    for (name, text) in [("es-agent@.service", &unit), ("es-server.service", &server)] {
        for line in ["MemoryHigh=", "MemoryMax="] {
            assert!(text.contains(line), "{name} lacks {line}");
        }
    }
    assert!(server.contains("ExecReload=/bin/kill -HUP $MAINPID"));
}

#[test]
fn server_environment_file_documents_every_setting() {
    let src = std::fs::read_to_string(repo().join("server-stub/src/lib.rs")).unwrap();
    let env = std::fs::read_to_string(repo().join("packaging/es-server.env")).unwrap();
    let vars: Vec<&str> = src
        .split("env = \"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .filter(|v| v.starts_with("ES_SERVER_"))
        .collect();
    assert!(vars.len() >= 20, "{vars:?}");
    for v in vars {
        assert!(
            env.lines()
                .any(|l| l.starts_with(&format!("{v}=")) || l.starts_with(&format!("#{v}="))),
            "packaging/es-server.env does not document {v}"
        );
    }
}

/// `!Sub` strings of the template with the substitutions its header promises.
fn resolve(v: &serde_yaml::Value) -> serde_json::Value {
    use serde_yaml::Value as Y;
    match v {
        Y::Tagged(t) if t.tag == "Sub" => {
            let s = t.value.as_str().expect("!Sub of a string");
            serde_json::Value::String(
                s.replace("${AWS::Partition}", "aws")
                    .replace("${AWS::AccountId}", "*")
                    .replace("${OutputBucketName}", "es-command-output")
                    .replace("${SandboxInstanceRoleNamePrefix}", "es-sandbox-")
                    .replace("${TargetRoleNamePrefix}", "es-target-"),
            )
        }
        Y::Tagged(t) => panic!("unexpected tag {} in a policy statement", t.tag),
        Y::Sequence(s) => serde_json::Value::Array(s.iter().map(resolve).collect()),
        Y::Mapping(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, v)| (k.as_str().expect("string key").to_owned(), resolve(v)))
                .collect(),
        ),
        other => serde_json::to_value(other).unwrap(),
    }
}

#[test]
fn iam_policies_match_their_cloudformation_and_pass_cfn_lint() {
    let _turn = crate::shared_turn();
    let dir = repo().join("packaging/iam");
    let template: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("es-agent-roles.cfn.yaml")).unwrap(),
    )
    .unwrap();
    for (resource, file) in [
        ("ShellsPolicy", "es-shells-policy.json"),
        ("CommandsPolicy", "es-commands-policy.json"),
    ] {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        let cfn = resolve(&template["Resources"][resource]["Properties"]["PolicyDocument"]);
        assert_eq!(cfn, json, "{resource} differs from {file}");
        // No wildcard actions: least privilege is listed action by action.
        for a in es_tests::policy_actions(file) {
            assert!(!a.contains('*'), "{file}: wildcard action {a}");
        }
    }
    let out = Command::new(tool("cfn-lint"))
        .arg(dir.join("es-agent-roles.cfn.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cfn-lint: {out:?}");
}

/// Runs `cmd`, panicking with its output unless it succeeds; answers stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The .deb packages (es-agent, es-server), built once per test run by `cargo deb --no-build`
/// from the debug binaries that `cargo build --workspace --bins` made (scripts/test builds them
/// first), into `target/es-debs`; their -dbgsym packages beside. Shared with the systemd test.
pub(crate) fn debs() -> &'static [(String, PathBuf); 2] {
    static DEBS: std::sync::OnceLock<[(String, PathBuf); 2]> = std::sync::OnceLock::new();
    DEBS.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        tool("cargo-deb");
        let dir = repo().join("target/es-debs");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ["es-agent", "es-server"].map(|pkg| {
            assert!(
                repo().join("target/debug").join(pkg).is_file(),
                "target/debug/{pkg} is missing: run `cargo build --workspace --bins` first (scripts/test does)"
            );
            let out = run(Command::new(&cargo)
                .current_dir(repo())
                .args(["deb", "-p", pkg, "--no-build", "--profile", "dev", "-o"])
                .arg(&dir));
            let deb = PathBuf::from(out.lines().last().unwrap().trim());
            assert!(deb.is_file(), "{out}");
            (pkg.to_owned(), deb)
        })
    })
}

/// `cargo deb --no-build` of the debug binaries that `cargo build --workspace --bins` made
/// (scripts/test builds them before the tests). The packages are then read with dpkg-deb: the
/// files, modes, conffiles, stripped binaries, and the maintainer script run against a scratch
/// root (DPKG_ROOT) creates the system user and locks the configuration down.
#[test]
fn deb_packages_hold_binaries_units_config_and_create_the_user() {
    let _turn = crate::shared_turn();
    let dir = tempfile::tempdir().unwrap();
    for ((pkg, deb), (unit, conf)) in debs().iter().zip([
        ("es-agent@.service", "es-agent.toml"),
        ("es-server.service", "es-server.env"),
    ]) {
        let pkg = pkg.as_str();

        let files = run(Command::new("dpkg-deb").arg("-c").arg(deb));
        for (path, mode) in [
            (format!("./usr/bin/{pkg}"), "-rwxr-xr-x"),
            (format!("./lib/systemd/system/{unit}"), "-rw-r--r--"),
            (format!("./etc/{pkg}/{conf}"), "-rw-r-----"),
            (format!("./usr/share/doc/{pkg}/operations.md"), "-rw-r--r--"),
        ] {
            assert!(
                files
                    .lines()
                    .any(|l| l.starts_with(mode) && l.ends_with(&path)),
                "{pkg}: no {path} with mode {mode} in\n{files}"
            );
        }
        let ctl = dir.path().join(format!("{pkg}-control"));
        run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&ctl));
        assert_eq!(
            std::fs::read_to_string(ctl.join("conffiles"))
                .unwrap()
                .trim(),
            format!("/etc/{pkg}/{conf}")
        );
        let control = std::fs::read_to_string(ctl.join("control")).unwrap();
        assert!(control.contains(&format!("Package: {pkg}")), "{control}");
        assert!(
            control.contains("passwd"),
            "useradd comes from passwd: {control}"
        );

        // The shipped files are the repository's, the binary without debug info.
        let root = dir.path().join(format!("{pkg}-root"));
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
        assert_eq!(
            std::fs::read(root.join("lib/systemd/system").join(unit)).unwrap(),
            std::fs::read(repo().join("packaging/systemd").join(unit)).unwrap()
        );
        let sections = run(Command::new("readelf")
            .arg("-S")
            .arg(root.join("usr/bin").join(pkg)));
        assert!(
            !sections.contains(".debug_info") && !sections.contains(".debug_line"),
            "{pkg} is not stripped"
        );
        // Its line tables went to the -dbgsym package beside it (issue 17: the release .deb
        // shipped them, 100 MB installed for es-agent).
        let ddeb = deb.with_file_name(
            deb.file_name()
                .unwrap()
                .to_string_lossy()
                .replacen(pkg, &format!("{pkg}-dbgsym"), 1)
                .replace(".deb", ".ddeb"),
        );
        assert!(
            ddeb.is_file(),
            "no {} beside {}",
            ddeb.display(),
            deb.display()
        );

        // The maintainer script, against a scratch root with only root in its user database.
        if unsafe { libc::geteuid() } != 0 {
            es_tests::skipped(
                "packaging::deb_packages_hold_binaries_units_config_and_create_the_user (postinst)",
                "not root: the maintainer script cannot run against a scratch root (CI runs as root)",
            );
            continue;
        }
        let etc = root.join("etc");
        for db in ["passwd", "group", "shadow", "gshadow"] {
            let host = std::fs::read_to_string(Path::new("/etc").join(db)).unwrap_or_default();
            let first: String = host
                .lines()
                .filter(|l| l.starts_with("root:"))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(etc.join(db), first).unwrap();
        }
        for _ in 0..2 {
            // Twice: a reinstall or upgrade finds the user and changes nothing.
            run(Command::new("sh")
                .arg(ctl.join("postinst"))
                .arg("configure")
                .env("DPKG_ROOT", &root));
        }
        let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
        let users: Vec<&str> = passwd
            .lines()
            .filter(|l| l.starts_with(&format!("{pkg}:")))
            .collect();
        assert_eq!(users.len(), 1, "{passwd}");
        let fields: Vec<&str> = users[0].split(':').collect();
        let uid: u32 = fields[2].parse().unwrap();
        assert!(uid < 1000, "a system user: {}", users[0]);
        assert_eq!(fields[6], "/usr/sbin/nologin");
        use std::os::unix::fs::MetadataExt;
        let gid: u32 = fields[3].parse().unwrap();
        let meta = std::fs::metadata(etc.join(pkg).join(conf)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (0, gid, 0o640)
        );
        let meta = std::fs::metadata(etc.join(pkg)).unwrap();
        assert_eq!((meta.gid(), meta.mode() & 0o777), (gid, 0o750));
    }
}
