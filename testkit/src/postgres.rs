//! PostgreSQL (`postgres` from Debian's `postgresql` package) on a free
//! port: a fresh cluster in the process's own directory (a copy of a
//! template that `initdb` makes once per machine), then the server on
//! `127.0.0.1:<port>` with no Unix socket, ready once a client connects
//! and runs `SELECT 1`.
//!
//! The programs are looked up in `$CHORUS_PG_BIN`, then in the newest
//! `/usr/lib/postgresql/<version>/bin` (where Debian puts them: they are not
//! on `PATH`), then on `PATH`.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI, a
//! container), `initdb` and `postgres` run as an unprivileged user through
//! `setpriv` (util-linux): `$CHORUS_PG_USER` if set, else `postgres` (the
//! user Debian's package creates), else `nobody`; the process directory is
//! handed to that user. Run as any other user, they run as that user.
//!
//! Durability settings suit tests: `fsync` and `full_page_writes` are off
//! (a killed server keeps what it wrote to the operating system, so a
//! crash and restart loses no committed transaction; only a machine crash
//! would), `synchronous_commit` stays on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::daemon::{Daemon, DaemonSpec, Probe, deref_daemon};
use crate::process::{ProcSpec, free_port, workdir};
use crate::{Error, Result};

/// The superuser `initdb` creates (trust authentication on loopback).
pub const SUPERUSER: &str = "chorus";
/// The database tests use.
pub const DATABASE: &str = "postgres";

/// Where to find the programs, overriding the lookup.
pub const BIN_ENV: &str = "CHORUS_PG_BIN";
/// Which user runs PostgreSQL when the tests run as root.
pub const USER_ENV: &str = "CHORUS_PG_USER";

/// How `postgres` is started besides its port and directory.
#[derive(Clone, Debug, Default)]
pub struct PostgresOptions {
    /// Further settings, as `-c name=value`.
    pub settings: Vec<(String, String)>,
}

/// A PostgreSQL server. Kill (SIGKILL of the postmaster and its backends,
/// as a crash would), restart (crash recovery from the same directory),
/// freeze and thaw come from its [`Daemon`].
pub struct Postgres {
    daemon: Daemon,
}

deref_daemon!(Postgres);

impl Postgres {
    /// A server with the default settings; panics if it cannot start.
    pub async fn start() -> Self {
        Self::start_with(PostgresOptions::default()).await
    }

    /// [`Postgres::launch`], panicking with the error (for tests).
    pub async fn start_with(options: PostgresOptions) -> Self {
        Self::launch(options)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates a cluster in a fresh directory, starts the server and waits
    /// until it accepts a query.
    pub async fn launch(options: PostgresOptions) -> Result<Self> {
        let port = free_port();
        let dir = workdir("postgres")?;
        let bin = bin_dir();
        let runner = Runner::for_this_process()?;
        runner.hand_over(dir.path())?;
        let data = dir.path().join("data");
        new_cluster(runner.clone(), bin.clone(), data.clone()).await?;
        let mut args = vec![
            "-D".to_owned(),
            data.display().to_string(),
            "-p".to_owned(),
            port.to_string(),
        ];
        let defaults = [
            ("listen_addresses", "127.0.0.1"),
            ("unix_socket_directories", ""),
            ("fsync", "off"),
            ("full_page_writes", "off"),
            ("shared_buffers", "16MB"),
            ("max_connections", "50"),
        ];
        let settings = defaults
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(options.settings);
        for (name, value) in settings {
            args.extend(["-c".to_owned(), format!("{name}={value}")]);
        }
        let (program, args) = runner.command(&bin.join("postgres"), args);
        let url = dsn(port);
        let daemon = Daemon::launch(DaemonSpec {
            port,
            proc: ProcSpec {
                name: format!("postgres :{port}"),
                program,
                args,
                env: Vec::new(),
                log: dir.path().join("postgres.log"),
                // The postmaster's backends die with it, as in a crash (a
                // backend left behind would keep the next start out).
                group: true,
            },
            dir,
            ready_when: "postgres to accept a query".to_owned(),
            probe: query_probe(url),
        })
        .await?;
        Ok(Self { daemon })
    }

    /// `postgres://chorus@127.0.0.1:<port>/postgres` (trust: no password).
    pub fn dsn(&self) -> String {
        dsn(self.port)
    }

    /// A connected client (its connection runs on a task of its own);
    /// panics when the server does not take it.
    pub async fn client(&self) -> Client {
        connect(&self.dsn())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.addr()))
    }

    /// Runs `sql` (one or more statements) on a fresh connection; panics
    /// on an error.
    pub async fn execute(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} on {}: {e}", self.addr()));
    }
}

fn dsn(port: u16) -> String {
    format!("postgres://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}")
}

/// Connects to `dsn` without TLS; the connection is driven by a task of
/// its own until the client is dropped.
pub async fn connect(dsn: &str) -> std::result::Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A probe that the server at `dsn` answers `SELECT 1` within a second.
fn query_probe(dsn: String) -> Probe {
    Arc::new(move || {
        let dsn = dsn.clone();
        Box::pin(async move {
            let answer = async {
                let client = connect(&dsn).await.ok()?;
                client.simple_query("SELECT 1").await.ok()
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(1), answer).await,
                Ok(Some(_))
            )
        })
    })
}

/// `$CHORUS_PG_BIN`, else the newest `/usr/lib/postgresql/<version>/bin`,
/// else the empty path (the programs are looked up on `PATH`).
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_ENV) {
        return dir.into();
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .max();
    newest.map(|(_, bin)| bin).unwrap_or_default()
}

/// Who runs PostgreSQL: this process's user, or (as root) an unprivileged
/// one through `setpriv`.
#[derive(Clone)]
struct Runner {
    /// `None`: this process's own user.
    user: Option<nix::unistd::User>,
}

impl Runner {
    fn for_this_process() -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Self { user: None });
        }
        let wanted = std::env::var(USER_ENV).ok();
        let candidates = match &wanted {
            Some(name) => vec![name.as_str()],
            None => vec!["postgres", "nobody"],
        };
        let user = candidates
            .iter()
            .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
            .ok_or_else(|| Error::Io {
                what: format!(
                    "find a user to run PostgreSQL as (root cannot): tried {candidates:?}; set {USER_ENV}"
                ),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        Ok(Self { user: Some(user) })
    }

    /// Gives `dir` to the user PostgreSQL runs as.
    fn hand_over(&self, dir: &Path) -> Result<()> {
        let Some(user) = &self.user else {
            return Ok(());
        };
        nix::unistd::chown(dir, Some(user.uid), Some(user.gid)).map_err(|e| Error::Io {
            what: format!("give {} to {}", dir.display(), user.name),
            source: e.into(),
        })
    }

    /// The program and arguments that run `program args` as the user.
    fn command(&self, program: &Path, args: Vec<String>) -> (PathBuf, Vec<String>) {
        let Some(user) = &self.user else {
            return (program.to_owned(), args);
        };
        let mut all = vec![
            format!("--reuid={}", user.uid),
            format!("--regid={}", user.gid),
            "--init-groups".to_owned(),
            "--".to_owned(),
            program.display().to_string(),
        ];
        all.extend(args);
        ("setpriv".into(), all)
    }
}

/// A fresh cluster in `data`: a copy (`cp -a`) of a template cluster
/// that `initdb` makes once per machine, user and PostgreSQL installation
/// under the temp dir (`initdb` costs a second or two of CPU; a copy, a
/// few milliseconds).
async fn new_cluster(runner: Runner, bin: PathBuf, data: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        let template = template(&runner, &bin)?;
        run(
            "cp",
            &[
                "-a".into(),
                template.display().to_string(),
                data.display().to_string(),
            ],
        )
    })
    .await
    .map_err(|e| Error::Io {
        what: "create a cluster".to_owned(),
        source: std::io::Error::other(e),
    })?
}

/// The template cluster, made now if missing. Two test processes may make
/// one at once: each runs `initdb` in a directory of its own and renames
/// it into place; the loser uses the winner's.
fn template(runner: &Runner, bin: &Path) -> Result<PathBuf> {
    let user = runner
        .user
        .as_ref()
        .map_or_else(|| nix::unistd::geteuid().to_string(), |u| u.uid.to_string());
    let install: String = bin
        .display()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let template = std::env::temp_dir().join(format!("chorus-postgres-template-{user}{install}"));
    if template.join("PG_VERSION").exists() {
        return Ok(template);
    }
    let scratch = workdir("postgres-template")?;
    runner.hand_over(scratch.path())?;
    let data = scratch.path().join("data");
    let args = [
        "-D",
        &data.display().to_string(),
        "-U",
        SUPERUSER,
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
    ]
    .map(String::from)
    .into();
    let (program, args) = runner.command(&bin.join("initdb"), args);
    run(&program.display().to_string(), &args)?;
    if std::fs::rename(&data, &template).is_err() && !template.join("PG_VERSION").exists() {
        return Err(Error::Io {
            what: format!("move the template cluster to {}", template.display()),
            source: std::io::ErrorKind::Other.into(),
        });
    }
    Ok(template)
}

/// Runs a one-off command to its end; fails with its output.
fn run(program: &str, args: &[String]) -> Result<()> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Exited {
        name: program.to_owned(),
        what: "finishing".to_owned(),
        status: out.status,
        log: format!(
            "\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_committed_row_survives_a_crash_and_restart() {
        let mut pg = Postgres::start().await;
        pg.execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
            .await;
        pg.kill();
        pg.restart().await;
        let row = pg
            .client()
            .await
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 1);
    }
}
