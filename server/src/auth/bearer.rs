//! `Authorization: Bearer <credentials>` (RFC 6750), for client tokens on
//! the WebSocket upgrade and for the backend API key alike.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER\tabc "), Some("abc"));
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Token abc"), None);
    }
}
