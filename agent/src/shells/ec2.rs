//! EC2 helpers of es-shells: paged lookups, error classes with hints, "already exists" and
//! "already gone" answers, retries of eventual consistency, filters and tags.

use std::time::Duration;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

use super::{Result, ShellsError, CREATED_BY, TAG_CREATED_BY, TAG_SANDBOX};

/// The given instances, every page of them (EC2 implementations may page even when ids are
/// given: moto answers 100 at a time).
pub(crate) async fn describe_ids(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
    let mut all = Vec::new();
    for chunk in ids.chunks(1000) {
        let mut token: Option<String> = None;
        loop {
            let r = retry_consistency(|| {
                ec2.describe_instances()
                    .set_instance_ids(Some(chunk.to_vec()))
                    .set_next_token(token.clone())
                    .send()
            })
            .await
            .map_err(|e| aws_err("DescribeInstances", e))?;
            for res in r.reservations() {
                all.extend(res.instances().iter().cloned());
            }
            token = r.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(all)
}

/// The error code of an SDK error (the failure's class when no answer came: `Timeout`, ...).
pub fn code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> String {
    crate::aws::error_code(e)
}

/// Turns an SDK error into a job error, with a hint for the errors people can fix.
pub fn aws_err<E, R>(op: &'static str, e: SdkError<E, R>) -> ShellsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = code(&e);
    let message = crate::aws::one_line(&e);
    let hint = if code.starts_with("InvalidAMIID") {
        " (the AMI does not exist in this region or account: check `ami`)"
    } else if matches!(
        code.as_str(),
        "InstanceLimitExceeded"
            | "VcpuLimitExceeded"
            | "VpcLimitExceeded"
            | "AddressLimitExceeded"
            | "InsufficientInstanceCapacity"
    ) {
        " (a quota or capacity limit: request an increase, or deploy fewer or smaller apps)"
    } else if matches!(
        code.as_str(),
        "InvalidSubnet.Conflict" | "InvalidVpc.Range" | "InvalidSubnet.Range"
    ) {
        " (a CIDR conflict: choose a CIDR that is free and inside the VPC)"
    } else if code == "UnauthorizedOperation" || code == "AccessDenied" {
        " (the agent's IAM role lacks this permission)"
    } else {
        ""
    };
    ShellsError::Aws {
        op,
        code,
        message,
        hint: hint.to_owned(),
    }
}

/// True for errors that mean "it is already there".
pub fn already_exists(code: &str) -> bool {
    matches!(
        code,
        "InvalidPermission.Duplicate"
            | "RouteAlreadyExists"
            | "Resource.AlreadyAssociated"
            | "InvalidGroup.Duplicate"
    )
}

/// True for errors that mean "it is already gone".
pub fn already_gone(code: &str) -> bool {
    code.ends_with(".NotFound") || code == "InvalidVpcPeeringConnectionID.NotFound"
}

/// Retries `f` while EC2 answers `*.NotFound` (eventual consistency right after a create) or a
/// dependency violation, with exponential backoff: 10 tries over about 10 s.
pub async fn retry_consistency<T, E, R, F, Fut>(mut f: F) -> std::result::Result<T, SdkError<E, R>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, SdkError<E, R>>>,
    E: ProvideErrorMetadata,
{
    let mut delay = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match f().await {
            Err(e) if tries < 9 && consistency_error(&code(&e)) => {
                tries += 1;
                let jitter = rand::random_range(0..=delay.as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(jitter) + delay / 2).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
            other => return other,
        }
    }
}

/// Errors that a moment of waiting may fix: a resource not visible yet right after its
/// creation, or a dependency still being released (a snapshot still held by an image). A missing AMI is a real error.
fn consistency_error(code: &str) -> bool {
    (code.ends_with(".NotFound") && !code.starts_with("InvalidAMIID"))
        || code == "DependencyViolation"
        // A snapshot behind an image deregistered a moment ago.
        || code == "InvalidSnapshot.InUse"
}

pub fn filter(name: &str, values: &[&str]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.iter().map(|v| v.to_string()).collect()))
        .build()
}

pub fn sandbox_filter(sandbox: &str) -> Filter {
    filter(&format!("tag:{TAG_SANDBOX}"), &[sandbox])
}

pub fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

/// TagSpecification for a resource created for `sandbox`, with extra tags.
pub fn tags(
    rt: ResourceType,
    sandbox: &str,
    name: &str,
    extra: &[(&str, &str)],
) -> TagSpecification {
    let mut b = TagSpecification::builder()
        .resource_type(rt)
        .tags(tag(TAG_SANDBOX, sandbox))
        .tags(tag("Name", name))
        .tags(tag(TAG_CREATED_BY, CREATED_BY))
        .tags(tag(
            super::TAG_CREATED_AT,
            &std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                .to_string(),
        ));
    for (k, v) in extra {
        b = b.tags(tag(k, v));
    }
    b.build()
}

/// The value of tag `key` in a tag list.
pub fn tag_value<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// A peering connection that still exists (not deleted, rejected, failed or expired). The
/// `status-code` filter is also sent, but not every EC2 implementation honours it.
pub fn live_peering(p: &aws_sdk_ec2::types::VpcPeeringConnection) -> bool {
    let code = p
        .status()
        .and_then(|s| s.code())
        .map(|c| c.as_str())
        .unwrap_or("");
    matches!(
        code,
        "pending-acceptance" | "provisioning" | "active" | "initiating-request"
    )
}

/// The security group named `name` in VPC `vpc_id` (group names are unique per VPC).
pub async fn group_named(
    ec2: &aws_sdk_ec2::Client,
    vpc_id: &str,
    name: &str,
) -> Result<Option<aws_sdk_ec2::types::SecurityGroup>> {
    let r = ec2
        .describe_security_groups()
        .filters(filter("vpc-id", &[vpc_id]))
        .filters(filter("group-name", &[name]))
        .send()
        .await
        .map_err(|e| aws_err("DescribeSecurityGroups", e))?;
    Ok(r.security_groups().first().cloned())
}

/// Adds ingress rules to a security group; rules it already has count as added (a re-run).
pub async fn authorize_ingress(
    ec2: &aws_sdk_ec2::Client,
    group_id: &str,
    perms: &[aws_sdk_ec2::types::IpPermission],
) -> Result<()> {
    let r = retry_consistency(|| {
        ec2.authorize_security_group_ingress()
            .group_id(group_id)
            .set_ip_permissions(Some(perms.to_vec()))
            .send()
    })
    .await;
    match r {
        Err(e) if !already_exists(&code(&e)) => Err(aws_err("AuthorizeSecurityGroupIngress", e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        // Retried here (eventual consistency, dependencies being released).
        assert!(consistency_error("InvalidSubnetID.NotFound"));
        assert!(consistency_error("InvalidGroup.NotFound"));
        assert!(consistency_error("DependencyViolation"));
        // Real errors: fail at once.
        assert!(!consistency_error("InvalidAMIID.NotFound"));
        assert!(!consistency_error("VcpuLimitExceeded"));
        assert!(!consistency_error("InvalidSubnet.Conflict"));
        // Success in disguise.
        assert!(already_exists("RouteAlreadyExists"));
        assert!(already_exists("InvalidPermission.Duplicate"));
        assert!(already_gone("InvalidVpcID.NotFound"));
        assert!(!already_gone("DependencyViolation"));
    }
}
