//! The backend HTTP API's key: `Authorization: Bearer <api key>`, compared
//! in constant time (the length of the key may still leak, as usual).

use std::fmt;

use subtle::ConstantTimeEq;

use super::{AuthError, bearer_token};

/// The configured API key. Its `Debug` form hides it.
#[derive(Clone)]
pub struct ApiKey(Vec<u8>);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// Refuses a key that no `Authorization` header could carry: empty, or
    /// with whitespace or non-printable characters (usually a trailing
    /// newline read from a file).
    pub fn new(key: String) -> Result<Self, AuthError> {
        if key.is_empty() {
            return Err(AuthError::BadConfig("API key is empty".to_owned()));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::BadConfig(
                "API key contains whitespace or non-printable/non-ASCII characters \
                 (a trailing newline from a file?)"
                    .to_owned(),
            ));
        }
        Ok(Self(key.into_bytes()))
    }

    /// Checks a call's whole `Authorization` header value (e.g. `"Bearer abc"`).
    pub fn check(&self, authorization_header: Option<&str>) -> Result<(), AuthError> {
        let header = authorization_header
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .ok_or(AuthError::MissingApiKey)?;
        let given = bearer_token(header).ok_or(AuthError::BadApiKey)?;
        if bool::from(given.as_bytes().ct_eq(&self.0)) {
            Ok(())
        } else {
            Err(AuthError::BadApiKey)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn api_key() {
        let key = ApiKey::new("s3cr3t-key".to_owned()).unwrap();
        assert!(key.check(Some("Bearer s3cr3t-key")).is_ok());
        assert!(key.check(Some("bearer  s3cr3t-key ")).is_ok());
        for wrong in [
            "Bearer s3cr3t-kez",
            "Bearer s3cr3t",
            "Bearer s3cr3t-key2",
            "s3cr3t-key",
            "Basic s3cr3t-key",
            "Bearer",
        ] {
            assert!(
                matches!(key.check(Some(wrong)), Err(AuthError::BadApiKey)),
                "{wrong}"
            );
        }
        assert!(matches!(key.check(None), Err(AuthError::MissingApiKey)));
        assert!(matches!(key.check(Some("")), Err(AuthError::MissingApiKey)));
        assert!(!format!("{key:?}").contains("s3cr3t"));
    }
}
