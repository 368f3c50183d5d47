//! End to end, every part real: this test plays the kubelet of three nodes.
//!
//! One `shoal serve` on a temporary directory; three `shoal csi` node plugins (node-a,
//! node-b, node-c), each on its own unix socket; an RWX volume created through the CSI
//! Controller and published on all three nodes (three replicas of one Deployment), each
//! publish being a real FUSE mount by a `shoal mount` process. Then, through the mounts: a
//! real archive unpacked on one node and checked everywhere (and through libnfs), edits seen
//! at once, concurrent writers, a plain NFSv3 client's change, a frozen client, and teardown.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bpfman_csi::v1::controller_client::ControllerClient;
use bpfman_csi::v1::node_client::NodeClient;
use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use bpfman_csi::v1::{
    CreateVolumeRequest, DeleteVolumeRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
    VolumeCapability,
};
use sha2::{Digest, Sha256};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Lease term of the test server: short, so the frozen-client case takes seconds.
const LEASE_TERM_S: u64 = 3;

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// A child process, terminated (then killed) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return; // already reaped: its pid may belong to someone else now
        }
        signal(self.0.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started; it touches no memory.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Starts `shoal serve` on `export` at 127.0.0.1:`port` (lease term [`LEASE_TERM_S`]) and
/// waits until its lease channel answers.
fn serve(export: &Path, port: u16) -> Proc {
    let p = Proc(
        Command::new(SHOAL)
            .arg("serve")
            .arg(export)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--lease-term", &LEASE_TERM_S.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let chan: SocketAddr = format!("127.0.0.1:{}", port + 1).parse().unwrap();
    wait_for("shoal serve", Duration::from_secs(10), || {
        TcpStream::connect(chan).is_ok()
    });
    p
}

/// Two free consecutive ports: NFS on the first, the lease channel on the second.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mounted(dir: &Path) -> bool {
    shoal_fuse::mountinfo::is_mounted(dir)
}

/// The pid of the `shoal mount` process serving `target`.
fn mount_pid(target: &Path) -> u32 {
    let want = target.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "mount") && args.contains(&want) {
            return pid;
        }
    }
    panic!("no shoal mount process for {want}");
}

async fn csi_channel(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            UnixStream::connect(path.clone())
        }))
        .await
        .expect("connect to CSI socket")
}

fn rwx() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn sha256(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Relative path to sha256 of every regular file under `root`.
fn tree_digest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, sha256(&std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

/// Names (with kind and size) of everything under `root`, for comparing trees across nodes.
fn tree_listing(root: &Path) -> BTreeMap<String, (bool, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(rel, (m.is_dir(), if m.is_dir() { 0 } else { m.len() }));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

fn nfs_url(port: u16, path: &str) -> String {
    format!("nfs://127.0.0.1{path}?nfsport={port}&mountport={port}")
}

fn nfs_cat(port: u16, path: &str) -> Vec<u8> {
    let out = Command::new("nfs-cat")
        .arg(nfs_url(port, path))
        .output()
        .expect("nfs-cat (libnfs-utils) installed");
    assert!(
        out.status.success(),
        "nfs-cat {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A real archive from the local cargo registry: the `.crate` of one of our dependencies.
fn real_archive() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cargo"));
    let cache = home.join("registry/cache");
    for index in std::fs::read_dir(&cache)
        .expect("cargo registry cache")
        .flatten()
    {
        let candidate = index.path().join("tonic-0.11.0.crate");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("tonic-0.11.0.crate not found under {}", cache.display());
}

/// Unmounts anything left under `root` if the test fails half-way.
struct MountSweeper(PathBuf);

impl Drop for MountSweeper {
    fn drop(&mut self) {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.0.to_string_lossy().to_string();
        for line in table.lines() {
            if let Some(mp) = line.split(' ').nth(4) {
                if mp.starts_with(&root) {
                    let _ = Command::new("umount").arg("-l").arg(mp).status();
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_three_replicas_see_the_same_files() {
    let work = tempfile::Builder::new()
        .prefix("shoal-e2e.")
        .tempdir()
        .unwrap();
    let _sweeper = MountSweeper(work.path().to_path_buf());
    let export = work.path().join("export");
    std::fs::create_dir(&export).unwrap();

    // --- the share-manager ---
    let port = free_port_pair();
    let _server = serve(&export, port);
    let share = format!("127.0.0.1:{port}");

    // --- three node plugins ---
    let nodes = ["node-a", "node-b", "node-c"];
    let mut plugins = Vec::new();
    let mut channels = Vec::new();
    for n in nodes {
        let sock = work.path().join(format!("{n}.sock"));
        plugins.push(Proc(
            Command::new(SHOAL)
                .arg("csi")
                .args([
                    "--endpoint",
                    &format!("unix://{}", sock.display()),
                    "--node-id",
                    n,
                    "--share",
                    &share,
                ])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        wait_for("CSI socket", Duration::from_secs(10), || sock.exists());
        channels.push(csi_channel(&sock).await);
    }

    // --- CreateVolume: an RWX volume ---
    let mut controller = ControllerClient::new(channels[0].clone());
    let created = controller
        .create_volume(CreateVolumeRequest {
            name: "pvc-web-html".into(),
            volume_capabilities: vec![rwx()],
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("a volume");
    let volume_dirs: Vec<_> = std::fs::read_dir(export.join("volumes"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(
        volume_dirs.len(),
        1,
        "CreateVolume made one directory on the share"
    );
    let volume_on_disk = volume_dirs[0].path();

    // --- NodePublishVolume on every node: three replicas ---
    let mut targets = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let target = work.path().join(n).join("pods/web/volumes/html");
        NodeClient::new(channels[i].clone())
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: created.volume_id.clone(),
                volume_context: created.volume_context.clone(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(rwx()),
                readonly: false,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodePublishVolume on {n}: {e}"));
        assert!(mounted(&target), "{n}: target is a mount");
        targets.push(target);
    }
    let [a, b, c] = [&targets[0], &targets[1], &targets[2]];

    // The libnfs path of the volume: its directory relative to the export.
    let vol_rel = format!(
        "/{}",
        volume_on_disk.strip_prefix(&export).unwrap().display()
    );

    // --- 1. unpack a real archive through node-a, check every file everywhere ---
    let archive = real_archive();
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(a)
        .status()
        .unwrap();
    assert!(status.success(), "tar -x through node-a");
    let reference = {
        let scratch = work.path().join("reference");
        std::fs::create_dir(&scratch).unwrap();
        assert!(Command::new("tar")
            .arg("-xzf")
            .arg(&archive)
            .arg("-C")
            .arg(&scratch)
            .status()
            .unwrap()
            .success());
        tree_digest(&scratch)
    };
    assert!(
        reference.len() > 50,
        "a real archive with many files ({})",
        reference.len()
    );
    assert_eq!(tree_digest(a), reference, "node-a");
    assert_eq!(tree_digest(b), reference, "node-b");
    assert_eq!(tree_digest(c), reference, "node-c");
    assert_eq!(
        tree_digest(&volume_on_disk),
        reference,
        "the export on disk"
    );
    let vr = vol_rel.clone();
    let nfs_sums = tokio::task::spawn_blocking(move || {
        reference
            .keys()
            .map(|rel| (rel.clone(), sha256(&nfs_cat(port, &format!("{vr}/{rel}")))))
            .collect::<BTreeMap<_, _>>()
    })
    .await
    .unwrap();
    assert_eq!(nfs_sums, tree_digest(a), "libnfs nfs-cat");

    // --- 2. edit index.html on node-c, read the new bytes on node-a and node-b at once ---
    std::fs::write(a.join("index.html"), b"<h1>v1</h1>\n").unwrap();
    assert_eq!(
        std::fs::read(b.join("index.html")).unwrap(),
        b"<h1>v1</h1>\n"
    );
    assert_eq!(
        std::fs::read(c.join("index.html")).unwrap(),
        b"<h1>v1</h1>\n"
    );
    for round in 0..20 {
        let page = format!(
            "<h1>edited on node-c, round {round}</h1>\n{}",
            "x".repeat(round * 100)
        );
        std::fs::write(c.join("index.html"), &page).unwrap();
        assert_eq!(
            std::fs::read_to_string(a.join("index.html")).unwrap(),
            page,
            "node-a, round {round}"
        );
        assert_eq!(
            std::fs::read_to_string(b.join("index.html")).unwrap(),
            page,
            "node-b, round {round}"
        );
    }

    // --- 3. three writers append concurrently, then rename and unlink ---
    let writers: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = t.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let dir = t.join("logs");
                let _ = std::fs::create_dir(&dir);
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("w{i}.log")))
                    .unwrap();
                for line in 0..200 {
                    writeln!(f, "writer {i} line {line}").unwrap();
                }
                drop(f);
                std::fs::rename(
                    dir.join(format!("w{i}.log")),
                    dir.join(format!("writer-{i}.log")),
                )
                .unwrap();
                std::fs::write(dir.join(format!("tmp-{i}")), b"scratch").unwrap();
                std::fs::remove_file(dir.join(format!("tmp-{i}"))).unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }
    let tree_a = tree_listing(a);
    assert_eq!(tree_listing(b), tree_a, "node-b tree");
    assert_eq!(tree_listing(c), tree_a, "node-c tree");
    for i in 0..3 {
        let log = std::fs::read_to_string(b.join(format!("logs/writer-{i}.log"))).unwrap();
        assert_eq!(log.lines().count(), 200, "writer {i}'s lines on node-b");
        assert!(
            !a.join(format!("logs/w{i}.log")).exists() && !c.join(format!("logs/tmp-{i}")).exists()
        );
    }

    // --- 4. a plain NFSv3 client changes a file; the FUSE mounts see it at once ---
    assert_eq!(
        std::fs::read(a.join("logs/writer-0.log")).unwrap().len(),
        tree_a["logs/writer-0.log"].1 as usize
    );
    // nfs-cp refuses to overwrite (GUARDED create): remove through a mount, then copy.
    let nfs_replace = |mount: &Path, rel: &str, bytes: &[u8]| {
        let local = work.path().join("from-libnfs.txt");
        std::fs::write(&local, bytes).unwrap();
        std::fs::remove_file(mount.join(rel)).unwrap();
        let cp = Command::new("nfs-cp")
            .arg(&local)
            .arg(nfs_url(port, &format!("{vol_rel}/{rel}")))
            .output()
            .unwrap();
        assert!(
            cp.status.success(),
            "nfs-cp: {}",
            String::from_utf8_lossy(&cp.stderr)
        );
        for t in &targets {
            assert_eq!(
                std::fs::read(t.join(rel)).unwrap(),
                bytes,
                "{rel} on {}",
                t.display()
            );
        }
    };
    nfs_replace(a, "logs/writer-0.log", b"written by a plain NFSv3 client\n");
    // And a file every node has cached (index.html): the cached copies are recalled.
    let before = std::fs::read_to_string(b.join("index.html")).unwrap();
    assert!(before.starts_with("<h1>edited on node-c"));
    nfs_replace(c, "index.html", b"<h1>from libnfs</h1>\n");

    // --- 5. a frozen client: the writer proceeds once its lease runs out, and the frozen
    // node, resumed, does not return the old bytes ---
    std::fs::write(a.join("frozen.txt"), b"old bytes").unwrap();
    assert_eq!(
        std::fs::read(b.join("frozen.txt")).unwrap(),
        b"old bytes",
        "node-b caches the old bytes"
    );
    let frozen = mount_pid(b);
    signal(frozen, libc::SIGSTOP);
    let started = Instant::now();
    let a_path = a.join("frozen.txt");
    let write =
        tokio::task::spawn_blocking(move || std::fs::write(a_path, b"new bytes after the freeze"));
    let written = tokio::time::timeout(Duration::from_secs(LEASE_TERM_S * 4 + 10), write).await;
    let waited = started.elapsed();
    signal(frozen, libc::SIGCONT);
    written
        .expect("the writer proceeds once the frozen lease runs out")
        .unwrap()
        .unwrap();
    assert!(
        waited <= Duration::from_secs(LEASE_TERM_S * 4),
        "writer waited {waited:?}, more than the lease allows"
    );
    assert_eq!(
        std::fs::read(b.join("frozen.txt")).unwrap(),
        b"new bytes after the freeze",
        "node-b after resuming"
    );
    assert_eq!(
        std::fs::read(c.join("frozen.txt")).unwrap(),
        b"new bytes after the freeze"
    );

    // The share's counters (through `shoal stats`) show the recalls and the one that
    // ended because the frozen lease ran out.
    let stats = Command::new(SHOAL)
        .args(["stats", &share])
        .output()
        .unwrap();
    assert!(
        stats.status.success(),
        "shoal stats: {}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let stats = String::from_utf8_lossy(&stats.stdout).into_owned();
    let counter = |name: &str| -> u64 {
        let line = stats
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {stats}"));
        line[name.len()..].trim().parse().unwrap()
    };
    assert!(counter("recalls sent") >= 20, "{stats}");
    assert!(counter("recalls expired") >= 1, "{stats}");
    // Three mounts, the plugins' share clients and this one.
    assert!(counter("sessions") >= 4, "{stats}");

    // --- 6. teardown: unpublish everywhere, no mount left; DeleteVolume removes the directory ---
    for (i, t) in targets.iter().enumerate() {
        NodeClient::new(channels[i].clone())
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: created.volume_id.clone(),
                target_path: t.to_string_lossy().into(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnpublishVolume on {}: {e}", nodes[i]));
        assert!(!mounted(t), "{} still mounted", t.display());
        assert!(!t.exists(), "{} not removed", t.display());
    }
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !table.contains(&*work.path().to_string_lossy()),
        "no mount left under the test directory"
    );
    controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: created.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
    assert!(
        !volume_on_disk.exists(),
        "DeleteVolume removed the directory"
    );
    drop(plugins);
}

/// What the server acknowledged survives a crash of the server process: a file written and
/// closed through a mount (no fsync asked for) is on disk after `kill -9` of `shoal serve`,
/// and a restarted server serves it to the same, still-mounted client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_server_crash() {
    let work = tempfile::Builder::new()
        .prefix("shoal-crash.")
        .tempdir()
        .unwrap();
    let _sweeper = MountSweeper(work.path().to_path_buf());
    let export = work.path().join("export");
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&export).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let port = free_port_pair();
    let mut server = serve(&export, port);
    let _mount = Proc(
        Command::new(SHOAL)
            .args(["mount", &format!("127.0.0.1:{port}")])
            .arg(&mnt)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("shoal mount", Duration::from_secs(10), || mounted(&mnt));

    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(mnt.join("acknowledged.bin"), &data).unwrap();
    // The crash: no chance to flush or clean up anything.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    assert_eq!(
        std::fs::read(export.join("acknowledged.bin")).unwrap(),
        data,
        "on disk after the crash"
    );

    // Same data, same node ids: the mount carries on once a server is back.
    let _server = serve(&export, port);
    let mut back = None;
    wait_for(
        "the mount to reach the restarted server",
        Duration::from_secs(30),
        || {
            back = std::fs::read(mnt.join("acknowledged.bin")).ok();
            back.is_some()
        },
    );
    assert_eq!(
        back.unwrap(),
        data,
        "read through the mount after the restart"
    );
    std::mem::forget(server);
}
