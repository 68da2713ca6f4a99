//! What can go wrong while starting or steering a process.

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program is missing or cannot run.
    #[error("cannot start {program} (scripts/test.sh installs what the tests need): {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A directory, configuration or log file could not be written.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A signal could not be sent (the process is gone).
    #[error("cannot send {signal} to {name}: {source}")]
    Signal {
        name: String,
        signal: &'static str,
        #[source]
        source: nix::Error,
    },
    /// The process ended before it was ready.
    #[error("{name} exited ({status}) before {what}{log}")]
    Exited {
        name: String,
        what: String,
        status: std::process::ExitStatus,
        /// The end of its log, for the failure message.
        log: String,
    },
    /// A condition did not hold in time.
    #[error("timed out after {waited:?} waiting for {what}{log}")]
    Timeout {
        what: String,
        waited: Duration,
        /// The end of the log of the process waited on, if any.
        log: String,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
