//! Shoal's CSI plugin: the Identity, Controller and Node services of the Container Storage
//! Interface (v1), served over a unix socket to the kubelet and the CSI sidecars.
//!
//! - [`endpoint`]: the socket: parsing `unix://` endpoints, removing a stale socket, binding.
//! - [`volume`]: what a volume is: its id (derived from the CO's name, never able to leave
//!   the share's `volumes/` directory), its context, and which capabilities Shoal supports.
//!   The one place that validates names, ids and capabilities.
//! - [`share`]: the controller's directory operations on the share, through the channel
//!   client: creating, inspecting and recursively removing `volumes/<id>`.
//! - [`identity`], [`controller`], [`node`]: the three gRPC services; they translate CSI
//!   requests into calls on `volume`, `share` and `mount`, and errors into gRPC codes.
//! - [`mount`]: the node's mount table: reading `/proc/self/mountinfo`, spawning
//!   `shoal mount` as a detached process, and unmounting.
//!
//! A volume is a directory `volumes/<id>` on a share served by `shoal serve`. The controller
//! creates and removes it through the share itself; the node mounts it with `shoal mount
//! HOST:PORT/volumes/<id> TARGET`, one FUSE process per published target, which outlives a
//! restart of the plugin.

// The generated service traits return `tonic::Status` (176 bytes); helpers that feed them
// return it too rather than box it and unbox it at every `?`. Errors are the cold path.
#![allow(clippy::result_large_err)]

pub mod controller;
pub mod endpoint;
pub mod identity;
pub mod mount;
pub mod node;
pub mod share;
pub mod volume;

use std::path::PathBuf;
use std::sync::Arc;

use bpfman_csi::v1::controller_server::ControllerServer;
use bpfman_csi::v1::identity_server::IdentityServer;
use bpfman_csi::v1::node_server::NodeServer;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::info;

/// The plugin's name as the CO sees it (`GetPluginInfo`, the StorageClass `provisioner`).
pub const DRIVER_NAME: &str = "shoal.csi.dev";

/// The plugin's version, reported as `vendor_version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What `shoal csi` is started with.
#[derive(Debug, Clone)]
pub struct CsiOptions {
    /// Where to listen: `unix:///abs/path/csi.sock` or a bare absolute path.
    pub endpoint: String,
    /// This node's name, reported by `NodeGetInfo` (the Kubernetes node name).
    pub node_id: String,
    /// `HOST:PORT` of the share the controller creates volumes on. Only the controller needs
    /// it; a node-only plugin mounts whatever share each volume's context names.
    pub share: Option<String>,
    /// The `shoal` executable, spawned as `shoal mount` for each published volume.
    pub shoal_bin: PathBuf,
}

/// Errors that stop the plugin (per-call errors are gRPC statuses, not these).
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves Identity, Controller and Node on the unix socket until SIGTERM/SIGINT, then
/// removes the socket file.
pub async fn run(opts: CsiOptions) -> Result<(), CsiError> {
    let shutdown = shutdown_signal()?;
    serve(opts, shutdown).await
}

/// Like [`run`], but stops when `shutdown` completes instead of on a signal (for tests and
/// embedding). The socket file is removed on return.
pub async fn serve(
    opts: CsiOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CsiError> {
    let path = endpoint::socket_path(&opts.endpoint)?;
    let listener = endpoint::bind(&path)?;
    let state_dir = path
        .parent()
        .map(|p| p.join("shoal-csi"))
        .unwrap_or_else(|| PathBuf::from("/tmp/shoal-csi"));
    info!(
        socket = %path.display(),
        node = %opts.node_id,
        share = opts.share.as_deref().unwrap_or("-"),
        "CSI plugin listening"
    );

    let identity = identity::IdentityService;
    let controller = controller::ControllerService::new(opts.share.clone());
    let node = node::NodeService::new(
        opts.node_id.clone(),
        opts.share.clone(),
        Arc::new(mount::Mounter::new(opts.shoal_bin.clone(), state_dir)),
    );
    let served = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::new(controller))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    endpoint::remove_socket(&path);
    info!(socket = %path.display(), "CSI plugin stopped");
    served.map_err(CsiError::from)
}

/// A future that completes on the first SIGTERM or SIGINT. The handlers are installed before
/// it is returned, so a signal that arrives while the server starts is not lost.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, CsiError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(CsiError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(CsiError::Signal)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    })
}
