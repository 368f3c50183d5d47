//! The Node service: NodePublishVolume mounts a volume at the kubelet's target path with a
//! detached `shoal mount`; NodeUnpublishVolume unmounts it. No staging: a Shoal mount is
//! cheap, so each target gets its own.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bpfman_csi::v1::node_server::Node;
use bpfman_csi::v1::*;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::mount::{MountError, Mounter, Published};
use crate::share::Share;
use crate::volume::{self, Access, CTX_SHARE, CTX_SUBDIR};

/// The node plugin.
pub struct NodeService {
    node_id: String,
    /// The share for volumes whose context names none (volumes created before contexts were
    /// recorded, or statically provisioned ones).
    default_share: Option<String>,
    mounter: Arc<Mounter>,
    /// Targets with a publish or unpublish in progress; a concurrent call on the same target
    /// is answered ABORTED.
    busy: Arc<Mutex<HashSet<PathBuf>>>,
    /// One channel client per share, to check that a volume exists before mounting it.
    shares: Mutex<HashMap<String, Arc<Share>>>,
}

struct Busy {
    set: Arc<Mutex<HashSet<PathBuf>>>,
    target: PathBuf,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.target);
    }
}

impl NodeService {
    pub fn new(node_id: String, default_share: Option<String>, mounter: Arc<Mounter>) -> Self {
        NodeService {
            node_id,
            default_share,
            mounter,
            busy: Arc::default(),
            shares: Mutex::default(),
        }
    }

    fn claim(&self, target: &Path) -> Result<Busy, Status> {
        if !self.busy.lock().unwrap().insert(target.to_path_buf()) {
            return Err(Status::aborted(format!(
                "an operation on target {} is already in progress",
                target.display()
            )));
        }
        Ok(Busy {
            set: self.busy.clone(),
            target: target.to_path_buf(),
        })
    }

    fn share(&self, addr: &str) -> Arc<Share> {
        self.shares
            .lock()
            .unwrap()
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(Share::new(addr.to_string())))
            .clone()
    }

    /// The share (`HOST:PORT`) and subdirectory to mount for a volume.
    fn source_of(
        &self,
        volume_id: &str,
        context: &HashMap<String, String>,
    ) -> Result<(String, String), Status> {
        let share = match context.get(CTX_SHARE).or(self.default_share.as_ref()) {
            Some(s) => s,
            None => {
                return Err(Status::invalid_argument(format!(
                    "volume_context has no {CTX_SHARE:?} and the plugin was started without --share"
                )))
            }
        };
        volume::check_share(share)
            .map_err(|m| Status::invalid_argument(format!("volume_context: {m}")))?;
        let subdir = match context.get(CTX_SUBDIR) {
            Some(s) => s.clone(),
            None if volume::is_valid_id(volume_id) => volume::subdir_of(volume_id),
            None => {
                return Err(Status::not_found(format!(
                    "volume {volume_id:?} is not a Shoal volume id and its context names no {CTX_SUBDIR:?}"
                )))
            }
        };
        volume::check_subdir(&subdir)
            .map_err(|m| Status::invalid_argument(format!("volume_context: {m}")))?;
        Ok((share.clone(), subdir))
    }
}

/// A target path from a request: required and absolute.
fn target_of(target: &str) -> Result<PathBuf, Status> {
    if target.is_empty() {
        return Err(Status::invalid_argument("target_path is required"));
    }
    if !target.starts_with('/') {
        return Err(Status::invalid_argument(format!(
            "target_path {target:?} must be absolute"
        )));
    }
    Ok(PathBuf::from(target))
}

fn mount_status(e: MountError) -> Status {
    match e {
        MountError::Foreign(..) | MountError::Conflict { .. } => {
            Status::already_exists(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not supported by the Shoal CSI plugin"))
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let target = target_of(&req.target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let access = match volume::parse_capability(cap, "volume_capability")? {
            Access::Block => {
                return Err(Status::invalid_argument(volume::block_unsupported(
                    "volume_capability",
                )))
            }
            a => a,
        };
        let (share, subdir) = self.source_of(&req.volume_id, &req.volume_context)?;
        let want = Published {
            source: format!("{share}/{subdir}"),
            volume_id: req.volume_id.clone(),
            read_only: req.readonly || access.read_only(),
        };
        let _busy = self.claim(&target)?;
        if self
            .mounter
            .is_published(&target, &want)
            .await
            .map_err(mount_status)?
        {
            return Ok(Response::new(NodePublishVolumeResponse {}));
        }
        // Ask the share first, so a missing volume is NOT_FOUND rather than a failed mount.
        match self.share(&share).dir_exists(&subdir).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Status::not_found(format!(
                    "volume {}: {subdir} does not exist on share {share}",
                    req.volume_id
                )))
            }
            Err(e) if e.unreachable() => return Err(Status::unavailable(e.to_string())),
            Err(e) => return Err(Status::internal(e.to_string())),
        }
        self.mounter
            .mount(&target, &want)
            .await
            .map_err(mount_status)?;
        info!(volume = %req.volume_id, target = %target.display(), read_only = want.read_only, "NodePublishVolume");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let target = target_of(&req.target_path)?;
        let _busy = self.claim(&target)?;
        self.mounter
            .unpublish(&target)
            .await
            .map_err(mount_status)?;
        info!(volume = %req.volume_id, target = %target.display(), "NodeUnpublishVolume");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }

    async fn node_stage_volume(
        &self,
        _request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(unimplemented("NodeStageVolume"))
    }

    async fn node_unstage_volume(
        &self,
        _request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(unimplemented("NodeUnstageVolume"))
    }

    async fn node_get_volume_stats(
        &self,
        _request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(unimplemented("NodeGetVolumeStats"))
    }

    async fn node_expand_volume(
        &self,
        _request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(unimplemented("NodeExpandVolume"))
    }
}
