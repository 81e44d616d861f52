//! Who the agent acts as in AWS: STS GetCallerIdentity at start (and in `check-config`), so
//! that an agent without credentials says so at once, in one line with the fix, instead of
//! failing each job with the SDK's provider-chain dump. Until the identity is known the agent
//! tells the server (heartbeat `aws_problem`), which offers it no job that needs AWS.

use std::time::Duration;

use aws_config::SdkConfig;

/// The account and ARN the credentials belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub account: String,
    pub arn: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (account {})", self.arn, self.account)
    }
}

/// What an agent without usable credentials says, with the ways to give it some.
pub const NO_CREDENTIALS: &str = "no AWS credentials: none in the environment, a profile, web identity, the container or the instance metadata; give the instance an IAM role (instance profile), or set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, in /etc/es-agent/NAME.env";

/// Longest wait for the answer (the credential chain's instance-metadata probe included).
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Asks STS who these credentials are.
pub async fn whoami(sdk: &SdkConfig) -> Result<Identity, String> {
    let call = aws_sdk_sts::Client::new(sdk).get_caller_identity().send();
    match tokio::time::timeout(CHECK_TIMEOUT, call).await {
        Err(_) => Err(format!(
            "STS GetCallerIdentity did not answer within {} s (check the network path to AWS, or aws_endpoint_url)",
            CHECK_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(super::one_line(&e)),
        Ok(Ok(out)) => Ok(Identity {
            account: out.account.unwrap_or_default(),
            arn: out.arn.unwrap_or_default(),
        }),
    }
}

/// Builds the agent's AWS configuration from `settings` and asks STS who it is. Both run in a
/// task of their own: the SDK panics when it cannot build its HTTPS client (a host without CA
/// certificates), which must be a problem reported like any other, not the agent's end.
pub async fn check(settings: super::AwsSettings) -> Result<Identity, String> {
    let task = tokio::spawn(async move {
        let aws = super::Aws::new(settings).await;
        whoami(aws.base()).await
    });
    match task.await {
        Ok(found) => found,
        Err(e) => {
            let why = e
                .try_into_panic()
                .ok()
                .and_then(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                })
                .unwrap_or_else(|| "the check was cancelled".into());
            Err(format!(
                "cannot make HTTPS connections to AWS: {} (install the CA certificates: Debian's ca-certificates)",
                why.lines().next().unwrap_or_default()
            ))
        }
    }
}
