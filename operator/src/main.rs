//! `chorus-operator`: `run` (default) reconciles MessagingClusters; `crd`
//! prints the CustomResourceDefinition.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "chorus-operator",
    version,
    about = "Kubernetes operator for Chorus MessagingClusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the MessagingCluster CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) | None => print!("{}", chorus_operator::crd::crd_yaml()?),
    }
    Ok(())
}
