//! Authentication and room permissions (README, "Auth").
//!
//! Pure: no I/O. The only outside input is the system clock, which
//! `jsonwebtoken` reads to check `exp`/`nbf`. Build one [`Authenticator`] at
//! start-up from an [`AuthConfig`]; it is cheap to share (`Arc`) or clone.
//!
//! # Client tokens (WebSocket)
//!
//! When a JWT secret or public key is configured, every WebSocket client must
//! present a JWT (`?token=` or `Authorization: Bearer`):
//!
//! - **Algorithms.** A shared secret accepts HS256 only; an RSA public key
//!   accepts RS256 only; an EC P-256 public key accepts ES256 only. The
//!   algorithm is fixed by the configured key, never chosen by the token, so
//!   algorithm-confusion attacks (`alg: none`, HS256 signed with the public
//!   key) are refused. Configuring both a secret and a public key is a
//!   start-up error.
//! - **`sub`** (string, required, non-empty): the user id.
//! - **`exp`** (integer seconds since the epoch, required): a token is good
//!   strictly before its `exp`, by this node's clock, with no leeway — the
//!   same instant at which a connection opened with it is closed, so an
//!   expired token never gets a session that ends at once. `nbf`, if
//!   present, is checked with [`NBF_LEEWAY_SECS`] of leeway for clock skew.
//!   `aud`/`iss` are not checked (no audience/issuer is configured).
//! - **`rooms`** (optional list of patterns): rooms the client may subscribe to.
//!   **Absent (or `null`) → any room.** Present → only matching rooms; `[]`
//!   means only the personal room.
//! - **`publish`** (optional list of patterns): rooms the client may publish
//!   to. **Absent (or `null`) → the same rooms it may subscribe to** (so a
//!   token with neither claim may do everything). Present → only matching
//!   rooms, independent of `rooms`.
//! - **Personal room.** `user:<sub>` is always allowed, for both subscribing
//!   and publishing, whatever the claims say.
//! - **Patterns.** `*` matches every room; `prefix:*` matches every room that
//!   begins with `prefix:` (so `chat:*` matches `chat:lobby` and `chat:a:b`,
//!   not `chat` nor `chatter`); anything else is an exact room name. A pattern
//!   that is none of these (`chat*`, `a*b`, empty, characters outside the room
//!   alphabet `[A-Za-z0-9_:.@-]`, longer than 256 bytes) makes the whole token
//!   invalid: fail closed, with the reason in the error.
//!
//! When no JWT key is configured, client auth is off: any token is ignored and
//! every client gets [`Session::anonymous`], which may do everything.
//!
//! # Backend API key (HTTP API)
//!
//! Separate from client tokens: `Authorization: Bearer <api key>`, compared in
//! constant time (the length of the key may still leak, as usual). When no API
//! key is configured, every call is allowed.
//!
//! Room-name validity (`bad_room`) is the protocol layer's job: the `may_*`
//! checks here assume an already valid room name.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Leeway, in seconds, when checking `nbf` (clock skew between the token
/// issuer and this node). `exp` has none.
pub const NBF_LEEWAY_SECS: u64 = 30;

/// Longest room name the protocol allows, in bytes (`bad_room`).
const MAX_ROOM_LEN: usize = 256;

/// Prefix of a user's personal room: `user:<sub>`.
pub const PERSONAL_ROOM_PREFIX: &str = "user:";

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
#[derive(Clone)]
pub struct Authenticator {
    /// `None`: client auth is off.
    jwt: Option<JwtCheck>,
    /// `None`: the backend API is open.
    api_key: Option<Vec<u8>>,
}

#[derive(Clone)]
struct JwtCheck {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
}

impl JwtCheck {
    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = NBF_LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Checked here, without the leeway (see `authenticate`).
        validation.validate_exp = false;
        validation.validate_nbf = true;
        // No audience is configured; with this on, jsonwebtoken would refuse
        // every token that carries an `aud` claim.
        validation.validate_aud = false;
        Self {
            key,
            algorithm,
            validation,
        }
    }

    /// Accepts `PUBLIC KEY` (SPKI, RSA or EC) and `RSA PUBLIC KEY` (PKCS#1).
    fn from_public_pem(pem: &[u8]) -> Result<Self, AuthError> {
        let bad = |why: String| AuthError::BadConfig(format!("JWT public key: {why}"));
        let text = std::str::from_utf8(pem)
            .map_err(|_| bad("not PEM text (not valid UTF-8)".to_owned()))?;
        let label = pem_label(text).ok_or_else(|| {
            bad("no `-----BEGIN ...-----` line; a PEM public key is expected".to_owned())
        })?;
        match label {
            "PUBLIC KEY" | "RSA PUBLIC KEY" => {}
            "CERTIFICATE" => {
                return Err(bad("got a certificate; give its public key \
                     (`openssl x509 -in cert.pem -pubkey -noout`)"
                    .to_owned()));
            }
            l if l.contains("PRIVATE KEY") => {
                return Err(bad(format!(
                    "got a private key ({l}); give the public key only \
                     (`openssl pkey -in key.pem -pubout`)"
                )));
            }
            other => {
                return Err(bad(format!(
                    "unsupported PEM block `{other}`; expected `PUBLIC KEY`"
                )));
            }
        }
        let der = pem::parse(pem)
            .map_err(|e| bad(format!("damaged PEM: {e}")))?
            .into_contents();
        // Both verifiers take the DER as it is (SPKI, or PKCS#1 for RSA);
        // parse it here so that a key that cannot verify anything is refused
        // at start, not at the first token.
        let parses = |algorithm| signature::ParsedPublicKey::new(algorithm, &der).is_ok();
        if parses(&signature::RSA_PKCS1_2048_8192_SHA256) {
            return Ok(Self::new(DecodingKey::from_rsa_der(&der), Algorithm::RS256));
        }
        if parses(&signature::ECDSA_P256_SHA256_FIXED) {
            return Ok(Self::new(DecodingKey::from_ec_der(&der), Algorithm::ES256));
        }
        Err(bad(
            "not an RSA (2048 to 8192 bits) or P-256 EC public key, or a damaged one \
             (RS256 and ES256 are supported; other curves and Ed25519 are not)"
                .to_owned(),
        ))
    }
}

/// The label of the first `-----BEGIN <label>-----` line.
fn pem_label(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt_algorithm", &self.jwt.as_ref().map(|j| j.algorithm))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
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
            (Some(secret), None) => {
                if secret.is_empty() {
                    return Err(AuthError::BadConfig("JWT secret is empty".to_owned()));
                }
                Some(JwtCheck::new(
                    DecodingKey::from_secret(&secret),
                    Algorithm::HS256,
                ))
            }
            (None, Some(pem)) => Some(JwtCheck::from_public_pem(&pem)?),
            (None, None) => None,
        };
        let api_key = match cfg.api_key {
            None => None,
            Some(key) if key.is_empty() => {
                return Err(AuthError::BadConfig("API key is empty".to_owned()));
            }
            // A header value cannot carry it after `Bearer `: it would never
            // match. Usually a trailing newline read from a file.
            Some(key) if !key.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(AuthError::BadConfig(
                    "API key contains whitespace or non-printable/non-ASCII characters \
                     (a trailing newline from a file?)"
                        .to_owned(),
                ));
            }
            Some(key) => Some(key.into_bytes()),
        };
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
        self.jwt.as_ref().map(|j| j.algorithm)
    }

    /// Authenticate a WebSocket client from the `?token=` query value or the
    /// `Authorization: Bearer` header value (already stripped of `Bearer `;
    /// see [`bearer_token`]).
    ///
    /// With no JWT key configured, returns [`Session::anonymous`] whatever the
    /// token. Otherwise a missing or empty token is [`AuthError::MissingToken`].
    pub fn authenticate(&self, token: Option<&str>) -> Result<Session, AuthError> {
        let Some(jwt) = &self.jwt else {
            return Ok(Session::anonymous());
        };
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        let data = jsonwebtoken::decode::<Claims>(token, &jwt.key, &jwt.validation)
            .map_err(|e| token_error(&e, jwt.algorithm))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if data.claims.exp <= now {
            return Err(AuthError::Expired);
        }
        Session::from_claims(data.claims)
    }

    /// Check a backend HTTP API call's whole `Authorization` header value
    /// (e.g. `"Bearer abc"`). Constant-time compare. `Ok` when no API key is
    /// configured.
    pub fn check_api_key(&self, authorization_header: Option<&str>) -> Result<(), AuthError> {
        let Some(expected) = &self.api_key else {
            return Ok(());
        };
        let header = authorization_header
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .ok_or(AuthError::MissingApiKey)?;
        let given = bearer_token(header).ok_or(AuthError::BadApiKey)?;
        if bool::from(given.as_bytes().ct_eq(expected)) {
            Ok(())
        } else {
            Err(AuthError::BadApiKey)
        }
    }
}

/// The credentials of an `Authorization: Bearer <credentials>` header value;
/// the scheme is case-insensitive. `None` for another scheme or no
/// credentials.
pub fn bearer_token(header_value: &str) -> Option<&str> {
    let (scheme, rest) = header_value
        .trim()
        .split_once(|c: char| c.is_ascii_whitespace())?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Turns a `jsonwebtoken` failure into our error, with a reason a client
/// developer can act on (never anything about the key).
fn token_error(e: &jsonwebtoken::errors::Error, expected: Algorithm) -> AuthError {
    let why = match e.kind() {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::InvalidSignature => "signature does not match".to_owned(),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            format!("algorithm not accepted (this server takes {expected:?})")
        }
        ErrorKind::ImmatureSignature => "not valid yet (`nbf` is in the future)".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim `{c}`"),
        ErrorKind::InvalidClaimFormat(c) => format!("claim `{c}` has the wrong type"),
        ErrorKind::Json(err) => format!("malformed JSON: {err}"),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "not a JWT (expected three base64url parts: header.payload.signature)".to_owned()
        }
        other => format!("{other:?}"),
    };
    AuthError::InvalidToken(why)
}

/// The claims Chorus reads from a client token; others are ignored.
/// Public so tests and token-minting tools can build tokens with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id. Required, non-empty.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch. Required.
    pub exp: u64,
    /// Rooms the client may subscribe to; `None`: any room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// Rooms the client may publish to; `None`: same as for subscribing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
}

/// What an authenticated client may do, for the life of its connection.
#[derive(Clone, Debug)]
pub struct Session {
    /// `sub`; `None` for an anonymous session.
    user: Option<String>,
    /// `user:<sub>`, always allowed.
    personal_room: Option<String>,
    subscribe: Grant,
    publish: Grant,
    expires_at: Option<SystemTime>,
}

impl Session {
    /// The session of every client when auth is off: everything allowed, no
    /// user, no expiry.
    pub fn anonymous() -> Self {
        Self {
            user: None,
            personal_room: None,
            subscribe: Grant::Any,
            publish: Grant::Any,
            expires_at: None,
        }
    }

    /// The session for already verified claims (signature and `exp` are the
    /// caller's business). Checks `sub` and the patterns.
    pub fn from_claims(claims: Claims) -> Result<Self, AuthError> {
        if claims.sub.is_empty() {
            return Err(AuthError::InvalidToken("claim `sub` is empty".to_owned()));
        }
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .ok_or_else(|| AuthError::InvalidToken("claim `exp` is out of range".to_owned()))?;
        let subscribe = Grant::from_claim("rooms", claims.rooms)?;
        let publish = match claims.publish {
            None => subscribe.clone(),
            Some(list) => Grant::from_claim("publish", Some(list))?,
        };
        Ok(Self {
            personal_room: Some(format!("{PERSONAL_ROOM_PREFIX}{}", claims.sub)),
            user: Some(claims.sub),
            subscribe,
            publish,
            expires_at: Some(expires_at),
        })
    }

    /// The user id (`sub`); `None` when anonymous.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The personal room `user:<sub>`; `None` when anonymous.
    pub fn personal_room(&self) -> Option<&str> {
        self.personal_room.as_deref()
    }

    /// May this client subscribe to `room`? (`forbidden` when not.)
    pub fn may_subscribe(&self, room: &str) -> bool {
        self.is_personal(room) || self.subscribe.allows(room)
    }

    /// May this client publish to `room`? (`forbidden` when not.)
    pub fn may_publish(&self, room: &str) -> bool {
        self.is_personal(room) || self.publish.allows(room)
    }

    /// When the token expires (its `exp`, without leeway); `None` when
    /// anonymous.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    fn is_personal(&self, room: &str) -> bool {
        self.personal_room.as_deref() == Some(room)
    }
}

/// The rooms one claim grants.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Grant {
    /// Claim absent.
    Any,
    /// Claim present: rooms matching one of these (none if empty).
    Only(Vec<Pattern>),
}

impl Grant {
    fn from_claim(claim: &str, list: Option<Vec<String>>) -> Result<Self, AuthError> {
        let Some(list) = list else {
            return Ok(Self::Any);
        };
        list.iter()
            .map(|p| {
                Pattern::parse(p).ok_or_else(|| {
                    AuthError::InvalidToken(format!(
                        "claim `{claim}`: {p:?} is not a room name, `prefix:*` or `*`"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::Only)
    }

    fn allows(&self, room: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(patterns) => patterns.iter().any(|p| p.matches(room)),
        }
    }
}

/// One entry of `rooms` / `publish`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `*`
    All,
    /// `prefix:*`, stored as `prefix:`.
    Prefix(String),
    /// A room name.
    Exact(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Option<Self> {
        if s == "*" {
            return Some(Self::All);
        }
        if let Some(prefix) = s.strip_suffix('*') {
            return (prefix.len() > 1 && prefix.ends_with(':') && is_room_text(prefix))
                .then(|| Self::Prefix(prefix.to_owned()));
        }
        is_room_text(s).then(|| Self::Exact(s.to_owned()))
    }

    pub fn matches(&self, room: &str) -> bool {
        match self {
            Self::All => true,
            Self::Prefix(prefix) => room.starts_with(prefix.as_str()),
            Self::Exact(name) => room == name,
        }
    }
}

/// Non-empty, at most 256 bytes, only `[A-Za-z0-9_:.@-]`.
fn is_room_text(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ROOM_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'@' | b'-'))
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
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};

    const SECRET: &[u8] = b"test-secret-of-at-least-32-bytes!!";

    // Generated with openssl for these tests only:
    //   openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt
    const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgvmpIo0QOIQcrW1rE
XBvLfPcksu/F6biTxJn40ts9rVihRANCAATjFz2jN9GuGpLRcQMCumo3AFcFhVkm
A+0xXnEnhZMOy2OkyW46dslMTJ1JW0Vx3JoC1ON1999N8deBvc4BMYNj
-----END PRIVATE KEY-----
";
    //   openssl ec -in ec.key -pubout
    const EC_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE4xc9ozfRrhqS0XEDArpqNwBXBYVZ
JgPtMV5xJ4WTDstjpMluOnbJTEydSVtFcdyaAtTjdfffTfHXgb3OATGDYw==
-----END PUBLIC KEY-----
";
    //   openssl ecparam -name secp384r1 -genkey -noout | openssl ec -pubout
    const EC_P384_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEleSELHJgwX/hLQ2O5Z0LPloCC2wOIlZS
KVLvdxN98Jw9eotsnYNtT2CNUvU4VROoH8SEXoQnEOYhqHzuKYsPN6KhHlG6XkN5
CpenXQxZ2deI7BH/RLaplQB65ghhxlh5
-----END PUBLIC KEY-----
";
    //   openssl genpkey -algorithm ed25519 | openssl pkey -pubout
    const ED25519_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA8ufb0cHEVq6psOT+hcJ6XCk0rVgjEA1kXdqMmygEaOQ=
-----END PUBLIC KEY-----
";
    //   openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 | openssl rsa -traditional
    const RSA_PRIVATE_PEM: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEA06mHv+9w9y/C+MXBfxavCjwt6l3OUZqSQbE0LXDL9nYX+Wh8
o/sYhY0VKXlOrH0MGYPgRgfGJGQnIoMhwqdNO3794UYuBS/13GpBIeS5hXnP9q6b
L94gWnWiQUSgDl0H36AeZFefmB4JKHYEcSSPbV5b0kVoHUAbJLVmC/8njg/A1IV6
ZgvMHyspk6s7paWsX//KF+fBWN7JkXO2oFd1HlYKcG7iJpq7JrP4yZG5EYviypxE
5gFCWTnru5mBZdQjiyr/2IWLbkadX39qkOz1EL12wh5ZfN774Y04VRmH1+cqLnNq
cJ016ULL9piWWyC0+8kxODVlPf93vm05tpz9RQIDAQABAoIBADrwjuImIW1bye2v
V8H1hZmSh3CnXYAAzHBpkW+D5PAFE4j6jRa2oa3yyu1JH9zNV3S1cdreaFES6Ijm
PhzvrISASN8VxVPhdpPBrNBs2jJuaLg3B/TM5HJ8JkoJe450XnBprHzhn4ni90bi
kjsVZLEeYPBNLoBSrRxMPRXjH9chTuFDV0jyq8flMHcfyndLe1/NWRHtdZucynUL
bbnZJEen/6O3gPA0KDouBGZdlLe+ijJcmejFXLvs9TZrpaqWHCtqF5/9SE8otbpN
7wHw5LkWAuCH6nUUBvpF3ngLjXwmVtlBMADHUrrixldDIpxT+j1176xN51nf46sM
R0crrrMCgYEA+pND8yRl1VYgqHRQWtstNCiJFTPKMWF5utUK4oxLRR7rc7dDyJa4
Vjh66XzBNwfUVDHxpyOyE0WgIDNKOq2/ytrNeuA5Tg30Q5oBvNXN2/RyRlHMnriJ
ynMFVdIYkgyiBiceuK6D/71ZAwa5uAIjXqMFjqrKzGY0f84RFIiY0z8CgYEA2D6a
A9GvqTe/qwpEhDwBUn+9HSRFaGScBkIsSamM8I9WZg0IDJyLB7t1vio+R/yG/JUi
YbNsCfnfAZVNJlqLnTNE1kRLbAT6wXqH/d+YWEyILroNW7qR1ZvUIu2y4Y5dKdBT
0GNp1EL+8VDA+Fk/dM8WCEO00qeP3KJ8Rz83AnsCgYABr6YAZ9lLkzXLDGVSBzGJ
rVAm1V9h7677A9374kfLYkbhU3VgTytUYTLqiU1fimzyWBexMTtMh+Zo8Q9pz6t/
uPMzBXk9PjjLj6i9VY76EO4H7Rr8Ym+C7j0186D4sp8QfYjmYz4+JU8JBy2OwGzu
gRhTenC86V8nEQLqaXTlzwKBgD7fnMpFemyaD/l8J8XG6J+DEopZlHCw6AiNzvCw
ApGjK3zKhy+biHT8FVTwVWF61Ai2l+OOVnhkFWoRbfgb1YIkePxPqRpELGB67vVq
wJHT1ri3UdD84xAXmct6D0uzp/TTZLsvXILh49xoHWNYF7Ivz/khLn8dRx/ggn/4
qlbnAoGBAKFJ14QPFYwWlAxLMYTYpCtH9afOD4tPMLrO4D/pyM6+kl4jm20Pj0nF
NdrZQxULwbagUVRuPsQ8sQniw0NlpBv5FM6HEE82u2R8cIUiVlmGyvM0BKIY4meE
ZqvrmV5Biwy3PuvcJ3Pj+1ldsFS6vGg62AzaUY0lRaBHklzP57JS
-----END RSA PRIVATE KEY-----
";
    //   openssl rsa -in rsa.pem -pubout
    const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA06mHv+9w9y/C+MXBfxav
Cjwt6l3OUZqSQbE0LXDL9nYX+Wh8o/sYhY0VKXlOrH0MGYPgRgfGJGQnIoMhwqdN
O3794UYuBS/13GpBIeS5hXnP9q6bL94gWnWiQUSgDl0H36AeZFefmB4JKHYEcSSP
bV5b0kVoHUAbJLVmC/8njg/A1IV6ZgvMHyspk6s7paWsX//KF+fBWN7JkXO2oFd1
HlYKcG7iJpq7JrP4yZG5EYviypxE5gFCWTnru5mBZdQjiyr/2IWLbkadX39qkOz1
EL12wh5ZfN774Y04VRmH1+cqLnNqcJ016ULL9piWWyC0+8kxODVlPf93vm05tpz9
RQIDAQAB
-----END PUBLIC KEY-----
";

    /// The DER inside a PEM block (PKCS#8 for EC, PKCS#1 for RSA private keys).
    fn der(pem: &str) -> Vec<u8> {
        pem::parse(pem).unwrap().into_contents()
    }

    fn claims(sub: &str) -> Claims {
        Claims {
            sub: sub.to_owned(),
            exp: get_current_timestamp() + 600,
            rooms: None,
            publish: None,
        }
    }

    fn list(items: &[&str]) -> Option<Vec<String>> {
        Some(items.iter().map(|s| (*s).to_owned()).collect())
    }

    fn hs256(claims: &impl Serialize, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn secret_auth() -> Authenticator {
        Authenticator::new(AuthConfig {
            jwt_secret: Some(SECRET.to_vec()),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn pem_auth(pem: &str) -> Result<Authenticator, AuthError> {
        Authenticator::new(AuthConfig {
            jwt_public_key_pem: Some(pem.as_bytes().to_vec()),
            ..AuthConfig::default()
        })
    }

    fn api_auth(key: &str) -> Authenticator {
        Authenticator::new(AuthConfig {
            api_key: Some(key.to_owned()),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn session(c: &Claims) -> Session {
        secret_auth().authenticate(Some(&hs256(c, SECRET))).unwrap()
    }

    #[test]
    fn valid_hs256_token_gives_its_permissions() {
        let mut c = claims("alice");
        c.rooms = list(&["chat:*", "news"]);
        c.publish = list(&["chat:lobby"]);
        let auth = secret_auth();
        assert!(auth.clients_need_token());
        assert_eq!(auth.jwt_algorithm(), Some(Algorithm::HS256));
        let s = auth.authenticate(Some(&hs256(&c, SECRET))).unwrap();

        assert_eq!(s.user(), Some("alice"));
        assert_eq!(s.personal_room(), Some("user:alice"));
        assert_eq!(
            s.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(c.exp))
        );
        assert!(s.may_subscribe("chat:lobby"));
        assert!(s.may_subscribe("chat:a:b"));
        assert!(s.may_subscribe("news"));
        assert!(!s.may_subscribe("news:sport"));
        assert!(!s.may_subscribe("chat"));
        assert!(!s.may_subscribe("chatter"));
        assert!(!s.may_subscribe("other"));
        assert!(s.may_publish("chat:lobby"));
        assert!(!s.may_publish("chat:other"));
        assert!(!s.may_publish("news"));
        // Personal room, both ways, whatever the claims.
        assert!(s.may_subscribe("user:alice"));
        assert!(s.may_publish("user:alice"));
        assert!(!s.may_subscribe("user:bob"));
        assert!(!s.may_publish("user:bob"));
    }

    #[test]
    fn absent_claims_allow_everything_and_publish_follows_rooms() {
        let s = session(&claims("alice"));
        assert!(s.may_subscribe("anything"));
        assert!(s.may_publish("anything"));
        assert!(s.may_publish("user:bob"));

        let mut c = claims("alice");
        c.rooms = list(&["chat:*"]);
        let s = session(&c);
        assert!(s.may_publish("chat:x"));
        assert!(!s.may_publish("news"));
        assert!(!s.may_subscribe("news"));

        // `publish` present, `rooms` absent: subscribe anywhere, publish only there.
        let mut c = claims("alice");
        c.publish = list(&["chat:*"]);
        let s = session(&c);
        assert!(s.may_subscribe("news"));
        assert!(s.may_publish("chat:x"));
        assert!(!s.may_publish("news"));
    }

    #[test]
    fn empty_lists_leave_only_the_personal_room() {
        let mut c = claims("alice");
        c.rooms = list(&[]);
        c.publish = list(&[]);
        let s = session(&c);
        assert!(!s.may_subscribe("chat:x"));
        assert!(!s.may_publish("chat:x"));
        assert!(s.may_subscribe("user:alice"));
        assert!(s.may_publish("user:alice"));
    }

    #[test]
    fn star_matches_everything() {
        let mut c = claims("alice");
        c.rooms = list(&["*"]);
        c.publish = list(&["news"]);
        let s = session(&c);
        assert!(s.may_subscribe("a"));
        assert!(s.may_subscribe("x:y:z"));
        assert!(s.may_publish("news"));
        assert!(!s.may_publish("a"));
    }

    #[test]
    fn pattern_parsing() {
        assert_eq!(Pattern::parse("*"), Some(Pattern::All));
        assert_eq!(
            Pattern::parse("chat:*"),
            Some(Pattern::Prefix("chat:".to_owned()))
        );
        assert_eq!(
            Pattern::parse("a.b@c-d_e:f"),
            Some(Pattern::Exact("a.b@c-d_e:f".to_owned()))
        );
        for bad in [
            "",
            "chat*",
            "a*b",
            ":*",
            "**",
            "chat:**",
            "room with space",
            "é",
        ] {
            assert_eq!(Pattern::parse(bad), None, "{bad:?}");
        }
        assert!(Pattern::parse(&"a".repeat(256)).is_some());
        assert!(Pattern::parse(&"a".repeat(257)).is_none());
    }

    #[test]
    fn bad_pattern_invalidates_the_token() {
        let mut c = claims("alice");
        c.publish = list(&["chat*"]);
        let err = secret_auth()
            .authenticate(Some(&hs256(&c, SECRET)))
            .unwrap_err();
        assert!(
            matches!(&err, AuthError::InvalidToken(why) if why.contains("publish")),
            "{err}"
        );
    }

    #[test]
    fn expired_token() {
        let mut c = claims("alice");
        c.exp = get_current_timestamp() - 3600;
        let err = secret_auth()
            .authenticate(Some(&hs256(&c, SECRET)))
            .unwrap_err();
        assert!(matches!(err, AuthError::Expired), "{err}");
    }

    #[test]
    fn a_token_expires_at_its_exp_with_no_leeway() {
        for ago in [5, 0] {
            let mut c = claims("alice");
            c.exp = get_current_timestamp() - ago;
            let err = secret_auth()
                .authenticate(Some(&hs256(&c, SECRET)))
                .unwrap_err();
            assert!(matches!(err, AuthError::Expired), "{ago}s ago: {err}");
        }
        let mut c = claims("alice");
        c.exp = get_current_timestamp() + 5;
        assert!(secret_auth().authenticate(Some(&hs256(&c, SECRET))).is_ok());
    }

    #[test]
    fn wrong_secret_is_invalid() {
        let token = hs256(&claims("alice"), b"another-secret");
        let err = secret_auth().authenticate(Some(&token)).unwrap_err();
        assert!(
            matches!(&err, AuthError::InvalidToken(why) if why.contains("signature")),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_invalid() {
        for token in ["abc", "a.b.c", "x.y"] {
            let err = secret_auth().authenticate(Some(token)).unwrap_err();
            assert!(matches!(err, AuthError::InvalidToken(_)), "{token}: {err}");
        }
    }

    #[test]
    fn missing_claims_are_invalid() {
        #[derive(Serialize)]
        struct NoSub {
            exp: u64,
        }
        #[derive(Serialize)]
        struct NoExp {
            sub: &'static str,
        }
        let auth = secret_auth();
        for token in [
            hs256(
                &NoSub {
                    exp: get_current_timestamp() + 600,
                },
                SECRET,
            ),
            hs256(&NoExp { sub: "alice" }, SECRET),
            hs256(&claims(""), SECRET),
        ] {
            let err = auth.authenticate(Some(&token)).unwrap_err();
            assert!(matches!(err, AuthError::InvalidToken(_)), "{err}");
        }
    }

    #[test]
    fn extra_claims_are_ignored() {
        let token = hs256(
            &serde_json::json!({
                "sub": "alice", "exp": get_current_timestamp() + 600,
                "aud": "someone", "iss": "issuer", "iat": 1, "name": "Alice",
            }),
            SECRET,
        );
        assert_eq!(
            secret_auth().authenticate(Some(&token)).unwrap().user(),
            Some("alice")
        );
    }

    #[test]
    fn future_nbf_is_invalid() {
        let token = hs256(
            &serde_json::json!({
                "sub": "alice", "exp": get_current_timestamp() + 600,
                "nbf": get_current_timestamp() + 300,
            }),
            SECRET,
        );
        let err = secret_auth().authenticate(Some(&token)).unwrap_err();
        assert!(matches!(err, AuthError::InvalidToken(_)), "{err}");
    }

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
    fn api_key() {
        let auth = api_auth("s3cr3t-key");
        assert!(auth.backend_needs_api_key());
        assert!(!auth.clients_need_token());
        assert!(auth.check_api_key(Some("Bearer s3cr3t-key")).is_ok());
        assert!(auth.check_api_key(Some("bearer  s3cr3t-key ")).is_ok());
        for wrong in [
            "Bearer s3cr3t-kez",
            "Bearer s3cr3t",
            "Bearer s3cr3t-key2",
            "s3cr3t-key",
            "Basic s3cr3t-key",
            "Bearer",
        ] {
            assert!(
                matches!(auth.check_api_key(Some(wrong)), Err(AuthError::BadApiKey)),
                "{wrong}"
            );
        }
        assert!(matches!(
            auth.check_api_key(None),
            Err(AuthError::MissingApiKey)
        ));
        assert!(matches!(
            auth.check_api_key(Some("")),
            Err(AuthError::MissingApiKey)
        ));
        // Not configured: open.
        assert!(secret_auth().check_api_key(None).is_ok());
    }

    #[test]
    fn bearer_token_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER\tabc "), Some("abc"));
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Token abc"), None);
    }

    #[test]
    fn es256_token() {
        let auth = pem_auth(EC_PUBLIC_PEM).unwrap();
        assert_eq!(auth.jwt_algorithm(), Some(Algorithm::ES256));
        let mut c = claims("carol");
        c.rooms = list(&["game:*"]);
        let key = EncodingKey::from_ec_der(&der(EC_PRIVATE_PEM));
        let token = encode(&Header::new(Algorithm::ES256), &c, &key).unwrap();
        let s = auth.authenticate(Some(&token)).unwrap();
        assert_eq!(s.user(), Some("carol"));
        assert!(s.may_subscribe("game:1"));
        assert!(!s.may_subscribe("chat:1"));

        // An HS256 token signed with the public key bytes is refused.
        let forged = hs256(&c, EC_PUBLIC_PEM.as_bytes());
        let err = auth.authenticate(Some(&forged)).unwrap_err();
        assert!(
            matches!(&err, AuthError::InvalidToken(why) if why.contains("algorithm")),
            "{err}"
        );
    }

    #[test]
    fn rs256_token() {
        let auth = pem_auth(RSA_PUBLIC_PEM).unwrap();
        assert_eq!(auth.jwt_algorithm(), Some(Algorithm::RS256));
        let key = EncodingKey::from_rsa_der(&der(RSA_PRIVATE_PEM));
        let token = encode(&Header::new(Algorithm::RS256), &claims("dave"), &key).unwrap();
        assert_eq!(
            auth.authenticate(Some(&token)).unwrap().user(),
            Some("dave")
        );

        // Signed by another key (the EC one): refused.
        let ec = EncodingKey::from_ec_der(&der(EC_PRIVATE_PEM));
        let token = encode(&Header::new(Algorithm::ES256), &claims("dave"), &ec).unwrap();
        assert!(matches!(
            auth.authenticate(Some(&token)),
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        // {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (empty)
        let token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.\
                     eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        let err = secret_auth().authenticate(Some(token)).unwrap_err();
        assert!(matches!(err, AuthError::InvalidToken(_)), "{err}");
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
