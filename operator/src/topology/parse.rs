//! Turning Redis and Sentinel replies into the observed model. No I/O.

use std::collections::HashMap;

use super::model::{NodeAddr, RedisRole};

/// Parses the text of `INFO replication`.
pub fn replication_info(text: &str) -> Result<RedisRole, String> {
    let fields: HashMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.trim_end_matches('\r').split_once(':'))
        .collect();
    let field = |name: &str| {
        fields
            .get(name)
            .copied()
            .ok_or_else(|| format!("INFO replication has no {name}"))
    };
    let number = |name: &str| -> Result<u64, String> {
        let value = field(name)?;
        value
            .parse()
            .map_err(|_| format!("INFO replication: {name} is not a number: {value:?}"))
    };
    match field("role")? {
        "master" => Ok(RedisRole::Master {
            offset: number("master_repl_offset")?,
        }),
        "slave" | "replica" => {
            let port = field("master_port")?;
            let port = port
                .parse()
                .map_err(|_| format!("INFO replication: bad master_port {port:?}"))?;
            Ok(RedisRole::Replica {
                master: NodeAddr::new(field("master_host")?, port),
                link_up: field("master_link_status")? == "up",
                // Absent until the replica has connected once.
                offset: number("slave_repl_offset").unwrap_or(0),
            })
        }
        other => Err(format!("INFO replication: unknown role {other:?}")),
    }
}

/// `ip` and `port` of one entry of `SENTINEL SENTINELS` / `SENTINEL REPLICAS`
/// (or of `SENTINEL MASTER`).
pub fn entry_addr(entry: &HashMap<String, String>) -> Result<NodeAddr, String> {
    let ip = entry.get("ip").ok_or("entry has no ip")?;
    let port = entry.get("port").ok_or("entry has no port")?;
    let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    Ok(NodeAddr::new(ip.clone(), port))
}

/// A numeric field of `SENTINEL MASTER`.
pub fn number_field(entry: &HashMap<String, String>, name: &str) -> Result<u64, String> {
    let value = entry
        .get(name)
        .ok_or_else(|| format!("SENTINEL MASTER has no {name}"))?;
    value
        .parse()
        .map_err(|_| format!("SENTINEL MASTER: {name} is not a number: {value:?}"))
}

/// `SENTINEL GET-MASTER-ADDR-BY-NAME` answers `[ip, port]` or nil.
pub fn master_addr(reply: Option<(String, String)>) -> Result<Option<NodeAddr>, String> {
    match reply {
        None => Ok(None),
        Some((ip, port)) => {
            let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
            Ok(Some(NodeAddr::new(ip, port)))
        }
    }
}

/// The `flags` field is a comma-separated list.
pub fn has_flag(entry: &HashMap<String, String>, flag: &str) -> bool {
    entry
        .get("flags")
        .is_some_and(|flags| flags.split(',').any(|f| f == flag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_info() {
        let text = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\
                    slave0:ip=127.0.0.1,port=7001,state=online,offset=42,lag=0\r\n\
                    master_replid:abc\r\nmaster_repl_offset:42\r\n";
        assert_eq!(replication_info(text), Ok(RedisRole::Master { offset: 42 }));
    }

    #[test]
    fn replica_info() {
        let text = "# Replication\r\nrole:slave\r\nmaster_host:10.0.0.7\r\nmaster_port:6379\r\n\
                    master_link_status:up\r\nslave_repl_offset:1234\r\nmaster_repl_offset:1234\r\n";
        assert_eq!(
            replication_info(text),
            Ok(RedisRole::Replica {
                master: NodeAddr::new("10.0.0.7", 6379),
                link_up: true,
                offset: 1234
            })
        );
    }

    #[test]
    fn replica_before_first_connect() {
        let text = "role:slave\nmaster_host:10.0.0.7\nmaster_port:6379\nmaster_link_status:down\n";
        assert_eq!(
            replication_info(text),
            Ok(RedisRole::Replica {
                master: NodeAddr::new("10.0.0.7", 6379),
                link_up: false,
                offset: 0
            })
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(replication_info("hello").is_err());
        assert!(replication_info("role:sentinel").is_err());
    }

    #[test]
    fn flags() {
        let entry: HashMap<String, String> =
            [("flags".to_owned(), "master,failover_in_progress".to_owned())].into();
        assert!(has_flag(&entry, "failover_in_progress"));
        assert!(!has_flag(&entry, "s_down"));
    }
}
