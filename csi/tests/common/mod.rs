//! Test harness: a real plugin on a real unix socket in a temp dir, tonic clients over it,
//! and (for controller tests) a real in-process share.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bpfman_csi::v1::controller_client::ControllerClient;
use bpfman_csi::v1::identity_client::IdentityClient;
use bpfman_csi::v1::node_client::NodeClient;
use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use bpfman_csi::v1::VolumeCapability;
use shoal_csi::CsiOptions;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};

/// A running plugin; stops (and removes its socket) when `stop` is called.
pub struct Plugin {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), shoal_csi::CsiError>>>,
}

impl Plugin {
    /// Starts a plugin for `share` that spawns `shoal_bin` to mount.
    pub async fn start(share: Option<String>, shoal_bin: PathBuf) -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        let opts = CsiOptions {
            endpoint: format!("unix://{}", socket.display()),
            node_id: "node-1".to_string(),
            share,
            shoal_bin,
        };
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(shoal_csi::serve(opts, async {
            let _ = rx.await;
        }));
        let channel = connect(&socket).await;
        Plugin {
            dir,
            socket,
            channel,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    /// Stops the plugin and waits for it to finish.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let res = tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("plugin stops");
        res.unwrap().unwrap();
    }
}

/// A tonic channel over the unix socket at `path`, retrying until the plugin listens there
/// (a stale socket file may exist before it does).
pub async fn connect(path: &Path) -> Channel {
    let mut last = None;
    for _ in 0..500 {
        let path = path.to_path_buf();
        // The URI is ignored: every connection goes to the socket.
        let res = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                UnixStream::connect(path.clone())
            }))
            .await;
        match res {
            Ok(ch) => return ch,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("cannot connect to {}: {last:?}", path.display());
}

pub fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// Asserts a gRPC error's code and that its message mentions `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    res: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    let s = res.expect_err("call should fail");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(needle),
        "message {:?} should mention {needle:?}",
        s.message()
    );
}

/// A path for a binary that must never be run.
pub fn no_binary() -> PathBuf {
    PathBuf::from("/nonexistent/shoal")
}
