//! Who is calling, and what they may do: agents by their client certificate, submitters by a
//! bearer token or a client certificate, each submitter with a scope.
//!
//! Certificates are issued by the operator's CA (`--client-ca`); rustls has already checked the
//! chain and the validity period during the handshake. The subject names the caller:
//! `CN` = agent or submitter name, `OU` = `shells`, `commands`, `submitter` or `admin`. An agent
//! may only register under its certificate's name and role, and, with an agents file
//! (`--agents`), only for the selectors listed for it there; a session may only be used by the
//! certificate that opened it.
//!
//! Tokens are kept as SHA-256 digests in a file (`--tokens`), one `NAME HEX [SCOPE]` line each;
//! `es-server token NAME --scope S` prints a fresh token and its line. Scopes nest: `read`
//! (Get, Watch, List, Agents, Audit) < `submit` (also Submit, and Cancel of one's own jobs) <
//! `admin` (also DrainAgent, SweepOrphans, Cancel of anyone's jobs). A submitter certificate
//! (OU `submitter`) has `submit`, an `admin` one `admin`.
//!
//! A deny-list (`--deny`) revokes certificate serials, token digests and names at once; the
//! tokens, deny and agents files are read again on SIGHUP (a file that fails to parse keeps the
//! previous policy and is logged). Every refusal is logged (never with the token) and counted
//! in `es_server_auth_failures_total`.
//!
//! With `--insecure` (plaintext, loopback only) agents are trusted as they describe themselves;
//! submitters still need a token when a tokens file is configured.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use es_proto::metrics::{labels, Labels};
use es_proto::v1::AgentIdentity;
use es_proto::Role;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// A caller as proven by its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub name: String,
    /// The certificate's `OU`: `shells`, `commands`, `submitter` or `admin`.
    pub unit: String,
    /// Serial number, lowercase hex without leading zeros (as the deny-list holds it).
    pub serial: String,
}

impl CertIdentity {
    /// The agent role the certificate is for, if it is an agent's.
    pub fn role(&self) -> Option<Role> {
        Role::parse(&self.unit)
    }
}

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

/// An authenticated submitter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `submitter:NAME`, or `anonymous:CLAIMED` when the server requires nothing.
    pub actor: String,
    pub scope: Scope,
}

impl Caller {
    /// Refuses unless the caller's scope includes `need`; `what` names the action.
    pub fn require(&self, need: Scope, what: &str) -> Result<(), Status> {
        if self.scope >= need {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{} has scope {}; {what} needs scope {} (a token made with `es-server token NAME --scope {}`)",
            self.actor,
            self.scope.name(),
            need.name(),
            need.name()
        )))
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
struct Deny {
    serials: HashSet<String>,
    names: HashSet<String>,
    digests: HashSet<[u8; 32]>,
}

#[derive(Debug, Default)]
struct Policy {
    /// Token digest -> (submitter name, scope). `None`: no tokens file configured.
    tokens: Option<HashMap<[u8; 32], (String, Scope)>>,
    deny: Deny,
    /// Agent name -> what it may register as. `None`: no agents file (any selector).
    agents: Option<HashMap<String, AgentGrant>>,
}

/// The authentication policy of a running server.
pub struct Auth {
    /// TLS with client certificates is on.
    pub tls: bool,
    files: AuthFiles,
    policy: RwLock<Arc<Policy>>,
    failures: Family<Labels, Counter>,
}

/// Digest under which a token is stored.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
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

fn lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
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
fn parse_deny(text: &str) -> Result<Deny, String> {
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

/// The name and role in a DER certificate's subject (`CN`, `OU`), and its serial.
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
            "the client certificate of {name} has no subject OU (shells, commands, submitter or admin)"
        )
    })?;
    Ok(CertIdentity {
        name,
        unit,
        serial: normalize_serial(&hex(cert.raw_serial())),
    })
}

fn read(flag: &'static str, path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|e| AuthError::File {
        flag,
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

impl AuthFiles {
    fn load(&self) -> Result<Policy, AuthError> {
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

fn peer_addr<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown address".into())
}

impl Auth {
    pub fn new(
        tls: bool,
        files: AuthFiles,
        failures: Family<Labels, Counter>,
    ) -> Result<Auth, AuthError> {
        let policy = files.load()?;
        Ok(Auth {
            tls,
            files,
            policy: RwLock::new(Arc::new(policy)),
            failures,
        })
    }

    /// Reads the tokens, deny and agents files again; on an error the previous policy stays.
    pub fn reload(&self) -> Result<(), AuthError> {
        let fresh = Arc::new(self.files.load()?);
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Checks a submitter's scope; a refusal is logged and counted like a failed
    /// authentication.
    pub fn require<T>(
        &self,
        req: &Request<T>,
        caller: &Caller,
        need: Scope,
        what: &str,
    ) -> Result<(), Status> {
        caller
            .require(need, what)
            .map_err(|s| self.refuse(req, "submitter", "scope", s))
    }

    /// Logs and counts a refusal; answers the status to return.
    fn refuse<T>(&self, req: &Request<T>, kind: &str, reason: &str, status: Status) -> Status {
        log::warn!(
            "refused {kind} from {}: {} ({reason})",
            peer_addr(req),
            status.message()
        );
        self.failures
            .get_or_create(&labels(&[("kind", kind), ("reason", reason)]))
            .inc();
        status
    }

    /// The certificate identity of the peer, if TLS is on and it presented one.
    fn peer<T>(&self, req: &Request<T>, kind: &str) -> Result<Option<CertIdentity>, Status> {
        if !self.tls {
            return Ok(None);
        }
        let Some(leaf) = req.peer_certs().and_then(|c| c.first().cloned()) else {
            return Ok(None);
        };
        let id = cert_identity(leaf.as_ref())
            .map_err(|e| self.refuse(req, kind, "certificate", Status::unauthenticated(e)))?;
        let p = self.policy();
        if p.deny.serials.contains(&id.serial) || p.deny.names.contains(&id.name) {
            return Err(self.refuse(
                req,
                kind,
                "revoked",
                Status::unauthenticated(format!(
                    "the certificate of {} (serial {}) is revoked on this server",
                    id.name, id.serial
                )),
            ));
        }
        Ok(Some(id))
    }

    /// The agent behind a request: `Some` with TLS (a certificate is required), `None` when
    /// running insecure.
    pub fn agent<T>(&self, req: &Request<T>) -> Result<Option<CertIdentity>, Status> {
        if !self.tls {
            return Ok(None);
        }
        match self.peer(req, "agent")? {
            Some(id) if id.role().is_some() => Ok(Some(id)),
            Some(id) => Err(self.refuse(
                req,
                "agent",
                "not-an-agent",
                Status::permission_denied(format!(
                    "certificate {} is for `{}`, not for an agent (OU must be shells or commands)",
                    id.name, id.unit
                )),
            )),
            None => Err(self.refuse(
                req,
                "agent",
                "no-certificate",
                Status::unauthenticated(
                    "agents must present a client certificate issued by the server's client CA",
                ),
            )),
        }
    }

    /// Checks a registration against the certificate (name, role) and the agents file (role,
    /// selector). Without TLS the claimed name stands in for the certificate's.
    pub fn check_registration<T>(
        &self,
        req: &Request<T>,
        cert: Option<&CertIdentity>,
        identity: &AgentIdentity,
    ) -> Result<(), Status> {
        let role = Role::try_from(identity.role).unwrap_or_default();
        let deny = |reason: &str, msg: String| {
            Err(self.refuse(req, "agent", reason, Status::permission_denied(msg)))
        };
        if let Some(cert) = cert {
            if cert.name != identity.name {
                return deny("name", format!(
                    "certificate is for agent {}, but it registers as {}: set name = \"{}\" or use that agent's certificate",
                    cert.name, identity.name, cert.name
                ));
            }
            if cert.role() != Some(role) {
                return deny("role", format!(
                    "certificate of {} is for role {}, but it registers as role {}: agents may only take jobs of their certificate's role",
                    cert.name,
                    cert.unit,
                    role.name()
                ));
            }
        }
        let p = self.policy();
        if p.deny.names.contains(&identity.name) {
            return Err(self.refuse(
                req,
                "agent",
                "revoked",
                Status::unauthenticated(format!(
                    "agent {} is revoked on this server",
                    identity.name
                )),
            ));
        }
        let Some(agents) = &p.agents else {
            return Ok(());
        };
        let Some(grant) = agents.get(&identity.name) else {
            return deny(
                "unlisted",
                format!(
                    "agent {} is not in the server's agents file: add `{} {} {}` to it (and send the server SIGHUP)",
                    identity.name,
                    identity.name,
                    role.name(),
                    if identity.selector.is_empty() { "-" } else { &identity.selector }
                ),
            );
        };
        if grant.role != role {
            return deny(
                "role",
                format!(
                    "agent {} may serve role {} (agents file), not {}",
                    identity.name,
                    grant.role.name(),
                    role.name()
                ),
            );
        }
        if !grant
            .selectors
            .iter()
            .any(|s| s == "*" || *s == identity.selector)
        {
            let shown: Vec<&str> = grant
                .selectors
                .iter()
                .map(|s| if s.is_empty() { "-" } else { s.as_str() })
                .collect();
            return deny(
                "selector",
                format!(
                    "agent {} may serve selectors {} (agents file), not {:?}",
                    identity.name,
                    shown.join(","),
                    identity.selector
                ),
            );
        }
        Ok(())
    }

    /// The submitter behind a request and its scope (everything, as `anonymous:CLAIMED`, when
    /// the server requires no credentials: plaintext on loopback without a tokens file).
    pub fn submitter<T>(&self, req: &Request<T>, claimed: &str) -> Result<Caller, Status> {
        let p = self.policy();
        if let Some(tokens) = &p.tokens {
            if let Some(v) = req.metadata().get("authorization") {
                let v = v.to_str().unwrap_or_default();
                let token = v
                    .strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .unwrap_or(v)
                    .trim();
                let d = digest(token);
                return match tokens.get(&d) {
                    Some((name, _))
                        if p.deny.digests.contains(&d) || p.deny.names.contains(name) =>
                    {
                        Err(self.refuse(
                            req,
                            "submitter",
                            "revoked",
                            Status::unauthenticated(format!("the token of {name} is revoked")),
                        ))
                    }
                    Some((name, scope)) => Ok(Caller {
                        actor: format!("submitter:{name}"),
                        scope: *scope,
                    }),
                    None => Err(self.refuse(
                        req,
                        "submitter",
                        "unknown-token",
                        Status::unauthenticated(
                            "the token is not valid (not in the server's tokens file)",
                        ),
                    )),
                };
            }
        }
        if let Some(id) = self.peer(req, "submitter")? {
            let scope = match id.unit.as_str() {
                "submitter" => Scope::Submit,
                "admin" => Scope::Admin,
                _ => {
                    return Err(self.refuse(
                        req,
                        "submitter",
                        "agent-certificate",
                        Status::permission_denied(format!(
                            "certificate {} is an agent's ({}): agents cannot submit or read jobs",
                            id.name, id.unit
                        )),
                    ))
                }
            };
            return Ok(Caller {
                actor: format!("submitter:{}", id.name),
                scope,
            });
        }
        if p.tokens.is_some() || self.tls {
            return Err(self.refuse(
                req,
                "submitter",
                "no-credentials",
                Status::unauthenticated(
                    "missing credentials: pass a token (--token or ES_TOKEN) or a submitter client certificate",
                ),
            ));
        }
        let who = if claimed.is_empty() {
            "unknown"
        } else {
            claimed
        };
        Ok(Caller {
            actor: format!("anonymous:{who}"),
            scope: Scope::Admin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_round_trip_scopes_and_errors() {
        let (token, line) = new_token("ci", Scope::Read);
        let map = parse_tokens(&format!("# comment\n\n{line}\n")).unwrap();
        assert_eq!(map.get(&digest(&token)), Some(&("ci".into(), Scope::Read)));
        // A line of an older release (no scope) keeps what it could do: submit.
        let (t2, l2) = new_token("old", Scope::Admin);
        let old = l2.rsplit_once(' ').unwrap().0;
        assert_eq!(
            parse_tokens(old).unwrap().get(&digest(&t2)),
            Some(&("old".into(), Scope::Submit))
        );
        for (text, want) in [
            ("ci es_plaintext".to_owned(), "64 hex"),
            (format!("{line}\n{line}"), "twice"),
            ("lonely".to_owned(), "NAME SHA256HEX"),
            (
                format!("{} root", &line[..line.len() - 5]),
                "scope \"root\"",
            ),
        ] {
            let e = parse_tokens(&text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn deny_and_agents_files() {
        let d = parse_deny(&format!(
            "serial=0A:1B\nserial 00ff\ndigest {}\nname es-shells-old\n",
            "ab".repeat(32)
        ))
        .unwrap();
        assert!(d.serials.contains("a1b") && d.serials.contains("ff"));
        assert!(d.names.contains("es-shells-old") && d.digests.len() == 1);
        assert!(parse_deny("serial zz").is_err());
        assert!(parse_deny("token x").unwrap_err().contains("line 1"));

        let a = parse_agents("es-shells-prod shells prod,prod-b\nes-cmd commands -\nany shells *")
            .unwrap();
        assert_eq!(
            a["es-shells-prod"],
            AgentGrant {
                role: Role::Shells,
                selectors: vec!["prod".into(), "prod-b".into()]
            }
        );
        assert_eq!(a["es-cmd"].selectors, vec![String::new()]);
        assert!(parse_agents("x wizard prod").unwrap_err().contains("role"));
        assert!(parse_agents("x shells").unwrap_err().contains("NAME ROLE"));
    }

    #[test]
    fn scopes_nest() {
        let c = Caller {
            actor: "submitter:ro".into(),
            scope: Scope::Read,
        };
        assert!(c.require(Scope::Read, "Get").is_ok());
        let e = c.require(Scope::Submit, "Submit").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("--scope submit"), "{}", e.message());
        let admin = Caller {
            actor: "submitter:ops".into(),
            scope: Scope::Admin,
        };
        assert!(admin.require(Scope::Submit, "Submit").is_ok());
    }

    #[test]
    fn serials_are_normalized() {
        assert_eq!(normalize_serial("serial=00:0A:ff"), "aff");
        assert_eq!(normalize_serial("0AFF"), "aff");
        assert_eq!(normalize_serial("00"), "0");
    }
}
