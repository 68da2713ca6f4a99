//! `--broker` URLs for Redis:
//! `redis://[[user]:password@]host:port[/db]` and
//! `redis+sentinel://[[user]:password@]host:port[,host:port…]/<master-name>[/db]` and
//! `redis+cluster://[[user]:password@]host:port[,host:port…]` (any nodes of
//! a Redis Cluster: the rest is learnt from them; database 0 only).

use std::fmt;

/// Its `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub target: Target,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisUrl")
            .field("target", &self.target)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Direct(Addr),
    Sentinel {
        sentinels: Vec<Addr>,
        master: String,
    },
    /// Redis Cluster: the nodes to learn the topology from first.
    Cluster {
        seeds: Vec<Addr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Addr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad Redis URL `{url}`: {why}")]
pub struct UrlError {
    url: String,
    why: String,
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let fail = |why: &str| UrlError {
            url: crate::secret::redact_url(url),
            why: why.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| fail("missing scheme"))?;
        let (sentinel, cluster) = match scheme {
            "redis" => (false, false),
            "redis+sentinel" => (true, false),
            "redis+cluster" => (false, true),
            _ => {
                return Err(fail(
                    "scheme must be redis://, redis+sentinel:// or redis+cluster://",
                ));
            }
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pw)) => (
                    (!user.is_empty()).then(|| user.to_string()),
                    Some(pw.to_string()),
                ),
                None => (None, Some(u.to_string())),
            },
        };
        let password = password.filter(|p| !p.is_empty());
        let addrs = hosts
            .split(',')
            .map(|h| {
                parse_addr(h, if sentinel { 26379 } else { 6379 })
                    .ok_or_else(|| fail("bad host:port"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        let (target, db) = if sentinel {
            let master = segments
                .next()
                .ok_or_else(|| fail("missing /<master-name>"))?
                .to_string();
            (
                Target::Sentinel {
                    sentinels: addrs,
                    master,
                },
                segments.next(),
            )
        } else if cluster {
            if segments.next().is_some() {
                return Err(fail("a Redis Cluster has database 0 only: no path"));
            }
            (Target::Cluster { seeds: addrs }, None)
        } else {
            if addrs.len() != 1 {
                return Err(fail(
                    "redis:// takes one host:port (use redis+sentinel:// or redis+cluster:// for several)",
                ));
            }
            (
                Target::Direct(
                    addrs
                        .into_iter()
                        .next()
                        .ok_or_else(|| fail("missing host"))?,
                ),
                segments.next(),
            )
        };
        let db = match db {
            None => 0,
            Some(d) => d.parse().map_err(|_| fail("database must be a number"))?,
        };
        if segments.next().is_some() {
            return Err(fail("unexpected path segments"));
        }
        Ok(Self {
            target,
            username,
            password,
            db,
        })
    }
}

/// `host:port`, `[v6]:port` or `host` (then `default_port`).
pub(super) fn parse_addr(s: &str, default_port: u16) -> Option<Addr> {
    if s.is_empty() {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some(Addr {
            host: host.to_string(),
            port,
        });
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some(Addr {
            host: host.to_string(),
            port: port.parse().ok()?,
        }),
        Some(_) => None,
        None => Some(Addr {
            host: s.to_string(),
            port: default_port,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addr(h: &str, p: u16) -> Addr {
        Addr {
            host: h.into(),
            port: p,
        }
    }

    #[test]
    fn parses_direct_urls() {
        let u = RedisUrl::parse("redis://127.0.0.1:6390").unwrap();
        assert_eq!(
            u,
            RedisUrl {
                target: Target::Direct(addr("127.0.0.1", 6390)),
                username: None,
                password: None,
                db: 0
            }
        );
        let u = RedisUrl::parse("redis://:pw@redis.svc:7000/3").unwrap();
        assert_eq!((u.password.as_deref(), u.db), (Some("pw"), 3));
        let u = RedisUrl::parse("redis://app:pw@host").unwrap();
        assert_eq!(
            (u.username.as_deref(), u.target),
            (Some("app"), Target::Direct(addr("host", 6379)))
        );
    }

    #[test]
    fn parses_sentinel_urls() {
        let u = RedisUrl::parse("redis+sentinel://:s3@a:26379,b:26380,c/chorus").unwrap();
        assert_eq!(
            u.target,
            Target::Sentinel {
                sentinels: vec![addr("a", 26379), addr("b", 26380), addr("c", 26379)],
                master: "chorus".into()
            }
        );
        assert_eq!(u.password.as_deref(), Some("s3"));
        let debug = format!("{u:?}");
        assert!(
            !debug.contains("s3") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn parses_cluster_urls() {
        let u = RedisUrl::parse("redis+cluster://:pw@a:7000,b:7001,c").unwrap();
        assert_eq!(
            (u.target, u.password.as_deref(), u.db),
            (
                Target::Cluster {
                    seeds: vec![addr("a", 7000), addr("b", 7001), addr("c", 6379)]
                },
                Some("pw"),
                0
            )
        );
    }

    #[test]
    fn refuses_bad_urls_without_leaking_the_password() {
        for bad in [
            "http://x",
            "redis+sentinel://a:1",
            "redis://a:1,b:2",
            "redis://a:notaport",
            "redis://a:1/x",
            "redis://:pw@a:1/x/y",
            "redis+cluster://:pw@a:1/1",
            "redis+cluster://:pw@",
        ] {
            let e = RedisUrl::parse(bad).unwrap_err();
            assert!(!e.to_string().contains("pw"), "{e}");
        }
    }
}
