//! NodePublishVolume / NodeUnpublishVolume over gRPC.
//!
//! `fake_*` tests use a stand-in for `shoal mount` that mounts a tmpfs (needs root; skipped
//! otherwise), to test the plugin's own mechanics: detaching, waiting for the mount,
//! idempotency, conflicts, read-only, failures. `real_shoal_mount` runs the real binary
//! (`target/debug/shoal`, or `$SHOAL_BIN`) against an in-process share when it is built.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::*;
use common::*;
use tonic::Code;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A stand-in for `shoal mount SOURCE TARGET [--read-only]`: mounts a tmpfs named
/// `shoal:SOURCE` at TARGET and stays in the foreground until it is unmounted.
fn fake_shoal(dir: &Path) -> PathBuf {
    let path = dir.join("fake-shoal");
    std::fs::write(
        &path,
        r#"#!/bin/sh
[ "$1" = mount ] || { echo "usage: mount SOURCE TARGET" >&2; exit 2; }
case "$2" in *fail*) echo "cannot reach share $2" >&2; exit 1;; esac
opts=size=1m
[ "$4" = "--read-only" ] && opts="$opts,ro"
mount -t tmpfs -o "$opts" "shoal:$2" "$3" || exit 1
while grep -q " $3 " /proc/self/mountinfo; do sleep 0.1; done
"#,
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn mounts_at(target: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
        .map(str::to_string)
        .collect()
}

fn publish_req(
    volume: &str,
    share: &str,
    target: &Path,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        readonly,
        volume_context: [
            ("share".to_string(), share.to_string()),
            ("subdir".to_string(), format!("volumes/{volume}")),
        ]
        .into(),
        ..Default::default()
    }
}

fn unpublish_req(volume: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
    }
}

/// The session id of process `pid` (field 6 of /proc/PID/stat).
fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(3)?.parse().ok()
}

/// The pid recorded for the single published target of a plugin.
fn recorded_pid(p: &Plugin) -> u32 {
    let dir = p.dir.path().join("shoal-csi/mounts");
    let entry = std::fs::read_dir(dir).unwrap().next().unwrap().unwrap();
    let text = std::fs::read_to_string(entry.path()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap()
}

/// Lazily unmounts its paths when dropped, so a failing test leaves no mounts behind.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Ok(c) = std::ffi::CString::new(p.to_str().unwrap()) {
                // SAFETY: `c` is a valid path; unmounting something not mounted just fails.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// A share with `volumes` present on disk, and a plugin using the fake `shoal mount`.
struct FakeEnv {
    export: tempfile::TempDir,
    _server: shoal_nfs::server::Running,
    _bin: tempfile::TempDir,
    share: String,
    p: Plugin,
}

async fn fake_env(volumes: &[&str]) -> FakeEnv {
    let export = tempfile::tempdir().unwrap();
    for v in volumes {
        std::fs::create_dir_all(export.path().join("volumes").join(v)).unwrap();
    }
    let server = shoal_nfs::server::start(&shoal_nfs::server::ServeOptions {
        export: export.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        lease_term: Duration::from_secs(5),
    })
    .await
    .unwrap();
    let bin = tempfile::tempdir().unwrap();
    let p = Plugin::start(None, fake_shoal(bin.path())).await;
    FakeEnv {
        export,
        share: server.nfs_addr.to_string(),
        _server: server,
        _bin: bin,
        p,
    }
}

#[tokio::test]
async fn fake_publish_unpublish() {
    if !is_root() {
        return;
    }
    let env = fake_env(&["pvc-1", "pvc-2"]).await;
    let (p, share) = (&env.p, env.share.as_str());
    let mut n = p.node();
    let target = p.dir.path().join("pods/uid/volumes/pvc-1/mount");
    let _cleanup = Cleanup(vec![target.clone()]);

    n.node_publish_volume(publish_req("pvc-1", share, &target, false))
        .await
        .unwrap();
    let m = mounts_at(&target);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(
        m[0].contains(&format!("shoal:{share}/volumes/pvc-1")),
        "{m:?}"
    );
    assert!(m[0].split(' ').nth(5).unwrap().starts_with("rw"), "{m:?}");

    // The mount process leads a session of its own.
    let pid = recorded_pid(p);
    assert_eq!(session_of(pid), Some(pid));

    // Idempotent: the same publish again is OK and mounts nothing more.
    n.node_publish_volume(publish_req("pvc-1", share, &target, false))
        .await
        .unwrap();
    assert_eq!(mounts_at(&target).len(), 1);

    // A different volume, or the same one read-only, at the same target: ALREADY_EXISTS.
    assert_status(
        n.node_publish_volume(publish_req("pvc-2", share, &target, false))
            .await,
        Code::AlreadyExists,
        "pvc-1",
    );
    assert_status(
        n.node_publish_volume(publish_req("pvc-1", share, &target, true))
            .await,
        Code::AlreadyExists,
        "read-only",
    );

    n.node_unpublish_volume(unpublish_req("pvc-1", &target))
        .await
        .unwrap();
    assert!(mounts_at(&target).is_empty());
    assert!(!target.exists(), "target removed");
    // The mount process exits once unmounted.
    for _ in 0..50 {
        if session_of(pid).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(session_of(pid), None, "mount process {pid} exited");

    // Idempotent.
    n.node_unpublish_volume(unpublish_req("pvc-1", &target))
        .await
        .unwrap();
    env.p.stop().await;
}

#[tokio::test]
async fn fake_read_only_and_reader_modes() {
    if !is_root() {
        return;
    }
    let env = fake_env(&["pvc-1"]).await;
    let (p, share) = (&env.p, env.share.as_str());
    let mut n = p.node();

    let t1 = p.dir.path().join("t1");
    let _cleanup = Cleanup(vec![t1.clone(), p.dir.path().join("t2")]);
    n.node_publish_volume(publish_req("pvc-1", share, &t1, true))
        .await
        .unwrap();
    let t2 = p.dir.path().join("t2");
    let mut req = publish_req("pvc-1", share, &t2, false);
    req.volume_capability = Some(mount_cap(Mode::MultiNodeReaderOnly));
    n.node_publish_volume(req).await.unwrap();
    for t in [&t1, &t2] {
        let m = mounts_at(t);
        assert!(m[0].split(' ').nth(5).unwrap().starts_with("ro"), "{m:?}");
        let e = std::fs::write(t.join("x"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    }
    for t in [&t1, &t2] {
        n.node_unpublish_volume(unpublish_req("pvc-1", t))
            .await
            .unwrap();
        assert!(mounts_at(t).is_empty());
    }
    env.p.stop().await;
}

#[tokio::test]
async fn fake_failed_mount_reports_its_stderr() {
    if !is_root() {
        return;
    }
    let env = fake_env(&["pvc-fail"]).await;
    let (p, share) = (&env.p, env.share.as_str());
    let target = p.dir.path().join("t");
    assert_status(
        p.node()
            .node_publish_volume(publish_req("pvc-fail", share, &target, false))
            .await,
        Code::Internal,
        &format!("cannot reach share {share}/volumes/pvc-fail"),
    );
    assert!(mounts_at(&target).is_empty());

    // A volume the share does not have: NOT_FOUND, and nothing is spawned or created.
    let target = p.dir.path().join("t2");
    assert_status(
        p.node()
            .node_publish_volume(publish_req("pvc-gone", share, &target, false))
            .await,
        Code::NotFound,
        "pvc-gone",
    );
    assert!(!target.exists());
    // An unreachable share: UNAVAILABLE.
    assert_status(
        p.node()
            .node_publish_volume(publish_req("pvc-fail", "127.0.0.1:1", &target, false))
            .await,
        Code::Unavailable,
        "127.0.0.1:1",
    );
    assert!(env.export.path().join("volumes/pvc-fail").is_dir());
}

#[tokio::test]
async fn foreign_mount_at_target_is_not_ours() {
    if !is_root() {
        return;
    }
    let env = fake_env(&["pvc-1"]).await;
    let (p, share) = (&env.p, env.share.as_str());
    let target = p.dir.path().join("t");
    let _cleanup = Cleanup(vec![target.clone()]);
    std::fs::create_dir(&target).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "other", target.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_status(
        p.node()
            .node_publish_volume(publish_req("pvc-1", share, &target, false))
            .await,
        Code::AlreadyExists,
        "other",
    );
    // Unpublish still unmounts whatever is at the target (the CO owns the path).
    p.node()
        .node_unpublish_volume(unpublish_req("pvc-1", &target))
        .await
        .unwrap();
    assert!(mounts_at(&target).is_empty());
    env.p.stop().await;
}

/// The real `shoal` binary, if it has been built.
fn real_shoal() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/shoal");
    p.exists().then_some(p)
}

// The share runs in this process: file I/O through the mount must not block its runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_shoal_mount() {
    let Some(bin) = real_shoal() else { return };
    if !is_root() || !Path::new("/dev/fuse").exists() {
        return;
    }
    let export = tempfile::tempdir().unwrap();
    let server = shoal_nfs::server::start(&shoal_nfs::server::ServeOptions {
        export: export.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        lease_term: Duration::from_secs(5),
    })
    .await
    .unwrap();
    let p = Plugin::start(Some(server.nfs_addr.to_string()), bin).await;
    let vol = p
        .controller()
        .create_volume(CreateVolumeRequest {
            name: "pvc-real".into(),
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let mut n = p.node();
    let rw = p.dir.path().join("rw");
    let ro = p.dir.path().join("ro");
    let _cleanup = Cleanup(vec![rw.clone(), ro.clone()]);
    for (target, readonly) in [(&rw, false), (&ro, true)] {
        n.node_publish_volume(NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
            readonly,
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Written through one mount: on the share's disk, and visible through the other.
    let on_disk = export.path().join("volumes/pvc-real/hello");
    let (rw2, ro2) = (rw.clone(), ro.clone());
    tokio::task::spawn_blocking(move || {
        std::fs::write(rw2.join("hello"), b"from a pod").unwrap();
        assert_eq!(std::fs::read(&on_disk).unwrap(), b"from a pod");
        assert_eq!(std::fs::read(ro2.join("hello")).unwrap(), b"from a pod");
        let e = std::fs::write(ro2.join("nope"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    })
    .await
    .unwrap();

    // Idempotent publish of the real mount (recognised by its record and its fsname).
    n.node_publish_volume(NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: rw.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(mounts_at(&rw).len(), 1);

    // The mount process dies (the target answers ENOTCONN, or is auto-unmounted): publishing
    // again remounts.
    let records = p.dir.path().join("shoal-csi/mounts");
    let pid: i32 = std::fs::read_dir(records)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .find(|t| t.contains(&format!("target={}\n", rw.display())))
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("pid=")?.parse().ok()))
        .unwrap();
    // SAFETY: plain kill(2) of the mount process this test started through the plugin.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    for _ in 0..100 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n.node_publish_volume(NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: rw.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(mounts_at(&rw).len(), 1);
    let rw2 = rw.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(std::fs::read(rw2.join("hello")).unwrap(), b"from a pod");
    })
    .await
    .unwrap();

    for target in [&rw, &ro] {
        n.node_unpublish_volume(unpublish_req(&vol.volume_id, target))
            .await
            .unwrap();
        assert!(mounts_at(target).is_empty());
        assert!(!target.exists());
    }
    p.controller()
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!export.path().join("volumes/pvc-real").exists());
    p.stop().await;
}
