//! No handle, name or symlink reaches outside the export: forged handles, hostile names,
//! symlinks pointing out, and a directory swapped for a symlink while clients work in it.
//! Each test keeps a file next to the export (`outside/`) and checks it never changes.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use nfs3::{createhow3, nfsstat3, sattr3};
use nfs3_client::nfs3_types::nfs3::Nfs3Option;

/// A temporary tree: `export/` (served, with `d/`) and `outside/secret.txt` next to it.
struct Tree {
    _tmp: tempfile::TempDir,
    export: PathBuf,
    outside: PathBuf,
    secret: PathBuf,
}

const SECRET: &[u8] = b"not for NFS clients\n";

fn tree() -> Tree {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(export.join("d")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let secret = outside.join("secret.txt");
    std::fs::write(&secret, SECRET).unwrap();
    Tree {
        _tmp: tmp,
        export,
        outside,
        secret,
    }
}

/// What must not change outside the export: the secret's content, mode, owner, times, and
/// the names in `outside/`.
fn snapshot(t: &Tree) -> (Vec<u8>, u32, u32, i64, i64, Vec<String>) {
    let m = std::fs::metadata(&t.secret).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&t.outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    (
        std::fs::read(&t.secret).unwrap(),
        m.mode(),
        m.uid(),
        m.mtime(),
        m.mtime_nsec(),
        names,
    )
}

fn listing(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_handles_are_refused() {
    let t = tree();
    let before = snapshot(&t);
    let srv = serve(&t.export).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let root = c.root.clone();

    // Wrong length, wrong magic, empty.
    let short = fh(root.data.as_ref()[..10].to_vec());
    assert_eq!(
        c.getattr(&short).await.unwrap_err(),
        nfsstat3::NFS3ERR_BADHANDLE
    );
    let mut magic = root.data.as_ref().to_vec();
    magic[0] ^= 0xff;
    assert_eq!(
        c.getattr(&fh(magic)).await.unwrap_err(),
        nfsstat3::NFS3ERR_BADHANDLE
    );
    assert_eq!(
        c.getattr(&fh(Vec::new())).await.unwrap_err(),
        nfsstat3::NFS3ERR_BADHANDLE
    );
    let mut long = root.data.as_ref().to_vec();
    long.extend_from_slice(&[0; 8]);
    assert_eq!(
        c.getattr(&fh(long)).await.unwrap_err(),
        nfsstat3::NFS3ERR_BADHANDLE
    );

    // Another export's fsid.
    let mut other = root.data.as_ref().to_vec();
    other[11] ^= 1;
    assert_eq!(
        c.getattr(&fh(other)).await.unwrap_err(),
        nfsstat3::NFS3ERR_STALE
    );

    // Node ids of things outside the export: the secret, its directory, the export's parent,
    // the filesystem root. None may be read, written, listed or changed.
    let ids = [
        std::fs::metadata(&t.secret).unwrap().ino(),
        std::fs::metadata(&t.outside).unwrap().ino(),
        std::fs::metadata(t.export.parent().unwrap()).unwrap().ino(),
        std::fs::metadata("/").unwrap().ino(),
        std::fs::metadata("/etc/passwd").unwrap().ino(),
    ];
    for id in ids {
        let h = with_node(&root, id);
        assert_eq!(
            c.getattr(&h).await.unwrap_err(),
            nfsstat3::NFS3ERR_STALE,
            "id {id}"
        );
        assert_eq!(
            c.read(&h, 0, 100).await.unwrap_err(),
            nfsstat3::NFS3ERR_STALE
        );
        assert_eq!(
            c.write(&h, 0, b"pwned").await.unwrap_err(),
            nfsstat3::NFS3ERR_STALE
        );
        assert_eq!(
            c.setattr(&h, sattr_size(0)).await.unwrap_err(),
            nfsstat3::NFS3ERR_STALE
        );
        assert!(c.readdirplus_all(&h).await.is_err());
        assert!(c.lookup(&h, b"secret.txt").await.is_err());
        assert!(c.create_file(&h, b"planted").await.is_err());
    }
    assert_eq!(snapshot(&t), before);

    // Forged unknown ids do not make every call walk the whole export again.
    let walks = srv.share.volume.full_walks();
    for id in 0..200u64 {
        let h = with_node(&root, 0x7fff_0000_0000 + id);
        assert_eq!(c.getattr(&h).await.unwrap_err(), nfsstat3::NFS3ERR_STALE);
    }
    let walked = srv.share.volume.full_walks() - walks;
    assert!(walked <= 2, "200 forged ids caused {walked} full walks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused_and_change_nothing() {
    let t = tree();
    let before = snapshot(&t);
    let srv = serve(&t.export).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let root = c.root.clone();
    let d = c.walk("d").await.unwrap();

    // ".." of the root is the root.
    let (up, _) = c.lookup(&root, b"..").await.unwrap();
    assert_eq!(node_of(&up), node_of(&root));
    let (up, _) = c.lookup(&d, b"..").await.unwrap();
    assert_eq!(node_of(&up), node_of(&root));

    let export_before = listing(&t.export);
    let d_before = listing(&t.export.join("d"));
    let bad: [&[u8]; 7] = [
        b"../outside/secret.txt",
        b"..",
        b"a/b",
        b"/etc/passwd",
        b"",
        b"x\0y",
        &[b'n'; 300],
    ];
    for n in bad {
        let shown = String::from_utf8_lossy(n).into_owned();
        if n != b".." {
            assert!(c.lookup(&d, n).await.is_err(), "lookup {shown}");
        }
        assert!(c.create_file(&d, n).await.is_err(), "create {shown}");
        assert!(c.mkdir(&d, n).await.is_err(), "mkdir {shown}");
        assert!(
            c.symlink(&d, n, b"target").await.is_err(),
            "symlink {shown}"
        );
        assert!(c.remove(&d, n).await.is_err(), "remove {shown}");
        assert!(c.rmdir(&d, n).await.is_err(), "rmdir {shown}");
        assert!(
            c.rename(&root, b"d", &d, n).await.is_err(),
            "rename to {shown}"
        );
        assert!(
            c.rename(&d, n, &root, b"got").await.is_err(),
            "rename from {shown}"
        );
    }
    let inval = c.create_file(&d, b"a/b").await.unwrap_err();
    assert!(matches!(
        inval,
        nfsstat3::NFS3ERR_INVAL | nfsstat3::NFS3ERR_NOENT
    ));
    assert_eq!(
        c.create_file(&d, &[b'n'; 300]).await.unwrap_err(),
        nfsstat3::NFS3ERR_NAMETOOLONG
    );
    assert_eq!(listing(&t.export), export_before);
    assert_eq!(listing(&t.export.join("d")), d_before);
    assert_eq!(snapshot(&t), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_are_never_followed_by_the_server() {
    let t = tree();
    let srv = serve(&t.export).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let d = c.walk("d").await.unwrap();

    // Made by a client (absolute) and on disk (relative, climbing out).
    let abs = t.secret.display().to_string().into_bytes();
    let l_abs = c.symlink(&d, b"abs", &abs).await.unwrap();
    std::os::unix::fs::symlink("../../outside/secret.txt", t.export.join("d/rel")).unwrap();
    std::os::unix::fs::symlink("../../outside", t.export.join("d/dirlink")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", t.export.join("d/passwd")).unwrap();
    let (l_rel, _) = c.lookup(&d, b"rel").await.unwrap();
    let (l_dir, _) = c.lookup(&d, b"dirlink").await.unwrap();
    let (l_pw, _) = c.lookup(&d, b"passwd").await.unwrap();
    let before = snapshot(&t);
    let passwd_before = std::fs::read("/etc/passwd").unwrap();

    // READLINK returns the text verbatim.
    assert_eq!(c.readlink(&l_abs).await.unwrap(), abs);
    assert_eq!(
        c.readlink(&l_rel).await.unwrap(),
        b"../../outside/secret.txt"
    );
    assert_eq!(c.readlink(&l_pw).await.unwrap(), b"/etc/passwd");

    for l in [&l_abs, &l_rel, &l_pw, &l_dir] {
        assert!(c.read(l, 0, 100).await.is_err(), "read through a symlink");
        assert!(
            c.write(l, 0, b"pwned").await.is_err(),
            "write through a symlink"
        );
        assert!(
            c.setattr(l, sattr_size(0)).await.is_err(),
            "truncate through a symlink"
        );
        // Mode on a symlink is ignored; the target's mode must not change.
        let _ = c.setattr(l, sattr_mode(0o777)).await;
        let times = sattr3 {
            mtime: nfs3::set_mtime::SET_TO_SERVER_TIME,
            ..sattr3::default()
        };
        let _ = c.setattr(l, times).await;
        let owner = sattr3 {
            uid: Nfs3Option::Some(4321),
            ..sattr3::default()
        };
        let _ = c.setattr(l, owner).await;
        assert!(
            c.create_file(l, b"planted").await.is_err(),
            "create under a symlink"
        );
        assert!(
            c.mkdir(l, b"planted").await.is_err(),
            "mkdir under a symlink"
        );
        assert!(c.readdirplus_all(l).await.is_err(), "list a symlink");
    }
    // Looking up a name under a symlink to a directory: NOTDIR, never the target's entry.
    assert_eq!(
        c.lookup(&l_dir, b"secret.txt").await.unwrap_err(),
        nfsstat3::NFS3ERR_NOTDIR
    );
    // Creating over the symlink's own name neither follows nor replaces it.
    for how in [
        createhow3::UNCHECKED(sattr_size(0)),
        createhow3::GUARDED(sattr3::default()),
    ] {
        assert!(c.create(&d, b"rel", how).await.is_err());
    }
    assert!(std::fs::symlink_metadata(t.export.join("d/rel"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(snapshot(&t), before);
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
}

/// A directory that a client works in is swapped for a symlink pointing outside, over and
/// over, while the client creates, writes and truncates files in it. Nothing may land
/// outside the export, whichever way the race falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swapping_a_directory_for_a_symlink_never_escapes() {
    let t = tree();
    let before = snapshot(&t);
    let srv = serve(&t.export).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let d = c.walk("d").await.unwrap();
    // The secret's name in `d` too, so a followed path would open the real secret.
    let f = c.create_file(&d, b"secret.txt").await.unwrap();
    c.write(&f, 0, b"inside").await.unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let export = t.export.clone();
        let outside = t.outside.clone();
        std::thread::spawn(move || {
            let (dir, aside) = (export.join("d"), export.join("d.aside"));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::rename(&dir, &aside).unwrap();
                std::os::unix::fs::symlink(&outside, &dir).unwrap();
                std::thread::yield_now();
                std::fs::remove_file(&dir).unwrap();
                std::fs::rename(&aside, &dir).unwrap();
            }
        })
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(1500);
    let mut i = 0u32;
    while tokio::time::Instant::now() < deadline {
        i += 1;
        let n = format!("planted-{}", i % 8);
        let _ = c.create_file(&d, n.as_bytes()).await;
        let _ = c.create_file(&d, b"secret.txt").await;
        let _ = c.lookup(&d, b"secret.txt").await;
        let _ = c.write(&f, 0, b"pwned").await;
        let _ = c.setattr(&f, sattr_size(0)).await;
        let _ = c.setattr(&f, sattr_mode(0o777)).await;
        let _ = c.remove(&d, n.as_bytes()).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(i > 20, "the race ran ({i} rounds)");
    assert_eq!(snapshot(&t), before);
}

/// A directory the server knows is moved out of the export on disk and a symlink to it put
/// in its place: the files it held keep their inode numbers, but are outside now, and the
/// server's remembered paths lead through the symlink. Nothing there may be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_moved_out_and_symlinked_back_is_out_of_reach() {
    let t = tree();
    std::fs::write(t.export.join("d/file"), b"was inside").unwrap();
    let srv = serve(&t.export).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let d = c.walk("d").await.unwrap();
    let (f, _) = c.lookup(&d, b"file").await.unwrap();

    let moved = t.outside.join("d-moved");
    std::fs::rename(t.export.join("d"), &moved).unwrap();
    std::os::unix::fs::symlink(&moved, t.export.join("d")).unwrap();
    let before = std::fs::metadata(moved.join("file")).unwrap();

    assert!(c.read(&f, 0, 100).await.is_err(), "read");
    assert!(c.write(&f, 0, b"pwned").await.is_err(), "write");
    assert!(c.setattr(&f, sattr_mode(0o777)).await.is_err(), "chmod");
    assert!(c.setattr(&f, sattr_size(0)).await.is_err(), "truncate");
    assert!(c.getattr(&f).await.is_err(), "getattr");
    assert!(c.create_file(&d, b"planted").await.is_err(), "create");
    assert!(c.lookup(&d, b"file").await.is_err(), "lookup");
    let after = std::fs::metadata(moved.join("file")).unwrap();
    assert_eq!(std::fs::read(moved.join("file")).unwrap(), b"was inside");
    assert_eq!(before.mode(), after.mode());
    assert!(!moved.join("planted").exists());
}
