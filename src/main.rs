//! The `shoal` binary: argument parsing, logging and wiring only. Each subcommand hands
//! over to a library crate: `serve` to `shoal-nfs`, `mount` to `shoal-fuse`, `csi` to
//! `shoal-csi`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing::info;

mod bench;
mod demo;
mod local;
mod stats;

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
    /// Mount a share (or one directory of it) with FUSE; stays in the foreground until
    /// unmounted (`fusermount3 -u MOUNTPOINT`) or sent SIGTERM/SIGINT.
    Mount {
        /// The share's ADDR:PORT (its NFS port), optionally followed by /SUBDIR.
        share: String,
        /// Where to mount it (an existing directory).
        mountpoint: PathBuf,
        /// Mount read-only.
        #[arg(long)]
        read_only: bool,
        /// This client's name in the server's logs (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the CSI plugin (Identity, Controller, Node) on a unix socket.
    Csi {
        /// unix:///path/to/csi.sock
        #[arg(long)]
        endpoint: String,
        /// This node's id, reported by NodeGetInfo.
        #[arg(long)]
        node_id: String,
        /// The share's ADDR:PORT, needed by the Controller to create and delete volumes.
        #[arg(long)]
        share: Option<String>,
    },
    /// Show the whole path on an embedded default: a temporary export, three mounts, a
    /// write on one seen on the others; cleans up on exit.
    Demo {
        /// Keep the mounts up until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Print a share's lease counters: sessions, leases held, recalls and their round trip.
    Stats {
        /// The share's ADDR:PORT (its NFS port).
        share: String,
    },
    /// Measure on a temporary local share: the cost of a lease recall to a writer (two
    /// mounts, one reads, the other overwrites) and small-file throughput through a mount.
    Bench {
        /// Recall iterations: B reads the file, A overwrites it (0 skips this part).
        #[arg(long, default_value_t = 1000)]
        iterations: usize,
        /// Small files to create, stat, read and remove through one mount (0 skips this part).
        #[arg(long, default_value_t = 1000)]
        files: usize,
        /// Bytes written to each small file.
        #[arg(long, default_value_t = 4096)]
        file_size: usize,
        /// Directory to create the temporary export in (default: the system temp directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Lease term of the share, in seconds.
        #[arg(long, default_value_t = 10)]
        lease_term: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo and the benchmark print their own story; their parts only speak up about
    // problems.
    let default_filter = if matches!(
        cli.command,
        Command::Demo { .. } | Command::Bench { .. } | Command::Stats { .. }
    ) {
        "warn"
    } else {
        // nfsserve logs every accepted connection at info.
        "info,nfsserve=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve {
            export,
            listen,
            lease_term,
        } => serve(export, listen, lease_term),
        Command::Mount {
            share,
            mountpoint,
            read_only,
            name,
        } => mount(share, mountpoint, read_only, name),
        Command::Csi {
            endpoint,
            node_id,
            share,
        } => csi(endpoint, node_id, share),
        Command::Demo { keep } => demo::run(keep),
        Command::Stats { share } => stats::run(&share),
        Command::Bench {
            iterations,
            files,
            file_size,
            dir,
            lease_term,
        } => {
            if lease_term == 0 {
                Err(anyhow::anyhow!("--lease-term must be at least 1 second"))
            } else {
                bench::run(bench::BenchOptions {
                    iterations,
                    files,
                    file_size,
                    dir,
                    lease_term: Duration::from_secs(lease_term),
                })
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
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

fn mount(
    share: String,
    mountpoint: PathBuf,
    read_only: bool,
    name: Option<String>,
) -> anyhow::Result<()> {
    let (share, subdir) = match share.split_once('/') {
        Some((addr, sub)) if !sub.trim_matches('/').is_empty() => {
            (addr.to_string(), Some(sub.trim_matches('/').to_string()))
        }
        Some((addr, _)) => (addr.to_string(), None),
        None => (share, None),
    };
    let name = name.unwrap_or_else(hostname);
    shoal_fuse::mount(shoal_fuse::MountOptions {
        share,
        subdir,
        mountpoint,
        read_only,
        name,
    })?;
    Ok(())
}

fn csi(endpoint: String, node_id: String, share: Option<String>) -> anyhow::Result<()> {
    let shoal_bin = std::env::current_exe()?;
    let opts = shoal_csi::CsiOptions {
        endpoint,
        node_id,
        share,
        shoal_bin,
    };
    runtime()?.block_on(shoal_csi::run(opts))?;
    Ok(())
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "shoal".into())
}

/// The error and its causes on one line, each cause once (a message that already quotes
/// its cause does not repeat it).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
