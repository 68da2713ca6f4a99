//! Secrets in the configuration (keys, passwords, URLs that may carry one):
//! their `Debug` forms hide them, so no `{:?}` of a config, an option set
//! or an error can put one in a log line.

use std::fmt;

/// A secret string (`--api-key`, `--jwt-secret`). `Debug` prints
/// `<redacted>`; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `url` with its user information (`user:password@`) replaced by `***`,
/// for logs, errors and `Debug`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::broker::{RedisOptions, RedisUrl};
    use crate::config::Config;
    use crate::upstream::ConsumerConfig;
    use clap::Parser;

    #[test]
    fn no_debug_form_shows_a_secret() {
        let config = Config::try_parse_from([
            "chorus-server",
            "--broker",
            "redis+sentinel://admin:redis-pw-1@s1:26379,s2:26379/chorus",
            "--api-key",
            "api-key-2",
            "--jwt-secret",
            "jwt-secret-3",
        ])
        .unwrap();
        let url = RedisUrl::parse(config.broker.as_str()).unwrap();
        let options = RedisOptions::new(url.clone(), "n1".into());
        let consumer = ConsumerConfig::new("redis://:redis-pw-1@h:6379", "g", "c", vec![]);
        let text = format!("{config:?} {url:?} {options:?} {consumer:?}");
        for secret in ["redis-pw-1", "api-key-2", "jwt-secret-3"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        // What is not secret still shows.
        assert!(
            text.contains("s1:26379") && text.contains("admin"),
            "{text}"
        );
        assert_eq!(config.api_key.unwrap().expose(), "api-key-2");
    }

    #[test]
    fn secrets_and_url_passwords_stay_out_of_debug() {
        assert_eq!(format!("{:?}", Secret::from("k3y")), "<redacted>");
        assert_eq!(Secret::from("k3y").expose(), "k3y");
        assert_eq!(
            redact_url("redis://user:pw@h:6379/0"),
            "redis://***@h:6379/0"
        );
        assert_eq!(
            redact_url("redis+sentinel://:p@w@a:1,b:2/m"),
            "redis+sentinel://***@a:1,b:2/m"
        );
        assert_eq!(redact_url("memory://"), "memory://");
    }
}
