//! The AWS plumbing shared by es-shells and es-commands: the SDK configuration (standard
//! credential chain, endpoint override for emulators, retry and timeouts, agent-wide EC2 pacing
//! in `limiter.rs`), assumed roles from the agent's allow-list (`assume.rs`), and the per-job call
//! counter and audit interceptor (`calls.rs`).

use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use es_proto::v1::Job;

pub mod assume;
mod calls;
pub mod identity;
pub(crate) mod limiter;

pub use calls::CallCounter;
pub(crate) use calls::Count;

/// A job named a role the agent may not assume.
#[derive(Debug, thiserror::Error)]
#[error("invalid `spec.target.role_arn`: {0}")]
pub struct NotAllowed(pub String);

/// AWS settings of the agent (from its configuration).
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// Region; empty = the standard chain (AWS_REGION, profile, IMDS).
    pub region: String,
    /// Endpoint override (an emulator such as moto); empty = AWS.
    pub endpoint_url: String,
    /// Attempts per call for throttling and 5xx (SDK standard retry mode).
    pub max_attempts: u32,
    /// Longest single attempt of a call (then it is abandoned and retried); zero = 30 s.
    pub call_timeout: Duration,
    /// Concurrent EC2 calls of one job (e.g. RunInstances of a DeploySandbox).
    pub concurrency: usize,
    /// Pace requests with EC2's default token buckets (see `limiter.rs`).
    pub rate_limit: bool,
    /// Roles jobs may assume (`assume_roles`); empty = none.
    pub assume_roles: Vec<assume::AllowedRole>,
    /// A sweep never touches a sandbox younger than this (`sweep_min_age`).
    pub sweep_min_age: Duration,
    /// SSM path under which sandbox private keys are kept (`key_parameter_prefix`).
    pub key_parameter_prefix: String,
    /// KMS key of those parameters; empty = the account's `alias/aws/ssm`.
    pub key_parameter_kms_key: String,
    /// `user_data_http_allowed`: user data may be fetched over plain http.
    pub user_data_http_allowed: bool,
}

pub(crate) struct Aws {
    pub settings: AwsSettings,
    base: SdkConfig,
}

impl Aws {
    pub async fn new(mut settings: AwsSettings) -> Aws {
        if settings.max_attempts == 0 {
            settings.max_attempts = 8;
        }
        if settings.concurrency == 0 {
            settings.concurrency = 16;
        }
        if settings.key_parameter_prefix.is_empty() {
            settings.key_parameter_prefix = "/es/sandboxes".into();
        }
        if settings.call_timeout.is_zero() {
            settings.call_timeout = Duration::from_secs(30);
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(settings.max_attempts)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5).min(settings.call_timeout))
                    .operation_attempt_timeout(settings.call_timeout)
                    .build(),
            );
        if !settings.region.is_empty() {
            loader = loader.region(Region::new(settings.region.clone()));
        }
        if !settings.endpoint_url.is_empty() {
            loader = loader.endpoint_url(settings.endpoint_url.clone());
        }
        let mut base = loader.load().await;
        if settings.rate_limit {
            // The SDK picks its default client lazily; build the same one (hyper 1, rustls with
            // aws-lc) here so it can be wrapped.
            let inner = base.http_client().unwrap_or_else(|| {
                use aws_smithy_http_client::tls;
                aws_smithy_http_client::Builder::new()
                    .tls_provider(tls::Provider::Rustls(
                        tls::rustls_provider::CryptoMode::AwsLc,
                    ))
                    .build_https()
            });
            let paced = limiter::PacedClient {
                inner,
                limiter: Arc::new(limiter::Limiter::default()),
            };
            base = base.into_builder().http_client(paced).build();
        }
        Aws { base, settings }
    }

    /// The agent's own SDK configuration (its credentials, region and endpoint).
    pub fn base(&self) -> &SdkConfig {
        &self.base
    }

    /// The SDK configuration for the job's `spec.target` (assumed role and region), or the
    /// agent's own. A role that is not on the agent's allow-list is refused before any call.
    pub fn sdk_config(&self, job: &Job) -> Result<SdkConfig, NotAllowed> {
        let mut sdk = self.base.clone();
        let Some(t) = job.spec.as_ref().and_then(|s| s.target.as_ref()) else {
            return Ok(sdk);
        };
        let region = if t.region.is_empty() {
            sdk.region().cloned()
        } else {
            Some(Region::new(t.region.clone()))
        };
        if let Some(r) = region {
            sdk = sdk.into_builder().region(r).build();
        }
        if !t.role_arn.is_empty() {
            let Some(allowed) = assume::allowed(&self.settings.assume_roles, &t.role_arn) else {
                return Err(NotAllowed(format!(
                        "{} is not on this agent's allow-list of roles to assume: the operator adds it (or its account) to `assume_roles` in the agent's configuration",
                    es_proto::limits::clip(&t.role_arn, 200)
                )));
            };
            let role = assume::JobRole::new(&sdk, allowed, &t.role_arn, &job.id, &job.submitted_by);
            sdk = sdk
                .into_builder()
                .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(role))
                .build();
        }
        Ok(sdk)
    }

    /// An SSM client for the job's target, counting calls into `calls` (sandbox keys).
    pub fn ssm_client(
        &self,
        job: &Job,
        calls: Arc<CallCounter>,
    ) -> Result<aws_sdk_ssm::Client, NotAllowed> {
        let sdk = self.sdk_config(job)?;
        let conf = aws_sdk_ssm::config::Builder::from(&sdk)
            .interceptor(Count(calls))
            .build();
        Ok(aws_sdk_ssm::Client::from_conf(conf))
    }

    /// An EC2 client for the job's target (assumed role and region) that counts calls into
    /// `calls`.
    pub fn client(
        &self,
        job: &Job,
        calls: Arc<CallCounter>,
    ) -> Result<aws_sdk_ec2::Client, NotAllowed> {
        let sdk = self.sdk_config(job)?;
        let conf = aws_sdk_ec2::config::Builder::from(&sdk)
            .interceptor(Count(calls))
            .build();
        Ok(aws_sdk_ec2::Client::from_conf(conf))
    }
}

/// The error code an AWS service answered, or, when no answer came (a timeout, a connection
/// failure), the class of the failure, so an error never reads "failed: : ...".
pub fn error_code<E, R>(e: &aws_smithy_runtime_api::client::result::SdkError<E, R>) -> String
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata,
{
    use aws_smithy_runtime_api::client::result::SdkError;
    if let Some(code) = aws_sdk_ec2::error::ProvideErrorMetadata::code(e).filter(|c| !c.is_empty())
    {
        return code.to_owned();
    }
    match e {
        SdkError::TimeoutError(_) => "Timeout",
        SdkError::DispatchFailure(_) => "ConnectionFailed",
        SdkError::ResponseError(_) => "BadResponse",
        SdkError::ConstructionFailure(_) => "BadRequest",
        _ => "Error",
    }
    .to_owned()
}

/// An SDK error as one readable line: the service's message when AWS answered; otherwise the
/// cause, first line only, with the fix when it is missing credentials (the SDK's own text for
/// that is a screenful of provider attempts).
pub fn one_line<E, R>(e: &aws_smithy_runtime_api::client::result::SdkError<E, R>) -> String
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_ec2::error::ProvideErrorMetadata;
    if let Some(m) = e.message() {
        return m.to_owned();
    }
    let chain = es_proto::error_chain(e);
    if chain.to_ascii_lowercase().contains("credentials") {
        return identity::NO_CREDENTIALS.to_owned();
    }
    let first = chain.lines().next().unwrap_or_default();
    es_proto::limits::clip(first, 300)
}
