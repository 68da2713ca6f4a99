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
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chorus_operator::topology::{NodeAddr, TopologyConfig, reconcile_topology};

const PASSWORD: &str = "group-test-password";
const DOWN_AFTER_MS: u64 = 1000;
const WAIT: Duration = Duration::from_secs(40);

/// Groups run one at a time: a Sentinel starved of CPU enters TILT mode.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/build/scripts")
        .join(name)
}

/// A port whose neighbour (the waiting room) is free too.
fn free_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = a.local_addr().expect("addr").port();
        if port < 65000 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

/// One script run (and the redis-server it starts), in a process group of
/// its own: killed together, like a container.
struct Member {
    child: Option<Child>,
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
        let (program, extra): (PathBuf, Vec<(&str, String)>) = if self.sentinel {
            (
                script("sentinel.sh"),
                vec![
                    ("CHORUS_QUORUM", "2".to_owned()),
                    ("CHORUS_DOWN_AFTER_MS", DOWN_AFTER_MS.to_string()),
                    ("CHORUS_FAILOVER_TIMEOUT_MS", "4000".to_owned()),
                ],
            )
        } else {
            (
                script("redis.sh"),
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
        let mut cmd = Command::new("sh");
        cmd.arg(program)
            .arg("start")
            .env("REDIS_PASSWORD", PASSWORD)
            .env("CHORUS_SELF", &self.addr)
            .env("CHORUS_PEERS", &group.peers)
            .env("CHORUS_SENTINELS", &group.sentinels)
            .env("CHORUS_DATA", &data)
            .env("CHORUS_CALL_TIMEOUT", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        self.child = Some(cmd.spawn().expect("start the script"));
    }

    /// SIGKILL to the script and its redis-server, as when a container dies.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
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

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
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
            child: None,
            addr: format!("127.0.0.1:{port}"),
            data: dir.join(format!("{}{i}", if sentinel { "s" } else { "r" })),
            sentinel,
        };
        let redis = (0..3).map(|i| member(i, free_pair(), false)).collect();
        let sentinels = (0..3).map(|i| member(i, free_port(), true)).collect();
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

async fn bootstrapped(tag: &str) -> Group {
    let mut g = Group::new(tag);
    g.start_all();
    let master = eventually("a new group to elect pod 0 and settle", || settled(&g)).await;
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
    eventually("one master again, with every replica linked", || {
        settled(&g)
    })
    .await;
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
