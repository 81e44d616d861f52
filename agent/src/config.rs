//! Agent configuration: a TOML file plus `ES_AGENT_*` environment overrides (the `config`
//! crate), unknown keys rejected, every value checked at start. Errors name the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use es_proto::Role;
use serde::{Deserialize, Deserializer};

/// How the agent receives offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One long-lived server stream (default).
    Stream,
    /// Repeated long-polls, for networks that cut long streams.
    Poll,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("{s:?} is not a duration like 30s or 5m: {e}"))
    })
}

fn default_slots() -> u32 {
    8
}
fn default_transport() -> Transport {
    Transport::Stream
}
fn default_drain_grace() -> Duration {
    Duration::from_secs(60)
}
fn default_cancel_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff_base() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_cap() -> Duration {
    Duration::from_secs(60)
}

/// Every key of the agent's configuration (see packaging/es-agent.toml for the reference).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Unique agent name, e.g. `es-shells-us-east-1` (fallbacks end in `-b` by convention).
    pub name: String,
    /// `shells` or `commands`.
    pub role: String,
    /// Server URL, e.g. `https://10.0.0.10:7700`; several replicas comma-separated
    /// (`https://es-1:7700,https://es-2:7700`), tried in turn until one of them leads.
    pub server: String,
    /// Jobs run at once (1..=1024).
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Execution-server selector value this agent serves.
    #[serde(default)]
    pub selector: String,
    /// A fallback replica: gets work only when no healthy primary has room.
    #[serde(default)]
    pub fallback: bool,
    /// Where to serve grpc.health.v1 (host:port; port 0 picks one). Unset: no health server.
    #[serde(default)]
    pub health_addr: Option<String>,
    /// The address the server should probe, when it differs from `health_addr` (e.g. NAT). The
    /// server probes the address the agent connected from, with this address's port.
    #[serde(default)]
    pub advertise_health_addr: Option<String>,
    #[serde(default = "default_transport")]
    pub transport: Transport,
    /// SIGTERM: time in-flight jobs get to finish before they are cancelled.
    #[serde(default = "default_drain_grace", deserialize_with = "duration")]
    pub drain_grace: Duration,
    /// Time a job gets to stop cooperatively before it is forced.
    #[serde(default = "default_cancel_grace", deserialize_with = "duration")]
    pub cancel_grace: Duration,
    /// First reconnect delay ceiling; doubles per failure, with full jitter.
    #[serde(default = "default_backoff_base", deserialize_with = "duration")]
    pub backoff_base: Duration,
    /// Largest reconnect delay ceiling.
    #[serde(default = "default_backoff_cap", deserialize_with = "duration")]
    pub backoff_cap: Duration,
    /// AWS region (es-shells); empty = the standard chain (AWS_REGION, profile, instance metadata).
    #[serde(default)]
    pub aws_region: String,
    /// EC2 endpoint override, for an emulator; empty = AWS.
    #[serde(default)]
    pub aws_endpoint_url: String,
    /// Attempts per EC2 call on throttling and 5xx (backoff with jitter between them).
    #[serde(default = "default_aws_max_attempts")]
    pub aws_max_attempts: u32,
    /// One attempt of an AWS call taking longer than this is abandoned and retried.
    #[serde(default = "default_aws_call_timeout", deserialize_with = "duration")]
    pub aws_call_timeout: Duration,
    /// Concurrent EC2 calls of one job (e.g. RunInstances of a DeploySandbox).
    #[serde(default = "default_aws_concurrency")]
    pub aws_concurrency: u32,
    /// Pace EC2 requests with EC2's default token buckets, agent-wide.
    #[serde(default = "default_true")]
    pub aws_rate_limit: bool,
    /// es-commands over SSH: an OpenSSH known_hosts file with the instances' host keys.
    #[serde(default)]
    pub ssh_known_hosts: String,
    /// es-commands over SSH: refuse hosts whose key is not known (job or known_hosts).
    #[serde(default)]
    pub ssh_require_known_host_key: bool,
    /// CA (PEM) that signed the server's certificate (https:// servers).
    #[serde(default)]
    pub tls_ca: String,
    /// This agent's client certificate (PEM; subject CN = name, OU = role).
    #[serde(default)]
    pub tls_cert: String,
    /// Private key of `tls_cert` (PEM). Read at start; never printed.
    #[serde(default)]
    pub tls_key: String,
    /// Allow a plaintext http:// server (no TLS, no client certificate). Logs a warning.
    #[serde(default)]
    pub insecure: bool,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`), host:port. Unset: none.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Roles jobs may assume (`spec.target.role_arn`): exact role ARNs, or 12-digit account
    /// ids (any role there), each as a string or as `{ role = "...", external_id = "..." }`
    /// when the role's trust policy wants an external id. Empty: jobs may not assume roles.
    #[serde(default, deserialize_with = "one_or_many")]
    pub assume_roles: Vec<AssumeRoleEntry>,
    /// A sweep never deletes a sandbox younger than this (from its oldest resource).
    #[serde(default = "default_sweep_min_age", deserialize_with = "duration")]
    pub sweep_min_age: Duration,
    /// Where sandbox private keys are kept in SSM Parameter Store: `<prefix>/<sandbox>/key-pair`.
    #[serde(default = "default_key_parameter_prefix")]
    pub key_parameter_prefix: String,
    /// KMS key of those SecureString parameters (id, ARN or alias); empty = `alias/aws/ssm`.
    #[serde(default)]
    pub key_parameter_kms_key: String,
    /// Let apps fetch their user data over plain http (`user_data_url`); https only otherwise.
    #[serde(default)]
    pub user_data_http_allowed: bool,
}

/// One `assume_roles` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AssumeRoleEntry {
    Role(String),
    /// An account id given unquoted (or through the environment, which parses digits as a
    /// number); printed back with its 12 digits.
    Account(u64),
    WithExternalId {
        role: String,
        #[serde(default)]
        external_id: String,
    },
}

impl AssumeRoleEntry {
    fn allowed(&self) -> crate::aws::assume::AllowedRole {
        let (role, external_id) = match self {
            AssumeRoleEntry::Role(r) => (r.clone(), String::new()),
            AssumeRoleEntry::Account(n) => (format!("{n:012}"), String::new()),
            AssumeRoleEntry::WithExternalId { role, external_id } => {
                (role.clone(), external_id.clone())
            }
        };
        crate::aws::assume::AllowedRole { role, external_id }
    }
}

/// A list, or one entry alone (`ES_AGENT_ASSUME_ROLES=333333333333` has no comma to split on).
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AssumeRoleEntry>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<AssumeRoleEntry>),
        One(AssumeRoleEntry),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(e) => vec![e],
    })
}

fn default_key_parameter_prefix() -> String {
    "/es/sandboxes".into()
}

fn default_sweep_min_age() -> Duration {
    Duration::from_secs(3600)
}

fn default_true() -> bool {
    true
}

fn default_aws_max_attempts() -> u32 {
    8
}
fn default_aws_call_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_aws_concurrency() -> u32 {
    16
}

/// A configuration error naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub(crate) fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("invalid configuration key `{key}`: {why}"))
}

impl AgentConfig {
    /// Loads `file` (if given) and then the `ES_AGENT_<KEY>` environment variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let mut b = config::Config::builder();
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError(format!(
                    "configuration file {} does not exist",
                    f.display()
                )));
            }
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        let vars: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("ES_AGENT_") && k != "ES_AGENT_CONFIG")
            .collect();
        b = b.add_source(
            config::Environment::with_prefix("ES_AGENT")
                .prefix_separator("_")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("assume_roles")
                .source(Some(vars)),
        );
        let cfg: AgentConfig = b
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(format!("invalid configuration: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the error names the key and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.key_parameter_prefix;
        if !p.starts_with('/')
            || p.ends_with('/')
            || p.len() > 900
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
        {
            return Err(bad(
                "key_parameter_prefix",
                format!(
                    "{p:?} is not an SSM parameter path like \"/es/sandboxes\" (a leading /, \
                     no trailing /, letters, digits, / - _ .)"
                ),
            ));
        }
        if self.name.is_empty() {
            return Err(bad(
                "name",
                "is empty; set e.g. name = \"es-shells-us-east-1\"",
            ));
        }
        if let Some(c) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(bad(
                "name",
                format!("contains {c:?}; use letters, digits, - _ ."),
            ));
        }
        if Role::parse(&self.role).is_none() {
            return Err(bad(
                "role",
                format!(
                    "{:?} is not a role; use \"shells\" or \"commands\"",
                    self.role
                ),
            ));
        }
        if self.slots == 0 || self.slots > 1024 {
            return Err(bad(
                "slots",
                format!("is {}; must be between 1 and 1024", self.slots),
            ));
        }
        let servers = self.servers();
        if servers.is_empty() {
            return Err(bad(
                "server",
                "is empty: give a URL like https://10.0.0.10:7700 (several comma-separated)",
            ));
        }
        for url in &servers {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(
                    "server",
                    format!("{url:?} must be a URL like http://10.0.0.10:7700"),
                ));
            }
            if tonic::transport::Endpoint::from_shared(url.clone()).is_err() {
                return Err(bad("server", format!("{url:?} is not a valid URL")));
            }
        }
        if servers.iter().any(|u| u.starts_with("http://"))
            && servers.iter().any(|u| u.starts_with("https://"))
        {
            return Err(bad(
                "server",
                "mixes http:// and https:// addresses: the replicas of one server speak the same",
            ));
        }
        self.validate_tls()?;
        for (key, v) in [
            ("health_addr", &self.health_addr),
            ("advertise_health_addr", &self.advertise_health_addr),
            ("metrics_addr", &self.metrics_addr),
        ] {
            if let Some(a) = v {
                if a.parse::<SocketAddr>().is_err() {
                    return Err(bad(
                        key,
                        format!("{a:?} is not host:port, e.g. 0.0.0.0:7701"),
                    ));
                }
            }
        }
        if self.backoff_base.is_zero() || self.backoff_base > self.backoff_cap {
            return Err(bad(
                "backoff_base",
                "must be above 0 and not above backoff_cap",
            ));
        }
        if self.aws_max_attempts == 0 || self.aws_max_attempts > 20 {
            return Err(bad(
                "aws_max_attempts",
                format!("is {}; must be between 1 and 20", self.aws_max_attempts),
            ));
        }
        if self.aws_call_timeout < Duration::from_secs(1)
            || self.aws_call_timeout > Duration::from_secs(600)
        {
            return Err(bad(
                "aws_call_timeout",
                format!(
                    "is {}; must be between 1s and 10m",
                    humantime::format_duration(self.aws_call_timeout)
                ),
            ));
        }
        if self.aws_concurrency == 0 || self.aws_concurrency > 256 {
            return Err(bad(
                "aws_concurrency",
                format!("is {}; must be between 1 and 256", self.aws_concurrency),
            ));
        }
        let url = &self.aws_endpoint_url;
        if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(bad(
                "aws_endpoint_url",
                format!(
                    "{:?} must be a URL like http://127.0.0.1:5000",
                    self.aws_endpoint_url
                ),
            ));
        }
        if !self.ssh_known_hosts.is_empty() && !Path::new(&self.ssh_known_hosts).is_file() {
            return Err(bad(
                "ssh_known_hosts",
                format!(
                    "{:?} is not a readable file; give an OpenSSH known_hosts file or leave it empty",
                    self.ssh_known_hosts
                ),
            ));
        }
        for (i, e) in self.assume_roles.iter().enumerate() {
            let a = e.allowed();
            let account = a.role.len() == 12 && a.role.bytes().all(|b| b.is_ascii_digit());
            let parts: Vec<&str> = a.role.splitn(6, ':').collect();
            let arn = parts.len() == 6
                && parts[0] == "arn"
                && parts[1].starts_with("aws")
                && parts[2] == "iam"
                && parts[4].len() == 12
                && parts[4].bytes().all(|b| b.is_ascii_digit())
                && parts[5].starts_with("role/");
            if !account && !arn {
                return Err(bad(
                    &format!("assume_roles[{i}]"),
                    format!(
                        "{:?} is neither a role ARN (arn:aws:iam::123456789012:role/NAME) nor a 12-digit account id",
                        a.role
                    ),
                ));
            }
            if a.external_id.len() > 1224
                || !a
                    .external_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+=,.@:/-_".contains(c))
            {
                return Err(bad(
                    &format!("assume_roles[{i}].external_id"),
                    "at most 1224 of letters, digits and + = , . @ : / - _ (STS's rule)",
                ));
            }
        }
        if self.backoff_cap > Duration::from_secs(600) {
            return Err(bad(
                "backoff_cap",
                "at most 10m; agents must come back soon after an outage",
            ));
        }
        Ok(())
    }

    pub fn aws_settings(&self) -> crate::aws::AwsSettings {
        crate::aws::AwsSettings {
            region: self.aws_region.clone(),
            endpoint_url: self.aws_endpoint_url.clone(),
            max_attempts: self.aws_max_attempts,
            call_timeout: self.aws_call_timeout,
            concurrency: self.aws_concurrency as usize,
            rate_limit: self.aws_rate_limit,
            assume_roles: self
                .assume_roles
                .iter()
                .map(AssumeRoleEntry::allowed)
                .collect(),
            sweep_min_age: self.sweep_min_age,
            key_parameter_prefix: self.key_parameter_prefix.clone(),
            key_parameter_kms_key: self.key_parameter_kms_key.clone(),
            user_data_http_allowed: self.user_data_http_allowed,
        }
    }

    pub fn ssh_settings(&self) -> crate::commands::SshSettings {
        crate::commands::SshSettings {
            known_hosts: (!self.ssh_known_hosts.is_empty())
                .then(|| std::path::PathBuf::from(&self.ssh_known_hosts)),
            require_known_host_key: self.ssh_require_known_host_key,
        }
    }

    pub fn role(&self) -> Role {
        Role::parse(&self.role).expect("validated")
    }

    /// The effective configuration as TOML lines (for `check-config`). Secrets are masked:
    /// passwords in URLs; the TLS key is shown by path only (its content is never read here).
    pub fn describe(&self) -> String {
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "(none)".into());
        format!(
            "name = {:?}\nrole = {:?}\nserver = {:?}\nslots = {}\nselector = {:?}\nfallback = {}\nhealth_addr = {:?}\nadvertise_health_addr = {:?}\ntransport = {:?}\ndrain_grace = {:?}\ncancel_grace = {:?}\nbackoff_base = {:?}\nbackoff_cap = {:?}\naws_region = {:?}\naws_endpoint_url = {:?}\naws_max_attempts = {}\naws_call_timeout = {:?}\naws_concurrency = {}\naws_rate_limit = {}\nssh_known_hosts = {:?}\nssh_require_known_host_key = {}\ntls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}\ninsecure = {}\nmetrics_addr = {:?}\nassume_roles = [{}]\nsweep_min_age = {:?}\nkey_parameter_prefix = {:?}\nkey_parameter_kms_key = {:?}\nuser_data_http_allowed = {}\n",
            self.name,
            self.role().name(),
            self.servers().iter().map(|u| mask_url(u)).collect::<Vec<_>>().join(","),
            self.slots,
            self.selector,
            self.fallback,
            opt(&self.health_addr),
            opt(&self.advertise_health_addr),
            format!("{:?}", self.transport).to_lowercase(),
            humantime::format_duration(self.drain_grace).to_string(),
            humantime::format_duration(self.cancel_grace).to_string(),
            humantime::format_duration(self.backoff_base).to_string(),
            humantime::format_duration(self.backoff_cap).to_string(),
            self.aws_region,
            mask_url(&self.aws_endpoint_url),
            self.aws_max_attempts,
            humantime::format_duration(self.aws_call_timeout).to_string(),
            self.aws_concurrency,
            self.aws_rate_limit,
            self.ssh_known_hosts,
            self.ssh_require_known_host_key,
            self.tls_ca,
            self.tls_cert,
            self.tls_key,
            self.insecure,
            opt(&self.metrics_addr),
            // External ids are shown masked: they are part of the trust relationship.
            self.assume_roles
                .iter()
                .map(|e| {
                    let a = e.allowed();
                    if a.external_id.is_empty() {
                        format!("{:?}", a.role)
                    } else {
                        format!("{{ role = {:?}, external_id = \"***\" }}", a.role)
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
            humantime::format_duration(self.sweep_min_age).to_string(),
            self.key_parameter_prefix,
            self.key_parameter_kms_key,
            self.user_data_http_allowed,
        )
    }
}

/// `scheme://user:secret@host` -> `scheme://user:***@host`.
impl AgentConfig {
    /// The server addresses, in the order they are tried.
    pub fn servers(&self) -> Vec<String> {
        self.server
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_environment_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        std::fs::write(
            &f,
            "name = \"es-shells-1\"\nrole = \"shells\"\nserver = \"http://127.0.0.1:7700\"\nslots = 4\ndrain_grace = \"5s\"\n",
        )
        .unwrap();
        let c = AgentConfig::load(
            Some(&f),
            env(&[
                ("ES_AGENT_INSECURE", "true"),
                ("ES_AGENT_SLOTS", "16"),
                ("ES_AGENT_FALLBACK", "true"),
                ("ES_AGENT_CONFIG", "ignored"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.slots, 16);
        assert!(c.fallback);
        assert_eq!(c.drain_grace, Duration::from_secs(5));
        assert_eq!(c.cancel_grace, Duration::from_secs(10));
        assert_eq!(c.transport, Transport::Stream);
        assert!(c.describe().contains("slots = 16"));
    }

    #[test]
    fn errors_name_the_key() {
        let base = [
            ("ES_AGENT_NAME", "a"),
            ("ES_AGENT_ROLE", "shells"),
            ("ES_AGENT_SERVER", "http://127.0.0.1:1"),
            ("ES_AGENT_INSECURE", "true"),
        ];
        let cases: Vec<(&str, &str, &str)> = vec![
            ("ES_AGENT_SLOTS", "0", "`slots`"),
            ("ES_AGENT_ROLE", "shell", "`role`"),
            ("ES_AGENT_NAME", "", "`name`"),
            ("ES_AGENT_SERVER", "127.0.0.1:7700", "`server`"),
            ("ES_AGENT_SERVER", " , ", "several comma-separated"),
            (
                "ES_AGENT_SERVER",
                "http://127.0.0.1:1,https://127.0.0.1:2",
                "mixes http:// and https://",
            ),
            (
                "ES_AGENT_SERVER",
                "http://127.0.0.1:1,es-2:7700",
                "\"es-2:7700\" must be a URL",
            ),
            ("ES_AGENT_HEALTH_ADDR", "nope", "`health_addr`"),
            ("ES_AGENT_DRAIN_GRACE", "soon", "drain_grace"),
            ("ES_AGENT_COLOUR", "blue", "colour"),
            ("ES_AGENT_INSECURE", "false", "insecure = true"),
            ("ES_AGENT_TLS_CA", "/etc/ca.pem", "`tls_ca`"),
            ("ES_AGENT_METRICS_ADDR", "x", "`metrics_addr`"),
            (
                "ES_AGENT_ASSUME_ROLES",
                "arn:aws:s3:::bucket",
                "`assume_roles[0]`",
            ),
            ("ES_AGENT_SWEEP_MIN_AGE", "a while", "sweep_min_age"),
        ];
        for (k, v, want) in cases {
            let mut e = env(&base);
            e.retain(|(key, _)| key != k);
            e.push((k.to_string(), v.to_string()));
            let err = AgentConfig::load(None, e).unwrap_err().to_string();
            assert!(err.contains(want), "{k}={v}: {err}");
        }
        let err = AgentConfig::load(Some(Path::new("/nonexistent.toml")), vec![]).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
        // Replicas: every address, in the order given.
        let mut e = env(&base);
        e.retain(|(key, _)| key != "ES_AGENT_SERVER");
        e.push((
            "ES_AGENT_SERVER".into(),
            "http://127.0.0.1:1, http://127.0.0.1:2".into(),
        ));
        let cfg = AgentConfig::load(None, e).unwrap();
        assert_eq!(cfg.servers(), ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    }

    #[test]
    fn assume_roles_from_the_environment_and_the_file() {
        let base = [
            ("ES_AGENT_NAME", "a"),
            ("ES_AGENT_ROLE", "shells"),
            ("ES_AGENT_SERVER", "http://127.0.0.1:1"),
            ("ES_AGENT_INSECURE", "true"),
        ];
        let mut e = env(&base);
        e.push((
            "ES_AGENT_ASSUME_ROLES".into(),
            "012345678901,arn:aws:iam::222222222222:role/es-target-x".into(),
        ));
        let roles = AgentConfig::load(None, e)
            .unwrap()
            .aws_settings()
            .assume_roles;
        let mut one = env(&base);
        one.push(("ES_AGENT_ASSUME_ROLES".into(), "111111111111".into()));
        let only = AgentConfig::load(None, one)
            .unwrap()
            .aws_settings()
            .assume_roles;
        assert_eq!(only[0].role, "111111111111");
        let names: Vec<&str> = roles.iter().map(|r| r.role.as_str()).collect();
        assert_eq!(
            names,
            ["012345678901", "arn:aws:iam::222222222222:role/es-target-x"],
            "an account id keeps its leading zero"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        std::fs::write(
            &f,
            "assume_roles = [333333333333, { role = \"arn:aws:iam::2:role/x\", external_id = \"ext-1\" }]\n",
        )
        .unwrap();
        let err = AgentConfig::load(Some(&f), env(&base))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`assume_roles[1]`"), "{err}");
        std::fs::write(
            &f,
            "assume_roles = [333333333333, { role = \"arn:aws:iam::222222222222:role/x\", external_id = \"ext-1\" }]\n",
        )
        .unwrap();
        let c = AgentConfig::load(Some(&f), env(&base)).unwrap();
        assert_eq!(c.aws_settings().assume_roles[1].external_id, "ext-1");
        assert!(
            !c.describe().contains("ext-1"),
            "external ids are not printed"
        );
    }

    #[test]
    fn passwords_in_urls_are_masked() {
        assert_eq!(mask_url("https://u:p4ss@h:1/x"), "https://u:***@h:1/x");
        assert_eq!(mask_url("https://h:1"), "https://h:1");
        let c = AgentConfig::load(
            None,
            env(&[
                ("ES_AGENT_NAME", "a"),
                ("ES_AGENT_ROLE", "shells"),
                ("ES_AGENT_SERVER", "http://127.0.0.1:1"),
                ("ES_AGENT_INSECURE", "true"),
                (
                    "ES_AGENT_AWS_ENDPOINT_URL",
                    "http://k:s3cret@127.0.0.1:5000",
                ),
            ]),
        )
        .unwrap();
        let d = c.describe();
        assert!(!d.contains("s3cret") && d.contains("k:***@"), "{d}");
    }

    #[test]
    fn reference_config_is_valid_and_documents_every_key() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/es-agent.toml"
        ));
        let text = std::fs::read_to_string(path).unwrap();
        // The reference names the packaged TLS files; point them at files that exist here.
        let dir = tempfile::tempdir().unwrap();
        let mut local = text.clone();
        // The certificate must be es-shells' (CN) for role shells (OU), as the reference says.
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "es-shells");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "shells");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap().pem();
        for (f, content) in [
            ("ca.pem", cert.clone()),
            ("es-shells.pem", cert),
            ("es-shells.key", key.serialize_pem()),
        ] {
            let p = dir.path().join(f);
            std::fs::write(&p, content).unwrap();
            local = local.replace(&format!("/etc/es-agent/tls/{f}"), p.to_str().unwrap());
        }
        let copy = dir.path().join("es-agent.toml");
        std::fs::write(&copy, local).unwrap();
        let c = AgentConfig::load(Some(&copy), vec![]).unwrap();
        for line in c.describe().lines() {
            let key = line.split(" = ").next().unwrap();
            assert!(
                text.contains(&format!("{key} = ")),
                "{key} is not documented in {}",
                path.display()
            );
        }
    }
}
