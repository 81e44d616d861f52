//! Secrets an agent sealed to this command: the sandbox key pair's private key (`sandbox
//! access-key`) and Windows passwords (`sandbox up` with `wait_password`). The CLI makes a
//! one-time X25519 key, sends its public half in the job, and opens what the agent returns;
//! only ciphertext ever passes through the server. Each secret is written to a new file
//! readable by its owner only (never printed, never overwritten).

use std::io::Write;
use std::path::Path;

use es_proto::sealed::Opener;
use es_proto::v1::{shells_result, Job};
use std::path::PathBuf;

use super::conn::EXIT_USAGE;

/// Opens the key in `job`'s result with `opener` and writes it to `out` (mode 0600, which must
/// not exist yet). Answers the line to print.
pub fn save(job: &Job, opener: &Opener, out: &Path) -> Result<String, (u8, String)> {
    let Some(shells_result::Result::AccessKey(k)) = job
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .and_then(|s| s.result.as_ref())
    else {
        return Err((1, format!("job {} returned no key", job.id)));
    };
    let key = opener
        .open(&k.sealed_private_key)
        .map_err(|e| (1, format!("job {}: {e}", job.id)))?;
    write_private(out, &key)?;
    Ok(format!(
        "private key of {} ({}, {}) written to {} (mode 0600); e.g. ssh -i {} ec2-user@ADDRESS",
        k.key_name,
        k.key_type,
        k.key_fingerprint,
        out.display(),
        out.display()
    ))
}

/// Opens the Windows passwords in a deploy's result and writes each to `SANDBOX-APP.password`
/// in `dir` (mode 0600, new files). Answers the lines to print.
pub fn save_passwords(job: &Job, opener: &Opener, dir: &Path) -> Result<Vec<String>, (u8, String)> {
    let Some(shells_result::Result::Apps(apps)) = job
        .result
        .as_ref()
        .and_then(|r| r.shells.as_ref())
        .and_then(|s| s.result.as_ref())
    else {
        return Ok(Vec::new());
    };
    let mut lines = Vec::new();
    for a in apps.apps.iter().filter(|a| !a.sealed_password.is_empty()) {
        let password = opener
            .open(&a.sealed_password)
            .map_err(|e| (1, format!("app {}: {e}", a.name)))?;
        let out: PathBuf = dir.join(format!("{}-{}.password", job.sandbox_id, a.name));
        write_private(&out, &password)?;
        lines.push(format!(
            "password of app {} ({}) written to {} (mode 0600)",
            a.name,
            a.instance_id,
            out.display()
        ));
    }
    Ok(lines)
}

/// Writes `secret` to the new file `out`, readable by its owner only.
fn write_private(out: &Path, secret: &[u8]) -> Result<(), (u8, String)> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_0600()
        .open(out)
        .map_err(|e| {
            (
                EXIT_USAGE,
                format!(
                    "{}: {e}{}",
                    out.display(),
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        " (a secret's file is never overwritten: remove it, or give --out)"
                    } else {
                        ""
                    }
                ),
            )
        })?;
    f.write_all(secret)
        .and_then(|()| f.sync_all())
        .map_err(|e| (1, format!("{}: {e}", out.display())))
}

/// `OpenOptions::mode(0o600)` where the platform has modes.
trait Private {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Private for std::fs::OpenOptions {
    #[cfg(unix)]
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
    #[cfg(not(unix))]
    fn mode_0600(&mut self) -> &mut Self {
        self
    }
}
