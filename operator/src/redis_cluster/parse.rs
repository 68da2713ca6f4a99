//! Replies of `CLUSTER NODES` and `CLUSTER INFO`, parsed.

use super::model::NodeLine;

/// `CLUSTER NODES`: one node per line,
/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`.
pub fn nodes(text: &str) -> Result<Vec<NodeLine>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(node_line)
        .collect()
}

fn node_line(line: &str) -> Result<NodeLine, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return Err(format!("short CLUSTER NODES line: {line:?}"));
    }
    let addr = fields[1].split(',').next().unwrap_or("");
    let addr = addr.split('@').next().unwrap_or("");
    let (ip, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("no ip:port in {line:?}"))?;
    let mut node = NodeLine {
        id: fields[0].to_owned(),
        ip: ip.to_owned(),
        port: port.parse().map_err(|_| format!("bad port in {line:?}"))?,
        flags: fields[2].split(',').map(str::to_owned).collect(),
        master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
        ..NodeLine::default()
    };
    for slot in &fields[8..] {
        if let Some(inner) = slot.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            if let Some((s, to)) = inner.split_once("->-") {
                node.migrating.push((number(s, line)?, to.to_owned()));
            } else if let Some((s, from)) = inner.split_once("-<-") {
                node.importing.push((number(s, line)?, from.to_owned()));
            }
        } else if let Some((a, b)) = slot.split_once('-') {
            node.slots.push((number(a, line)?, number(b, line)?));
        } else {
            let s = number(slot, line)?;
            node.slots.push((s, s));
        }
    }
    Ok(node)
}

fn number(s: &str, line: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("bad slot {s:?} in {line:?}"))
}

/// A field of an `INFO`-style reply (`key:value` lines).
pub fn info_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn node_lines_carry_flags_masters_slots_and_slots_in_flight() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 10.0.0.5:6379@16379,chat-redis-cluster-1.chat-redis-cluster.default.svc myself,master - 0 0 2 connected 5461-10922 [10923->-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 10.0.0.7:6379@16379 master - 0 1426238316232 3 connected 10924-16383 [10923-<-07c37dfeb235213a872192d90877d0cd55635b91]
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 10.0.0.6:6379@16379 slave 07c37dfeb235213a872192d90877d0cd55635b91 0 1426238317239 4 connected
aaaa 10.0.0.9:6379@16379 master,fail - 0 0 1 disconnected
bbbb :0@0 master,noaddr - 0 0 0 disconnected 7
";
        let nodes = nodes(text).unwrap();
        assert_eq!(nodes.len(), 5);
        let me = &nodes[0];
        assert!(me.is_myself() && me.is_master());
        assert_eq!((me.ip.as_str(), me.port), ("10.0.0.5", 6379));
        assert_eq!(me.slots, [(5461, 10922)]);
        assert_eq!(
            me.migrating,
            [(10923, "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca".to_owned())]
        );
        assert_eq!(nodes[1].importing[0].0, 10923);
        assert_eq!(nodes[1].slot_count(), 16383 - 10924 + 1);
        assert_eq!(
            nodes[2].master_id.as_deref(),
            Some("07c37dfeb235213a872192d90877d0cd55635b91")
        );
        assert!(nodes[3].is_down() && nodes[4].is_down());
        assert_eq!(nodes[4].slots, [(7, 7)]);
        assert!(nodes[4].ip.is_empty());
    }

    #[test]
    fn info_fields_are_read_by_key() {
        let text = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\n";
        assert_eq!(info_field(text, "cluster_state"), Some("ok"));
        assert_eq!(info_field(text, "cluster_slots_assigned"), Some("16384"));
        assert_eq!(info_field(text, "cluster_size"), None);
    }
}
