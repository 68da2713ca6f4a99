//! chorus-bench: a load generator for Chorus fleets.
//!
//! - [`fleet`]: the processes under test (nodes, Redis, Sentinel), or nodes given by URL
//! - [`client`]: wire-protocol subscribers and publishers
//! - [`scenarios`]: fanout, saturate, rooms, idle, failover
//! - [`report`]: the human table and the JSON line
//! - [`hist`], [`procfs`]: latency histograms, CPU and memory from `/proc`

pub mod client;
pub mod fleet;
pub mod floor;
pub mod hist;
pub mod peers;
pub mod procfs;
pub mod report;
pub mod scenarios;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use fleet::{BrokerKind, Fleet, FleetSpec};
use peers::Target;
use report::{Report, ms, num, show};
use scenarios::{FailoverArgs, FanoutArgs, IdleArgs, RoomsArgs, SaturateArgs};

/// Load generator for Chorus: starts a fleet (or targets running nodes),
/// runs one bounded scenario, prints a table and one JSON line per run.
#[derive(Debug, Parser)]
#[command(name = "chorus-bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
    /// Target running nodes instead of starting a fleet (repeat per node;
    /// CPU and memory figures are then unavailable).
    #[arg(long = "url", global = true)]
    pub urls: Vec<String>,
    /// Nodes to start.
    #[arg(long, global = true, default_value_t = 3)]
    pub nodes: usize,
    /// Broker of the started fleet (failover always uses a Sentinel group).
    #[arg(long, global = true, value_enum, default_value_t = BrokerArg::Redis)]
    pub broker: BrokerArg,
    /// Masters of the Redis Cluster (`--broker cluster`).
    #[arg(long, global = true, default_value_t = 3)]
    pub shards: usize,
    /// The chorus-server binary (default: next to this executable).
    #[arg(long, global = true)]
    pub server_bin: Option<PathBuf>,
    /// Extra flag for every started node (repeat; e.g. `--server-arg=--send-queue=4096`).
    #[arg(long = "server-arg", global = true, allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// Also run the scenario against one node with the memory broker and
    /// report the overhead of going multi-node.
    #[arg(long, global = true, value_enum)]
    pub compare: Option<Compare>,
    /// Run the scenario this many times (a fresh fleet each time).
    #[arg(long, global = true, default_value_t = 1)]
    pub runs: usize,
    /// Sentinel down-after-milliseconds (failover).
    #[arg(long, global = true, default_value_t = 1000)]
    pub down_after_ms: u64,
    /// What to run the scenario against: Chorus, or a peer side by side
    /// (installed by `bench/peers/install.sh`; 3 nodes on one Redis).
    #[arg(long, global = true, value_enum, default_value_t = Target::Chorus)]
    pub target: Target,
    /// Skip the loopback floor measured after fanout and saturate runs.
    #[arg(long, global = true)]
    pub no_floor: bool,
    /// The binary that runs the floor's writer (default: this one).
    #[arg(long, global = true, hide = true)]
    pub floor_writer: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerArg {
    Memory,
    Redis,
    /// A Redis Cluster of `--shards` masters (sharded Pub/Sub).
    Cluster,
    /// One Apache Kafka broker (KRaft), jars from scripts/kafka/install.sh.
    Kafka,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compare {
    /// One node, memory broker.
    Single,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// S subscribers in one room, one publisher at a fixed rate, M messages.
    Fanout(FanoutArgs),
    /// Publishers with a window of in-flight publishes for a fixed time.
    Saturate(SaturateArgs),
    /// Many small rooms, each served by subscribers on different nodes.
    Rooms(RoomsArgs),
    /// Idle subscribed connections: memory per connection.
    Idle(IdleArgs),
    /// Continuous publishing while the Redis master is SIGKILLed (Sentinel).
    Failover(FailoverArgs),
    /// The loopback floor's writer (run by the bench itself).
    #[command(hide = true)]
    FloorWriter(floor::WriterArgs),
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout(_) => "fanout",
            Scenario::Saturate(_) => "saturate",
            Scenario::Rooms(_) => "rooms",
            Scenario::Idle(_) => "idle",
            Scenario::Failover(_) => "failover",
            Scenario::FloorWriter(_) => "floor-writer",
        }
    }

    /// The floor to set a run against: (connections, rate, messages).
    fn floor_plan(&self) -> Option<(usize, Option<f64>, u64)> {
        match self {
            Scenario::Fanout(a) => Some((a.subscribers, Some(a.rate), a.messages.min(1000))),
            Scenario::Saturate(a) => Some((a.subscribers, None, 5000)),
            _ => None,
        }
    }
}

async fn run_once(scenario: &Scenario, fleet: &mut Fleet) -> Result<Report> {
    match scenario {
        Scenario::Fanout(a) => scenarios::fanout(fleet, a).await,
        Scenario::Saturate(a) => scenarios::saturate(fleet, a).await,
        Scenario::Rooms(a) => scenarios::rooms(fleet, a).await,
        Scenario::Idle(a) => scenarios::idle(fleet, a).await,
        Scenario::Failover(a) => scenarios::failover(fleet, a).await,
        Scenario::FloorWriter(_) => bail!("floor-writer is not a scenario"),
    }
}

/// Measures the loopback floor for `scenario` (µs of CPU per write) and
/// puts it, and the run's CPU per delivery over it, into `report`.
async fn put_floor(cli: &Cli, report: &mut Report) -> Result<Option<f64>> {
    let scenario = &cli.scenario;
    let Some((conns, rate, messages)) = scenario.floor_plan() else {
        return Ok(None);
    };
    let text = report
        .get("frame_text_bytes")
        .and_then(Value::as_u64)
        .unwrap_or(150) as usize;
    let exe = match &cli.floor_writer {
        Some(exe) => exe.clone(),
        None => std::env::current_exe()?,
    };
    let floor = floor::measure(&exe, conns, text, rate, messages).await?;
    report.put(
        "floor_us_per_delivery",
        "loopback floor (µs CPU per write)",
        num(Some(floor.us_per_write)),
        format!(
            "{:.2} µs ({} writes of {text} B to {conns} sockets)",
            floor.us_per_write, floor.writes
        ),
    );
    let l = &floor.latency;
    report.put(
        "floor_latency_ms",
        "loopback floor latency (ms)",
        json!({"p50": ms(l.quantile(0.5)), "p99": ms(l.quantile(0.99)), "max": ms(l.max())}),
        format!(
            "p50 {:.1} / p99 {:.1} ms",
            ms(l.quantile(0.5)),
            ms(l.quantile(0.99))
        ),
    );
    put_ratio(report, floor.us_per_write);
    Ok(Some(floor.us_per_write))
}

/// The run's CPU per delivery (servers and Redis) over the floor.
fn put_ratio(report: &mut Report, floor_us: f64) {
    let ratio = report
        .get("cpu_s_per_m_deliveries")
        .and_then(Value::as_f64)
        .map(|c| c / floor_us);
    report.put(
        "cpu_over_floor",
        "CPU per delivery ÷ floor",
        num(ratio),
        show(ratio, "×"),
    );
}

/// Raises this process's open-file limit to its hard limit, and the hard
/// limit too when allowed (root), so that `needed` connections fit; the
/// nodes the bench starts inherit it.
fn raise_open_files(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = needed.max(soft);
    let hard = if want > hard { want } else { hard };
    if setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).is_err() {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.max(soft), hard);
    }
}

async fn fleet_for(cli: &Cli, spec: &FleetSpec) -> Result<Fleet> {
    if cli.urls.is_empty() {
        Fleet::start(spec).await
    } else {
        Fleet::external(&cli.urls)
    }
}

/// Runs what the command line asks; prints each run and returns the JSON lines.
pub async fn run(cli: Cli) -> Result<Vec<Value>> {
    if let Scenario::FloorWriter(args) = &cli.scenario {
        floor::write(args)?;
        return Ok(Vec::new());
    }
    // Enough for the idle scenario's connections on both ends and more.
    raise_open_files(262_144);
    if cli.target != Target::Chorus && (cli.compare.is_some() || !cli.urls.is_empty()) {
        bail!(
            "--target {} starts its own fleet: no --compare, no --url",
            cli.target.name()
        );
    }
    let failover = matches!(cli.scenario, Scenario::Failover(_));
    if failover && !cli.urls.is_empty() {
        bail!("failover kills the Redis master: it needs the fleet the bench starts (no --url)");
    }
    if failover && cli.compare.is_some() {
        bail!("--compare single has no meaning for failover (a single memory node has no Redis)");
    }
    if cli.compare.is_some() && !cli.urls.is_empty() {
        bail!("--compare single starts its own node: drop --url");
    }
    let spec = FleetSpec {
        nodes: cli.nodes,
        broker: match (failover, cli.broker) {
            (true, _) => BrokerKind::Sentinel,
            (false, BrokerArg::Memory) => BrokerKind::Memory,
            (false, BrokerArg::Redis) => BrokerKind::Redis,
            (false, BrokerArg::Cluster) => BrokerKind::Cluster(cli.shards.max(1)),
            (false, BrokerArg::Kafka) => BrokerKind::Kafka,
        },
        server_bin: cli
            .server_bin
            .clone()
            .unwrap_or_else(fleet::default_server_bin),
        server_args: cli.server_args.clone(),
        down_after_ms: cli.down_after_ms,
        target: cli.target,
    };
    if spec.broker == BrokerKind::Memory && spec.nodes > 1 {
        bail!("the memory broker does not connect nodes: use --nodes 1 with --broker memory");
    }
    let single = FleetSpec {
        nodes: 1,
        broker: BrokerKind::Memory,
        ..spec.clone()
    };
    let mut lines = Vec::new();
    for run in 1..=cli.runs.max(1) {
        let mut report = {
            let mut fleet = fleet_for(&cli, &spec).await?;
            run_once(&cli.scenario, &mut fleet).await?
        };
        report.put_json("target", cli.target.name());
        let floor = match cli.no_floor {
            true => None,
            false => put_floor(&cli, &mut report).await?,
        };
        println!("{}", report.table());
        let line = match cli.compare {
            None => {
                let mut v = report.json();
                v["run"] = run.into();
                v
            }
            Some(Compare::Single) => {
                let mut base = {
                    let mut fleet = Fleet::start(&single).await?;
                    run_once(&cli.scenario, &mut fleet).await?
                };
                if let Some(floor) = floor {
                    put_ratio(&mut base, floor);
                }
                println!("{}", base.table());
                let (overhead, shown) = report::compare(&report, &base);
                println!("{shown}");
                json!({
                    "scenario": cli.scenario.name(), "run": run, "compare": "single",
                    "fleet": report.json(), "single": base.json(), "overhead": overhead,
                })
            }
        };
        println!("{line}");
        lines.push(line);
    }
    Ok(lines)
}
