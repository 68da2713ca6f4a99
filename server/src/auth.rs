//! Temporary: API key only (replaced by the full auth module).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig { pub jwt_secret: Option<Vec<u8>>, pub jwt_public_key_pem: Option<Vec<u8>>, pub api_key: Option<String> }
pub struct Authenticator { api_key: Option<String> }
#[derive(Debug, thiserror::Error)]
pub enum AuthError { #[error("missing or wrong API key")] BadApiKey }
#[derive(Clone, Debug)]
pub struct Session;
impl Authenticator {
    pub fn new(cfg: AuthConfig) -> Result<Self, AuthError> { Ok(Self { api_key: cfg.api_key }) }
    pub fn clients_need_token(&self) -> bool { false }
    pub fn authenticate(&self, _token: Option<&str>) -> Result<Session, AuthError> { Ok(Session) }
    pub fn check_api_key(&self, h: Option<&str>) -> Result<(), AuthError> {
        match &self.api_key { None => Ok(()), Some(k) => if h.and_then(|h| h.strip_prefix("Bearer ")) == Some(k.as_str()) { Ok(()) } else { Err(AuthError::BadApiKey) } }
    }
}
impl Session {
    pub fn anonymous() -> Self { Session }
    pub fn user(&self) -> Option<&str> { None }
    pub fn may_subscribe(&self, _room: &str) -> bool { true }
    pub fn may_publish(&self, _room: &str) -> bool { true }
    pub fn expires_at(&self) -> Option<std::time::SystemTime> { None }
}
