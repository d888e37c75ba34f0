//! Encrypting to age recipients, the one thing the captain can do with
//! secrets ([`meta_schema::sops::encrypt`]).

use meta_schema::sops::Secrets;

/// Is `s` an age X25519 recipient (`age1…`) that files can be encrypted to?
pub fn is_age_recipient(s: &str) -> bool {
    seal(&Secrets::new(), &[("", s)], 0).is_ok()
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the age recipient of {0:?} is not an age X25519 recipient")]
    Recipient(String),
    #[error(transparent)]
    Sops(#[from] meta_schema::sops::SopsError),
}

/// Encrypts `secrets` to `(name, age1…)` recipients. The recipient type is
/// the one [`meta_schema::sops::encrypt`] takes, inferred, so the captain
/// needs no direct dependency on `age`.
pub fn seal(
    secrets: &Secrets,
    recipients: &[(&str, &str)],
    now_millis: i64,
) -> Result<String, SealError> {
    let mut keys = Vec::with_capacity(recipients.len());
    for (name, r) in recipients {
        keys.push(
            r.parse()
                .map_err(|_| SealError::Recipient((*name).to_string()))?,
        );
    }
    Ok(meta_schema::sops::encrypt(secrets, &keys, now_millis)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_are_checked_by_encrypting_to_them() {
        assert!(!is_age_recipient("age1notarecipient"));
        assert!(!is_age_recipient(""));
        assert!(is_age_recipient(
            "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
        ));
    }
}
