//! A TCP proxy in front of Redis that can make existing pub/sub connections
//! go silent: they stay open, commands still reach Redis, but nothing Redis
//! sends comes back — the failure mode only a canary can see.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct SilencingProxy {
    pub port: u16,
    /// Connections accepted so far; those numbered below `silence_below` and
    /// that sent a SUBSCRIBE are silenced.
    accepted: Arc<AtomicU64>,
    silence_below: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl SilencingProxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let accepted = Arc::new(AtomicU64::new(0));
        let silence_below = Arc::new(AtomicU64::new(0));
        let (acc, below) = (accepted.clone(), silence_below.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = acc.fetch_add(1, Ordering::SeqCst);
                let below = below.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    pipe(number, client, server, below).await;
                });
            }
        });
        Self {
            port,
            accepted,
            silence_below,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Silences every pub/sub connection open now; later ones are untouched.
    pub fn silence_subscribers(&self) {
        self.silence_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for SilencingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(number: u64, client: TcpStream, server: TcpStream, silence_below: Arc<AtomicU64>) {
    let subscriber = Arc::new(AtomicBool::new(false));
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let sub = subscriber.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if buf[..n]
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
            {
                sub.store(true, Ordering::SeqCst);
            }
            if server_wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let silenced =
                subscriber.load(Ordering::SeqCst) && number < silence_below.load(Ordering::SeqCst);
            if !silenced && client_wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(up, down);
}
