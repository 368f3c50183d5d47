//! Identity and argument validation over a real unix socket; no share needed.

mod common;

use bpfman_csi::v1::controller_service_capability::{rpc, Type as CType};
use bpfman_csi::v1::plugin_capability::{service, Type as PType};
use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::*;
use common::*;
use tonic::Code;

#[tokio::test]
async fn identity() {
    let p = Plugin::start(None, no_binary()).await;
    let mut id = p.identity();
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "shoal.csi.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(PType::Service(s)) if s.r#type == service::Type::ControllerService as i32
    )));

    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    let socket = p.socket.clone();
    p.stop().await;
    assert!(!socket.exists(), "socket removed at shutdown");
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let opts = shoal_csi::CsiOptions {
        endpoint: socket.display().to_string(),
        node_id: "n".into(),
        share: None,
        shoal_bin: no_binary(),
    };
    let task = tokio::spawn(shoal_csi::serve(opts, async {
        let _ = rx.await;
    }));
    let ch = connect(&socket).await;
    let mut id = bpfman_csi::v1::identity_client::IdentityClient::new(ch);
    id.probe(ProbeRequest {}).await.unwrap();
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_endpoints_are_clear_errors() {
    let run = |endpoint: &str| {
        shoal_csi::serve(
            shoal_csi::CsiOptions {
                endpoint: endpoint.to_string(),
                node_id: "n".into(),
                share: None,
                shoal_bin: no_binary(),
            },
            async {},
        )
    };
    let e = run("unix:///nonexistent-dir-for-shoal/csi.sock")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = run("tcp://127.0.0.1:1").await.unwrap_err();
    assert!(e.to_string().contains("unix://"), "{e}");
}

#[tokio::test]
async fn controller_argument_errors() {
    let p = Plugin::start(Some("127.0.0.1:1".into()), no_binary()).await;
    let mut c = p.controller();
    let ok_caps = vec![mount_cap(Mode::MultiNodeMultiWriter)];

    assert_status(
        c.create_volume(CreateVolumeRequest {
            name: String::new(),
            volume_capabilities: ok_caps.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "name is required",
    );
    assert_status(
        c.create_volume(CreateVolumeRequest {
            name: "pvc-1".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "volume_capabilities is required",
    );
    assert_status(
        c.create_volume(CreateVolumeRequest {
            name: "pvc-1".into(),
            volume_capabilities: vec![block_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "block access is not supported",
    );
    let mut no_mode = mount_cap(Mode::SingleNodeWriter);
    no_mode.access_mode = None;
    assert_status(
        c.create_volume(CreateVolumeRequest {
            name: "pvc-1".into(),
            volume_capabilities: vec![no_mode],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "volume_capabilities[0].access_mode is required",
    );
    let mut no_type = mount_cap(Mode::SingleNodeWriter);
    no_type.access_type = None;
    assert_status(
        c.create_volume(CreateVolumeRequest {
            name: "pvc-1".into(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter), no_type],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "volume_capabilities[1].access_type is required",
    );
    assert_status(
        c.create_volume(CreateVolumeRequest {
            name: "pvc-1".into(),
            volume_capabilities: ok_caps.clone(),
            parameters: [("mode".to_string(), "rwx".to_string())].into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "parameter mode",
    );
    assert_status(
        c.delete_volume(DeleteVolumeRequest::default()).await,
        Code::InvalidArgument,
        "volume_id is required",
    );
    assert_status(
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_capabilities: ok_caps.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "volume_id is required",
    );
    assert_status(
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-1".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "volume_capabilities is required",
    );
    // A share that does not answer: UNAVAILABLE, naming it.
    assert_status(
        c.create_volume(CreateVolumeRequest {
            name: "pvc-1".into(),
            volume_capabilities: ok_caps,
            ..Default::default()
        })
        .await,
        Code::Unavailable,
        "127.0.0.1:1",
    );

    let caps = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|CType::Rpc(r)| r.r#type))
        .collect();
    assert_eq!(rpcs, vec![rpc::Type::CreateDeleteVolume as i32]);

    assert_status(
        c.list_volumes(ListVolumesRequest::default()).await,
        Code::Unimplemented,
        "ListVolumes",
    );
    assert_status(
        c.controller_publish_volume(ControllerPublishVolumeRequest::default())
            .await,
        Code::Unimplemented,
        "ControllerPublishVolume",
    );
    p.stop().await;
}

#[tokio::test]
async fn controller_without_share_fails_precondition() {
    let p = Plugin::start(None, no_binary()).await;
    assert_status(
        p.controller()
            .create_volume(CreateVolumeRequest {
                name: "pvc-1".into(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "--share",
    );
    p.stop().await;
}

#[tokio::test]
async fn node_argument_errors() {
    let p = Plugin::start(None, no_binary()).await;
    let mut n = p.node();
    let target = p.dir.path().join("target").display().to_string();
    let good = NodePublishVolumeRequest {
        volume_id: "pvc-1".into(),
        target_path: target.clone(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        volume_context: [
            ("share".to_string(), "127.0.0.1:2049".to_string()),
            ("subdir".to_string(), "volumes/pvc-1".to_string()),
        ]
        .into(),
        ..Default::default()
    };
    let cases: Vec<(NodePublishVolumeRequest, &str)> = vec![
        (
            NodePublishVolumeRequest {
                volume_id: String::new(),
                ..good.clone()
            },
            "volume_id is required",
        ),
        (
            NodePublishVolumeRequest {
                target_path: String::new(),
                ..good.clone()
            },
            "target_path is required",
        ),
        (
            NodePublishVolumeRequest {
                target_path: "relative/target".into(),
                ..good.clone()
            },
            "must be absolute",
        ),
        (
            NodePublishVolumeRequest {
                volume_capability: None,
                ..good.clone()
            },
            "volume_capability is required",
        ),
        (
            NodePublishVolumeRequest {
                volume_capability: Some(block_cap(Mode::SingleNodeWriter)),
                ..good.clone()
            },
            "block access is not supported",
        ),
        (
            NodePublishVolumeRequest {
                volume_context: [
                    ("share".to_string(), "127.0.0.1:2049".to_string()),
                    ("subdir".to_string(), "volumes/../../etc".to_string()),
                ]
                .into(),
                ..good.clone()
            },
            "subdir",
        ),
        (
            NodePublishVolumeRequest {
                volume_context: Default::default(),
                ..good.clone()
            },
            "without --share",
        ),
    ];
    for (req, needle) in cases {
        assert_status(
            n.node_publish_volume(req).await,
            Code::InvalidArgument,
            needle,
        );
    }
    assert!(!std::path::Path::new(&target).exists(), "nothing created");

    assert_status(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: target.clone(),
        })
        .await,
        Code::InvalidArgument,
        "volume_id is required",
    );
    assert_status(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-1".into(),
            target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "target_path is required",
    );
    // Unpublishing something never published is success.
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "pvc-1".into(),
        target_path: target,
    })
    .await
    .unwrap();

    let info = n
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    let caps = n
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.is_empty());
    assert_status(
        n.node_stage_volume(NodeStageVolumeRequest::default()).await,
        Code::Unimplemented,
        "NodeStageVolume",
    );
    p.stop().await;
}
