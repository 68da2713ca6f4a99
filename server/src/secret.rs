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

/// A PostgreSQL connection string (URL or `key=value` form) with its
/// user information and every `password` parameter replaced by `***`.
pub fn redact_dsn(dsn: &str) -> String {
    let dsn = redact_url(dsn);
    let mut out = String::with_capacity(dsn.len());
    let mut rest = dsn.as_str();
    while let Some(at) = rest.find("password") {
        let (before, from) = rest.split_at(at + "password".len());
        out.push_str(before);
        let after_key = from.trim_start();
        let Some(value) = after_key.strip_prefix('=') else {
            rest = from;
            continue;
        };
        let value = value.trim_start();
        let end = match value.strip_prefix('\'') {
            // Quoted (key=value form): up to the closing quote; `\'` escapes one.
            Some(quoted) => {
                let mut escaped = false;
                quoted
                    .char_indices()
                    .find(|&(_, c)| {
                        let close = c == '\'' && !escaped;
                        escaped = c == '\\' && !escaped;
                        close
                    })
                    .map_or(value.len(), |(i, _)| i + 2)
            }
            None => value
                .find(|c: char| c.is_whitespace() || c == '&')
                .unwrap_or(value.len()),
        };
        out.push_str("=***");
        rest = &value[end..];
    }
    out.push_str(rest);
    out
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

    #[test]
    fn postgres_passwords_stay_out_of_the_redacted_dsn() {
        for (dsn, redacted) in [
            (
                "postgres://relay:s3cret@db:5432/app?sslmode=disable",
                "postgres://***@db:5432/app?sslmode=disable",
            ),
            (
                "postgresql://db/app?user=relay&password=s3cret&sslmode=disable",
                "postgresql://db/app?user=relay&password=***&sslmode=disable",
            ),
            (
                "host=db user=relay password=s3cret dbname=app",
                "host=db user=relay password=*** dbname=app",
            ),
            (
                r"host=db password = 'it\'s s3cret' dbname=app",
                "host=db password=*** dbname=app",
            ),
            ("host=db dbname=app", "host=db dbname=app"),
        ] {
            assert_eq!(redact_dsn(dsn), redacted, "{dsn}");
        }
        let config = Config::try_parse_from([
            "chorus-server",
            "--outbox",
            "postgres://relay:pg-pw-4@db/app",
        ])
        .unwrap();
        let text = format!("{config:?}");
        assert!(
            !text.contains("pg-pw-4") && text.contains("db/app"),
            "{text}"
        );
    }
}
