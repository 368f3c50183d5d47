//! The Controller service: CreateVolume, DeleteVolume and ValidateVolumeCapabilities on the
//! share given at start-up. Everything else answers UNIMPLEMENTED.
//!
//! Capacity is not enforced (a directory on a shared filesystem has no size of its own): the
//! requested capacity is recorded at creation, echoed back, and used only to answer
//! ALREADY_EXISTS when the same name is asked for again with a capacity the first request
//! could not satisfy, as the CSI spec requires.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bpfman_csi::v1::controller_server::Controller;
use bpfman_csi::v1::controller_service_capability::{rpc, Rpc, Type};
use bpfman_csi::v1::validate_volume_capabilities_response::Confirmed;
use bpfman_csi::v1::*;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::share::{Share, ShareError};
use crate::volume::{self, Access};

/// The controller of one share (or of none, on a node-only plugin).
pub struct ControllerService {
    share: Option<Arc<Share>>,
    /// Volume ids with a Create or Delete in progress: a second call for the same id is
    /// answered ABORTED (the spec's "operation pending") rather than interleaved with it.
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Holds a volume id in `busy` until dropped.
struct Busy {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.id);
    }
}

impl ControllerService {
    /// A controller creating volumes on `share` (`HOST:PORT`); without one, every volume RPC
    /// fails with FAILED_PRECONDITION.
    pub fn new(share: Option<String>) -> ControllerService {
        ControllerService {
            share: share.map(|s| Arc::new(Share::new(s))),
            busy: Arc::default(),
        }
    }

    fn share(&self) -> Result<&Share, Status> {
        self.share.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "this plugin was started without a share (--share HOST:PORT): it has no controller",
            )
        })
    }

    fn claim(&self, id: &str) -> Result<Busy, Status> {
        if !self.busy.lock().unwrap().insert(id.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on volume {id} is already in progress"
            )));
        }
        Ok(Busy {
            set: self.busy.clone(),
            id: id.to_string(),
        })
    }
}

/// The gRPC status for a failed share operation.
fn share_status(e: ShareError) -> Status {
    warn!("share operation failed: {e}");
    if e.unreachable() {
        Status::unavailable(e.to_string())
    } else if matches!(e.errno(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        Status::resource_exhausted(e.to_string())
    } else {
        Status::internal(e.to_string())
    }
}

/// The capacity to record for a request: the required bytes, else the limit, else unknown.
fn requested_capacity(range: Option<&CapacityRange>) -> Result<i64, Status> {
    let Some(r) = range else { return Ok(0) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: required_bytes and limit_bytes must not be negative",
        ));
    }
    if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
        return Err(Status::out_of_range(format!(
            "capacity_range: required_bytes {} exceeds limit_bytes {}",
            r.required_bytes, r.limit_bytes
        )));
    }
    Ok(if r.required_bytes > 0 {
        r.required_bytes
    } else {
        r.limit_bytes
    })
}

/// True if a volume recorded with `capacity` (0: unknown) satisfies `range`.
fn capacity_compatible(capacity: i64, range: Option<&CapacityRange>) -> bool {
    let Some(r) = range else { return true };
    (r.required_bytes == 0 || capacity >= r.required_bytes)
        && (r.limit_bytes == 0 || capacity <= r.limit_bytes)
}

fn controller_capability(rpc: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(Type::Rpc(Rpc { r#type: rpc as i32 })),
    }
}

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not supported by the Shoal CSI plugin"))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        volume::require_mount_capabilities(&req.volume_capabilities)?;
        let capacity = requested_capacity(req.capacity_range.as_ref())?;
        let mode = volume::dir_mode(&req.parameters)?;
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume_content_source: Shoal volumes cannot be created from snapshots or clones",
            ));
        }
        let share = self.share()?;
        let id = volume::id_for_name(&req.name);
        let _busy = self.claim(&id)?;

        share
            .create_volume_dir(&id, mode)
            .await
            .map_err(share_status)?;
        let capacity = match share.read_capacity(&id).await.map_err(share_status)? {
            Some(recorded) if !capacity_compatible(recorded, req.capacity_range.as_ref()) => {
                return Err(Status::already_exists(format!(
                    "volume {id} for name {:?} already exists with capacity {recorded} bytes, \
                     which does not satisfy the requested range {:?}",
                    req.name, req.capacity_range
                )));
            }
            Some(recorded) => recorded,
            None => {
                share
                    .write_capacity(&id, capacity)
                    .await
                    .map_err(share_status)?;
                capacity
            }
        };
        info!(name = %req.name, volume = %id, capacity, "CreateVolume");
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(Volume {
                capacity_bytes: capacity,
                volume_context: volume::context(share.addr(), &id),
                volume_id: id,
                content_source: None,
                accessible_topology: vec![],
            }),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let share = self.share()?;
        if !volume::is_valid_id(&req.volume_id) {
            // No volume can have this id, so it is already gone.
            info!(volume = %req.volume_id, "DeleteVolume of an id this plugin never issues");
            return Ok(Response::new(DeleteVolumeResponse {}));
        }
        let _busy = self.claim(&req.volume_id)?;
        share
            .delete_volume(&req.volume_id)
            .await
            .map_err(share_status)?;
        info!(volume = %req.volume_id, "DeleteVolume");
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let mut unsupported = None;
        for (i, cap) in req.volume_capabilities.iter().enumerate() {
            let what = format!("volume_capabilities[{i}]");
            if volume::parse_capability(cap, &what)? == Access::Block {
                unsupported.get_or_insert(volume::block_unsupported(&what));
            }
        }
        let share = self.share()?;
        let exists = volume::is_valid_id(&req.volume_id)
            && share
                .volume_exists(&req.volume_id)
                .await
                .map_err(share_status)?;
        if !exists {
            return Err(Status::not_found(format!(
                "volume {} does not exist on share {}",
                req.volume_id,
                share.addr()
            )));
        }
        let response = match unsupported {
            Some(message) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
        };
        Ok(Response::new(response))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: vec![controller_capability(rpc::Type::CreateDeleteVolume)],
        }))
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(unimplemented("ControllerPublishVolume"))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(unimplemented("ControllerUnpublishVolume"))
    }

    async fn list_volumes(
        &self,
        _request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        Err(unimplemented("ListVolumes"))
    }

    async fn get_capacity(
        &self,
        _request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        Err(unimplemented("GetCapacity"))
    }

    async fn create_snapshot(
        &self,
        _request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        Err(unimplemented("CreateSnapshot"))
    }

    async fn delete_snapshot(
        &self,
        _request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        Err(unimplemented("DeleteSnapshot"))
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(unimplemented("ListSnapshots"))
    }

    async fn controller_expand_volume(
        &self,
        _request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        Err(unimplemented("ControllerExpandVolume"))
    }

    async fn controller_get_volume(
        &self,
        _request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        Err(unimplemented("ControllerGetVolume"))
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(unimplemented("ControllerModifyVolume"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required_bytes: i64, limit_bytes: i64) -> CapacityRange {
        CapacityRange {
            required_bytes,
            limit_bytes,
        }
    }

    #[test]
    fn capacities() {
        assert_eq!(requested_capacity(None).unwrap(), 0);
        assert_eq!(requested_capacity(Some(&range(10, 20))).unwrap(), 10);
        assert_eq!(requested_capacity(Some(&range(0, 20))).unwrap(), 20);
        assert!(requested_capacity(Some(&range(30, 20))).is_err());
        assert!(requested_capacity(Some(&range(-1, 0))).is_err());

        assert!(capacity_compatible(10, None));
        assert!(capacity_compatible(10, Some(&range(10, 10))));
        assert!(capacity_compatible(10, Some(&range(5, 0))));
        assert!(!capacity_compatible(10, Some(&range(20, 20))));
        assert!(!capacity_compatible(10, Some(&range(0, 5))));
        assert!(!capacity_compatible(0, Some(&range(1, 0))));
    }
}
