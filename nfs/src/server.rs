//! `shoal serve`: checks the export, binds the NFSv3 port and the channel port next to it,
//! and runs both front ends over one share until told to stop.
//!
//! Owns start-up errors (a missing export, a busy port: one line naming the cause) and
//! shutdown. It decides no file or lease policy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nfsserve::tcp::{NFSTcp, NFSTcpListener};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::channel::client::channel_port;
use crate::lease::LeaseTable;
use crate::nfs3::Nfs3;
use crate::share::Share;
use crate::volume::Volume;

/// What `shoal serve` needs to know.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The directory to export.
    pub export: PathBuf,
    /// NFSv3 and MOUNT listen here; the channel on the next port up.
    pub listen: SocketAddr,
    /// Lease term granted to caching clients.
    pub lease_term: Duration,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Export(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running share-manager.
pub struct Running {
    /// Where NFSv3 and MOUNT answer.
    pub nfs_addr: SocketAddr,
    /// Where the FUSE clients' channel answers.
    pub channel_addr: SocketAddr,
    pub share: Arc<Share>,
    tasks: Vec<JoinHandle<()>>,
    /// The runtime nfsserve runs on. nfsserve spawns a task per connection that nothing else
    /// can reach; shutting this runtime down is what ends those connections.
    nfs_runtime: Option<Runtime>,
}

impl Running {
    /// Stops accepting and drops every connection.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(rt) = self.nfs_runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// How many worker threads serve NFSv3 connections.
const NFS_WORKERS: usize = 2;

/// Binds nfsserve's listener on a runtime of its own.
async fn bind_nfs(
    rt: &Runtime,
    addr: SocketAddr,
    share: Arc<Share>,
) -> std::io::Result<NFSTcpListener<Nfs3>> {
    rt.spawn(async move { NFSTcpListener::bind(&addr.to_string(), Nfs3::new(share)).await })
        .await
        .map_err(|e| std::io::Error::other(format!("binding NFS listener: {e}")))?
}

/// Runs nfsserve's accept loop for ever: it panics on a connection reset before it could
/// read the peer's address, and returns on an accept error (out of descriptors); either way
/// the loop is started again rather than leaving the port dead.
async fn accept_nfs_forever(nfs: Arc<NFSTcpListener<Nfs3>>) {
    loop {
        let l = nfs.clone();
        match tokio::spawn(async move { l.handle_forever().await }).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!("NFS accept failed: {e}; accepting again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => warn!("NFS accept loop stopped ({e}); accepting again"),
        }
    }
}

/// Opens the export and starts both listeners. With port 0, picks a free pair of ports.
pub async fn start(opts: &ServeOptions) -> Result<Running, ServeError> {
    if opts.listen.port() == u16::MAX {
        return Err(ServeError::Bind {
            addr: opts.listen,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the lease channel needs the port after it; choose a port below 65535",
            ),
        });
    }
    let volume = Volume::open(&opts.export).map_err(|e| ServeError::Export(e.message))?;
    let share = Share::new(volume, LeaseTable::new(opts.lease_term));

    let attempts = if opts.listen.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let nfs_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(NFS_WORKERS)
            .thread_name("shoal-nfs3")
            .enable_all()
            .build()
            .map_err(|source| ServeError::Bind {
                addr: opts.listen,
                source,
            })?;
        let nfs = match bind_nfs(&nfs_runtime, opts.listen, share.clone()).await {
            Ok(l) => l,
            Err(source) => {
                nfs_runtime.shutdown_background();
                return Err(ServeError::Bind {
                    addr: opts.listen,
                    source,
                });
            }
        };
        let nfs_addr = SocketAddr::new(opts.listen.ip(), nfs.get_listen_port());
        let chan_addr = SocketAddr::new(opts.listen.ip(), channel_port(nfs_addr.port()));
        let chan = match TcpListener::bind(chan_addr).await {
            Ok(l) => l,
            Err(source) => {
                nfs_runtime.shutdown_background();
                last = Some(ServeError::Bind {
                    addr: chan_addr,
                    source,
                });
                continue;
            }
        };
        info!(export = %share.volume.root_path().display(), nfs = %nfs_addr, channel = %chan_addr,
              lease_term = ?opts.lease_term, "serving: NFSv3+MOUNT on nfs, lease channel on channel");
        nfs_runtime.spawn(accept_nfs_forever(Arc::new(nfs)));
        let chan_task = tokio::spawn(crate::channel::server::serve(chan, share.clone()));
        let stats_share = share.clone();
        let stats_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = stats_share.leases.stats();
                info!(sessions = s.sessions, leases = s.leases_held, recalls = s.recalls_sent,
                      rtt_median = ?s.recall_rtt_median, rtt_p99 = ?s.recall_rtt_p99, "lease counters");
            }
        });
        return Ok(Running {
            nfs_addr,
            channel_addr: chan_addr,
            share,
            tasks: vec![chan_task, stats_task],
            nfs_runtime: Some(nfs_runtime),
        });
    }
    Err(last.expect("at least one attempt"))
}
