//! Who is calling: agents by their client certificate, submitters by a bearer token or a client
//! certificate.
//!
//! Certificates are issued by the operator's CA (`--client-ca`); rustls has already checked the
//! chain and the validity period during the handshake. The subject names the caller:
//! `CN` = agent or submitter name, `OU` = `shells`, `commands` or `submitter`. An agent may only
//! register under its certificate's name and role, and a session may only be used by the
//! certificate that opened it.
//!
//! Tokens are kept as SHA-256 digests in a file (`--tokens`), one `NAME HEX` pair per line;
//! `es-server token NAME` prints a fresh token and its line.
//!
//! With `--insecure` (plaintext) agents are trusted as they describe themselves; submitters still
//! need a token when a tokens file is configured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use es_proto::Role;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// A caller as proven by its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub name: String,
    /// The certificate's `OU`: `shells`, `commands` or `submitter`.
    pub unit: String,
}

impl CertIdentity {
    /// The agent role the certificate is for, if it is an agent's.
    pub fn role(&self) -> Option<Role> {
        Role::parse(&self.unit)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("--tokens {path}: {detail}")]
    Tokens { path: PathBuf, detail: String },
}

/// The authentication policy of a running server.
#[derive(Debug, Default)]
pub struct Auth {
    /// TLS with client certificates is on.
    pub tls: bool,
    /// Token digest -> submitter name. `None`: no tokens file configured.
    tokens: Option<HashMap<[u8; 32], String>>,
}

/// Digest under which a token is stored.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random token (256 bits, hex) and the line to add to the tokens file for `name`.
pub fn new_token(name: &str) -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("es_{}", hex(&bytes));
    let line = format!("{name} {}", hex(&digest(&token)));
    (token, line)
}

/// Parses a tokens file: `NAME SHA256HEX` per line, `#` comments and blank lines ignored.
pub fn parse_tokens(text: &str, path: &Path) -> Result<HashMap<[u8; 32], String>, AuthError> {
    let bad = |n: usize, detail: String| AuthError::Tokens {
        path: path.to_owned(),
        detail: format!("line {n}: {detail}"),
    };
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(hexd), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(
                i + 1,
                "expected `NAME SHA256HEX` (make one with `es-server token NAME`)".into(),
            ));
        };
        if hexd.len() != 64 || !hexd.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(
                i + 1,
                format!("the digest of {name} is not 64 hex digits (store the SHA-256 of the token, not the token)"),
            ));
        }
        let mut d = [0u8; 32];
        for (j, chunk) in hexd.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(chunk).expect("ascii");
            d[j] = u8::from_str_radix(s, 16).expect("checked hex");
        }
        if out.insert(d, name.to_owned()).is_some() {
            return Err(bad(i + 1, format!("the token of {name} is listed twice")));
        }
    }
    Ok(out)
}

/// The name and role in a DER certificate's subject (`CN`, `OU`).
pub fn cert_identity(der: &[u8]) -> Result<CertIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
    };
    let name = first(&mut subject.iter_common_name())
        .filter(|n| !n.is_empty())
        .ok_or("the client certificate has no subject CN (the agent or submitter name)")?;
    let unit = first(&mut subject.iter_organizational_unit()).ok_or_else(|| {
        format!(
            "the client certificate of {name} has no subject OU (shells, commands or submitter)"
        )
    })?;
    Ok(CertIdentity { name, unit })
}

impl Auth {
    pub fn new(tls: bool, tokens_file: Option<&Path>) -> Result<Auth, AuthError> {
        let tokens = match tokens_file {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| AuthError::Tokens {
                    path: p.to_owned(),
                    detail: e.to_string(),
                })?;
                Some(parse_tokens(&text, p)?)
            }
        };
        Ok(Auth { tls, tokens })
    }

    /// The certificate identity of the peer, if TLS is on and it presented one.
    fn peer<T>(&self, req: &Request<T>) -> Result<Option<CertIdentity>, Status> {
        if !self.tls {
            return Ok(None);
        }
        let Some(certs) = req.peer_certs() else {
            return Ok(None);
        };
        let Some(leaf) = certs.first() else {
            return Ok(None);
        };
        cert_identity(leaf.as_ref())
            .map(Some)
            .map_err(Status::unauthenticated)
    }

    /// The agent behind a request: `Some` with TLS (a certificate is required), `None` when
    /// running insecure.
    pub fn agent<T>(&self, req: &Request<T>) -> Result<Option<CertIdentity>, Status> {
        if !self.tls {
            return Ok(None);
        }
        match self.peer(req)? {
            Some(id) if id.role().is_some() => Ok(Some(id)),
            Some(id) => Err(Status::permission_denied(format!(
                "certificate {} is for `{}`, not for an agent (OU must be shells or commands)",
                id.name, id.unit
            ))),
            None => Err(Status::unauthenticated(
                "agents must present a client certificate issued by the server's client CA",
            )),
        }
    }

    /// The submitter behind a request, as `submitter:NAME` (or `anonymous:CLAIMED` when nothing
    /// is required).
    pub fn submitter<T>(&self, req: &Request<T>, claimed: &str) -> Result<String, Status> {
        if let Some(tokens) = &self.tokens {
            if let Some(v) = req.metadata().get("authorization") {
                let v = v.to_str().unwrap_or_default();
                let token = v
                    .strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .unwrap_or(v)
                    .trim();
                return match tokens.get(&digest(token)) {
                    Some(name) => Ok(format!("submitter:{name}")),
                    None => Err(Status::unauthenticated(
                        "the token is not valid (not in the server's tokens file)",
                    )),
                };
            }
        }
        if let Some(id) = self.peer(req)? {
            if id.unit == "submitter" {
                return Ok(format!("submitter:{}", id.name));
            }
            return Err(Status::permission_denied(format!(
                "certificate {} is an agent's ({}): agents cannot submit or read jobs",
                id.name, id.unit
            )));
        }
        if self.tokens.is_some() || self.tls {
            return Err(Status::unauthenticated(
                "missing credentials: pass a token (--token or ES_TOKEN) or a submitter client certificate",
            ));
        }
        let who = if claimed.is_empty() {
            "unknown"
        } else {
            claimed
        };
        Ok(format!("anonymous:{who}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_round_trip_and_errors() {
        let (token, line) = new_token("ci");
        let map = parse_tokens(&format!("# comment\n\n{line}\n"), Path::new("t")).unwrap();
        assert_eq!(map.get(&digest(&token)).map(String::as_str), Some("ci"));
        let e = parse_tokens("ci es_plaintext", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("64 hex"), "{e}");
        let e = parse_tokens(&format!("{line}\n{line}"), Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = parse_tokens("lonely", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("NAME SHA256HEX"), "{e}");
    }
}
