//! The `chorus-server` binary on a free port, ready when `/readyz`
//! answers 200 (its broker link is up).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::Result;
use crate::daemon::{Daemon, DaemonSpec, Probe, deref_daemon};
use crate::process::{ProcSpec, free_port, workdir};

/// A `chorus-server` process listening on `127.0.0.1:<port>`. Kill,
/// freeze, SIGTERM (`proc().terminate()`: a drain) come from its [`Daemon`].
pub struct ChorusServer {
    daemon: Daemon,
}

deref_daemon!(ChorusServer);

impl ChorusServer {
    /// Starts `exe --listen 127.0.0.1:<free port> args…` with `env` added
    /// to this process's environment, without waiting for it (start a
    /// fleet, then wait for each with [`Daemon::ready`]).
    pub fn spawn(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let port = free_port();
        let dir = workdir("server")?;
        let mut all = vec!["--listen".to_owned(), format!("127.0.0.1:{port}")];
        all.extend(args.iter().map(|a| a.to_string()));
        let readyz = format!("http://127.0.0.1:{port}/readyz");
        let daemon = Daemon::spawn(DaemonSpec {
            port,
            proc: ProcSpec {
                name: format!("chorus-server :{port}"),
                program: exe.to_owned(),
                args: all,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                log: dir.path().join("chorus-server.log"),
                group: false,
            },
            dir,
            ready_when: format!("{readyz} to answer 200"),
            probe: http_ok_probe(readyz),
        })?;
        Ok(Self { daemon })
    }

    /// [`ChorusServer::spawn`], then [`Daemon::ready`] within `limit`.
    pub async fn launch(
        exe: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        limit: Duration,
    ) -> Result<Self> {
        let mut server = Self::spawn(exe, args, env)?;
        server.ready(limit).await?;
        Ok(server)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn http_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A probe that `GET url` answers 2xx.
pub fn http_ok_probe(url: String) -> Probe {
    let http = reqwest::Client::new();
    Arc::new(move || {
        let request = http.get(&url).send();
        Box::pin(async move { request.await.is_ok_and(|r| r.status().is_success()) })
    })
}
