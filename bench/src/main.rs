use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = chorus_bench::Cli::parse();
    // Two workers: the load generator shares the machine with the fleet it measures.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(chorus_bench::run(cli))?;
    Ok(())
}
