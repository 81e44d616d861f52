//! Windows passwords (AppSpec.wait_password): EC2 encrypts a Windows instance's administrator
//! password to its key pair (RSA, PKCS#1 v1.5) once the instance has made it (minutes after
//! boot). The agent polls GetPasswordData, decrypts with the sandbox's private key (read from
//! SSM Parameter Store) and seals the password to the deploy's recipient: it is never logged,
//! and what the job store holds is ciphertext only the submitter can open.

use std::collections::HashMap;
use std::time::Duration;

use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::{Pkcs1v15Encrypt, RsaPrivateKey};

use crate::shells::ec2::aws_err;
use crate::shells::{Cx, Result, ShellsError};

/// The RSA private key of a PEM text (PKCS#1, as EC2 gives RSA key pairs, or PKCS#8).
pub(super) fn rsa_key(pem: &str) -> std::result::Result<RsaPrivateKey, String> {
    RsaPrivateKey::from_pkcs1_pem(pem)
        .or_else(|_| RsaPrivateKey::from_pkcs8_pem(pem))
        .map_err(|_| "the sandbox key pair is not an RSA key".to_owned())
}

/// The password in EC2's `PasswordData` (base64 of the RSA ciphertext, maybe with line breaks).
pub(super) fn decrypt(key: &RsaPrivateKey, data: &str) -> std::result::Result<Vec<u8>, String> {
    let clean: String = data.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = aws_smithy_types::base64::decode(&clean)
        .map_err(|_| "EC2's password data is not base64".to_owned())?;
    key.decrypt(Pkcs1v15Encrypt, &bytes)
        .map_err(|_| "the password does not decrypt with the sandbox key pair".to_owned())
}

/// Waits for the passwords of `apps` (instance id, longest wait), one GetPasswordData per
/// pending instance per round; answers, per instance, the password sealed to `recipient`, or
/// why there is none.
pub(super) async fn wait_passwords(
    cx: &Cx<'_>,
    apps: &[(String, Duration)],
    recipient: &[u8],
) -> Result<HashMap<String, std::result::Result<Vec<u8>, String>>> {
    let pem = crate::shells::keys::private_key(cx).await?;
    let key = rsa_key(&pem).map_err(|reason| ShellsError::Invalid {
        field: "spec.prepare_network.key_type".into(),
        reason,
    })?;
    drop(pem);
    let start = tokio::time::Instant::now();
    let mut out = HashMap::new();
    let mut delay = Duration::ZERO;
    loop {
        let pending: Vec<&(String, Duration)> = apps
            .iter()
            .filter(|(id, _)| !out.contains_key(id))
            .collect();
        if pending.is_empty() {
            return Ok(out);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).clamp(Duration::from_secs(2), Duration::from_secs(15));
        for (id, limit) in pending {
            let r = cx
                .ec2
                .get_password_data()
                .instance_id(id)
                .send()
                .await
                .map_err(|e| aws_err("GetPasswordData", e))?;
            let data = r.password_data().unwrap_or_default();
            if !data.trim().is_empty() {
                let sealed = decrypt(&key, data)
                    .and_then(|p| es_proto::sealed::seal(recipient, &p).map_err(|e| e.to_string()));
                out.insert(id.clone(), sealed);
            } else if start.elapsed() > *limit {
                out.insert(
                    id.clone(),
                    Err(format!(
                        "no password after {} s (Windows makes it a few minutes after its \
                         first boot; raise wait_timeout_s)",
                        limit.as_secs()
                    )),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::RsaPublicKey;

    #[test]
    fn a_password_encrypted_to_the_key_pair_decrypts_and_nothing_else_does() {
        let mut rng = rsa::rand_core::OsRng;
        let key = RsaPrivateKey::new(&mut rng, 1024).unwrap();
        let pem = key.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let key = rsa_key(&pem).unwrap();
        let ct = RsaPublicKey::from(&key)
            .encrypt(&mut rng, Pkcs1v15Encrypt, b"Tr0ub4dor&3")
            .unwrap();
        // EC2 wraps the base64 in lines.
        let b64 = aws_smithy_types::base64::encode(&ct);
        let wrapped = format!("\n{}\n{}\n", &b64[..40], &b64[40..]);
        assert_eq!(decrypt(&key, &wrapped).unwrap(), b"Tr0ub4dor&3");
        let other = RsaPrivateKey::new(&mut rng, 1024).unwrap();
        assert!(decrypt(&other, &b64)
            .unwrap_err()
            .contains("does not decrypt"));
        assert!(decrypt(&key, "not base64!").is_err());
        assert!(rsa_key(
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
        )
        .is_err());
    }
}
