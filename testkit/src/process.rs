//! Child processes on loopback: a free port, a private directory that is
//! removed on drop (kept when `CHORUS_KEEP_TEST_DIRS` is set, to read the
//! logs after a failure), and a [`Proc`] that can be killed, restarted,
//! frozen and thawed.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::{Error, Result, wait};

/// Set to keep every process directory (configuration, data, log).
pub const KEEP_DIRS_ENV: &str = "CHORUS_KEEP_TEST_DIRS";

/// A port of 127.0.0.1 that was free a moment ago, for a child process that
/// needs its port before it starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// A fresh directory `chorus-<kind>-…` under the system's temp dir.
pub fn workdir(kind: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("chorus-{kind}-"))
        .disable_cleanup(std::env::var_os(KEEP_DIRS_ENV).is_some())
        .tempdir()
        .map_err(Error::io(format!("create a temp dir for {kind}")))
}

/// A child process killed (SIGKILL) and reaped on drop, for one-off
/// commands a test builds itself.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What to run, and where its output goes.
#[derive(Clone, Debug)]
pub struct ProcSpec {
    /// For messages: `redis-server :6379`.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// stdout and stderr, appended to across restarts.
    pub log: PathBuf,
    /// Runs in a process group of its own, and [`Proc::kill`] kills the
    /// group: a script and what it started die together, like a container.
    pub group: bool,
}

/// A running (or killed) child process that can be started again with the
/// same command line. SIGKILLed and reaped on drop.
pub struct Proc {
    spec: ProcSpec,
    child: Option<ChildGuard>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Proc {
    pub fn spawn(spec: ProcSpec) -> Result<Self> {
        let mut proc = Self { spec, child: None };
        proc.respawn()?;
        Ok(proc)
    }

    /// Starts the command again (after [`Proc::kill`]; a running one is
    /// killed first).
    pub fn respawn(&mut self) -> Result<()> {
        self.kill();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .map_err(Error::io(format!("open {}", self.spec.log.display())))?;
        let err = log
            .try_clone()
            .map_err(Error::io(format!("open {}", self.spec.log.display())))?;
        let mut command = Command::new(&self.spec.program);
        command
            .args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if self.spec.group {
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
        }
        let child = command.spawn().map_err(|source| Error::Spawn {
            program: self.spec.program.display().to_string(),
            source,
        })?;
        self.child = Some(ChildGuard(child));
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
    }

    /// SIGKILL, as a crash would (a frozen process dies too); the whole
    /// group with [`ProcSpec::group`].
    pub fn kill(&mut self) {
        if self.spec.group
            && let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok())
        {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.child = None;
    }

    /// SIGSTOP: the process keeps its sockets open but answers nothing,
    /// as a hung or starved process would, until [`Proc::thaw`].
    pub fn freeze(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`Proc::freeze`].
    pub fn thaw(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// SIGTERM: asks the process to shut down.
    pub fn terminate(&self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().and_then(|p| i32::try_from(p).ok());
        let sent = match pid {
            Some(pid) => nix::sys::signal::kill(Pid::from_raw(pid), signal),
            None => Err(nix::Error::ESRCH),
        };
        sent.map_err(|source| Error::Signal {
            name: self.spec.name.clone(),
            signal: signal.as_str(),
            source,
        })
    }

    /// How the process ended, if it has (`None` while it runs or after
    /// [`Proc::kill`]).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.0.try_wait().ok().flatten()
    }

    /// Polls `check` until it returns true, for at most `limit`; fails
    /// early when the process exits, and either failure carries the end of
    /// its log.
    pub async fn wait_ready(
        &mut self,
        what: &str,
        limit: Duration,
        mut check: impl AsyncFnMut() -> bool,
    ) -> Result<()> {
        let outcome = wait::until(what, limit, async || {
            if let Some(status) = self.exited() {
                return Some(Err(status));
            }
            check().await.then_some(Ok(()))
        })
        .await;
        let log = || {
            format!(
                "\n--- last lines of {} ---\n{}",
                self.spec.log.display(),
                self.log_tail(25)
            )
        };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => Err(Error::Exited {
                name: self.spec.name.clone(),
                what: what.to_owned(),
                status,
                log: log(),
            }),
            Err(Error::Timeout { what, waited, .. }) => Err(Error::Timeout {
                what,
                waited,
                log: log(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.spec.log, lines)
    }

    pub fn log_path(&self) -> &Path {
        &self.spec.log
    }
}

/// The last `lines` lines of a text file (empty if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    out
}
