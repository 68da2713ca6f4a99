//! A server process on a port of 127.0.0.1 that answers a readiness
//! probe: what every kind of process in this kit shares (start, wait until
//! ready, kill, restart on the same port, freeze, thaw, log). Each kind
//! wraps one and dereferences to it, so `redis.kill()` and
//! `sentinel.freeze()` are the same code.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use crate::Result;
use crate::process::{Proc, ProcSpec};

/// How long a started or restarted process may take to be ready.
pub const START_LIMIT: Duration = Duration::from_secs(20);

/// Whether the process is ready: a PING, an HTTP GET, a client connection.
pub type Probe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// A process listening on `127.0.0.1:<port>`, with its directory.
pub struct Daemon {
    pub port: u16,
    proc: Proc,
    /// For messages: "redis-server to answer PING".
    ready_when: String,
    probe: Probe,
    // Last: removed after the process is gone.
    dir: TempDir,
}

/// What [`Daemon::spawn`] starts.
pub struct DaemonSpec {
    pub port: u16,
    /// Removed when the daemon is dropped.
    pub dir: TempDir,
    pub proc: ProcSpec,
    /// For messages: "redis-server to answer PING".
    pub ready_when: String,
    pub probe: Probe,
}

impl Daemon {
    /// Starts the process without waiting for it.
    pub fn spawn(spec: DaemonSpec) -> Result<Self> {
        Ok(Self {
            port: spec.port,
            proc: Proc::spawn(spec.proc)?,
            ready_when: spec.ready_when,
            probe: spec.probe,
            dir: spec.dir,
        })
    }

    /// [`Daemon::spawn`], then [`Daemon::ready`] within [`START_LIMIT`].
    pub async fn launch(spec: DaemonSpec) -> Result<Self> {
        let mut daemon = Self::spawn(spec)?;
        daemon.ready(START_LIMIT).await?;
        Ok(daemon)
    }

    /// Waits until the probe says ready; fails early if the process exits.
    pub async fn ready(&mut self, limit: Duration) -> Result<()> {
        let probe = self.probe.clone();
        self.proc
            .wait_ready(&self.ready_when, limit, async || probe().await)
            .await
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its directory (configuration, data, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the process again on the same port with the same command
    /// line, and waits until it is ready.
    pub async fn try_restart(&mut self) -> Result<()> {
        self.proc.respawn()?;
        self.ready(START_LIMIT).await
    }

    /// [`Daemon::try_restart`], panicking with the error (for tests).
    pub async fn restart(&mut self) {
        self.try_restart().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGSTOP: the process keeps its connections and answers nothing, as
    /// a hung or starved one would, until [`Daemon::thaw`].
    pub fn freeze(&self) {
        self.proc.freeze().unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGCONT after [`Daemon::freeze`].
    pub fn thaw(&self) {
        self.proc.thaw().unwrap_or_else(|e| panic!("{e}"));
    }

    /// The process itself: SIGTERM, exit status.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}

/// `Deref` and `DerefMut` to the [`Daemon`] inside a process kind.
macro_rules! deref_daemon {
    ($kind:ty) => {
        impl std::ops::Deref for $kind {
            type Target = $crate::daemon::Daemon;
            fn deref(&self) -> &Self::Target {
                &self.daemon
            }
        }
        impl std::ops::DerefMut for $kind {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.daemon
            }
        }
    };
}
pub(crate) use deref_daemon;
