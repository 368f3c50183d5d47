//! CreateVolume / DeleteVolume / ValidateVolumeCapabilities against a real share served
//! in-process, checked on the exported directory on disk.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::*;
use common::*;
use shoal_nfs::server::{start, Running, ServeOptions};
use tonic::Code;

async fn share() -> (tempfile::TempDir, Running) {
    let export = tempfile::tempdir().unwrap();
    let running = start(&ServeOptions {
        export: export.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        lease_term: Duration::from_secs(5),
    })
    .await
    .expect("share starts");
    (export, running)
}

fn create(name: &str, caps: Vec<VolumeCapability>, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        volume_capabilities: caps,
        capacity_range: (bytes > 0).then_some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: bytes,
        }),
        ..Default::default()
    }
}

const ALL_MOUNT_MODES: [Mode; 7] = [
    Mode::SingleNodeWriter,
    Mode::SingleNodeReaderOnly,
    Mode::MultiNodeReaderOnly,
    Mode::MultiNodeSingleWriter,
    Mode::MultiNodeMultiWriter,
    Mode::SingleNodeSingleWriter,
    Mode::SingleNodeMultiWriter,
];

#[tokio::test]
async fn create_validate_delete() {
    let (export, server) = share().await;
    let addr = server.nfs_addr.to_string();
    let p = Plugin::start(Some(addr.clone()), no_binary()).await;
    let mut c = p.controller();
    let name = "pvc-0b5c8f2e-4d7a-4a8e-9a51-2f3c1d6e7a90";
    let caps: Vec<_> = ALL_MOUNT_MODES.iter().map(|m| mount_cap(*m)).collect();

    let vol = c
        .create_volume(create(name, caps.clone(), 1 << 30))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, name);
    assert_eq!(vol.capacity_bytes, 1 << 30);
    assert_eq!(vol.volume_context["share"], addr);
    assert_eq!(vol.volume_context["subdir"], format!("volumes/{name}"));
    let dir = export.path().join("volumes").join(name);
    assert!(dir.is_dir(), "volume directory on disk");
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
        0o777
    );

    // Idempotent: the same name and capacity is the same volume.
    let again = c
        .create_volume(create(name, caps.clone(), 1 << 30))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, vol);
    // The same name with a capacity the volume does not satisfy.
    assert_status(
        c.create_volume(create(name, caps.clone(), 2 << 30)).await,
        Code::AlreadyExists,
        name,
    );

    let confirmed = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: name.into(),
            volume_capabilities: caps.clone(),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.confirmed.unwrap().volume_capabilities, caps);
    let block = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: name.into(),
            volume_capabilities: vec![block_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(block.confirmed.is_none());
    assert!(block.message.contains("block"), "{}", block.message);
    for unknown in ["pvc-unknown", "../etc", ".pvc-0b5c8f2e.capacity"] {
        assert_status(
            c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: unknown.into(),
                volume_capabilities: caps.clone(),
                ..Default::default()
            })
            .await,
            Code::NotFound,
            "does not exist",
        );
    }

    // A populated tree, written behind the share's back, is removed whole.
    std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
    std::fs::write(dir.join("a/b/c/file"), b"x").unwrap();
    std::fs::write(dir.join("top"), b"y").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("a/link")).unwrap();
    for i in 0..600 {
        std::fs::write(dir.join("a").join(format!("f{i}")), b"z").unwrap();
    }
    c.delete_volume(DeleteVolumeRequest {
        volume_id: name.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!dir.exists(), "volume directory removed");
    assert!(std::path::Path::new("/etc/passwd").exists());
    let left: Vec<_> = std::fs::read_dir(export.path().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");

    // Idempotent: deleting again, or deleting what never existed, succeeds.
    for id in [name, "pvc-never", "../../etc"] {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_status(
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: name.into(),
            volume_capabilities: caps,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        name,
    );
    p.stop().await;
}

#[tokio::test]
async fn unsafe_names_stay_inside_volumes() {
    let (export, server) = share().await;
    let p = Plugin::start(Some(server.nfs_addr.to_string()), no_binary()).await;
    let mut c = p.controller();
    let caps = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    for name in ["../../escape", "..", "a/b", ".hidden"] {
        let vol = c
            .create_volume(create(name, caps.clone(), 0))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let id = vol.volume_id;
        assert!(
            !id.contains('/') && !id.starts_with('.'),
            "{name:?} -> {id:?}"
        );
        assert!(export.path().join("volumes").join(&id).is_dir());
        let again = c
            .create_volume(create(name, caps.clone(), 0))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(again.volume_id, id, "deterministic");
    }
    let top: Vec<_> = std::fs::read_dir(export.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(top, vec!["volumes".to_string()], "nothing outside volumes/");
    p.stop().await;
}

#[tokio::test]
async fn mode_parameter_and_concurrent_creates() {
    let (export, server) = share().await;
    let p = Plugin::start(Some(server.nfs_addr.to_string()), no_binary()).await;
    let caps = vec![mount_cap(Mode::SingleNodeWriter)];
    let mut req = create("pvc-mode", caps.clone(), 0);
    req.parameters = [("mode".to_string(), "2770".to_string())].into();
    p.controller().create_volume(req).await.unwrap();
    let mode = std::fs::metadata(export.path().join("volumes/pvc-mode"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o2770);

    // Many volumes at once: each ends up on disk.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut c = p.controller();
        let caps = caps.clone();
        tasks.push(tokio::spawn(async move {
            c.create_volume(create(&format!("pvc-{i}"), caps, 0)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for i in 0..16 {
        assert!(export.path().join(format!("volumes/pvc-{i}")).is_dir());
    }
    p.stop().await;
}
