//! Real PostgreSQL clusters for the tests: Debian's `postgresql` package, one cluster per test
//! (initdb and pg_ctl on a temporary directory, a free loopback port), run as the `postgres`
//! system user since PostgreSQL refuses root. Stopped when dropped, and by a watchdog shell if
//! the test process dies first.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The superuser the tests connect as, and its password.
pub const USER: &str = "es";
pub const PASSWORD: &str = "es-test-secret";

/// One running cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

/// The newest installed server's bin directory (`/usr/lib/postgresql/N/bin`).
fn server_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: apt-get install postgresql (scripts/test does)")
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no /usr/lib/postgresql/N/bin/initdb")
        .1
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

fn run(mut c: Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Cluster {
    /// initdb + start on a free loopback port.
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// Like [`Cluster::start`], serving TLS with this certificate and key (PEM files).
    pub fn start_tls(cert: &Path, key: &Path) -> Cluster {
        Cluster::start_inner(&["ssl = on"], Some((cert, key)))
    }

    /// Like [`Cluster::start`], with extra `postgresql.conf` lines.
    pub fn start_with(conf: &[&str]) -> Cluster {
        Cluster::start_inner(conf, None)
    }

    fn start_inner(conf: &[&str], tls: Option<(&Path, &Path)>) -> Cluster {
        let bin = server_bin();
        let dir = tempfile::Builder::new()
            .prefix("es-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        run(
            {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(dir.path());
                c
            },
            "chown the cluster directory to postgres",
        );
        let pw = dir.path().join("pw");
        std::fs::write(&pw, PASSWORD).unwrap();
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres").arg(&pw);
                c
            },
            "chown pwfile",
        );
        let data = dir.path().join("data");
        let mut init = as_postgres(&bin, "initdb");
        init.arg("-D")
            .arg(&data)
            .args(["-U", USER, "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"])
            .arg(format!("--pwfile={}", pw.display()));
        run(init, "initdb");
        let port = crate::sshd::free_port_on(&["127.0.0.1".to_owned()]);
        let mut lines = vec![
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("port = {port}"),
            format!("unix_socket_directories = '{}'", dir.path().display()),
            // The tests never crash the machine, only processes: WAL survives those.
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "max_connections = 200".into(),
            "shared_buffers = 64MB".into(),
        ];
        lines.extend(conf.iter().map(|l| l.to_string()));
        if let Some((cert, key)) = tls {
            // PostgreSQL wants its key owned by it and private.
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                let dest = data.join(to);
                std::fs::copy(from, &dest).expect("copy TLS file");
                run(
                    {
                        let mut c = Command::new("chown");
                        c.arg("postgres").arg(&dest);
                        c
                    },
                    "chown TLS file",
                );
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            lines.push("ssl_cert_file = 'server.crt'".into());
            lines.push("ssl_key_file = 'server.key'".into());
        }
        let conf_file = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_file).unwrap();
        text.push_str(&format!("\n{}\n", lines.join("\n")));
        std::fs::write(&conf_file, text).unwrap();
        let c = Cluster { dir, bin, port };
        c.pg_ctl_start();
        c.watchdog();
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory the cluster lives in (owned by postgres): put its TLS files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pg_ctl_start(&self) {
        let mut c = as_postgres(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null());
        let out = c.output().expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// Kills the cluster if the test process dies without dropping it.
    fn watchdog(&self) {
        let script = format!(
            "P=''; while kill -0 {test} 2>/dev/null && [ -d '{data}' ]; do \
               P=$(head -1 '{data}/postmaster.pid' 2>/dev/null || echo \"$P\"); sleep 1; done; \
             [ -n \"$P\" ] && kill -QUIT \"$P\" 2>/dev/null; true",
            test = std::process::id(),
            data = self.data().display()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// `postgres://es:…@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name`; answers its URL.
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// Runs `sql` in database `db` with psql; answers its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut c = Command::new("psql");
        c.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &self.port.to_string(),
            "-U",
            USER,
            "-d",
            db,
            "-c",
            sql,
        ])
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "5");
        run(c, &format!("psql {sql:?}")).trim().to_owned()
    }

    /// Stops the cluster (`-m fast`: sessions are ended, committed work kept).
    pub fn stop(&self) {
        let mut c = as_postgres(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "fast", "stop"])
            .stdout(Stdio::null());
        run(c, "pg_ctl stop");
    }

    /// Starts it again after [`Cluster::stop`], on the same port.
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    /// Waits until a query succeeds (after a restart).
    pub fn wait_ready(&self) {
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            let ok = Command::new("psql")
                .args([
                    "-X",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    USER,
                ])
                .args(["-d", "postgres", "-c", "SELECT 1"])
                .env("PGPASSWORD", PASSWORD)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("PostgreSQL on port {} did not come back", self.port);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut c = as_postgres(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = c.status();
    }
}

/// The PostgreSQL job store on `url` (migrated), opened in this process as a leading server
/// opens it: for tests and benchmarks of the store itself.
pub async fn open_store(url: &str) -> es_server::store::Store {
    use es_server::store::postgres;
    let db = postgres::Database::parse(url, None).unwrap();
    postgres::prepare(&db).await.unwrap();
    let (seen, _) = tokio::sync::watch::channel(String::new());
    let (leadership, _keeper) = postgres::leader::campaign(
        db.clone(),
        "es-tests".into(),
        String::new(),
        seen,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("alone on its database, it leads");
    std::sync::Arc::new(postgres::PgStore::open(&db, leadership).unwrap())
}
