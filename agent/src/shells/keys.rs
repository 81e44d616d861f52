//! The sandbox key pair: made by PrepareSandboxNetwork (CreateKeyPair, tagged with the sandbox),
//! its private key kept only in SSM Parameter Store as a SecureString
//! (`<prefix>/<sandbox>/key-pair`), handed back by GetAccessKey sealed to the one client that
//! asked, and deleted by cleanup (the parameter first, then the key pair, so that whatever is
//! left is still found by the key pair's tag).
//!
//! The private key is held in memory only between the AWS call that returns it and the one that
//! stores (or seals) it: it is never logged, put in an event or error, or returned in clear.

use aws_sdk_ec2::types::{KeyFormat, KeyPairInfo, KeyType, ResourceType};
use aws_sdk_ssm::types::{ParameterType, Tag as SsmTag};
use es_proto::v1::{AccessKey, DeletedResource};

use super::ec2::{aws_err, code, sandbox_filter, tags};
use super::{Cx, Result, ShellsError, CREATED_BY, TAG_CREATED_BY, TAG_SANDBOX};

/// Where sandbox keys live in SSM, from the agent's configuration.
pub(crate) struct KeyStore<'a> {
    pub ssm: &'a aws_sdk_ssm::Client,
    /// `key_parameter_prefix`, e.g. "/es/sandboxes".
    pub prefix: &'a str,
    /// `key_parameter_kms_key`; empty = alias/aws/ssm.
    pub kms_key: &'a str,
}

impl KeyStore<'_> {
    pub fn parameter(&self, sandbox: &str) -> String {
        format!("{}/{sandbox}/key-pair", self.prefix)
    }
}

/// The key pair's name: unique per sandbox in the account and region.
pub(crate) fn key_name(sandbox: &str) -> String {
    format!("es-{sandbox}")
}

/// The sandbox's key pairs (by its tag).
async fn find(cx: &Cx<'_>) -> Result<Vec<KeyPairInfo>> {
    Ok(cx
        .ec2
        .describe_key_pairs()
        .filters(sandbox_filter(cx.sandbox))
        .send()
        .await
        .map_err(|e| aws_err("DescribeKeyPairs", e))?
        .key_pairs()
        .to_vec())
}

/// Whether the sandbox's parameter exists (its value is not decrypted).
async fn parameter_exists(cx: &Cx<'_>, name: &str) -> Result<bool> {
    match cx
        .keys
        .ssm
        .get_parameter()
        .name(name)
        .with_decryption(false)
        .send()
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if code(&e) == "ParameterNotFound" => Ok(false),
        Err(e) => Err(aws_err("GetParameter", e)),
    }
}

/// The key type a prepare asks for (`None` for "none"): as given, or, unset, RSA when one of
/// the apps' images is Windows. Reads only: a prepare checks it before creating anything.
pub(crate) async fn key_kind(
    cx: &Cx<'_>,
    key_type: &str,
    amis: &[String],
) -> Result<Option<KeyType>> {
    Ok(Some(match key_type {
        "none" => return Ok(None),
        "" if windows_among(cx, amis).await? => KeyType::Rsa,
        "" | "ed25519" => KeyType::Ed25519,
        "rsa" => KeyType::Rsa,
        other => {
            return Err(ShellsError::Invalid {
                field: "spec.prepare_network.key_type".into(),
                reason: format!("{other:?}: use ed25519, rsa or none"),
            })
        }
    }))
}

/// Makes the sandbox key pair of type `kind` unless it exists with its private key stored;
/// answers its name and the parameter. A key pair whose private key never reached SSM (a crash
/// in between) is useless: it is deleted and made again.
/// `fresh`: nothing carries the sandbox's tag (DescribeTags said so): there is nothing to find.
pub(crate) async fn ensure(cx: &Cx<'_>, kind: KeyType, fresh: bool) -> Result<(String, String)> {
    let name = key_name(cx.sandbox);
    let parameter = cx.keys.parameter(cx.sandbox);
    let found = match fresh {
        true => None,
        false => find(cx).await?.into_iter().next(),
    };
    if let Some(k) = found {
        if k.key_type() != Some(&kind) {
            return Err(ShellsError::Invalid {
                field: "spec.prepare_network.key_type".into(),
                reason: format!(
                    "the sandbox already has a {} key pair ({name}); one sandbox has one key \
                     type: clean it up to change it",
                    k.key_type().map(|t| t.as_str()).unwrap_or("?")
                ),
            });
        }
        if parameter_exists(cx, &parameter).await? {
            return Ok((name, parameter));
        }
        log::warn!(sandbox_id = cx.sandbox, job_id = cx.job_id;
            "key pair {name} has no private key in SSM ({parameter}): making it again");
        cx.ec2
            .delete_key_pair()
            .key_name(&name)
            .send()
            .await
            .map_err(|e| aws_err("DeleteKeyPair", e))?;
    }
    let created = cx
        .ec2
        .create_key_pair()
        .key_name(&name)
        .key_type(kind)
        .key_format(KeyFormat::Pem)
        .tag_specifications(tags(ResourceType::KeyPair, cx.sandbox, &name, &[]))
        .send()
        .await;
    let material = match created {
        Ok(r) => r.key_material.unwrap_or_default(),
        // A concurrent run made it: that run stores its private key.
        Err(e) if code(&e) == "InvalidKeyPair.Duplicate" => {
            return Ok((name, parameter));
        }
        Err(e) => return Err(aws_err("CreateKeyPair", e)),
    };
    let mut put = cx
        .keys
        .ssm
        .put_parameter()
        .name(&parameter)
        .description(format!("private key of es-shells sandbox {}", cx.sandbox))
        .value(material)
        .r#type(ParameterType::SecureString)
        .tags(ssm_tag(TAG_SANDBOX, cx.sandbox))
        .tags(ssm_tag(TAG_CREATED_BY, CREATED_BY));
    if !cx.keys.kms_key.is_empty() {
        put = put.key_id(cx.keys.kms_key);
    }
    put.send().await.map_err(|e| aws_err("PutParameter", e))?;
    log::info!(sandbox_id = cx.sandbox, job_id = cx.job_id;
        "key pair {name} made; its private key is in SSM as {parameter}");
    Ok((name, parameter))
}

/// Whether one of `amis` is a Windows image (they need an RSA key pair).
async fn windows_among(cx: &Cx<'_>, amis: &[String]) -> Result<bool> {
    if amis.is_empty() {
        return Ok(false);
    }
    let r = cx
        .ec2
        .describe_images()
        .set_image_ids(Some(amis.to_vec()))
        .send()
        .await
        .map_err(|e| match code(&e) {
            c if c.starts_with("InvalidAMIID") => ShellsError::Invalid {
                field: "spec.prepare_network.amis".into(),
                reason: format!(
                    "{}: an image the apps boot from does not exist here",
                    e.as_service_error()
                        .and_then(|s| {
                            aws_smithy_types::error::metadata::ProvideErrorMetadata::message(s)
                        })
                        .unwrap_or("not found")
                ),
            },
            _ => aws_err("DescribeImages", e),
        })?;
    Ok(r.images().iter().any(|i| {
        i.platform()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("windows"))
    }))
}

fn ssm_tag(k: &str, v: &str) -> SsmTag {
    SsmTag::builder()
        .key(k)
        .value(v)
        .build()
        .expect("key and value are set")
}

/// The key type of the sandbox's key pair, if it has one (Windows apps need "rsa").
pub(crate) async fn sandbox_key(cx: &Cx<'_>) -> Result<Option<(String, KeyType)>> {
    Ok(find(cx).await?.into_iter().next().map(|k| {
        (
            k.key_name().unwrap_or_default().to_owned(),
            k.key_type().cloned().unwrap_or(KeyType::Ed25519),
        )
    }))
}

/// The sandbox's private key (PEM or OpenSSH text), decrypted from SSM. The caller seals or
/// uses it and drops it; it is never logged.
pub(crate) async fn private_key(cx: &Cx<'_>) -> Result<String> {
    let parameter = cx.keys.parameter(cx.sandbox);
    match cx
        .keys
        .ssm
        .get_parameter()
        .name(&parameter)
        .with_decryption(true)
        .send()
        .await
    {
        Ok(r) => Ok(r.parameter.and_then(|p| p.value).unwrap_or_default()),
        Err(e) if code(&e) == "ParameterNotFound" => Err(ShellsError::NoNetwork(format!(
            "the private key of sandbox {} is not in SSM ({parameter}); run \
             PrepareSandboxNetwork again to make a new key pair",
            cx.sandbox
        ))),
        Err(e) => Err(aws_err("GetParameter", e)),
    }
}

/// GetAccessKey: the private key, sealed to `recipient`.
pub(crate) async fn access_key(cx: &Cx<'_>, recipient: &[u8]) -> Result<AccessKey> {
    if recipient.len() != es_proto::sealed::RECIPIENT_LEN {
        return Err(ShellsError::Invalid {
            field: "spec.get_access_key.recipient".into(),
            reason: format!(
                "{} bytes; give the {}-byte X25519 public key the private key is sealed to",
                recipient.len(),
                es_proto::sealed::RECIPIENT_LEN
            ),
        });
    }
    let Some(k) = find(cx).await?.into_iter().next() else {
        return Err(ShellsError::NoNetwork(format!(
            "sandbox {} has no key pair (PrepareSandboxNetwork makes one unless key_type is \
             \"none\")",
            cx.sandbox
        )));
    };
    let value = private_key(cx).await?;
    let sealed =
        es_proto::sealed::seal(recipient, value.as_bytes()).map_err(|e| ShellsError::Invalid {
            field: "spec.get_access_key.recipient".into(),
            reason: e.to_string(),
        })?;
    Ok(AccessKey {
        key_name: k.key_name().unwrap_or_default().to_owned(),
        key_type: k
            .key_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        key_fingerprint: k.key_fingerprint().unwrap_or_default().to_owned(),
        sealed_private_key: sealed,
        parameter: cx.keys.parameter(cx.sandbox),
    })
}

/// Deletes the sandbox `sb`'s parameter (cleanup, before its key pair). Nothing is reported
/// when there was none.
pub(crate) async fn delete_parameter(
    keys: &KeyStore<'_>,
    sb: &str,
    dry_run: bool,
) -> Result<Option<DeletedResource>> {
    let name = keys.parameter(sb);
    let rec = |outcome: &str, error: String| DeletedResource {
        kind: "ssm-parameter".into(),
        id: name.clone(),
        sandbox_id: sb.into(),
        outcome: outcome.into(),
        error,
    };
    if dry_run {
        return Ok(
            match keys
                .ssm
                .get_parameter()
                .name(&name)
                .with_decryption(false)
                .send()
                .await
            {
                Ok(_) => Some(rec("would-delete", String::new())),
                Err(e) if code(&e) == "ParameterNotFound" => None,
                Err(e) => return Err(aws_err("GetParameter", e)),
            },
        );
    }
    match keys.ssm.delete_parameter().name(&name).send().await {
        Ok(_) => Ok(Some(rec("deleted", String::new()))),
        Err(e) if code(&e) == "ParameterNotFound" => Ok(None),
        Err(e) => Ok(Some(rec(
            "failed",
            aws_err("DeleteParameter", e).to_string(),
        ))),
    }
}
