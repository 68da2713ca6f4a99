//! The peers Chorus is measured against, run side by side by the same
//! scenarios (`--target`): Centrifugo v6 (Redis engine, its JSON protocol
//! over WebSocket, its HTTP publish API) and Socket.IO 4 with
//! `@socket.io/redis-adapter` (a Node script, `peers/socketio/server.js`).
//! Their versions and configurations live in `bench/peers/`; the peers
//! themselves are installed outside the repository by
//! `bench/peers/install.sh` (into `~/.cache/chorus/bench`, or
//! `$CHORUS_BENCH_PEERS`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chorus_testkit::chorus::http_ok_probe;
use chorus_testkit::daemon::{Daemon, DaemonSpec, Probe};
use chorus_testkit::process::{ProcSpec, free_port, workdir};

/// What the scenarios run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Chorus,
    Centrifugo,
    Socketio,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Chorus => "chorus",
            Target::Centrifugo => "centrifugo",
            Target::Socketio => "socketio",
        }
    }
}

/// Where `bench/peers/install.sh` put the peers.
pub fn installed() -> PathBuf {
    std::env::var_os("CHORUS_BENCH_PEERS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/chorus/bench")))
        .unwrap_or_else(|| PathBuf::from(".cache/chorus/bench"))
}

/// `bench/peers` in the source tree (scripts and configurations).
pub fn sources() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// A started peer node: the process, its WebSocket URL and HTTP base.
pub struct PeerNode {
    pub daemon: Daemon,
    pub ws_url: String,
    pub http_base: String,
}

/// The API key the Centrifugo configuration sets for its HTTP API.
pub const CENTRIFUGO_API_KEY: &str = "chorus-bench";

/// Starts one node of `target` (not Chorus) on Redis at `redis_addr`
/// (`127.0.0.1:port`), without waiting for it.
pub fn spawn(target: Target, redis_addr: &str) -> Result<PeerNode> {
    let port = free_port();
    let base = installed();
    let (name, program, args, env, probe, ws_path) = match target {
        Target::Chorus => bail!("Chorus nodes are started by the fleet itself"),
        Target::Centrifugo => {
            let bin = base.join("bin/centrifugo");
            let config = sources().join("centrifugo/config.json");
            (
                "centrifugo",
                bin,
                vec!["--config".to_owned(), config.display().to_string()],
                vec![
                    ("CENTRIFUGO_HTTP_SERVER_PORT".to_owned(), port.to_string()),
                    (
                        "CENTRIFUGO_ENGINE_REDIS_ADDRESS".to_owned(),
                        format!("redis://{redis_addr}"),
                    ),
                ],
                http_ok_probe(format!("http://127.0.0.1:{port}/health")),
                "/connection/websocket",
            )
        }
        Target::Socketio => {
            let script = sources().join("socketio/server.js");
            (
                "socket.io",
                PathBuf::from("node"),
                vec![script.display().to_string()],
                vec![
                    ("PORT".to_owned(), port.to_string()),
                    ("REDIS_URL".to_owned(), format!("redis://{redis_addr}")),
                    (
                        "NODE_PATH".to_owned(),
                        base.join("socketio/node_modules").display().to_string(),
                    ),
                    ("NODE_ENV".to_owned(), "production".to_owned()),
                ],
                tcp_probe(port),
                "/socket.io/?EIO=4&transport=websocket",
            )
        }
    };
    if program.is_absolute() && !program.exists() {
        bail!(
            "{} is not installed: run bench/peers/install.sh",
            program.display()
        );
    }
    let dir = workdir(name).context("peer work directory")?;
    let daemon = Daemon::spawn(DaemonSpec {
        port,
        proc: ProcSpec {
            name: format!("{name} :{port}"),
            program,
            args,
            env,
            log: dir.path().join(format!("{name}.log")),
            group: false,
        },
        dir,
        ready_when: format!("{name} to listen on {port}"),
        probe,
    })?;
    Ok(PeerNode {
        daemon,
        ws_url: format!("ws://127.0.0.1:{port}{ws_path}"),
        http_base: format!("http://127.0.0.1:{port}"),
    })
}

/// Ready once the port accepts a connection.
fn tcp_probe(port: u16) -> Probe {
    Arc::new(move || {
        Box::pin(async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
    })
}
