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

use crate::hist::Histogram;
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

/// The floor measured: writer CPU per write, and how long after it was
/// sent each frame reached the bench (the latency no server can beat on
/// this machine: the same writes, read by the same kind of tasks).
#[derive(Debug, Clone)]
pub struct Floor {
    pub us_per_write: f64,
    pub writes: u64,
    pub latency: Histogram,
}

/// Microseconds since the Unix epoch: the writer and the bench are two
/// processes on one machine, so they share this clock.
fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The frame's text starts with its message's send time, this many digits.
const STAMP: usize = 20;

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
    let text = text.max(STAMP);
    let header = frame_header(text).len();
    let frame_len = header + text;
    let mut readers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut pending: Vec<u8> = Vec::with_capacity(2 * frame_len);
            let mut latency = Histogram::default();
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let now = wall_us();
                pending.extend_from_slice(&buf[..n]);
                let whole = pending.len() / frame_len * frame_len;
                for frame in pending[..whole].chunks_exact(frame_len) {
                    let stamp = std::str::from_utf8(&frame[header..header + STAMP])
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(now);
                    latency.record(now.saturating_sub(stamp));
                }
                pending.drain(..whole);
            }
            latency
        }));
    }
    let result = tokio::task::spawn_blocking(move || {
        let mut lines = lines;
        let line = lines.next().context("writer result")??;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        anyhow::Ok(v)
    })
    .await??;
    let mut latency = Histogram::default();
    for r in readers {
        latency.merge(&r.await?);
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
        latency,
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
    let text = args.text.max(STAMP);
    let mut frame = frame_header(text);
    let header = frame.len();
    frame.resize(header + text, b'x');
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
        // Stamped when it is sent, as a publisher stamps a message.
        let stamp = wall_us();
        frame[header..header + STAMP].copy_from_slice(format!("{stamp:0STAMP$}").as_bytes());
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

/// A server-to-client WebSocket text frame's header for `text` bytes.
fn frame_header(text: usize) -> Vec<u8> {
    let mut h = vec![0x81];
    match text {
        n if n < 126 => h.push(n as u8),
        n if n < 65536 => {
            h.push(126);
            h.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            h.push(127);
            h.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    h
}
