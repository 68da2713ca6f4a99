//! Keys, claims and authenticators for the auth tests.
#![allow(clippy::unwrap_used)]

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde::Serialize;

use super::{AuthConfig, AuthError, Authenticator, Claims, Grants};

pub const SECRET: &[u8] = b"test-secret-of-at-least-32-bytes!!";

// Generated with openssl for these tests only:
//   openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt
pub const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgvmpIo0QOIQcrW1rE
XBvLfPcksu/F6biTxJn40ts9rVihRANCAATjFz2jN9GuGpLRcQMCumo3AFcFhVkm
A+0xXnEnhZMOy2OkyW46dslMTJ1JW0Vx3JoC1ON1999N8deBvc4BMYNj
-----END PRIVATE KEY-----
";
//   openssl ec -in ec.key -pubout
pub const EC_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE4xc9ozfRrhqS0XEDArpqNwBXBYVZ
JgPtMV5xJ4WTDstjpMluOnbJTEydSVtFcdyaAtTjdfffTfHXgb3OATGDYw==
-----END PUBLIC KEY-----
";
//   openssl ecparam -name secp384r1 -genkey -noout | openssl ec -pubout
pub const EC_P384_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEleSELHJgwX/hLQ2O5Z0LPloCC2wOIlZS
KVLvdxN98Jw9eotsnYNtT2CNUvU4VROoH8SEXoQnEOYhqHzuKYsPN6KhHlG6XkN5
CpenXQxZ2deI7BH/RLaplQB65ghhxlh5
-----END PUBLIC KEY-----
";
//   openssl genpkey -algorithm ed25519 | openssl pkey -pubout
pub const ED25519_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA8ufb0cHEVq6psOT+hcJ6XCk0rVgjEA1kXdqMmygEaOQ=
-----END PUBLIC KEY-----
";
//   openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 | openssl rsa -traditional
pub const RSA_PRIVATE_PEM: &str = "-----BEGIN RSA PRIVATE KEY-----
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
pub const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
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
pub fn der(pem: &str) -> Vec<u8> {
    pem::parse(pem).unwrap().into_contents()
}

pub fn claims(sub: &str) -> Claims {
    Claims {
        sub: sub.to_owned(),
        exp: get_current_timestamp() + 600,
        rooms: None,
        publish: None,
    }
}

pub fn list(items: &[&str]) -> Option<Vec<String>> {
    Some(items.iter().map(|s| (*s).to_owned()).collect())
}

pub fn hs256(claims: &impl Serialize, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

pub fn secret_auth() -> Authenticator {
    Authenticator::new(AuthConfig {
        jwt_secret: Some(SECRET.to_vec()),
        ..AuthConfig::default()
    })
    .unwrap()
}

pub fn pem_auth(pem: &str) -> Result<Authenticator, AuthError> {
    Authenticator::new(AuthConfig {
        jwt_public_key_pem: Some(pem.as_bytes().to_vec()),
        ..AuthConfig::default()
    })
}

pub fn api_auth(key: &str) -> Authenticator {
    Authenticator::new(AuthConfig {
        api_key: Some(key.to_owned()),
        ..AuthConfig::default()
    })
    .unwrap()
}

pub fn grants(c: &Claims) -> Grants {
    secret_auth().authenticate(Some(&hs256(c, SECRET))).unwrap()
}
