//! The policy files of `auth`: submitter tokens with their scopes, the deny-list and the
//! agents file, parsed and read again on SIGHUP. Pure parsing, no request handling.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use es_proto::Role;
use sha2::{Digest, Sha256};

/// What a submitter may do; each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Submit,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "submit" => Some(Scope::Submit),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Admin => "admin",
        }
    }
}

/// What an agent identity may register as (from the agents file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentGrant {
    pub role: Role,
    /// Selector values it may serve; `*` = any.
    pub selectors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{flag} {path}: {detail}")]
    File {
        flag: &'static str,
        path: PathBuf,
        detail: String,
    },
}

/// The files the policy is read from (and read again on SIGHUP).
#[derive(Debug, Clone, Default)]
pub struct AuthFiles {
    pub tokens: Option<PathBuf>,
    pub deny: Option<PathBuf>,
    pub agents: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub(super) struct Deny {
    pub(super) serials: HashSet<String>,
    pub(super) names: HashSet<String>,
    pub(super) digests: HashSet<[u8; 32]>,
}

#[derive(Debug, Default)]
pub(super) struct Policy {
    /// Token digest -> (submitter name, scope). `None`: no tokens file configured.
    pub(super) tokens: Option<HashMap<[u8; 32], (String, Scope)>>,
    pub(super) deny: Deny,
    /// Agent name -> what it may register as. `None`: no agents file (any selector).
    pub(super) agents: Option<HashMap<String, AgentGrant>>,
}

/// Digest under which a token is stored.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut d = [0u8; 32];
    for (j, chunk) in s.as_bytes().chunks(2).enumerate() {
        d[j] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(d)
}

/// A serial as `openssl x509 -serial` or a certificate parser prints it, normalized.
pub fn normalize_serial(s: &str) -> String {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_prefix("serial=").unwrap_or(&s);
    let digits: String = s.chars().filter(|c| *c != ':').collect();
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

/// A fresh random token (256 bits, hex) and the line to add to the tokens file for `name`.
pub fn new_token(name: &str, scope: Scope) -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("es_{}", hex(&bytes));
    let line = format!("{name} {} {}", hex(&digest(&token)), scope.name());
    (token, line)
}

pub(super) fn lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines().enumerate().filter_map(|(i, l)| {
        let l = l.trim();
        (!l.is_empty() && !l.starts_with('#')).then(|| (i + 1, l.split_whitespace().collect()))
    })
}

/// Parses a tokens file: `NAME SHA256HEX [read|submit|admin]` per line (default `submit`),
/// `#` comments and blank lines ignored.
pub fn parse_tokens(text: &str) -> Result<HashMap<[u8; 32], (String, Scope)>, String> {
    let mut out = HashMap::new();
    for (n, parts) in lines(text) {
        let (name, hexd, scope) = match parts.as_slice() {
            [name, hexd] => (*name, *hexd, Scope::Submit),
            [name, hexd, scope] => {
                let s = Scope::parse(scope).ok_or_else(|| {
                    format!("line {n}: scope {scope:?} of {name}: use read, submit or admin")
                })?;
                (*name, *hexd, s)
            }
            _ => {
                return Err(format!(
                    "line {n}: expected `NAME SHA256HEX [SCOPE]` (make one with `es-server token NAME`)"
                ))
            }
        };
        let d = unhex32(hexd).ok_or_else(|| {
            format!("line {n}: the digest of {name} is not 64 hex digits (store the SHA-256 of the token, not the token)")
        })?;
        if out.insert(d, (name.to_owned(), scope)).is_some() {
            return Err(format!("line {n}: the token of {name} is listed twice"));
        }
    }
    Ok(out)
}

/// Parses a deny-list: `serial HEX` or `serial=HEX` (a certificate, as openssl prints it),
/// `digest SHA256HEX` (a token), or `name NAME` (every certificate and token of that agent or
/// submitter).
pub(super) fn parse_deny(text: &str) -> Result<Deny, String> {
    let mut d = Deny::default();
    for (n, parts) in lines(text) {
        // `openssl x509 -serial -noout` prints `serial=HEX`: take that line as it is.
        let parts: Vec<&str> = match parts.as_slice() {
            [one] if one.starts_with("serial=") => vec!["serial", one],
            _ => parts,
        };
        match parts.as_slice() {
            ["serial", s]
                if s.trim_start_matches("serial=")
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':') =>
            {
                d.serials.insert(normalize_serial(s));
            }
            ["digest", h] => {
                d.digests.insert(
                    unhex32(h).ok_or_else(|| format!("line {n}: digest is not 64 hex digits"))?,
                );
            }
            ["name", name] => {
                d.names.insert((*name).to_owned());
            }
            _ => {
                return Err(format!(
                    "line {n}: expected `serial HEX`, `digest SHA256HEX` or `name NAME`"
                ))
            }
        }
    }
    Ok(d)
}

/// Parses an agents file: `NAME ROLE SELECTOR[,SELECTOR...]` per line (`*` = any selector,
/// `-` = the empty selector).
pub fn parse_agents(text: &str) -> Result<HashMap<String, AgentGrant>, String> {
    let mut out = HashMap::new();
    for (n, parts) in lines(text) {
        let [name, role, sels] = parts.as_slice() else {
            return Err(format!(
                "line {n}: expected `NAME ROLE SELECTOR[,SELECTOR...]` (e.g. es-shells-prod shells prod)"
            ));
        };
        let role = Role::parse(role)
            .ok_or_else(|| format!("line {n}: role {role:?} of {name}: use shells or commands"))?;
        let selectors = sels
            .split(',')
            .map(|s| {
                if s == "-" {
                    String::new()
                } else {
                    s.to_owned()
                }
            })
            .collect();
        if out
            .insert((*name).to_owned(), AgentGrant { role, selectors })
            .is_some()
        {
            return Err(format!("line {n}: agent {name} is listed twice"));
        }
    }
    Ok(out)
}

pub(super) fn read(flag: &'static str, path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|e| AuthError::File {
        flag,
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

impl AuthFiles {
    pub(super) fn load(&self) -> Result<Policy, AuthError> {
        fn parse_err<'a>(flag: &'static str, path: &'a Path) -> impl Fn(String) -> AuthError + 'a {
            move |detail| AuthError::File {
                flag,
                path: path.to_owned(),
                detail,
            }
        }
        let mut p = Policy::default();
        if let Some(path) = &self.tokens {
            p.tokens =
                Some(parse_tokens(&read("--tokens", path)?).map_err(parse_err("--tokens", path))?);
        }
        if let Some(path) = &self.deny {
            p.deny = parse_deny(&read("--deny", path)?).map_err(parse_err("--deny", path))?;
        }
        if let Some(path) = &self.agents {
            p.agents =
                Some(parse_agents(&read("--agents", path)?).map_err(parse_err("--agents", path))?);
        }
        Ok(p)
    }
}
