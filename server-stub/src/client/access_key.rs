//! `es-server sandbox access-key`: the sandbox key pair's private key, for the one who asks. The
//! CLI makes a one-time X25519 key, sends its public half in the GetAccessKey job, and opens the
//! sealed private key the agent returns; only ciphertext ever passes through the server. The
//! key is written to a new file readable by its owner only (never printed, never overwritten).

use std::io::Write;
use std::path::Path;

use es_proto::sealed::Opener;
use es_proto::v1::{shells_result, Job};

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
                        " (a key file is never overwritten: remove it, or give --out)"
                    } else {
                        ""
                    }
                ),
            )
        })?;
    f.write_all(&key)
        .and_then(|()| f.sync_all())
        .map_err(|e| (1, format!("{}: {e}", out.display())))?;
    Ok(format!(
        "private key of {} ({}, {}) written to {} (mode 0600); e.g. ssh -i {} ec2-user@ADDRESS",
        k.key_name,
        k.key_type,
        k.key_fingerprint,
        out.display(),
        out.display()
    ))
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
