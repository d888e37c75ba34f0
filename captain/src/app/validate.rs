//! The rules of names and values the API accepts, written once (the
//! OpenAPI document states the same constraints, `crate::api`).

use meta_schema::layout::is_dns_label;

use super::AppError;

/// A name of a project, app, env or node: a DNS label.
pub fn check_name(what: &str, name: &str) -> Result<(), AppError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(AppError::InvalidName(format!(
            "{what} {name:?} is not a DNS label: 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
        )))
    }
}

/// A git URL or (development) path.
pub fn valid_repo(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 2048
        && !repo.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A git branch name (`git check-ref-format --branch`, simplified).
pub fn valid_branch(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 255
        && !b.starts_with(['-', '/'])
        && !b.ends_with(['/', '.'])
        && !b.contains("..")
        && !b
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
}

/// A git commit id, full or abbreviated (4-64 hex digits); empty = none.
pub fn check_commit(what: &str, c: &str) -> Result<(), AppError> {
    let ok = (4..=64).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_hexdigit());
    if !c.is_empty() && !ok {
        return Err(AppError::BadRequest(format!(
            "{what} {c:?} is not a git commit id"
        )));
    }
    Ok(())
}

/// A `sha256:<64 lowercase hex>` image digest.
pub fn check_digest(what: &str, d: &str) -> Result<zw_util::Sha256Digest, AppError> {
    d.parse()
        .map_err(|e: zw_util::DigestError| AppError::BadRequest(format!("{what}: {e}")))
}

/// An email address, as far as the waitlist needs: one `@`, a domain.
pub fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    s.len() <= 254
        && !local.is_empty()
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && !domain.contains('@')
        && meta_schema::layout::is_domain(&domain.to_ascii_lowercase())
}

/// An environment variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_env_var_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

/// Converts a count the API takes unsigned into the database's i64.
pub fn to_i64(what: &str, v: u64) -> Result<i64, AppError> {
    i64::try_from(v).map_err(|_| AppError::BadRequest(format!("{what} {v} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_var_names() {
        assert!(is_env_var_name("API_KEY"));
        assert!(is_env_var_name("_x1"));
        assert!(!is_env_var_name("1A"));
        assert!(!is_env_var_name("A-B"));
        assert!(!is_env_var_name(""));
    }
}
