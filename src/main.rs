//! The `shoal` binary: argument parsing, logging and wiring only. Each subcommand hands
//! over to a library crate: `serve` to `shoal-nfs`, `mount` to `shoal-fuse`, `csi` to
//! `shoal-csi`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Shoal: a shared (ReadWriteMany) filesystem for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a directory to many nodes: NFSv3+MOUNT on ADDR:PORT, lease channel on PORT+1.
    Serve {
        /// The directory to export (the mounted RWO volume).
        export: PathBuf,
        /// Where NFSv3 and MOUNT listen; the lease channel listens on the next port up.
        #[arg(long, default_value = "0.0.0.0:2049")]
        listen: SocketAddr,
        /// Lease term in seconds: how long a client may cache without renewing.
        #[arg(long, default_value_t = 10)]
        lease_term: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            export,
            listen,
            lease_term,
        } => serve(export, listen, lease_term),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(export: PathBuf, listen: SocketAddr, lease_term: u64) -> anyhow::Result<()> {
    if lease_term == 0 {
        anyhow::bail!("--lease-term must be at least 1 second");
    }
    let opts = shoal_nfs::server::ServeOptions {
        export,
        listen,
        lease_term: Duration::from_secs(lease_term),
    };
    runtime()?.block_on(async {
        let running = shoal_nfs::server::start(&opts).await?;
        info!(nfs = %running.nfs_addr, channel = %running.channel_addr, "shoal serve ready");
        shutdown_signal().await;
        info!("shutting down");
        running.shutdown();
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
