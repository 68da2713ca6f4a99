//! The network part of a pass: ask every member what it knows, and carry
//! out the plan's actions. Every connect and command is bounded by
//! `ClusterConfig::call_timeout` (the topology module's connection, see
//! [`crate::topology`]); members are observed concurrently.

use std::collections::HashMap;
use std::net::IpAddr;

use futures_util::future::join_all;

use super::model::{Action, ClusterConfig, Member, Observed, Seen};
use super::parse;
use crate::topology::NodeAddr;
use crate::topology::io::Conn;

async fn connect(member: &Member, config: &ClusterConfig) -> Result<Conn, String> {
    let addr = NodeAddr::new(member.host.clone(), member.port);
    Conn::open(&addr, config.password.as_deref(), config.call_timeout)
        .await
        .map_err(|e| e.to_string())
}

/// The member's address now (its DNS name resolved): what its peers meet.
async fn resolve(member: &Member, config: &ClusterConfig) -> Result<String, String> {
    if let Ok(ip) = member.host.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let lookup = tokio::net::lookup_host((member.host.as_str(), member.port));
    let mut addrs = tokio::time::timeout(config.call_timeout, lookup)
        .await
        .map_err(|_| format!("resolving {}: timed out", member.host))?
        .map_err(|e| format!("resolving {}: {e}", member.host))?;
    addrs
        .next()
        .map(|a| a.ip().to_string())
        .ok_or_else(|| format!("{} has no address", member.host))
}

fn cluster(sub: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg(sub);
    cmd
}

async fn observe_member(member: &Member, config: &ClusterConfig) -> Result<Seen, String> {
    let ip = resolve(member, config).await?;
    let mut con = connect(member, config).await?;
    let err = |e: crate::topology::TopologyError| e.to_string();
    let id: String = con
        .query("CLUSTER MYID", &cluster("MYID"))
        .await
        .map_err(err)?;
    let text: String = con
        .query("CLUSTER NODES", &cluster("NODES"))
        .await
        .map_err(err)?;
    let nodes = parse::nodes(&text).map_err(|d| con.reply_error("CLUSTER NODES", d).to_string())?;
    let info: String = con
        .query("CLUSTER INFO", &cluster("INFO"))
        .await
        .map_err(err)?;
    let bus: Vec<String> = con
        .query(
            "CONFIG GET cluster-port",
            redis::cmd("CONFIG").arg("GET").arg("cluster-port"),
        )
        .await
        .map_err(err)?;
    let replication: String = con
        .query("INFO replication", redis::cmd("INFO").arg("replication"))
        .await
        .map_err(err)?;
    // cluster-port 0: the default, the client port + 10000.
    let bus_port = bus
        .get(1)
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .unwrap_or(member.port.saturating_add(10000));
    Ok(Seen {
        id,
        ip,
        bus_port,
        nodes,
        state_ok: parse::info_field(&info, "cluster_state") == Some("ok"),
        slots_ok: parse::info_field(&info, "cluster_slots_ok")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        link_up: parse::info_field(&replication, "master_link_status") == Some("up"),
    })
}

/// Asks every member, all at once.
pub async fn observe(config: &ClusterConfig) -> Observed {
    let members = join_all(
        config
            .members
            .iter()
            .map(|m| async move { (m.clone(), observe_member(m, config).await) }),
    )
    .await;
    Observed { members }
}

/// Connections of one pass, opened when first needed.
struct Links<'a> {
    observed: &'a Observed,
    config: &'a ClusterConfig,
    open: HashMap<usize, Conn>,
}

impl<'a> Links<'a> {
    fn seen(&self, i: usize) -> Result<&'a Seen, String> {
        self.observed
            .seen(i)
            .ok_or_else(|| format!("{} did not answer", self.name(i)))
    }

    fn name(&self, i: usize) -> String {
        self.observed
            .members
            .get(i)
            .map_or_else(|| format!("#{i}"), |(m, _)| m.name.clone())
    }

    fn port(&self, i: usize) -> u16 {
        self.observed.members.get(i).map_or(0, |(m, _)| m.port)
    }

    async fn run<T: redis::FromRedisValue>(
        &mut self,
        i: usize,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, String> {
        if !self.open.contains_key(&i) {
            let member = &self.observed.members[i].0;
            let con = connect(member, self.config).await?;
            self.open.insert(i, con);
        }
        let Some(con) = self.open.get_mut(&i) else {
            return Err(format!("no connection to {}", self.name(i)));
        };
        con.query(what, cmd).await.map_err(|e| e.to_string())
    }

    async fn ok(&mut self, i: usize, what: &'static str, cmd: &redis::Cmd) -> Result<(), String> {
        self.run::<redis::Value>(i, what, cmd).await.map(drop)
    }

    fn setslot(slot: u16, state: &str, id: Option<&str>) -> redis::Cmd {
        let mut cmd = cluster("SETSLOT");
        cmd.arg(slot).arg(state);
        if let Some(id) = id {
            cmd.arg(id);
        }
        cmd
    }

    /// `SETSLOT IMPORTING` on the receiver, `MIGRATING` on the giver.
    async fn begin(&mut self, slot: u16, from: usize, to: usize) -> Result<(), String> {
        let (from_id, to_id) = (self.seen(from)?.id.clone(), self.seen(to)?.id.clone());
        let importing = Self::setslot(slot, "IMPORTING", Some(&from_id));
        self.ok(to, "CLUSTER SETSLOT IMPORTING", &importing).await?;
        let migrating = Self::setslot(slot, "MIGRATING", Some(&to_id));
        self.ok(from, "CLUSTER SETSLOT MIGRATING", &migrating).await
    }

    /// The slot's remaining keys (`MIGRATE … REPLACE … KEYS`: the giver's
    /// copy wins over one an interrupted `MIGRATE` left behind), then
    /// `SETSLOT NODE` on the receiver, the giver and the other masters.
    async fn finish(&mut self, slot: u16, from: usize, to: usize) -> Result<(), String> {
        let receiver = self.seen(to)?;
        let (to_ip, to_port, to_id) = (receiver.ip.clone(), self.port(to), receiver.id.clone());
        let timeout_ms = self.config.call_timeout.as_millis().max(1000);
        loop {
            let mut get = cluster("GETKEYSINSLOT");
            get.arg(slot).arg(self.config.keys_per_migrate);
            let keys: Vec<Vec<u8>> = self.run(from, "CLUSTER GETKEYSINSLOT", &get).await?;
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg(&to_ip)
                .arg(to_port)
                .arg("")
                .arg(0)
                .arg(u64::try_from(timeout_ms).unwrap_or(u64::MAX))
                .arg("REPLACE");
            if let Some(password) = &self.config.password {
                migrate.arg("AUTH").arg(password);
            }
            migrate.arg("KEYS").arg(&keys);
            self.ok(from, "MIGRATE", &migrate).await?;
        }
        let node = Self::setslot(slot, "NODE", Some(&to_id));
        self.ok(to, "CLUSTER SETSLOT NODE", &node).await?;
        self.ok(from, "CLUSTER SETSLOT NODE", &node).await?;
        // The other masters learn it by gossip too; telling them spares
        // clients a round of redirections.
        let others: Vec<usize> = self
            .observed
            .reachable()
            .filter(|(i, s)| *i != from && *i != to && s.myself().is_some_and(|m| m.is_master()))
            .map(|(i, _)| i)
            .collect();
        for i in others {
            let _ignored = self.ok(i, "CLUSTER SETSLOT NODE", &node).await;
        }
        Ok(())
    }

    async fn apply(&mut self, action: &Action) -> Result<(), String> {
        match action {
            Action::Meet { on, whom } => {
                let seen = self.seen(*whom)?;
                let mut cmd = cluster("MEET");
                cmd.arg(&seen.ip).arg(self.port(*whom)).arg(seen.bus_port);
                self.ok(*on, "CLUSTER MEET", &cmd).await
            }
            Action::AddSlots { on, ranges } => {
                let mut cmd = cluster("ADDSLOTSRANGE");
                for (a, b) in ranges {
                    cmd.arg(*a).arg(*b);
                }
                self.ok(*on, "CLUSTER ADDSLOTSRANGE", &cmd).await
            }
            Action::Replicate { on, master } => {
                let id = self.seen(*master)?.id.clone();
                let mut cmd = cluster("REPLICATE");
                cmd.arg(id);
                self.ok(*on, "CLUSTER REPLICATE", &cmd).await
            }
            Action::Forget { id } => {
                let mut cmd = cluster("FORGET");
                cmd.arg(id);
                let members: Vec<usize> = self.observed.reachable().map(|(i, _)| i).collect();
                let mut forgotten = false;
                let mut last_error = None;
                for i in members {
                    match self.ok(i, "CLUSTER FORGET", &cmd).await {
                        Ok(()) => forgotten = true,
                        // A replica of that node, or one that never knew it.
                        Err(e) => last_error = Some(e),
                    }
                }
                match (forgotten, last_error) {
                    (false, Some(e)) => Err(e),
                    _ => Ok(()),
                }
            }
            Action::MoveSlots {
                from, to, slots, ..
            } => {
                for slot in slots {
                    self.begin(*slot, *from, *to).await?;
                    self.finish(*slot, *from, *to).await?;
                }
                Ok(())
            }
            Action::FinishMove { slot, from, to } => self.finish(*slot, *from, *to).await,
            Action::Stabilize { on, slot } => {
                let cmd = Self::setslot(*slot, "STABLE", None);
                self.ok(*on, "CLUSTER SETSLOT STABLE", &cmd).await
            }
        }
    }
}

/// Carries out the actions in order; one that fails does not stop the
/// others (a move that stops half-way is finished by the next pass).
pub async fn apply_all(
    actions: &[Action],
    observed: &Observed,
    config: &ClusterConfig,
) -> Vec<Result<(), String>> {
    let mut links = Links {
        observed,
        config,
        open: HashMap::new(),
    };
    let mut out = Vec::with_capacity(actions.len());
    for action in actions {
        out.push(links.apply(action).await);
    }
    out
}
