//! A TCP proxy in front of Redis (or a sentinel) that can make connections
//! misbehave while they stay open:
//! - **silence** existing pub/sub connections: commands still reach Redis,
//!   but nothing Redis sends comes back — the failure mode only a canary can
//!   see;
//! - **hold** replies: what the server sends is kept back (in order, nothing
//!   lost) until [`SilencingProxy::release`] — a server that accepts
//!   connections and commands but answers nothing for now.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which connections have their replies held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Nothing,
    /// Connections that never sent a SUBSCRIBE (open now or later).
    Commands,
    /// Every connection, open now or later.
    Everything,
}

pub struct SilencingProxy {
    pub port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    /// Connections accepted so far; those numbered below `silence_below` and
    /// that sent a SUBSCRIBE are silenced.
    accepted: AtomicU64,
    silence_below: AtomicU64,
    hold: watch::Sender<Hold>,
    /// Reads from the server kept back by a hold so far.
    held: AtomicU64,
}

impl SilencingProxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let shared = Arc::new(Shared {
            accepted: AtomicU64::new(0),
            silence_below: AtomicU64::new(0),
            hold: watch::Sender::new(Hold::Nothing),
            held: AtomicU64::new(0),
        });
        let state = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = state.accepted.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    pipe(number, client, server, state).await;
                });
            }
        });
        Self { port, shared, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Silences every pub/sub connection open now; later ones are untouched.
    pub fn silence_subscribers(&self) {
        self.shared.silence_below.store(
            self.shared.accepted.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }

    /// Holds back the replies on every connection that is not a
    /// subscription (the connection publishes and reads go through), until
    /// [`release`](Self::release).
    pub fn hold_commands(&self) {
        self.shared.hold.send_replace(Hold::Commands);
    }

    /// Holds back everything the server sends on every connection, open now
    /// or later, until [`release`](Self::release): the server accepts
    /// connections and reads commands but never answers.
    pub fn hold_everything(&self) {
        self.shared.hold.send_replace(Hold::Everything);
    }

    /// Lets every held reply through, in order.
    pub fn release(&self) {
        self.shared.hold.send_replace(Hold::Nothing);
    }

    /// How many replies (reads from the server) a hold kept back so far: the
    /// client is waiting for an answer once this is above zero.
    pub fn held(&self) -> u64 {
        self.shared.held.load(Ordering::SeqCst)
    }
}

impl Drop for SilencingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(number: u64, client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
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
        let mut hold = shared.hold.subscribe();
        loop {
            let n = match server_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let held = |h: &Hold| match h {
                Hold::Nothing => false,
                Hold::Commands => !subscriber.load(Ordering::SeqCst),
                Hold::Everything => true,
            };
            if held(&hold.borrow_and_update()) {
                shared.held.fetch_add(1, Ordering::SeqCst);
                // Nothing more is read from the server meanwhile: TCP keeps
                // the rest, in order.
                if hold.wait_for(|h| !held(h)).await.is_err() {
                    return;
                }
            }
            let silenced = subscriber.load(Ordering::SeqCst)
                && number < shared.silence_below.load(Ordering::SeqCst);
            if !silenced && client_wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(up, down);
}
