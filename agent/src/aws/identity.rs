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
