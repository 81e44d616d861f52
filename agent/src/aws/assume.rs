//! Assumed roles (`spec.target.role_arn`), without a confused deputy: a job may only name a role
//! on the agent's own allow-list (`assume_roles`), the external id comes from that list (never
//! from the job, which every reader of the job sees), and each job assumes the role under its
//! own session: session name = job id, source identity = the submitter, so the target account's
//! CloudTrail tells which job and which submitter acted.
//!
//! The credentials are fetched with STS `AssumeRole` on first use and refreshed five minutes
//! before they expire (a RunCommand job may outlive one session).

use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::provider::{self, error::CredentialsError, future, ProvideCredentials};
use aws_credential_types::Credentials;

/// One entry of the agent's allow-list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowedRole {
    /// An exact role ARN, or a 12-digit account id (any role of that account).
    pub role: String,
    /// Sent as `ExternalId` when this entry matches; empty = none.
    pub external_id: String,
}

/// The allow-list entry that lets a job assume `role_arn`: the exact ARN wins over its account.
pub fn allowed<'a>(list: &'a [AllowedRole], role_arn: &str) -> Option<&'a AllowedRole> {
    let account = role_arn.split(':').nth(4).unwrap_or("");
    list.iter().find(|a| a.role == role_arn).or_else(|| {
        list.iter()
            .find(|a| !account.is_empty() && a.role == account)
    })
}

/// STS `SourceIdentity` for a submitter (`submitter:NAME`): 2 to 64 of `[\w+=,.@-]`.
pub fn source_identity(submitted_by: &str) -> String {
    let name = submitted_by
        .split_once(':')
        .map(|(_, n)| n)
        .unwrap_or(submitted_by);
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if s.len() < 2 {
        s = format!("es-{s}");
    }
    s
}

/// Credentials of one job's session in an assumed role.
#[derive(Debug)]
pub struct JobRole {
    sts: aws_sdk_sts::Client,
    role_arn: String,
    external_id: String,
    session_name: String,
    source_identity: String,
    cache: tokio::sync::Mutex<Option<Credentials>>,
}

impl JobRole {
    /// `base` holds the agent's own credentials (they call STS).
    pub fn new(
        base: &SdkConfig,
        allowed: &AllowedRole,
        role_arn: &str,
        job_id: &str,
        submitted_by: &str,
    ) -> JobRole {
        JobRole {
            sts: aws_sdk_sts::Client::new(base),
            role_arn: role_arn.to_owned(),
            external_id: allowed.external_id.clone(),
            // RoleSessionName: 2 to 64 of [\w+=,.@-]; a job id (a UUID) fits.
            session_name: source_identity(job_id),
            source_identity: source_identity(submitted_by),
            cache: Default::default(),
        }
    }

    async fn fetch(&self) -> provider::Result {
        let mut cached = self.cache.lock().await;
        if let Some(c) = cached.as_ref() {
            let fresh = c
                .expiry()
                .is_none_or(|e| e > SystemTime::now() + Duration::from_secs(300));
            if fresh {
                return Ok(c.clone());
            }
        }
        let out = self
            .sts
            .assume_role()
            .role_arn(&self.role_arn)
            .role_session_name(&self.session_name)
            .source_identity(&self.source_identity)
            .set_external_id((!self.external_id.is_empty()).then(|| self.external_id.clone()))
            .send()
            .await
            .map_err(|e| {
                CredentialsError::provider_error(format!(
                    "STS AssumeRole {} (session {}): {}",
                    self.role_arn,
                    self.session_name,
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                ))
            })?;
        let k = out.credentials().ok_or_else(|| {
            CredentialsError::provider_error("STS AssumeRole returned no credentials")
        })?;
        let creds = Credentials::new(
            k.access_key_id(),
            k.secret_access_key(),
            Some(k.session_token().to_owned()),
            SystemTime::try_from(*k.expiration()).ok(),
            "es-agent-assume-role",
        );
        *cached = Some(creds.clone());
        Ok(creds)
    }
}

impl ProvideCredentials for JobRole {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.fetch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_roles_or_accounts_match() {
        let list = vec![
            AllowedRole {
                role: "arn:aws:iam::222222222222:role/shared".into(),
                external_id: "exact".into(),
            },
            AllowedRole {
                role: "333333333333".into(),
                external_id: String::new(),
            },
            AllowedRole {
                role: "222222222222".into(),
                external_id: "account".into(),
            },
        ];
        let cases = [
            ("arn:aws:iam::222222222222:role/shared", Some("exact")),
            ("arn:aws:iam::222222222222:role/other", Some("account")),
            ("arn:aws:iam::333333333333:role/x", Some("")),
            ("arn:aws:iam::444444444444:role/shared", None),
            ("arn:aws:iam::22222222222:role/shared", None),
            ("", None),
        ];
        for (arn, want) in cases {
            assert_eq!(
                allowed(&list, arn).map(|a| a.external_id.as_str()),
                want,
                "{arn}"
            );
        }
    }

    #[test]
    fn source_identity_is_what_sts_accepts() {
        assert_eq!(source_identity("submitter:quali-server"), "quali-server");
        assert_eq!(source_identity("anonymous:x"), "es-x");
        assert_eq!(source_identity("submitter:a b/c"), "a-b-c");
        assert_eq!(source_identity(&"x".repeat(100)).len(), 64);
        assert_eq!(
            source_identity("0190a2b4-7c1d-7e2f-8a3b-4c5d6e7f8a9b"),
            "0190a2b4-7c1d-7e2f-8a3b-4c5d6e7f8a9b"
        );
    }
}
