//! `chorus-operator`: `run` (the default) reconciles MessagingClusters;
//! `crd` prints the CustomResourceDefinition.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use chorus_operator::{
    controller, crd, http,
    leader::{Elector, LeaseConfig},
    metrics::Metrics,
    reconcile::Context,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::{Client, runtime::events::Reporter};
use tokio::sync::watch;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "chorus-operator",
    version,
    about = "Kubernetes operator for Chorus MessagingClusters"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reconcile MessagingClusters (the default).
    Run(RunArgs),
    /// Print the MessagingCluster CustomResourceDefinition as YAML.
    Crd,
    /// Print the objects the operator would create for a MessagingCluster
    /// manifest, without a cluster.
    Render(RenderArgs),
}

#[derive(Args, Debug, Clone)]
struct RenderArgs {
    /// The MessagingCluster manifest (`-` for standard input).
    #[arg(short = 'f', long = "filename")]
    file: std::path::PathBuf,
    /// Namespace of a manifest that names none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Namespace the operator runs in (its NetworkPolicy admits it).
    #[arg(long, default_value = "chorus-system")]
    operator_namespace: String,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "CHORUS_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Address of `/metrics` and `/healthz`.
    #[arg(
        long,
        env = "CHORUS_OPERATOR_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    metrics_listen: SocketAddr,
    /// Do not apply the CRD at start-up (e.g. when RBAC forbids it).
    #[arg(long, env = "CHORUS_OPERATOR_NO_INSTALL_CRD")]
    no_install_crd: bool,
    /// Run without leader election (a single replica, or local development).
    #[arg(long, env = "CHORUS_OPERATOR_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Name of the leader election Lease.
    #[arg(
        long,
        env = "CHORUS_OPERATOR_LEASE_NAME",
        default_value = "chorus-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else the kubeconfig's).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Namespace the operator's pods run in, admitted to Redis and Sentinel
    /// by each cluster's NetworkPolicy (default: the pod's namespace, else
    /// the kubeconfig's).
    #[arg(long, env = "POD_NAMESPACE")]
    operator_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events (default: pod name, else host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(long, env = "CHORUS_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Json,
    Text,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => {
            print!("{}", crd::crd_yaml()?);
            Ok(())
        }
        Some(Command::Render(args)) => {
            let manifest = if args.file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&args.file)
                    .with_context(|| format!("reading {}", args.file.display()))?
            };
            let out = chorus_operator::render::render(
                &manifest,
                &args.namespace,
                &args.operator_namespace,
            )?;
            print!("{out}");
            Ok(())
        }
        Some(Command::Run(args)) => run(args).await,
        None => run(cli.run).await,
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves once SIGTERM or Ctrl-C arrives; the one shutdown source.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => drop(s.recv().await),
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term => {},
        }
        info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

fn stopped(mut rx: watch::Receiver<bool>) -> impl Future<Output = ()> + Send + Sync + 'static {
    // A boxed future is not Sync; a shared one is, and the controller's
    // graceful shutdown asks for Sync.
    use futures_util::FutureExt;
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
    .boxed()
    .shared()
}

/// How long in-flight reconciles may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The controller's graceful shutdown waits for its caches to fill before
/// it can end, which never happens while the API server is unreachable:
/// after the shutdown signal, give it [`SHUTDOWN_GRACE`], then drop it.
async fn bounded(controller: impl Future<Output = ()>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(controller);
    tokio::select! {
        () = &mut controller => {}
        () = async { shutdown.await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            warn!(grace = ?SHUTDOWN_GRACE, "controller did not stop in time; stopping anyway");
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let shutdown = shutdown_signal();
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "chorus-operator".to_owned());
    info!(version = env!("CARGO_PKG_VERSION"), %identity, namespace = ?args.namespace, "starting");

    if !args.no_install_crd {
        crd::install(client.clone(), Duration::from_secs(60))
            .await
            .context("installing the CRD")?;
        info!("CRD applied and established");
    }

    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    let metrics_server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        client.clone(),
        stopped(shutdown.clone()),
    ));

    let elector = (!args.no_leader_election).then(|| {
        let namespace = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Elector::new(
            client.clone(),
            LeaseConfig {
                name: args.lease_name.clone(),
                namespace,
                identity: identity.clone(),
                lease_duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(5),
            },
        )
    });
    if let Some(elector) = &elector {
        tokio::select! {
            acquired = elector.acquire() => acquired.context("leader election")?,
            () = stopped(shutdown.clone()) => {
                info!("stopped before becoming leader");
                return Ok(());
            }
        }
    }

    let reporter = Reporter {
        controller: "chorus-operator".into(),
        instance: Some(identity),
    };
    let operator_namespace = args
        .operator_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    info!(%operator_namespace, "the Redis NetworkPolicies admit the operator from this namespace");
    let ctx = Arc::new(
        Context::new(client, reporter, metrics).with_operator_namespace(operator_namespace),
    );
    let controller = bounded(
        controller::run(ctx, args.namespace.clone(), stopped(shutdown.clone())),
        stopped(shutdown.clone()),
    );
    let outcome = match &elector {
        Some(elector) => tokio::select! {
            () = controller => Ok(()),
            lost = elector.hold() => Err(lost),
        },
        None => {
            controller.await;
            Ok(())
        }
    };
    match outcome {
        Ok(()) => {
            if let Some(elector) = &elector {
                elector.release().await;
            }
            metrics_server
                .await
                .context("metrics server task")?
                .context("metrics server")?;
            info!("stopped");
            Ok(())
        }
        Err(lost) => {
            // Another replica may already reconcile: stop at once.
            error!(error = %lost, "leadership lost; exiting");
            Err(lost).context("leader election")
        }
    }
}
