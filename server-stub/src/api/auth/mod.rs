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

use std::sync::{Arc, RwLock};

use es_proto::metrics::{labels, Labels};
use es_proto::v1::AgentIdentity;
use es_proto::Role;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::{Request, Status};

mod policy;

pub use policy::{
    digest, new_token, normalize_serial, parse_agents, parse_tokens, AgentGrant, AuthError,
    AuthFiles, Scope,
};
use policy::{hex, Policy};
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

/// The authentication policy of a running server.
pub struct Auth {
    /// TLS with client certificates is on.
    pub tls: bool,
    files: AuthFiles,
    policy: RwLock<Arc<Policy>>,
    failures: Family<Labels, Counter>,
}

/// The name and role in a DER certificate's subject (`CN`, `OU`), and its serial.
pub fn cert_identity(der: &[u8]) -> Result<CertIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let (name, unit) = es_proto::cert::names(&cert)?;
    Ok(CertIdentity {
        name,
        unit,
        serial: normalize_serial(&hex(cert.raw_serial())),
    })
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

/// SIGHUP reads the tokens, deny and agents files again (revocation without a restart).
pub async fn reload_on_sighup(auth: Arc<Auth>, stop: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        log::warn!("cannot listen for SIGHUP: credentials are read at start only");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                match auth.reload() {
                    Ok(()) => log::info!("SIGHUP: tokens, deny-list and agents files read again"),
                    Err(e) => log::error!("SIGHUP: {e}; the previous credentials stay in force"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
