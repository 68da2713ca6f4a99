//! chorus-bench: a load generator for Chorus fleets.
//!
//! - [`fleet`]: the processes under test (nodes, Redis, Sentinel), or nodes given by URL
//! - [`client`]: wire-protocol subscribers and publishers
//! - [`scenarios`]: fanout, saturate, rooms, idle, failover
//! - [`report`]: the human table and the JSON line
//! - [`hist`], [`procfs`]: latency histograms, CPU and memory from `/proc`

pub mod client;
pub mod fleet;
pub mod hist;
pub mod procfs;
pub mod report;
pub mod scenarios;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use fleet::{BrokerKind, Fleet, FleetSpec};
use report::Report;
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
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout(_) => "fanout",
            Scenario::Saturate(_) => "saturate",
            Scenario::Rooms(_) => "rooms",
            Scenario::Idle(_) => "idle",
            Scenario::Failover(_) => "failover",
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
        let report = {
            let mut fleet = fleet_for(&cli, &spec).await?;
            run_once(&cli.scenario, &mut fleet).await?
        };
        println!("{}", report.table());
        let line = match cli.compare {
            None => {
                let mut v = report.json();
                v["run"] = run.into();
                v
            }
            Some(Compare::Single) => {
                let base = {
                    let mut fleet = Fleet::start(&single).await?;
                    run_once(&cli.scenario, &mut fleet).await?
                };
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
