//! The topology module against real `redis-server` and `redis-sentinel`
//! processes on loopback, started by chorus-testkit on free ports and
//! killed when the test ends.
//!
//! Nothing waits a fixed time: every wait polls a condition a user could
//! check with `redis-cli`, with a generous deadline for a busy machine.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use chorus_operator::topology::{
    Action, MasterBasis, MemberKind, NodeAddr, TopologyConfig, TopologyReport, reconcile_topology,
};
use chorus_testkit::redis::Info;
use chorus_testkit::{RedisOptions, RedisServer, Sentinel, free_port, wait};

/// The group tests share two cores with other work; a Sentinel starved of
/// CPU enters TILT mode and pauses failovers, so tests run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sentinel timings for tests: notice a dead master after a second.
const DOWN_AFTER: Duration = Duration::from_millis(1000);
const FAILOVER_TIMEOUT: Duration = Duration::from_millis(3000);

/// A reconcile pass talks to every member: look no more often than this.
const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------- processes

/// Three Redis pods and three sentinels on loopback, none configured: the
/// module under test sets up replication and monitoring.
struct Group {
    redis: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
    redis_addrs: Vec<NodeAddr>,
    sentinel_addrs: Vec<NodeAddr>,
    password: Option<String>,
}

impl Group {
    async fn start(password: Option<&str>) -> Self {
        let mut redis = Vec::new();
        for _ in 0..3 {
            let options = RedisOptions {
                password: password.map(String::from),
                ..RedisOptions::default()
            };
            redis.push(RedisServer::start_with(options).await);
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Sentinel::start(None).await);
        }
        Self {
            redis_addrs: redis.iter().map(|r| local(r.port)).collect(),
            sentinel_addrs: sentinels.iter().map(|s| local(s.port)).collect(),
            redis,
            sentinels,
            password: password.map(String::from),
        }
    }

    fn config(&self) -> TopologyConfig {
        let mut config =
            TopologyConfig::new(self.redis_addrs.clone(), self.sentinel_addrs.clone(), 2);
        config.password = self.password.clone();
        config.down_after = Some(DOWN_AFTER);
        config.failover_timeout = Some(FAILOVER_TIMEOUT);
        config.call_timeout = Duration::from_secs(2);
        config
    }

    /// SIGKILL: a crash, no clean shutdown.
    fn kill_redis(&mut self, pod: usize) {
        self.redis[pod].kill();
    }

    async fn restart_redis(&mut self, pod: usize) {
        self.redis[pod].restart().await;
    }

    /// Polls `check` until it returns `Some`, or fails the test after
    /// `secs` seconds with the tail of every log.
    async fn wait_for<T>(&self, what: &str, secs: u64, check: impl AsyncFnMut() -> Option<T>) -> T {
        wait::until_every(what, Duration::from_secs(secs), POLL, check)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// Last lines of every log, for failure messages.
    fn logs(&self) -> String {
        let redis = self.redis.iter().map(|r| ("redis", r.port, r.log_tail(25)));
        let sentinels = self
            .sentinels
            .iter()
            .map(|s| ("sentinel", s.port, s.log_tail(25)));
        redis
            .chain(sentinels)
            .map(|(kind, port, tail)| format!("==> {kind} :{port} <==\n{tail}"))
            .collect()
    }

    /// Runs `reconcile_topology` until `done` accepts the report; returns
    /// every report seen (the last one accepted).
    async fn reconcile_until(
        &self,
        what: &str,
        secs: u64,
        done: impl Fn(&TopologyReport) -> bool,
    ) -> Vec<TopologyReport> {
        let config = self.config();
        let mut seen = Vec::new();
        self.wait_for(what, secs, async || {
            let report = reconcile_topology(&config).await.expect("valid config");
            let ok = done(&report);
            seen.push(report);
            ok.then_some(())
        })
        .await;
        seen
    }
}

fn local(port: u16) -> NodeAddr {
    NodeAddr::new("127.0.0.1", port)
}

// ------------------------------------------------- independent observation

/// One command on a fresh connection; `None` on any error.
async fn query<T: redis::FromRedisValue>(
    addr: &NodeAddr,
    password: Option<&str>,
    cmd: redis::Cmd,
) -> Option<T> {
    let url = chorus_testkit::redis::url(&addr.host, addr.port, password);
    chorus_testkit::redis::query(&url, &cmd).await.ok()
}

/// `INFO replication`.
async fn replication(addr: &NodeAddr, password: Option<&str>) -> Option<Info> {
    let url = chorus_testkit::redis::url(&addr.host, addr.port, password);
    chorus_testkit::redis::info(&url, "replication").await.ok()
}

/// `addr` is a replica of `master` with its link up.
async fn is_attached_replica(addr: &NodeAddr, master: &NodeAddr, password: Option<&str>) -> bool {
    let Some(info) = replication(addr, password).await else {
        return false;
    };
    info.get("role") == Some("slave")
        && info.get("master_host") == Some(master.host.as_str())
        && info.get("master_port") == Some(master.port.to_string().as_str())
        && info.get("master_link_status") == Some("up")
}

async fn sentinel_master(sentinel: &NodeAddr) -> Option<NodeAddr> {
    let mut cmd = redis::cmd("SENTINEL");
    cmd.arg("GET-MASTER-ADDR-BY-NAME").arg("chorus");
    let (ip, port): (String, u16) = query(sentinel, None, cmd).await?;
    Some(NodeAddr::new(ip, port))
}

async fn get(addr: &NodeAddr, password: Option<&str>, key: &str) -> Option<String> {
    let mut cmd = redis::cmd("GET");
    cmd.arg(key);
    query::<Option<String>>(addr, password, cmd).await.flatten()
}

async fn set(addr: &NodeAddr, password: Option<&str>, key: &str, value: &str) {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value);
    let ok: Option<String> = query(addr, password, cmd).await;
    assert_eq!(ok.as_deref(), Some("OK"), "SET {key} on {addr}");
}

/// Every sentinel knows the two other sentinels and both replicas: only
/// then can they agree on a failover.
fn sentinels_fully_meshed(report: &TopologyReport) -> bool {
    report.observed.sentinels.iter().all(|s| {
        matches!(&s.view, Ok(Some(v)) if v.known_sentinels.len() == 2 && v.known_replicas.len() == 2)
    })
}

// -------------------------------------------------------------------- tests

#[tokio::test]
async fn topology_fresh_group_gets_pod0_as_master_attached_replicas_and_agreeing_sentinels() {
    let _serial = SERIAL.lock().await;
    let group = Group::start(None).await;
    let pods = group.redis_addrs.clone();

    let report = reconcile_topology(&group.config())
        .await
        .expect("valid config");

    assert_eq!(report.master.as_ref(), Some(&pods[0]));
    assert_eq!(report.basis, Some(MasterBasis::FirstStart));
    assert!(report.master_reachable);
    assert_eq!(report.unreachable, vec![]);
    assert_eq!(report.sentinels_agreeing, 3, "{report:#?}");
    let failed: Vec<_> = report
        .actions
        .iter()
        .filter(|a| a.result.is_err())
        .collect();
    assert!(failed.is_empty(), "failed actions: {failed:#?}");
    let mut attached: Vec<&NodeAddr> = report
        .actions
        .iter()
        .filter_map(|a| match &a.action {
            Action::ReplicaOf { node, master } if master == &pods[0] => Some(node),
            _ => None,
        })
        .collect();
    attached.sort();
    let mut expected = vec![&pods[1], &pods[2]];
    expected.sort();
    assert_eq!(attached, expected);

    // What an operator would check with redis-cli.
    for replica in &pods[1..] {
        group
            .wait_for(
                &format!("{replica} attached to {}", pods[0]),
                60,
                async || {
                    is_attached_replica(replica, &pods[0], None)
                        .await
                        .then_some(())
                },
            )
            .await;
    }
    let master_info = replication(&pods[0], None).await.expect("INFO on pod 0");
    assert_eq!(master_info.get("role"), Some("master"));
    assert_eq!(master_info.get("connected_slaves"), Some("2"));
    for sentinel in &group.sentinel_addrs {
        assert_eq!(
            sentinel_master(sentinel).await.as_ref(),
            Some(&pods[0]),
            "sentinel {sentinel}"
        );
    }

    // Writes on the master reach the replicas.
    set(&pods[0], None, "greeting", "hello").await;
    for replica in &pods[1..] {
        group
            .wait_for(
                &format!("greeting replicated to {replica}"),
                30,
                async || {
                    (get(replica, None, "greeting").await.as_deref() == Some("hello")).then_some(())
                },
            )
            .await;
    }

    // Once settled, a pass changes nothing and reports a healthy group.
    let reports = group
        .reconcile_until("a converged report", 60, |r| {
            r.converged() && r.ready_replicas() == 2
        })
        .await;
    let last = reports.last().expect("at least one report");
    assert_eq!(last.master.as_ref(), Some(&pods[0]));
    assert_eq!(last.basis, Some(MasterBasis::SentinelMajority));
    assert_eq!(last.sentinels_agreeing, 3);
    for report in &reports {
        assert_eq!(report.actions, vec![], "a settled group needs no action");
    }
}

#[tokio::test]
async fn topology_failover_is_recognised_and_the_restarted_old_master_rejoins_as_replica() {
    let _serial = SERIAL.lock().await;
    let password = Some("s3cret");
    let mut group = Group::start(password).await;
    let pods = group.redis_addrs.clone();

    // Set up, then wait until every sentinel knows its peers and replicas
    // (Sentinel learns replicas from the master's INFO, every 10 s).
    let reports = group
        .reconcile_until("a converged, fully meshed group", 90, |r| {
            r.converged() && r.ready_replicas() == 2 && sentinels_fully_meshed(r)
        })
        .await;
    let old_master = pods[0].clone();
    assert_eq!(
        reports.last().and_then(|r| r.master.as_ref()),
        Some(&old_master)
    );

    set(&old_master, password, "before", "kept").await;
    let mut wait = redis::cmd("WAIT");
    wait.arg(2).arg(5000);
    let acked: Option<i64> = query(&old_master, password, wait).await;
    assert_eq!(acked, Some(2), "both replicas acknowledge the write");

    // Crash the master; Sentinel fails over on its own.
    group.kill_redis(0);
    let reports = group
        .reconcile_until("the module to report the sentinels' new master", 120, |r| {
            r.master.as_ref().is_some_and(|m| m != &old_master)
                && r.master_reachable
                && r.waiting.is_none()
                && r.basis == Some(MasterBasis::SentinelMajority)
        })
        .await;
    let report = reports.last().expect("a report");
    let new_master = report.master.clone().expect("a master");
    assert!(
        pods[1..].contains(&new_master),
        "new master {new_master} is a surviving pod"
    );
    assert!(
        report.master_changed_since(Some(&old_master)),
        "failover seen"
    );
    assert!(
        report
            .unreachable
            .iter()
            .any(|u| u.kind == MemberKind::Redis && u.addr == old_master),
        "the dead pod is reported unreachable: {:#?}",
        report.unreachable
    );
    assert_eq!(
        get(&new_master, password, "before").await.as_deref(),
        Some("kept"),
        "data survived the failover"
    );
    set(&new_master, password, "after", "written-on-new-master").await;

    // The old master comes back empty, claiming to be a master. Reconcile
    // at once: Sentinel itself would only convert it after ~8 s.
    group.restart_redis(0).await;
    let came_back = replication(&old_master, password)
        .await
        .expect("INFO on the restarted pod");
    let came_back_as_master = came_back.get("role") == Some("master");
    let reports = group
        .reconcile_until("the old master to rejoin as a replica", 120, |r| {
            r.replicas
                .iter()
                .any(|rep| rep.addr == old_master && rep.link_up)
                && r.master.as_ref() == Some(&new_master)
        })
        .await;
    let we_reattached = reports.iter().flat_map(|r| &r.actions).any(|a| {
        a.result.is_ok()
            && a.action
                == Action::ReplicaOf {
                    node: old_master.clone(),
                    master: new_master.clone(),
                }
    });
    if came_back_as_master {
        assert!(
            we_reattached,
            "the module re-attached the old master: {reports:#?}"
        );
    } else {
        eprintln!("note: Sentinel converted the old master before the first pass");
    }

    assert!(is_attached_replica(&old_master, &new_master, password).await);
    assert_eq!(
        get(&old_master, password, "after").await.as_deref(),
        Some("written-on-new-master"),
        "the old master now holds the new master's data"
    );
    for sentinel in &group.sentinel_addrs {
        group
            .wait_for(
                &format!("sentinel {sentinel} to follow {new_master}"),
                30,
                async || {
                    (sentinel_master(sentinel).await.as_ref() == Some(&new_master)).then_some(())
                },
            )
            .await;
    }
}

#[tokio::test]
async fn topology_second_master_is_demoted_and_a_stale_sentinel_is_repointed() {
    let _serial = SERIAL.lock().await;
    let group = Group::start(None).await;
    let pods = group.redis_addrs.clone();
    let sentinels = group.sentinel_addrs.clone();
    group
        .reconcile_until("a converged group", 60, |r| {
            r.converged() && r.ready_replicas() == 2
        })
        .await;

    // Pod 2 turns itself into a master (a split healed badly) and sentinel 2
    // follows a stale master (pod 1, a replica).
    let mut promote = redis::cmd("REPLICAOF");
    promote.arg("NO").arg("ONE");
    let ok: Option<String> = query(&pods[2], None, promote).await;
    assert_eq!(ok.as_deref(), Some("OK"));
    let mut remove = redis::cmd("SENTINEL");
    remove.arg("REMOVE").arg("chorus");
    let ok: Option<String> = query(&sentinels[2], None, remove).await;
    assert_eq!(ok.as_deref(), Some("OK"));
    let mut monitor = redis::cmd("SENTINEL");
    monitor
        .arg("MONITOR")
        .arg("chorus")
        .arg(&pods[1].host)
        .arg(pods[1].port)
        .arg(2);
    let ok: Option<String> = query(&sentinels[2], None, monitor).await;
    assert_eq!(ok.as_deref(), Some("OK"));
    assert_eq!(
        sentinel_master(&sentinels[2]).await.as_ref(),
        Some(&pods[1])
    );

    let report = reconcile_topology(&group.config())
        .await
        .expect("valid config");
    assert_eq!(report.master.as_ref(), Some(&pods[0]));
    assert_eq!(report.basis, Some(MasterBasis::SentinelMajority));
    let actions: Vec<&Action> = report.actions.iter().map(|a| &a.action).collect();
    assert!(
        actions.contains(&&Action::ReplicaOf {
            node: pods[2].clone(),
            master: pods[0].clone()
        }),
        "second master demoted: {actions:#?}"
    );
    assert!(
        actions.contains(&&Action::Remonitor {
            sentinel: sentinels[2].clone(),
            stale: pods[1].clone(),
            master: pods[0].clone()
        }),
        "stale sentinel re-pointed: {actions:#?}"
    );
    assert!(
        report.actions.iter().all(|a| a.result.is_ok()),
        "{report:#?}"
    );

    assert_eq!(
        sentinel_master(&sentinels[2]).await.as_ref(),
        Some(&pods[0])
    );
    group
        .wait_for("pod 2 attached to pod 0 again", 60, async || {
            is_attached_replica(&pods[2], &pods[0], None)
                .await
                .then_some(())
        })
        .await;
    let sentinel_options = {
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("MASTER").arg("chorus");
        query::<std::collections::HashMap<String, String>>(&sentinels[2], None, cmd)
            .await
            .expect("SENTINEL MASTER")
    };
    assert_eq!(
        sentinel_options
            .get("down-after-milliseconds")
            .map(String::as_str),
        Some("1000"),
        "options set again after the re-monitor"
    );
}

#[tokio::test]
async fn topology_unreachable_members_are_reported_and_do_not_hang_the_pass() {
    let _serial = SERIAL.lock().await;
    let group = Group::start(None).await;
    // A pod that accepts connections but never answers (a hung process),
    // and a sentinel address where nothing listens.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = NodeAddr::new("127.0.0.1", silent.local_addr().expect("addr").port());
    let refused = NodeAddr::new("127.0.0.1", free_port());

    let mut config = group.config();
    config.redis[1] = silent_addr.clone();
    config.sentinels[2] = refused.clone();
    config.call_timeout = Duration::from_millis(500);

    let started = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(30), reconcile_topology(&config))
        .await
        .expect("reconcile_topology must not hang on a dead member")
        .expect("valid config");
    let elapsed = started.elapsed();

    // The rest of the group is set up anyway.
    let pods = &config.redis;
    assert_eq!(report.master.as_ref(), Some(&pods[0]));
    assert_eq!(report.sentinels_agreeing, 2);
    let mut unreachable: Vec<(MemberKind, &NodeAddr)> = report
        .unreachable
        .iter()
        .map(|u| (u.kind, &u.addr))
        .collect();
    unreachable.sort_by_key(|(_, a)| (*a).clone());
    let mut expected = vec![
        (MemberKind::Redis, &silent_addr),
        (MemberKind::Sentinel, &refused),
    ];
    expected.sort_by_key(|(_, a)| (*a).clone());
    assert_eq!(unreachable, expected, "{:#?}", report.unreachable);
    assert!(
        report.unreachable.iter().all(|u| !u.reason.is_empty()),
        "{:#?}",
        report.unreachable
    );
    assert!(!report.converged());
    group
        .wait_for("pod 2 attached to pod 0", 60, async || {
            is_attached_replica(&pods[2], &pods[0], None)
                .await
                .then_some(())
        })
        .await;
    // Two observation passes, each bounded by ~1.5 x call_timeout for the
    // silent pod, plus the actions: far below this on any machine.
    assert!(
        elapsed < Duration::from_secs(15),
        "a pass with a hung pod took {elapsed:?}"
    );
    drop(silent);
}

/// `SENTINEL SENTINELS chorus` as addresses.
async fn sentinel_peers(sentinel: &NodeAddr) -> Option<Vec<NodeAddr>> {
    let mut cmd = redis::cmd("SENTINEL");
    cmd.arg("SENTINELS").arg("chorus");
    let peers: Vec<std::collections::HashMap<String, String>> = query(sentinel, None, cmd).await?;
    peers
        .iter()
        .map(|p| {
            Some(NodeAddr::new(
                p.get("ip")?.clone(),
                p.get("port")?.parse().ok()?,
            ))
        })
        .collect()
}

#[tokio::test]
async fn topology_sentinels_that_remember_a_removed_sentinel_are_reset() {
    let _serial = SERIAL.lock().await;
    let group = Group::start(None).await;
    let pods = group.redis_addrs.clone();
    let sentinels = group.sentinel_addrs.clone();
    group
        .reconcile_until("a converged, fully meshed group", 90, |r| {
            r.converged() && r.ready_replicas() == 2 && sentinels_fully_meshed(r)
        })
        .await;

    // A fourth sentinel joins, is discovered by the others, then goes away
    // for good (a sentinel pod replaced with a new IP looks the same).
    let extra_sentinel = Sentinel::start(None).await;
    let extra = local(extra_sentinel.port);
    let mut monitor = redis::cmd("SENTINEL");
    monitor
        .arg("MONITOR")
        .arg("chorus")
        .arg(&pods[0].host)
        .arg(pods[0].port)
        .arg(2);
    let ok: Option<String> = query(&extra, None, monitor).await;
    assert_eq!(ok.as_deref(), Some("OK"));
    for sentinel in &sentinels {
        group
            .wait_for(&format!("{sentinel} to discover {extra}"), 60, async || {
                sentinel_peers(sentinel)
                    .await
                    .filter(|peers| peers.contains(&extra))
            })
            .await;
    }
    drop(extra_sentinel);

    let reports = group
        .reconcile_until("every sentinel to forget the removed one", 180, |r| {
            r.converged()
                && sentinels_fully_meshed(r)
                && r.observed
                    .sentinels
                    .iter()
                    .all(|s| matches!(&s.view, Ok(Some(v)) if !v.known_sentinels.contains(&extra)))
        })
        .await;
    let mut reset: Vec<&NodeAddr> = reports
        .iter()
        .flat_map(|r| &r.actions)
        .filter_map(|a| match (&a.action, &a.result) {
            (Action::Reset { sentinel }, Ok(())) => Some(sentinel),
            _ => None,
        })
        .collect();
    reset.sort();
    reset.dedup();
    let mut expected: Vec<&NodeAddr> = sentinels.iter().collect();
    expected.sort();
    assert_eq!(reset, expected, "each sentinel was reset");
    for report in &reports {
        let resets = report
            .actions
            .iter()
            .filter(|a| matches!(a.action, Action::Reset { .. }))
            .count();
        assert!(
            resets <= 1,
            "at most one reset per pass: {:#?}",
            report.actions
        );
    }

    // What redis-cli shows: only the real peers, same master everywhere.
    for sentinel in &sentinels {
        let mut peers = sentinel_peers(sentinel).await.expect("SENTINEL SENTINELS");
        peers.sort();
        let mut others: Vec<NodeAddr> = sentinels
            .iter()
            .filter(|s| *s != sentinel)
            .cloned()
            .collect();
        others.sort();
        assert_eq!(peers, others, "peers of {sentinel}");
        assert_eq!(sentinel_master(sentinel).await.as_ref(), Some(&pods[0]));
    }
}
