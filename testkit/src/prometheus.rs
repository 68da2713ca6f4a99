//! `prometheus` (the Prometheus server) on a free port: it scrapes the
//! given targets' `/metrics` and evaluates the given rule file, both every
//! second, with its TSDB in its own directory. The test reads what it
//! computed through its HTTP API: instant queries, rules and alerts.
//!
//! The binary is looked up on `PATH`, then where `scripts/test.sh` unpacks
//! Debian's `prometheus` package (`~/.cache/chorus/prometheus/usr/bin`).

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::chorus::http_ok_probe;
use crate::daemon::{Daemon, DaemonSpec, deref_daemon};
use crate::process::{ProcSpec, free_port, workdir};
use crate::{Error, Result};

/// Now in seconds since the epoch, as Prometheus's API takes times.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One scrape target: `host:port` serving `/metrics`, and the labels its
/// series get (as a PodMonitor gives them `namespace`, `pod`, `cluster`).
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: String,
    pub labels: Vec<(String, String)>,
}

/// What the server scrapes and evaluates.
#[derive(Clone, Debug, Default)]
pub struct PrometheusOptions {
    pub targets: Vec<Target>,
    /// A rule file's content: `{"groups": [...]}` (a PrometheusRule's
    /// `spec`), as JSON or YAML.
    pub rules: Option<Value>,
}

/// A running Prometheus; kill, restart, freeze and thaw come from its
/// [`Daemon`].
pub struct Prometheus {
    daemon: Daemon,
    http: reqwest::Client,
}

deref_daemon!(Prometheus);

/// Where `scripts/test.sh` puts the binary when it is not on `PATH`.
fn program() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("prometheus"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_default();
        PathBuf::from(home).join(".cache/chorus/prometheus/usr/bin/prometheus")
    })
}

impl Prometheus {
    /// [`Prometheus::launch`], panicking with the error (for tests).
    pub async fn start(options: PrometheusOptions) -> Self {
        Self::launch(options)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writes the configuration and rule file, starts the server and waits
    /// until `/-/ready` answers (rules loaded, TSDB open).
    pub async fn launch(options: PrometheusOptions) -> Result<Self> {
        let port = free_port();
        let dir = workdir("prometheus")?;
        let write = |name: &str, content: &Value| {
            let path = dir.path().join(name);
            // JSON is YAML: Prometheus reads both.
            std::fs::write(&path, content.to_string()).map_err(|source| Error::Io {
                what: format!("writing {}", path.display()),
                source,
            })
        };
        let static_configs: Vec<Value> = options
            .targets
            .iter()
            .map(|t| {
                let labels: serde_json::Map<String, Value> = t
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                    .collect();
                json!({"targets": [t.addr], "labels": labels})
            })
            .collect();
        let mut config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "chorus", "static_configs": static_configs}],
        });
        if let Some(rules) = &options.rules {
            write("rules.yml", rules)?;
            config["rule_files"] = json!(["rules.yml"]);
        }
        write("prometheus.yml", &config)?;
        let at = dir.path().display().to_string();
        let args = vec![
            format!("--config.file={at}/prometheus.yml"),
            format!("--storage.tsdb.path={at}/data"),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ];
        let daemon = Daemon::launch(DaemonSpec {
            port,
            proc: ProcSpec {
                name: format!("prometheus :{port}"),
                program: program(),
                args,
                env: Vec::new(),
                log: dir.path().join("prometheus.log"),
                group: false,
            },
            ready_when: "prometheus to answer /-/ready".to_owned(),
            probe: http_ok_probe(format!("http://127.0.0.1:{port}/-/ready")),
            dir,
        })
        .await?;
        Ok(Self {
            daemon,
            http: reqwest::Client::new(),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `GET /api/v1/<path>` with `query`: the answer's `data`, or the error
    /// Prometheus gave (a query that does not parse, say).
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let url = format!("{}/api/v1/{path}", self.url());
        let answer: Value = self
            .http
            .get(&url)
            .query(query)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        match answer["status"].as_str() {
            Some("success") => Ok(answer["data"].clone()),
            _ => Err(format!("{url} {query:?}: {answer}")),
        }
    }

    /// The instant vector `expr` evaluates to now: one `{metric, value}`
    /// per series; panics if the query fails.
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        self.list("query", &[("query", expr)], "result").await
    }

    /// What `expr` evaluated to at each second from `start` to `end`
    /// (seconds since the epoch): one `{metric, values}` per series that
    /// had a result at some point; panics if the query fails.
    pub async fn query_range(&self, expr: &str, start: f64, end: f64) -> Vec<Value> {
        let (start, end) = (start.to_string(), end.to_string());
        let query = [
            ("query", expr),
            ("start", start.as_str()),
            ("end", end.as_str()),
            ("step", "1"),
        ];
        self.list("query_range", &query, "result").await
    }

    /// The array `key` of what [`Prometheus::api`] answers; panics if the
    /// call fails.
    async fn list(&self, path: &str, query: &[(&str, &str)], key: &str) -> Vec<Value> {
        let data = self
            .api(path, query)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        data[key].as_array().cloned().unwrap_or_default()
    }

    /// Every rule of the loaded rule file as `/api/v1/rules` reports it
    /// (name, query, health, lastError, and the alerts of an alerting rule).
    pub async fn rules(&self) -> Vec<Value> {
        let groups = self.list("rules", &[], "groups").await;
        groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The active alerts (`pending` or `firing`) named `name`.
    pub async fn alerts(&self, name: &str) -> Vec<Value> {
        let mut alerts = self.list("alerts", &[], "alerts").await;
        alerts.retain(|a| a["labels"]["alertname"] == name);
        alerts
    }
}
