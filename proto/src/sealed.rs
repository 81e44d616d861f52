//! Secrets an agent hands to the one submitter that asked for them (a sandbox's private key, a
//! Windows password): the client makes a one-time X25519 key pair, puts the public half in the
//! job, and the agent seals the secret to it (a NaCl sealed box: X25519, XSalsa20-Poly1305).
//! The job store, events, logs and audit trail then hold only ciphertext, which survives a
//! server restart or failover and which no other reader (an admin included) can open.

use crypto_box::{PublicKey, SecretKey};

/// Length of a recipient (an X25519 public key).
pub const RECIPIENT_LEN: usize = 32;

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the recipient must be a {RECIPIENT_LEN}-byte X25519 public key, not {0} bytes")]
    Recipient(usize),
    #[error("the sealed secret does not open with this key (not sealed to it, or damaged)")]
    Open,
    #[error("sealing failed")]
    Seal,
}

/// Seals `secret` to `recipient` (the job's public key).
pub fn seal(recipient: &[u8], secret: &[u8]) -> Result<Vec<u8>, SealError> {
    let key: [u8; RECIPIENT_LEN] = recipient
        .try_into()
        .map_err(|_| SealError::Recipient(recipient.len()))?;
    PublicKey::from(key)
        .seal(&mut crypto_box::aead::OsRng, secret)
        .map_err(|_| SealError::Seal)
}

/// The client's side: a one-time key whose public half goes into the job.
pub struct Opener {
    key: SecretKey,
}

impl Opener {
    pub fn new() -> Opener {
        Opener {
            key: SecretKey::generate(&mut crypto_box::aead::OsRng),
        }
    }

    /// The public half, for the job's `recipient` field.
    pub fn recipient(&self) -> Vec<u8> {
        self.key.public_key().as_bytes().to_vec()
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        self.key.unseal(sealed).map_err(|_| SealError::Open)
    }
}

impl Default for Opener {
    fn default() -> Self {
        Opener::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_one_who_asked_can_open() {
        let me = Opener::new();
        let other = Opener::new();
        let sealed = seal(&me.recipient(), b"-----BEGIN OPENSSH PRIVATE KEY-----").unwrap();
        assert!(!sealed
            .windows(10)
            .any(|w| w == b"-----BEGIN"[..10].as_ref()));
        assert_eq!(
            me.open(&sealed).unwrap(),
            b"-----BEGIN OPENSSH PRIVATE KEY-----"
        );
        assert!(other.open(&sealed).is_err());
        assert!(matches!(
            seal(&[1; 31], b"x"),
            Err(SealError::Recipient(31))
        ));
    }
}
