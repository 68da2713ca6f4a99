//! The loopback floor: what writing the same deliveries costs a minimal
//! program, measured in the same run as the scenario it is set against.
//!
//! A child process (this binary's hidden `floor-writer` command) accepts
//! as many loopback connections as the scenario had subscribers and writes
//! the same WebSocket frame (same size: header and text) to each in turn,
//! one `write` per delivery, at the scenario's rate (or as fast as it can);
//! the bench reads every socket with tokio tasks, as its subscribers do.
//! The writer's CPU per write is the floor: on loopback it includes the
//! receiver's TCP processing and wake-up, which no server can avoid
//! without writing several messages at once.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncReadExt;

use crate::procfs;

/// The hidden `floor-writer` command (run by [`measure`]).
#[derive(Debug, Clone, clap::Args)]
pub struct WriterArgs {
    #[arg(long)]
    pub conns: usize,
    /// Bytes of the frame's text (the header is added).
    #[arg(long)]
    pub text: usize,
    /// Messages per second; 0: as fast as it can.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    #[arg(long)]
    pub messages: u64,
}

/// The floor measured: writer CPU per write.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    pub us_per_write: f64,
    pub writes: u64,
}

/// Runs the writer in a child process and reads what it writes; the
/// writer's CPU seconds per write.
pub async fn measure(
    exe: &std::path::Path,
    conns: usize,
    text: usize,
    rate: Option<f64>,
    messages: u64,
) -> Result<Floor> {
    let child = Command::new(exe)
        .args([
            "floor-writer",
            "--conns",
            &conns.to_string(),
            "--text",
            &text.to_string(),
            "--rate",
            &rate.unwrap_or(0.0).to_string(),
            "--messages",
            &messages.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the floor writer")?;
    // Killed and reaped however this ends.
    let mut child = chorus_testkit::ChildGuard(child);
    let stdout = child.0.stdout.take().context("writer stdout")?;
    let (port, lines) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let port: u16 = lines.next().context("writer port")??.trim().parse()?;
        anyhow::Ok((port, lines))
    })
    .await??;
    let mut readers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut total = 0u64;
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            total
        }));
    }
    let result = tokio::task::spawn_blocking(move || {
        let mut lines = lines;
        let line = lines.next().context("writer result")??;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        anyhow::Ok(v)
    })
    .await??;
    for r in readers {
        r.await?;
    }
    drop(child);
    let cpu = result["cpu_s"].as_f64().context("cpu_s")?;
    let writes = result["writes"].as_u64().context("writes")?;
    if writes == 0 {
        bail!("the floor writer wrote nothing");
    }
    Ok(Floor {
        us_per_write: cpu / writes as f64 * 1e6,
        writes,
    })
}

/// The writer: accepts `conns` connections, then writes the frame to each
/// in turn, `messages` times; prints its port first, then its CPU.
pub fn write(args: &WriterArgs) -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let mut socks = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        let (tcp, _) = listener.accept()?;
        tcp.set_nodelay(true)?;
        socks.push(tcp);
    }
    let mut frame = Vec::with_capacity(args.text + 10);
    frame.push(0x81);
    match args.text {
        n if n < 126 => frame.push(n as u8),
        n if n < 65536 => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.resize(frame.len() + args.text, b'x');
    // Let the readers settle, as the scenarios do before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let before = procfs::self_cpu();
    let start = Instant::now();
    let mut writes = 0u64;
    for k in 0..args.messages {
        if args.rate > 0.0 {
            let due = start + Duration::from_secs_f64(k as f64 / args.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        for tcp in &mut socks {
            tcp.write_all(&frame)?;
            writes += 1;
        }
    }
    let cpu = procfs::self_cpu() - before;
    println!("{}", serde_json::json!({"cpu_s": cpu, "writes": writes}));
    std::io::stdout().flush()?;
    Ok(())
}
