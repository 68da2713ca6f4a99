//! Client tokens (WebSocket): JWTs, checked against one configured key.
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
//! - **`rooms`**, **`publish`**: what the connection may do; see
//!   [`super::session`].

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use super::AuthError;

/// Leeway, in seconds, when checking `nbf` (clock skew between the token
/// issuer and this node). `exp` has none.
pub const NBF_LEEWAY_SECS: u64 = 30;

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

/// The configured key and what a token must be to pass it.
#[derive(Clone)]
pub(crate) struct JwtCheck {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
}

// By hand: the key stays out of logs.
impl fmt::Debug for JwtCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtCheck")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl JwtCheck {
    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = NBF_LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Checked in `verify`, without the leeway.
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

    /// HS256 with a shared secret.
    pub(crate) fn from_secret(secret: &[u8]) -> Result<Self, AuthError> {
        if secret.is_empty() {
            return Err(AuthError::BadConfig("JWT secret is empty".to_owned()));
        }
        Ok(Self::new(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
        ))
    }

    /// Accepts `PUBLIC KEY` (SPKI, RSA or EC) and `RSA PUBLIC KEY` (PKCS#1).
    pub(crate) fn from_public_pem(pem: &[u8]) -> Result<Self, AuthError> {
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

    pub(crate) fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The claims of a token with a good signature, before its `exp`.
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| token_error(&e, self.algorithm))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if data.claims.exp <= now {
            return Err(AuthError::Expired);
        }
        Ok(data.claims)
    }
}

/// The label of the first `-----BEGIN <label>-----` line.
fn pem_label(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};

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
}
