//! Authentication and room permissions (README, "Auth").
//!
//! Pure: no I/O. The only outside input is the system clock, which
//! `jsonwebtoken` reads to check `exp`/`nbf`. Build one [`Authenticator`] at
//! start-up from an [`AuthConfig`]; it is cheap to share (`Arc`) or clone.
//!
//! - [`jwt`]: client tokens — the key and algorithm, the claims, why a token
//!   is refused;
//! - [`session`]: the [`Grants`] of a connection — what its token lets it
//!   subscribe to and publish in, and until when;
//! - [`api_key`]: the backend HTTP API's key;
//! - [`bearer`]: `Authorization: Bearer …` parsing, for both.
//!
//! Room patterns (`prefix:*`) are the protocol's ([`crate::protocol::Pattern`]),
//! as is room-name validity (`bad_room`): the `may_*` checks here assume an
//! already valid room name.
//!
//! When no JWT key is configured, client auth is off: any token is ignored and
//! every client gets [`Grants::anonymous`], which may do everything. When no
//! API key is configured, every backend call is allowed.

pub mod api_key;
pub mod bearer;
pub mod jwt;
pub mod session;

#[cfg(test)]
mod fixtures;

use std::fmt;

use jsonwebtoken::Algorithm;

pub use api_key::ApiKey;
pub use bearer::bearer_token;
pub use jwt::{Claims, NBF_LEEWAY_SECS};
pub use session::{Grants, PERSONAL_ROOM_PREFIX};

use jwt::JwtCheck;

/// What the operator configured. All `None` means auth is off.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// Shared secret for HS256 client tokens.
    pub jwt_secret: Option<Vec<u8>>,
    /// PEM public key (`PUBLIC KEY` or `RSA PUBLIC KEY`) for RS256 (RSA) or
    /// ES256 (EC P-256) client tokens.
    pub jwt_public_key_pem: Option<Vec<u8>>,
    /// Key that backend calls to the HTTP API must present.
    pub api_key: Option<String>,
}

// By hand so secrets never reach a log line.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "jwt_public_key_pem",
                &self.jwt_public_key_pem.as_ref().map(|_| "<set>"),
            )
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Checks client tokens and backend API keys. Built once at start-up.
#[derive(Clone, Debug)]
pub struct Authenticator {
    /// `None`: client auth is off.
    jwt: Option<JwtCheck>,
    /// `None`: the backend API is open.
    api_key: Option<ApiKey>,
}

impl Authenticator {
    /// Validates the configuration: an empty secret or API key, both a secret
    /// and a public key, or an unusable PEM is a [`AuthError::BadConfig`]
    /// naming the problem.
    pub fn new(cfg: AuthConfig) -> Result<Self, AuthError> {
        let jwt = match (cfg.jwt_secret, cfg.jwt_public_key_pem) {
            (Some(_), Some(_)) => {
                return Err(AuthError::BadConfig(
                    "set either a JWT secret (HS256) or a JWT public key (RS256/ES256), not both"
                        .to_owned(),
                ));
            }
            (Some(secret), None) => Some(JwtCheck::from_secret(&secret)?),
            (None, Some(pem)) => Some(JwtCheck::from_public_pem(&pem)?),
            (None, None) => None,
        };
        let api_key = cfg.api_key.map(ApiKey::new).transpose()?;
        Ok(Self { jwt, api_key })
    }

    /// True when a JWT secret or public key is set: clients must send a token.
    pub fn clients_need_token(&self) -> bool {
        self.jwt.is_some()
    }

    /// True when an API key is set: backend HTTP calls must present it.
    pub fn backend_needs_api_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// The JWT algorithm client tokens must use, when client auth is on.
    pub fn jwt_algorithm(&self) -> Option<Algorithm> {
        self.jwt.as_ref().map(JwtCheck::algorithm)
    }

    /// Authenticate a WebSocket client from the `?token=` query value or the
    /// `Authorization: Bearer` header value (already stripped of `Bearer `;
    /// see [`bearer_token`]).
    ///
    /// With no JWT key configured, returns [`Grants::anonymous`] whatever the
    /// token. Otherwise a missing or empty token is [`AuthError::MissingToken`].
    pub fn authenticate(&self, token: Option<&str>) -> Result<Grants, AuthError> {
        let Some(jwt) = &self.jwt else {
            return Ok(Grants::anonymous());
        };
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        Grants::from_claims(jwt.verify(token)?)
    }

    /// Check a backend HTTP API call's whole `Authorization` header value
    /// (e.g. `"Bearer abc"`). `Ok` when no API key is configured.
    pub fn check_api_key(&self, authorization_header: Option<&str>) -> Result<(), AuthError> {
        match &self.api_key {
            Some(key) => key.check(authorization_header),
            None => Ok(()),
        }
    }
}

/// Why authentication failed. Every variant but `BadConfig` is the protocol's
/// `unauthorized` (HTTP 401); `BadConfig` only happens at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required (`?token=` or `Authorization: Bearer`)")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("token expired")]
    Expired,
    #[error("API key required (`Authorization: Bearer <api key>`)")]
    MissingApiKey,
    #[error("wrong API key")]
    BadApiKey,
    #[error("bad auth configuration: {0}")]
    BadConfig(String),
}

impl AuthError {
    /// The protocol error code to send (README, "Protocol").
    pub fn code(&self) -> &'static str {
        "unauthorized"
    }

    /// A short fixed label per variant, for a metric or a log field.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken(_) => "invalid_token",
            Self::Expired => "expired",
            Self::MissingApiKey => "missing_api_key",
            Self::BadApiKey => "bad_api_key",
            Self::BadConfig(_) => "bad_config",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn missing_token_when_required() {
        let auth = secret_auth();
        assert!(matches!(
            auth.authenticate(None),
            Err(AuthError::MissingToken)
        ));
        assert!(matches!(
            auth.authenticate(Some("")),
            Err(AuthError::MissingToken)
        ));
        assert!(matches!(
            auth.authenticate(Some("  ")),
            Err(AuthError::MissingToken)
        ));
    }

    #[test]
    fn no_config_means_anonymous_everywhere() {
        let auth = Authenticator::new(AuthConfig::default()).unwrap();
        assert!(!auth.clients_need_token());
        assert!(!auth.backend_needs_api_key());
        for token in [None, Some(""), Some("garbage")] {
            let s = auth.authenticate(token).unwrap();
            assert_eq!(s.user(), None);
            assert_eq!(s.expires_at(), None);
            assert!(s.may_subscribe("chat:x"));
            assert!(s.may_publish("user:bob"));
        }
        assert!(auth.check_api_key(None).is_ok());
    }

    #[test]
    fn the_api_key_is_checked_only_when_set() {
        let auth = api_auth("s3cr3t-key");
        assert!(auth.backend_needs_api_key());
        assert!(!auth.clients_need_token());
        assert!(auth.check_api_key(Some("Bearer s3cr3t-key")).is_ok());
        assert!(matches!(
            auth.check_api_key(None),
            Err(AuthError::MissingApiKey)
        ));
        assert!(secret_auth().check_api_key(None).is_ok());
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let cases: [(AuthConfig, &str); 9] = [
            (
                AuthConfig {
                    jwt_secret: Some(SECRET.to_vec()),
                    jwt_public_key_pem: Some(EC_PUBLIC_PEM.as_bytes().to_vec()),
                    api_key: None,
                },
                "not both",
            ),
            (
                AuthConfig {
                    jwt_secret: Some(Vec::new()),
                    ..AuthConfig::default()
                },
                "secret is empty",
            ),
            (
                AuthConfig {
                    api_key: Some(String::new()),
                    ..AuthConfig::default()
                },
                "API key is empty",
            ),
            (
                AuthConfig {
                    api_key: Some("key\n".to_owned()),
                    ..AuthConfig::default()
                },
                "newline",
            ),
            (
                AuthConfig {
                    jwt_public_key_pem: Some(b"not a pem".to_vec()),
                    ..AuthConfig::default()
                },
                "BEGIN",
            ),
            (
                AuthConfig {
                    jwt_public_key_pem: Some(EC_PRIVATE_PEM.as_bytes().to_vec()),
                    ..AuthConfig::default()
                },
                "private key",
            ),
            (
                AuthConfig {
                    jwt_public_key_pem: Some(EC_P384_PUBLIC_PEM.as_bytes().to_vec()),
                    ..AuthConfig::default()
                },
                "P-256",
            ),
            (
                AuthConfig {
                    jwt_public_key_pem: Some(ED25519_PUBLIC_PEM.as_bytes().to_vec()),
                    ..AuthConfig::default()
                },
                "Ed25519",
            ),
            (
                AuthConfig {
                    jwt_public_key_pem: Some(
                        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec(),
                    ),
                    ..AuthConfig::default()
                },
                "damaged",
            ),
        ];
        for (cfg, needle) in cases {
            let err = Authenticator::new(cfg).unwrap_err();
            assert!(matches!(err, AuthError::BadConfig(_)), "{err}");
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let cfg = AuthConfig {
            jwt_secret: Some(SECRET.to_vec()),
            jwt_public_key_pem: None,
            api_key: Some("s3cr3t-key".to_owned()),
        };
        let text = format!("{cfg:?} {:?}", Authenticator::new(cfg.clone()).unwrap());
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(!text.contains("test-secret"), "{text}");
    }

    #[test]
    fn error_labels() {
        assert_eq!(AuthError::Expired.code(), "unauthorized");
        assert_eq!(AuthError::BadApiKey.metric_label(), "bad_api_key");
    }
}
