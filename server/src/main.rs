use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use chorus_server::config::{Config, LogFormat};
use chorus_server::{Node, run, shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logs(config.log_format);
    let node = Node::start(config.clone()).await.context("cannot start")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        node = %node.node_id,
        broker = node.broker.kind(),
        delivery = %config.delivery,
        "chorus-server listening"
    );
    if !config.listen.ip().is_loopback() {
        if !node.auth.clients_need_token() {
            tracing::warn!(
                "client auth is off: anyone who can reach this port may subscribe to and publish in any room \
                 (set --jwt-secret[-file] or --jwt-public-key-file)"
            );
        }
        if !node.auth.backend_needs_api_key() {
            tracing::warn!("the HTTP publish API needs no key (set --api-key or --api-key-file)");
        }
    }
    run(listener, node, shutdown::signal())
        .await
        .context("server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Logs go to stderr; text logs are coloured only on a terminal and
/// without `NO_COLOR` (<https://no-color.org>), so a log file stays plain.
fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
