//! The managed group's own scripts (`operator/src/build/scripts/`) run as
//! they run in the pods, against real `redis-server` and `redis-sentinel`
//! processes on loopback: a new group elects pod 0; a master restarted
//! faster than Sentinel notices never serves empty under its old name; all
//! members restarted at once come back with one master; a master lost with
//! every sentinel is replaced by the operator's topology step with the
//! member holding the data; a stranger cannot reconfigure a sentinel.
//!
//! Every wait polls what `redis-cli` would show, with a deadline for a busy
//! machine; nothing sleeps a fixed time.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use chorus_operator::topology::{NodeAddr, TopologyConfig, reconcile_topology};
use chorus_testkit::{Proc, ProcSpec, free_port};

const PASSWORD: &str = "group-test-password";
const DOWN_AFTER_MS: u64 = 1000;
/// Generous: a Sentinel starved of CPU (a busy CI machine) enters TILT mode for
/// 30 s before it fails anything over.
const WAIT: Duration = Duration::from_secs(120);

/// Groups run one at a time: a Sentinel starved of CPU enters TILT mode.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/build/scripts")
        .join(name)
}

/// `span` free ports in a row, below the kernel's ephemeral range (32768
/// and up): a port picked there is never handed to an outgoing connection
/// (the test's redis-cli calls, a replica's link, a sentinel's) between the
/// pick and the member binding it, as one from `127.0.0.1:0` can be — a
/// member that then cannot move to its port (or get it back after a
/// restart) stops, and the group never settles. In a pod the ports are
/// fixed and outside that range.
fn free_ports(span: u16) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Test binaries running side by side start at different places.
    let base = (std::process::id() % 1000) as u16 * 20;
    loop {
        let port = 12_000 + (base + NEXT.fetch_add(span, Ordering::Relaxed)) % 20_000;
        if (0..span).all(|k| TcpListener::bind(("127.0.0.1", port + k)).is_ok()) {
            return port;
        }
    }
}

/// A port whose neighbour (the waiting room) is free too.
fn free_pair() -> u16 {
    free_ports(2)
}

/// One script run (and the redis-server it starts), in a process group of
/// its own: killed together, like a container.
struct Member {
    proc: Option<Proc>,
    addr: String,
    data: PathBuf,
    sentinel: bool,
}

/// What every script of a group is told.
struct Lists {
    peers: String,
    sentinels: String,
    bootstrap: String,
}

impl Member {
    fn start(&mut self, group: &Lists) {
        let (script_name, mut env): (&str, Vec<(&str, String)>) = if self.sentinel {
            (
                "sentinel.sh",
                vec![
                    ("CHORUS_QUORUM", "2".to_owned()),
                    ("CHORUS_DOWN_AFTER_MS", DOWN_AFTER_MS.to_string()),
                    ("CHORUS_FAILOVER_TIMEOUT_MS", "4000".to_owned()),
                ],
            )
        } else {
            (
                "redis.sh",
                vec![
                    ("CHORUS_BOOTSTRAP", group.bootstrap.clone()),
                    (
                        "CHORUS_CONF",
                        self.data.join("redis.conf").display().to_string(),
                    ),
                    ("CHORUS_REDIS_CONF", "appendonly no\nsave \"\"".to_owned()),
                    ("CHORUS_PRESTOP_SECONDS", "10".to_owned()),
                ],
            )
        };
        let data = self.data.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        env.extend([
            ("REDIS_PASSWORD", PASSWORD.to_owned()),
            ("CHORUS_SELF", self.addr.clone()),
            ("CHORUS_PEERS", group.peers.clone()),
            ("CHORUS_SENTINELS", group.sentinels.clone()),
            ("CHORUS_DATA", data.display().to_string()),
            ("CHORUS_CALL_TIMEOUT", "1".to_owned()),
        ]);
        let spec = ProcSpec {
            name: format!("{script_name} {}", self.addr),
            program: "sh".into(),
            args: vec![
                script(script_name).display().to_string(),
                "start".to_owned(),
            ],
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            log: self.data.join(format!("{script_name}.log")),
            group: true,
        };
        self.proc = Some(Proc::spawn(spec).expect("start the script"));
    }

    /// SIGKILL to the script and its redis-server, as when a container dies.
    fn kill(&mut self) {
        self.proc = None;
    }

    /// A new pod: its emptyDir is gone too.
    fn wipe(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.data.join("data"));
    }

    fn node(&self) -> NodeAddr {
        let (host, port) = self.addr.rsplit_once(':').expect("host:port");
        NodeAddr::new(host, port.parse().expect("port"))
    }
}

/// Three members and three sentinels, run by the scripts.
struct Group {
    redis: Vec<Member>,
    sentinels: Vec<Member>,
    dir: PathBuf,
}

impl Group {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "chorus-group-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let member = |i: usize, port: u16, sentinel: bool| Member {
            proc: None,
            addr: format!("127.0.0.1:{port}"),
            data: dir.join(format!("{}{i}", if sentinel { "s" } else { "r" })),
            sentinel,
        };
        let redis = (0..3).map(|i| member(i, free_pair(), false)).collect();
        let sentinels = (0..3).map(|i| member(i, free_ports(1), true)).collect();
        Self {
            redis,
            sentinels,
            dir,
        }
    }

    fn list(&self, sentinels: bool) -> String {
        let members = if sentinels {
            &self.sentinels
        } else {
            &self.redis
        };
        members
            .iter()
            .map(|m| m.addr.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn lists(&self) -> Lists {
        Lists {
            peers: self.list(false),
            sentinels: self.list(true),
            bootstrap: self.redis[0].addr.clone(),
        }
    }

    fn start_all(&mut self) {
        for i in 0..3 {
            self.start_redis(i);
            self.start_sentinel(i);
        }
    }

    fn start_redis(&mut self, i: usize) {
        let lists = self.lists();
        self.redis[i].start(&lists);
    }

    fn start_sentinel(&mut self, i: usize) {
        let lists = self.lists();
        self.sentinels[i].start(&lists);
    }

    fn config(&self) -> TopologyConfig {
        let mut c = TopologyConfig::new(
            self.redis.iter().map(Member::node).collect(),
            self.sentinels.iter().map(Member::node).collect(),
            2,
        );
        c.password = Some(PASSWORD.to_owned());
        c.sentinel_password = Some(PASSWORD.to_owned());
        c.down_after = Some(Duration::from_millis(DOWN_AFTER_MS));
        c.failover_timeout = Some(Duration::from_millis(4000));
        c
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for m in self.redis.iter_mut().chain(self.sentinels.iter_mut()) {
            m.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli` against `addr` with the group's password; `None` when it
/// does not answer.
fn cli(addr: &str, args: &[&str]) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    let out = Command::new("timeout")
        .args([
            "2",
            "redis-cli",
            "--no-auth-warning",
            "-h",
            host,
            "-p",
            port,
        ])
        .args(args)
        .env("REDISCLI_AUTH", PASSWORD)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    (out.status.success() && !text.contains("Could not connect")).then_some(text)
}

fn role(addr: &str) -> Option<String> {
    cli(addr, &["ROLE"]).and_then(|t| t.lines().next().map(str::to_owned))
}

fn keys(addr: &str) -> Option<u64> {
    cli(addr, &["DBSIZE"]).and_then(|t| t.trim().parse().ok())
}

fn sentinel_master(addr: &str) -> Option<String> {
    let text = cli(addr, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "chorus"])?;
    let mut lines = text.lines();
    Some(format!("{}:{}", lines.next()?, lines.next()?)).filter(|m| m != ":")
}

async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Exactly one member serves as master, every other serves as its replica
/// with the link up, and every sentinel names it. Returns its index.
fn settled(g: &Group) -> Option<usize> {
    let roles: Vec<Option<String>> = g.redis.iter().map(|m| role(&m.addr)).collect();
    let masters: Vec<usize> = (0..3)
        .filter(|i| roles[*i].as_deref() == Some("master"))
        .collect();
    let [master] = masters[..] else { return None };
    let linked = g.redis.iter().enumerate().all(|(i, m)| {
        i == master
            || cli(&m.addr, &["INFO", "replication"]).is_some_and(|info| {
                info.contains("master_link_status:up")
                    && info.contains(&format!("master_port:{}", m_port(&g.redis[master].addr)))
            })
    });
    let named = g
        .sentinels
        .iter()
        .all(|s| sentinel_master(&s.addr).as_deref() == Some(g.redis[master].addr.as_str()));
    (linked && named).then_some(master)
}

fn m_port(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("")
}

fn write_keys(addr: &str, n: usize) {
    for i in 0..n {
        cli(addr, &["SET", &format!("k{i}"), "v"]).expect("write");
    }
}

async fn every_member_holds(g: &Group, n: u64, what: &str) {
    eventually(what, || {
        g.redis
            .iter()
            .all(|m| keys(&m.addr) == Some(n))
            .then_some(())
    })
    .await;
}

/// What each member and sentinel says, and the end of its script's log:
/// printed when a group does not settle (the group's directory goes with
/// it).
fn describe(g: &Group) -> String {
    let mut out = String::new();
    for m in g.redis.iter().chain(&g.sentinels) {
        let what = if m.sentinel {
            format!("names {:?}", sentinel_master(&m.addr))
        } else {
            format!(
                "role {:?}, {:?}",
                role(&m.addr),
                cli(&m.addr, &["INFO", "replication"]).map(|i| {
                    i.lines()
                        .filter(|l| {
                            l.starts_with("master_port") || l.starts_with("master_link_status")
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
            )
        };
        let name = if m.sentinel {
            "sentinel.sh"
        } else {
            "redis.sh"
        };
        let log = std::fs::read_to_string(m.data.join(format!("{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        out += &format!("--- {} {}: {what}\n", name, m.addr);
        for line in tail.iter().rev() {
            out += &format!("    {line}\n");
        }
    }
    out
}

/// Waits until the group is [`settled`]; on a timeout says what each
/// member and sentinel says.
async fn settle(g: &Group, what: &str) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(master) = settled(g) {
            return master;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            describe(g)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn bootstrapped(tag: &str) -> Group {
    let mut g = Group::new(tag);
    g.start_all();
    let master = settle(&g, "a new group to elect pod 0 and settle").await;
    assert_eq!(master, 0, "a new group starts with pod 0 as master");
    g
}

#[tokio::test]
async fn a_new_group_elects_pod_zero_and_replicates_it() {
    let _serial = SERIAL.lock().await;
    let g = bootstrapped("new").await;
    write_keys(&g.redis[0].addr, 20);
    every_member_holds(&g, 20, "the replicas to receive the writes").await;
    // Readiness as the pods report it.
    for m in &g.redis {
        let ready = Command::new("sh")
            .arg(script("redis.sh"))
            .arg("ready")
            .env("REDIS_PASSWORD", PASSWORD)
            .env("CHORUS_SELF", &m.addr)
            .env("CHORUS_PEERS", g.list(false))
            .env("CHORUS_SENTINELS", g.list(true))
            .status()
            .expect("ready");
        assert!(ready.success(), "{} reports not ready", m.addr);
    }
}

#[tokio::test]
async fn a_master_restarted_empty_faster_than_sentinel_notices_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut g = bootstrapped("restart").await;
    write_keys(&g.redis[0].addr, 50);
    every_member_holds(&g, 50, "the writes to replicate").await;
    // The container dies and comes back at once, with no persistence: it
    // holds nothing, and the sentinels still name it master.
    g.redis[0].kill();
    g.start_redis(0);
    let master = eventually("one master again, with every replica linked", || {
        settled(&g)
    })
    .await;
    assert_ne!(master, 0, "the empty member must not stay master");
    every_member_holds(&g, 50, "every member to hold the 50 keys").await;
}

#[tokio::test]
async fn all_members_restarted_at_once_come_back_with_one_master() {
    let _serial = SERIAL.lock().await;
    let mut g = bootstrapped("all").await;
    for i in 0..3 {
        g.redis[i].wipe();
    }
    for i in 0..3 {
        g.start_redis(i);
    }
    settle(&g, "one master again, with every replica linked").await;
}

#[tokio::test]
async fn a_master_lost_with_every_sentinel_is_replaced_by_the_member_holding_the_data() {
    let _serial = SERIAL.lock().await;
    let mut g = bootstrapped("lost").await;
    write_keys(&g.redis[0].addr, 30);
    every_member_holds(&g, 30, "the writes to replicate").await;
    g.redis[0].wipe();
    for i in 0..3 {
        g.sentinels[i].wipe();
    }
    for i in 0..3 {
        g.start_sentinel(i);
    }
    g.start_redis(0);
    // Nobody can tell who should lead: the members wait rather than serve
    // the empty pod's data, and the sentinels monitor nothing.
    eventually("the restarted member to wait in its waiting room", || {
        let waiting = format!(
            "127.0.0.1:{}",
            m_port(&g.redis[0].addr).parse::<u16>().ok()? + 1
        );
        (role(&g.redis[0].addr).is_none() && keys(&waiting) == Some(0)).then_some(())
    })
    .await;
    assert!(
        g.sentinels
            .iter()
            .all(|s| sentinel_master(&s.addr).is_none())
    );
    // The operator's topology step chooses the member with the data.
    let config = g.config();
    let report = eventually_async(|| async {
        let report = reconcile_topology(&config).await.expect("valid config");
        report.master.clone().map(|_| report)
    })
    .await;
    let chosen = report.master.expect("a master").to_string();
    assert_ne!(chosen, g.redis[0].addr, "never the empty pod");
    let master = eventually("one master again, with every replica linked", || {
        // Later passes re-attach what the first could not.
        settled(&g)
    })
    .await;
    assert_eq!(g.redis[master].addr, chosen);
    every_member_holds(&g, 30, "every member to hold the 30 keys").await;
}

async fn eventually_async<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_stranger_cannot_point_a_sentinel_elsewhere() {
    let _serial = SERIAL.lock().await;
    let g = bootstrapped("stranger").await;
    let (host, port) = g.sentinels[0].addr.rsplit_once(':').expect("addr");
    let out = Command::new("redis-cli")
        .args([
            "-h", host, "-p", port, "SENTINEL", "MONITOR", "evil", "10.9.9.9", "6379", "1",
        ])
        .output()
        .expect("redis-cli");
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.contains("NOAUTH"),
        "a sentinel without a password: {reply}"
    );
    assert!(
        cli(&g.sentinels[0].addr, &["SENTINEL", "MASTERS"]).is_some_and(|m| !m.contains("evil"))
    );
}

#[tokio::test]
async fn a_stopping_master_hands_over_without_losing_an_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let mut g = bootstrapped("handover").await;
    // A writer that follows the sentinels, like a server: each write it
    // was told succeeded must survive the hand-over.
    let sentinels: Vec<String> = g.sentinels.iter().map(|s| s.addr.clone()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Some(master) = sentinels.iter().find_map(|s| sentinel_master(s)) else {
                    continue;
                };
                if cli(&master, &["SET", &format!("w{n}"), "v"]).is_some_and(|r| r.trim() == "OK") {
                    acked.push(n);
                }
                n += 1;
            }
            acked
        })
    };
    eventually("writes to flow", || {
        (keys(&g.redis[0].addr)? > 20).then_some(())
    })
    .await;
    // What Kubernetes does before it stops the master's container.
    let prestop = Command::new("sh")
        .arg(script("redis.sh"))
        .arg("prestop")
        .env("REDIS_PASSWORD", PASSWORD)
        .env("CHORUS_SELF", &g.redis[0].addr)
        .env("CHORUS_PEERS", g.list(false))
        .env("CHORUS_SENTINELS", g.list(true))
        .env("CHORUS_CALL_TIMEOUT", "1")
        .env("CHORUS_PRESTOP_SECONDS", "20")
        .status()
        .expect("prestop");
    assert!(prestop.success());
    // Then Kubernetes stops the container.
    g.redis[0].kill();
    // Keep writing to the new master for a moment, then stop.
    let new_master = eventually("the sentinels to name the new master", || {
        sentinel_master(&g.sentinels[0].addr).filter(|m| *m != g.redis[0].addr)
    })
    .await;
    let before = keys(&new_master).expect("new master answers");
    eventually("writes to go on", || {
        (keys(&new_master)? > before + 10).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().expect("writer");
    let lost: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|n| cli(&new_master, &["EXISTS", &format!("w{n}")]).is_none_or(|r| r.trim() != "1"))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
}
