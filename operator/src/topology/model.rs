//! Plain data: what the module is told (config), what it sees (observed
//! state), what it decides (plan) and what it tells the controller (report).
//! Nothing here does I/O.

use std::fmt;
use std::time::Duration;

use super::error::TopologyError;

/// A `host:port` as Redis and Sentinel announce it.
///
/// Sentinel reports masters, replicas and peers by IP (the operator runs the
/// sentinels with `resolve-hostnames no`), so the addresses given to this
/// module must be the pod IPs, not DNS names: they are compared as strings.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
}

impl NodeAddr {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Everything [`reconcile_topology`](super::reconcile_topology) needs.
#[derive(Clone)]
pub struct TopologyConfig {
    /// The name sentinels know the group by (`chorus`).
    pub master_name: String,
    /// Redis pods in StatefulSet order: index 0 is pod 0, the first-start master.
    pub redis: Vec<NodeAddr>,
    /// Sentinel pods.
    pub sentinels: Vec<NodeAddr>,
    /// `requirepass` of the Redis pods; also given to sentinels as
    /// `auth-pass` and to replicas as `masterauth`.
    pub password: Option<String>,
    /// `requirepass` of the sentinels themselves, if any.
    pub sentinel_password: Option<String>,
    /// Sentinels that must agree a master is down before a failover.
    pub quorum: u32,
    /// `SENTINEL SET … down-after-milliseconds`; left alone when `None`.
    pub down_after: Option<Duration>,
    /// `SENTINEL SET … failover-timeout`; left alone when `None`.
    pub failover_timeout: Option<Duration>,
    /// Upper bound for connecting and for each command: a dead pod costs at
    /// most this much (all members are contacted concurrently).
    pub call_timeout: Duration,
}

impl TopologyConfig {
    /// Master name `chorus`, no password, Sentinel's own timing defaults and
    /// a one-second call timeout.
    pub fn new(redis: Vec<NodeAddr>, sentinels: Vec<NodeAddr>, quorum: u32) -> Self {
        Self {
            master_name: "chorus".to_owned(),
            redis,
            sentinels,
            password: None,
            sentinel_password: None,
            quorum,
            down_after: None,
            failover_timeout: None,
            call_timeout: Duration::from_secs(1),
        }
    }

    /// Refuses configurations no plan can satisfy. These are the caller's
    /// mistakes, unlike unreachable pods, which are only reported.
    pub fn validate(&self) -> Result<(), TopologyError> {
        let invalid = |reason: String| Err(TopologyError::InvalidConfig { reason });
        let name_ok = !self.master_name.is_empty()
            && self
                .master_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return invalid(format!(
                "master name {:?} must be non-empty and only contain letters, digits, '-', '_' or '.'",
                self.master_name
            ));
        }
        if self.redis.is_empty() {
            return invalid("no Redis addresses given".to_owned());
        }
        if self.sentinels.is_empty() {
            return invalid("no Sentinel addresses given".to_owned());
        }
        let sentinels = u32::try_from(self.sentinels.len()).unwrap_or(u32::MAX);
        if self.quorum == 0 || self.quorum > sentinels {
            return invalid(format!(
                "quorum {} must be between 1 and the number of sentinels ({sentinels})",
                self.quorum
            ));
        }
        if self.call_timeout.is_zero() {
            return invalid("call timeout must be positive".to_owned());
        }
        let mut all: Vec<&NodeAddr> = self.redis.iter().chain(&self.sentinels).collect();
        all.sort();
        if let Some(pair) = all.windows(2).find(|w| w[0] == w[1]) {
            return invalid(format!("address {} is listed twice", pair[0]));
        }
        Ok(())
    }
}

/// Passwords are never printed.
impl fmt::Debug for TopologyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |p: &Option<String>| p.as_ref().map(|_| "<redacted>");
        f.debug_struct("TopologyConfig")
            .field("master_name", &self.master_name)
            .field("redis", &self.redis)
            .field("sentinels", &self.sentinels)
            .field("password", &redact(&self.password))
            .field("sentinel_password", &redact(&self.sentinel_password))
            .field("quorum", &self.quorum)
            .field("down_after", &self.down_after)
            .field("failover_timeout", &self.failover_timeout)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// What one Redis pod says about itself (`INFO replication`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisRole {
    Master {
        /// `master_repl_offset`.
        offset: u64,
    },
    Replica {
        /// `master_host:master_port`.
        master: NodeAddr,
        /// `master_link_status:up`.
        link_up: bool,
        /// `slave_repl_offset`.
        offset: u64,
    },
    /// Not serving yet: the member runs in its waiting room (its port + 1)
    /// until it knows its role, which it takes from the sentinels.
    Waiting {
        /// `master_repl_offset` of the data it loaded.
        offset: u64,
        /// Keys it holds.
        keys: u64,
    },
}

impl RedisRole {
    /// How much data the member holds, for choosing a master: its
    /// replication offset, then its key count.
    pub fn data(&self) -> (u64, u64) {
        match self {
            RedisRole::Master { offset } | RedisRole::Replica { offset, .. } => (*offset, 0),
            RedisRole::Waiting { offset, keys } => (*offset, *keys),
        }
    }
}

/// What one sentinel knows about the monitored master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelView {
    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` (during a failover this is already
    /// the promoted replica once the leader has switched).
    pub master: NodeAddr,
    /// `config-epoch`: a higher epoch is a newer failover.
    pub config_epoch: u64,
    /// `flags` contains `failover_in_progress`.
    pub failover_in_progress: bool,
    pub quorum: u32,
    pub down_after_ms: u64,
    pub failover_timeout_ms: u64,
    /// `SENTINEL SENTINELS`: the other sentinels it knows.
    pub known_sentinels: Vec<NodeAddr>,
    /// `SENTINEL REPLICAS`: the replicas it knows.
    pub known_replicas: Vec<NodeAddr>,
}

/// A member that could not be asked: the reason, as text.
pub type Probe<T> = Result<T, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisNode {
    pub addr: NodeAddr,
    pub role: Probe<RedisRole>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelNode {
    pub addr: NodeAddr,
    /// `Ok(None)`: reachable, but monitors no master of that name.
    pub view: Probe<Option<SentinelView>>,
}

/// Everything observed in one pass, Redis pods in config order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub redis: Vec<RedisNode>,
    pub sentinels: Vec<SentinelNode>,
}

impl Observed {
    /// Members that did not answer, with the reason.
    pub fn unreachable(&self) -> Vec<Unreachable> {
        let redis = self.redis.iter().filter_map(|n| {
            n.role.as_ref().err().map(|reason| Unreachable {
                kind: MemberKind::Redis,
                addr: n.addr.clone(),
                reason: reason.clone(),
            })
        });
        let sentinels = self.sentinels.iter().filter_map(|n| {
            n.view.as_ref().err().map(|reason| Unreachable {
                kind: MemberKind::Sentinel,
                addr: n.addr.clone(),
                reason: reason.clone(),
            })
        });
        redis.chain(sentinels).collect()
    }
}

/// One step that changes the group. Each touches one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `REPLICAOF NO ONE`.
    Promote { node: NodeAddr },
    /// `CONFIG SET masterauth` (when a password is set) + `REPLICAOF host port`.
    ReplicaOf { node: NodeAddr, master: NodeAddr },
    /// `SENTINEL MONITOR name ip port quorum` + `SENTINEL SET` options.
    Monitor {
        sentinel: NodeAddr,
        master: NodeAddr,
    },
    /// `SENTINEL REMOVE name` + `MONITOR` + `SET`: the sentinel follows a stale master.
    Remonitor {
        sentinel: NodeAddr,
        stale: NodeAddr,
        master: NodeAddr,
    },
    /// `SENTINEL SET` options: quorum or timings drifted from the config.
    Configure { sentinel: NodeAddr },
    /// `SENTINEL RESET name`: the sentinel remembers peers or replicas that
    /// are not members any more (e.g. old pod IPs).
    Reset { sentinel: NodeAddr },
}

impl Action {
    /// The member the action talks to.
    pub fn target(&self) -> &NodeAddr {
        match self {
            Action::Promote { node } | Action::ReplicaOf { node, .. } => node,
            Action::Monitor { sentinel, .. }
            | Action::Remonitor { sentinel, .. }
            | Action::Configure { sentinel }
            | Action::Reset { sentinel } => sentinel,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Promote { node } => write!(f, "promote {node} to master"),
            Action::ReplicaOf { node, master } => write!(f, "make {node} a replica of {master}"),
            Action::Monitor { sentinel, master } => {
                write!(f, "sentinel {sentinel}: monitor {master}")
            }
            Action::Remonitor {
                sentinel,
                stale,
                master,
            } => write!(
                f,
                "sentinel {sentinel}: monitor {master} instead of stale {stale}"
            ),
            Action::Configure { sentinel } => write!(f, "sentinel {sentinel}: set options"),
            Action::Reset { sentinel } => write!(f, "sentinel {sentinel}: reset stale peers"),
        }
    }
}

/// Why the master is the master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MasterBasis {
    /// A majority of all configured sentinels report it.
    SentinelMajority,
    /// Nothing was set up yet: pod 0.
    FirstStart,
    /// Sentinels do not agree: the reachable master with the highest
    /// replication offset (lowest pod index on a tie).
    HighestOffset,
    /// Sentinels know no master and no pod is master: the replica with the
    /// highest offset is promoted.
    PromotedReplica,
    /// As `PromotedReplica`, but the member with the most data is waiting to
    /// learn its role: the sentinels are told, and it promotes itself.
    ChoseWaiting,
}

/// Why the plan holds back (changes nothing on the Redis side). The
/// controller should requeue soon; these are expected to pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// A sentinel reports `failover_in_progress`, or one reports a newer
    /// config epoch than the majority: Sentinel is moving the master.
    FailoverInProgress,
    /// The sentinels agree on a master that does not answer; Sentinel will
    /// fail over once it is down long enough.
    MasterUnreachable,
    /// The sentinels agree on an address that is not one of the Redis pods
    /// (a pod came back with a new IP); Sentinel will fail over.
    MasterNotAMember,
    /// The sentinels agree on a pod that reports itself as a replica;
    /// Sentinel treats that as down and fails over.
    MasterIsReplica,
    /// First start, but pod 0 does not answer yet.
    FirstMasterUnreachable,
    /// The sentinels know no master and a member holding data does not
    /// answer: choosing now could pick a member with less.
    MembersUnreachable,
    /// No pod claims to be master and the sentinels neither agree nor are
    /// all reachable and empty: nobody can safely pick one.
    NoMaster,
}

/// The pure decision: who the master is and what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub master: Option<NodeAddr>,
    pub basis: Option<MasterBasis>,
    pub waiting: Option<Waiting>,
    pub actions: Vec<Action>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberKind {
    Redis,
    Sentinel,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreachable {
    pub kind: MemberKind,
    pub addr: NodeAddr,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub addr: NodeAddr,
    /// `master_link_status:up` (false while the first sync runs).
    pub link_up: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionOutcome {
    pub action: Action,
    /// `Err` holds the failure as text (the [`TopologyError`] display).
    pub result: Result<(), String>,
}

/// What the controller puts in `status.redis` and turns into Events.
/// Describes the group as observed *after* the actions ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyReport {
    /// `status.redis.master`.
    pub master: Option<NodeAddr>,
    pub basis: Option<MasterBasis>,
    /// The master answered and says it is a master.
    pub master_reachable: bool,
    /// Pods replicating from `master`; `readyReplicas` counts `link_up`.
    pub replicas: Vec<ReplicaStatus>,
    /// `sentinelsReady`: sentinels whose master is `master`.
    pub sentinels_agreeing: usize,
    pub unreachable: Vec<Unreachable>,
    pub waiting: Option<Waiting>,
    /// What this pass changed, in plan order.
    pub actions: Vec<ActionOutcome>,
    /// The state after the actions (before them when there were none).
    pub observed: Observed,
}

impl TopologyReport {
    /// Replicas with a live link to the master (`status.redis.readyReplicas`).
    pub fn ready_replicas(&self) -> usize {
        self.replicas.iter().filter(|r| r.link_up).count()
    }

    /// True when the plan had nothing left to do and nothing is pending:
    /// the controller can requeue slowly.
    pub fn converged(&self) -> bool {
        self.actions.is_empty()
            && self.waiting.is_none()
            && self.master_reachable
            && self.unreachable.is_empty()
            && self.replicas.iter().all(|r| r.link_up)
    }

    /// For the "failover seen" Event: the master changed since the one the
    /// controller recorded last time (`None` the first time: no event).
    pub fn master_changed_since(&self, previous: Option<&NodeAddr>) -> bool {
        match (previous, &self.master) {
            (Some(before), Some(now)) => before != now,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(host: &str, n: u16) -> Vec<NodeAddr> {
        (0..n).map(|i| NodeAddr::new(host, 6379 + i)).collect()
    }

    fn valid() -> TopologyConfig {
        TopologyConfig::new(addrs("10.0.0.1", 3), addrs("10.0.1.1", 3), 2)
    }

    fn reason(config: &TopologyConfig) -> String {
        match config.validate() {
            Err(TopologyError::InvalidConfig { reason }) => reason,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn validate_accepts_a_normal_group() {
        assert!(valid().validate().is_ok());
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let mut c = valid();
        c.quorum = 0;
        assert!(reason(&c).contains("quorum 0"));
        c.quorum = 4;
        assert!(reason(&c).contains("number of sentinels (3)"));

        let mut c = valid();
        c.redis.clear();
        assert!(reason(&c).contains("no Redis"));

        let mut c = valid();
        c.sentinels.clear();
        assert!(reason(&c).contains("no Sentinel"));

        let mut c = valid();
        c.master_name = "chorus main".to_owned();
        assert!(reason(&c).contains("master name"));

        let mut c = valid();
        c.sentinels[0] = c.redis[1].clone();
        assert!(reason(&c).contains("10.0.0.1:6380 is listed twice"));

        let mut c = valid();
        c.call_timeout = Duration::ZERO;
        assert!(reason(&c).contains("timeout"));
    }

    #[test]
    fn debug_never_prints_passwords() {
        let mut c = valid();
        c.password = Some("hunter2".to_owned());
        c.sentinel_password = Some("hunter3".to_owned());
        let text = format!("{c:?}");
        assert!(!text.contains("hunter"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn addresses_display_as_host_port() {
        assert_eq!(NodeAddr::new("10.0.0.1", 6379).to_string(), "10.0.0.1:6379");
        assert_eq!(NodeAddr::new("fd00::1", 6379).to_string(), "[fd00::1]:6379");
    }

    fn report(master: Option<NodeAddr>) -> TopologyReport {
        TopologyReport {
            master,
            basis: Some(MasterBasis::SentinelMajority),
            master_reachable: true,
            replicas: vec![
                ReplicaStatus {
                    addr: NodeAddr::new("10.0.0.2", 6379),
                    link_up: true,
                },
                ReplicaStatus {
                    addr: NodeAddr::new("10.0.0.3", 6379),
                    link_up: false,
                },
            ],
            sentinels_agreeing: 3,
            unreachable: vec![],
            waiting: None,
            actions: vec![],
            observed: Observed {
                redis: vec![],
                sentinels: vec![],
            },
        }
    }

    #[test]
    fn failover_seen_only_when_a_known_master_changed() {
        let a = NodeAddr::new("10.0.0.1", 6379);
        let b = NodeAddr::new("10.0.0.2", 6379);
        assert!(report(Some(b.clone())).master_changed_since(Some(&a)));
        assert!(!report(Some(a.clone())).master_changed_since(Some(&a)));
        assert!(!report(Some(a.clone())).master_changed_since(None));
        assert!(!report(None).master_changed_since(Some(&a)));
    }

    #[test]
    fn ready_replicas_count_live_links_and_block_convergence() {
        let r = report(Some(NodeAddr::new("10.0.0.1", 6379)));
        assert_eq!(r.ready_replicas(), 1);
        assert!(!r.converged());
        let mut all_up = r.clone();
        all_up.replicas[1].link_up = true;
        assert!(all_up.converged());
    }
}
