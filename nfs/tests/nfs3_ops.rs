//! Every NFSv3 procedure Shoal serves, driven by an independent strict client
//! (`nfs3_client`) over real TCP, with each result checked on the real directory.
//!
//! Known limits of nfsserve 0.11 that Shoal cannot fix without forking it:
//! - Plain READDIR ignores the cookie: it calls `readdir_simple(dir, count)`, which has no
//!   cookie parameter, so an override cannot resume a listing. A directory larger than one
//!   READDIR reply cannot be listed with READDIR; clients use READDIRPLUS (Linux and libnfs
//!   do), whose paging is tested here.
//! - FSSTAT answers hard-coded sizes (1 TiB, 2^30 files), not the export's `statvfs`.
//! - REMOVE and RMDIR reach the same `remove` callback, so REMOVE of an empty directory
//!   removes it (RFC 1813 would refuse), and RMDIR of a file removes the file.
//! - SETATTR with a ctime guard that does not match writes NOT_SYNC and then carries on and
//!   writes a second reply into the same record; clients should not send guards.
//! - Writes always answer FILE_SYNC and there is no COMMIT: the volume writes through with
//!   pwrite, so the data is in the kernel's page cache when the reply leaves (tested below).

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime};

use common::*;
use nfs3::{createhow3, createverf3, ftype3, nfsstat3, nfstime3, sattr3, set_atime, set_mtime};
use nfs3_client::nfs3_types::nfs3::{FSINFO3args, FSSTAT3args, Nfs3Option, Nfs3Result};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_read_write_create_and_setattr() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("d")).unwrap();
    let srv = serve(root).await;
    let mut c = Client::mount(srv.nfs_addr).await;

    let d = c.walk("d").await.unwrap();
    assert_eq!(
        c.lookup(&d, b"missing").await.unwrap_err(),
        nfsstat3::NFS3ERR_NOENT
    );
    let (same, _) = c.lookup(&d, b".").await.unwrap();
    assert_eq!(node_of(&same), node_of(&d));

    // UNCHECKED with a mode: a new file with that mode.
    let f = c
        .create(&d, b"f", createhow3::UNCHECKED(sattr_mode(0o600)))
        .await
        .unwrap();
    let on_disk = root.join("d/f");
    assert_eq!(std::fs::metadata(&on_disk).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(node_of(&f), std::fs::metadata(&on_disk).unwrap().ino());

    // WRITE: on disk as soon as the reply is back, committed FILE_SYNC.
    let (n, how) = c.write(&f, 0, b"hello").await.unwrap();
    assert_eq!(n, 5);
    assert_eq!(how, nfs3::stable_how::FILE_SYNC);
    assert_eq!(std::fs::read(&on_disk).unwrap(), b"hello");
    c.write(&f, 10, b"world").await.unwrap();
    assert_eq!(std::fs::read(&on_disk).unwrap(), b"hello\0\0\0\0\0world");

    // READ: whole, partial (no eof), past the end (eof, nothing).
    assert_eq!(
        c.read(&f, 0, 4096).await.unwrap(),
        (b"hello\0\0\0\0\0world".to_vec(), true)
    );
    assert_eq!(c.read(&f, 1, 3).await.unwrap(), (b"ell".to_vec(), false));
    assert_eq!(c.read(&f, 100, 10).await.unwrap(), (Vec::new(), true));

    // UNCHECKED on an existing file keeps it and its data.
    let again = c.create_file(&d, b"f").await.unwrap();
    assert_eq!(node_of(&again), node_of(&f));
    assert_eq!(std::fs::read(&on_disk).unwrap().len(), 15);

    // GUARDED: EXIST on an existing name, a new file otherwise.
    let guarded = |m| createhow3::GUARDED(sattr_mode(m));
    assert_eq!(
        c.create(&d, b"f", guarded(0o644)).await.unwrap_err(),
        nfsstat3::NFS3ERR_EXIST
    );
    c.create(&d, b"g", guarded(0o640)).await.unwrap();
    assert_eq!(
        std::fs::metadata(root.join("d/g")).unwrap().mode() & 0o7777,
        0o640
    );

    // EXCLUSIVE: a new file; an existing name is refused.
    let verf = createverf3([7; 8]);
    let x = c
        .create(&d, b"x", createhow3::EXCLUSIVE(verf))
        .await
        .unwrap();
    assert!(root.join("d/x").is_file());
    assert_eq!(c.getattr(&x).await.unwrap().type_, ftype3::NF3REG);
    assert_eq!(
        c.create(&d, b"f", createhow3::EXCLUSIVE(verf))
            .await
            .unwrap_err(),
        nfsstat3::NFS3ERR_EXIST
    );

    // SETATTR: mode, owner, size, times; each checked on disk.
    let a = c.setattr(&f, sattr_mode(0o640)).await.unwrap();
    assert_eq!(a.mode & 0o7777, 0o640);
    assert_eq!(std::fs::metadata(&on_disk).unwrap().mode() & 0o7777, 0o640);

    let owner = sattr3 {
        uid: Nfs3Option::Some(1234),
        gid: Nfs3Option::Some(5678),
        ..sattr3::default()
    };
    let a = c.setattr(&f, owner).await.unwrap();
    let m = std::fs::metadata(&on_disk).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!((a.uid, a.gid), (1234, 5678));

    let a = c.setattr(&f, sattr_size(3)).await.unwrap();
    assert_eq!(a.size, 3);
    assert_eq!(std::fs::read(&on_disk).unwrap(), b"hel");
    c.setattr(&f, sattr_size(8)).await.unwrap();
    assert_eq!(std::fs::read(&on_disk).unwrap(), b"hel\0\0\0\0\0");

    let times = sattr3 {
        atime: set_atime::SET_TO_CLIENT_TIME(nfstime3 {
            seconds: 1_000_000_000,
            nseconds: 5,
        }),
        mtime: set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
            seconds: 1_100_000_000,
            nseconds: 7,
        }),
        ..sattr3::default()
    };
    let a = c.setattr(&f, times).await.unwrap();
    let m = std::fs::metadata(&on_disk).unwrap();
    assert_eq!((m.atime(), m.atime_nsec()), (1_000_000_000, 5));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_100_000_000, 7));
    assert_eq!((a.mtime.seconds, a.mtime.nseconds), (1_100_000_000, 7));

    let now = sattr3 {
        mtime: set_mtime::SET_TO_SERVER_TIME,
        ..sattr3::default()
    };
    c.setattr(&f, now).await.unwrap();
    let mtime = std::fs::metadata(&on_disk).unwrap().modified().unwrap();
    let age = SystemTime::now().duration_since(mtime).unwrap_or_default();
    assert!(
        age < Duration::from_secs(60),
        "mtime set to the server's clock"
    );

    // Truncating a directory is refused.
    assert_eq!(
        c.setattr(&d, sattr_size(0)).await.unwrap_err(),
        nfsstat3::NFS3ERR_ISDIR
    );
    // Reading or writing a directory is refused.
    assert_eq!(
        c.read(&d, 0, 10).await.unwrap_err(),
        nfsstat3::NFS3ERR_ISDIR
    );
    assert_eq!(
        c.write(&d, 0, b"x").await.unwrap_err(),
        nfsstat3::NFS3ERR_ISDIR
    );

    // GETATTR matches the disk.
    let a = c.getattr(&f).await.unwrap();
    let m = std::fs::metadata(&on_disk).unwrap();
    assert_eq!(a.fileid, m.ino());
    assert_eq!(a.size, m.len());
    assert_eq!(a.nlink, 1);
    assert_eq!(a.type_, ftype3::NF3REG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_symlinks_rename_and_fs_info() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let srv = serve(root).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let r = c.root.clone();

    // MKDIR, and EXIST on a second one.
    let a = c.mkdir(&r, b"a").await.unwrap();
    let b = c.mkdir(&r, b"b").await.unwrap();
    assert!(root.join("a").is_dir());
    assert_eq!(
        c.mkdir(&r, b"a").await.unwrap_err(),
        nfsstat3::NFS3ERR_EXIST
    );
    assert_eq!(c.getattr(&a).await.unwrap().type_, ftype3::NF3DIR);

    // RMDIR: NOTEMPTY, then gone.
    let f1 = c.create_file(&a, b"one").await.unwrap();
    c.write(&f1, 0, b"first").await.unwrap();
    assert_eq!(
        c.rmdir(&r, b"a").await.unwrap_err(),
        nfsstat3::NFS3ERR_NOTEMPTY
    );
    c.mkdir(&r, b"empty").await.unwrap();
    c.rmdir(&r, b"empty").await.unwrap();
    assert!(!root.join("empty").exists());
    assert_eq!(
        c.rmdir(&r, b"empty").await.unwrap_err(),
        nfsstat3::NFS3ERR_NOENT
    );

    // RENAME within a directory.
    c.rename(&a, b"one", &a, b"uno").await.unwrap();
    assert!(!root.join("a/one").exists());
    assert_eq!(std::fs::read(root.join("a/uno")).unwrap(), b"first");
    assert_eq!(
        c.read(&f1, 0, 100).await.unwrap().0,
        b"first",
        "handle follows the rename"
    );

    // RENAME across directories.
    c.rename(&a, b"uno", &b, b"moved").await.unwrap();
    assert_eq!(std::fs::read(root.join("b/moved")).unwrap(), b"first");
    let (found, _) = c.lookup(&b, b"moved").await.unwrap();
    assert_eq!(node_of(&found), node_of(&f1));
    assert_eq!(c.read(&f1, 0, 100).await.unwrap().0, b"first");

    // RENAME over an existing file: the target is replaced, its handle goes stale.
    let victim = c.create_file(&b, b"victim").await.unwrap();
    c.write(&victim, 0, b"old").await.unwrap();
    c.rename(&b, b"moved", &b, b"victim").await.unwrap();
    assert_eq!(std::fs::read(root.join("b/victim")).unwrap(), b"first");
    assert!(!root.join("b/moved").exists());
    assert_eq!(
        c.getattr(&victim).await.unwrap_err(),
        nfsstat3::NFS3ERR_STALE
    );
    assert_eq!(c.read(&f1, 0, 100).await.unwrap().0, b"first");

    // RENAME of a directory into itself is refused.
    assert_eq!(
        c.rename(&r, b"b", &b, b"inside").await.unwrap_err(),
        nfsstat3::NFS3ERR_INVAL
    );
    // RENAME of a missing name.
    assert_eq!(
        c.rename(&r, b"nothing", &r, b"x").await.unwrap_err(),
        nfsstat3::NFS3ERR_NOENT
    );

    // REMOVE.
    c.remove(&b, b"victim").await.unwrap();
    assert!(!root.join("b/victim").exists());
    assert_eq!(c.getattr(&f1).await.unwrap_err(), nfsstat3::NFS3ERR_STALE);
    assert_eq!(
        c.remove(&b, b"victim").await.unwrap_err(),
        nfsstat3::NFS3ERR_NOENT
    );

    // SYMLINK and READLINK: stored and returned verbatim.
    let l = c.symlink(&b, b"link", b"../a/whatever").await.unwrap();
    assert_eq!(
        std::fs::read_link(root.join("b/link")).unwrap().as_os_str(),
        "../a/whatever"
    );
    assert_eq!(c.readlink(&l).await.unwrap(), b"../a/whatever");
    assert_eq!(c.getattr(&l).await.unwrap().type_, ftype3::NF3LNK);
    assert_eq!(c.readlink(&b).await.unwrap_err(), nfsstat3::NFS3ERR_INVAL);
    c.remove(&b, b"link").await.unwrap();
    assert!(std::fs::symlink_metadata(root.join("b/link")).is_err());

    // FSINFO and FSSTAT answer for the root.
    match c
        .conn
        .fsinfo(&FSINFO3args { fsroot: r.clone() })
        .await
        .unwrap()
    {
        Nfs3Result::Ok(ok) => {
            assert!(ok.rtmax >= 64 * 1024 && ok.wtmax >= 64 * 1024);
            assert!(ok.maxfilesize > 0);
        }
        Nfs3Result::Err((s, _)) => panic!("fsinfo: {s:?}"),
    }
    match c
        .conn
        .fsstat(&FSSTAT3args { fsroot: r.clone() })
        .await
        .unwrap()
    {
        Nfs3Result::Ok(ok) => assert!(ok.tbytes >= ok.fbytes),
        Nfs3Result::Err((s, _)) => panic!("fsstat: {s:?}"),
    }
}

/// 20,000 entries through READDIRPLUS in small pages: each name exactly once, with a handle
/// that works; then again while entries are added and removed between pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdirplus_pages_a_large_directory() {
    const N: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::create_dir(&big).unwrap();
    for i in 0..N {
        std::fs::File::create(big.join(format!("file-{i:05}"))).unwrap();
    }
    let srv = serve(dir.path()).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let d = c.walk("big").await.unwrap();

    let all = c.readdirplus_all(&d).await.unwrap();
    let mut names: Vec<_> = all.iter().map(|e| e.name.clone()).collect();
    names.sort();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "no name twice");
    assert_eq!(names.len(), N, "every name once");
    let e = &all[N / 2];
    let h = e.fh.clone().expect("entries carry handles");
    assert_eq!(c.getattr(&h).await.unwrap().fileid, e.fileid);

    // Page again, changing the directory between pages.
    let mut seen = std::collections::HashMap::<Vec<u8>, usize>::new();
    let mut removed = std::collections::HashSet::new();
    let mut cookie = 0;
    let mut verf = nfs3::cookieverf3::default();
    let mut page_no = 0;
    loop {
        let (page, eof, v) = c
            .readdirplus_page(&d, cookie, verf, 64 * 1024)
            .await
            .unwrap();
        verf = v;
        for e in &page {
            *seen.entry(e.name.clone()).or_default() += 1;
        }
        if let Some(last) = page.last() {
            cookie = last.cookie;
        }
        if eof {
            break;
        }
        // Between every fourth page: remove one seen and one unseen entry, add two new ones.
        // (Each change makes the next page re-read the whole directory: keep it fast.)
        page_no += 1;
        if page_no % 4 != 1 {
            continue;
        }
        let seen_one = format!("file-{:05}", page_no * 7 % N);
        let unseen_one = format!("file-{:05}", (N - 1 - page_no * 13 % N) % N);
        for n in [&seen_one, &unseen_one] {
            if std::fs::remove_file(big.join(n)).is_ok() {
                removed.insert(n.clone().into_bytes());
            }
        }
        for k in 0..2 {
            std::fs::File::create(big.join(format!("new-{page_no}-{k}"))).unwrap();
        }
        assert!(page_no < 10_000, "the listing ends");
    }
    assert!(page_no > 20, "small pages: {page_no}");
    for (n, count) in &seen {
        assert_eq!(
            *count,
            1,
            "{} listed {count} times",
            String::from_utf8_lossy(n)
        );
    }
    for i in 0..N {
        let n = format!("file-{i:05}").into_bytes();
        if !removed.contains(&n) {
            assert!(
                seen.contains_key(&n),
                "{} missed",
                String::from_utf8_lossy(&n)
            );
        }
    }
}

/// Handles stay valid across a restart of the server on the same directory, even for nodes
/// the new server has never seen looked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::write(root.join("a/b/c/deep.txt"), b"deep data").unwrap();
    for i in 0..50 {
        std::fs::write(root.join(format!("a/b/n{i}")), b"x").unwrap();
    }
    let srv = serve(root).await;
    let port = srv.nfs_addr.port();
    let mut c = Client::mount(srv.nfs_addr).await;
    let deep = c.walk("a/b/c/deep.txt").await.unwrap();
    let dir_b = c.walk("a/b").await.unwrap();
    let dir_c = c.walk("a/b/c").await.unwrap();
    let made = c.create_file(&dir_c, b"made.txt").await.unwrap();
    c.write(&made, 0, b"made before").await.unwrap();
    let root_fh = c.root.clone();
    drop(c);
    srv.shutdown();

    let srv = serve_on(root, port).await;
    assert_eq!(
        srv.share.volume.known_nodes(),
        0,
        "a fresh server knows no node"
    );
    let mut c = Client::mount(srv.nfs_addr).await;
    assert_eq!(c.root.data, root_fh.data, "the root handle is the same");

    // Old handles, used directly: the volume finds their nodes by walking the export.
    assert_eq!(c.read(&deep, 0, 100).await.unwrap().0, b"deep data");
    c.write(&made, 0, b"MADE").await.unwrap();
    assert_eq!(
        std::fs::read(root.join("a/b/c/made.txt")).unwrap(),
        b"MADE before"
    );
    assert_eq!(c.getattr(&dir_b).await.unwrap().type_, ftype3::NF3DIR);
    let listing = c.readdirplus_all(&dir_b).await.unwrap();
    assert_eq!(listing.len(), 51);
    assert_eq!(c.getattr(&dir_c).await.unwrap().type_, ftype3::NF3DIR);

    // On a new port too.
    drop(c);
    srv.shutdown();
    let srv = serve(root).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    assert_eq!(c.read(&made, 0, 100).await.unwrap().0, b"MADE before");
}

/// A file removed and another created in its place may get the same inode number; the old
/// handle must not silently name the new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_inode_does_not_revive_an_old_handle() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("d")).unwrap();
    let birth_times = std::fs::metadata(root.join("d")).unwrap().created().is_ok();
    let srv = serve(root).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let d = c.walk("d").await.unwrap();

    let old = c.create_file(&d, b"old").await.unwrap();
    c.write(&old, 0, b"old secret").await.unwrap();
    let ino = node_of(&old);
    c.remove(&d, b"old").await.unwrap();

    // Create files until one reuses the inode number (ext4 and tmpfs reuse freed inodes).
    let mut reused = None;
    for i in 0..200 {
        let n = format!("new{i}");
        let h = c.create_file(&d, n.as_bytes()).await.unwrap();
        if node_of(&h) == ino {
            reused = Some((n, h));
            break;
        }
    }
    let Some((n, new)) = reused else {
        // Nothing reused the number: the old handle is simply stale.
        assert_eq!(c.getattr(&old).await.unwrap_err(), nfsstat3::NFS3ERR_STALE);
        return;
    };
    c.write(&new, 0, b"new data").await.unwrap();
    if !birth_times {
        // Without birth times the handle cannot tell the two files apart (documented).
        return;
    }
    assert_ne!(old.data, new.data, "handles of the two files differ");
    assert_eq!(c.getattr(&old).await.unwrap_err(), nfsstat3::NFS3ERR_STALE);
    assert_eq!(
        c.read(&old, 0, 100).await.unwrap_err(),
        nfsstat3::NFS3ERR_STALE
    );
    assert_eq!(
        c.write(&old, 0, b"X").await.unwrap_err(),
        nfsstat3::NFS3ERR_STALE
    );
    assert_eq!(std::fs::read(root.join("d").join(n)).unwrap(), b"new data");
}

/// Writes are on disk the moment the reply arrives, also in large chunks and at offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_are_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("d")).unwrap();
    let srv = serve(root).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let d = c.walk("d").await.unwrap();
    let f = c.create_file(&d, b"data.bin").await.unwrap();
    let chunk: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 253) as u8).collect();
    let mut expected = Vec::new();
    for i in 0..6u64 {
        let off = i * chunk.len() as u64;
        c.write(&f, off, &chunk).await.unwrap();
        expected.extend_from_slice(&chunk);
        // Read back from a separate file descriptor: no buffering in the server.
        assert_eq!(std::fs::read(root.join("d/data.bin")).unwrap(), expected);
    }
    let (back, eof) = c.read(&f, 0, 1024 * 1024).await.unwrap();
    assert_eq!(back, expected[..1024 * 1024]);
    assert!(!eof);
}

/// libnfs and nfs3_client see the same files: one writes, the other reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_independent_clients_agree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("d")).unwrap();
    let srv = serve(root).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let d = c.walk("d").await.unwrap();
    let f = c.create_file(&d, b"from-rust").await.unwrap();
    c.write(&f, 0, b"written by nfs3_client\n").await.unwrap();

    let p = srv.nfs_addr.port();
    let url = format!("nfs://127.0.0.1/d/from-rust?nfsport={p}&mountport={p}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("nfs-cat")
            .arg(url)
            .output()
            .expect("libnfs-utils installed")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"written by nfs3_client\n");
}

/// After `Running::shutdown`, connected clients are cut off: nothing is served by a server
/// that was told to stop (its volume may be handed to the next one).
/// nfsserve spawns each connection's task itself; they run on a runtime of their own that
/// `shutdown` ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_client_connections() {
    let dir = tempfile::tempdir().unwrap();
    let srv = serve(dir.path()).await;
    let mut c = Client::mount(srv.nfs_addr).await;
    let root = c.root.clone();
    c.getattr(&root).await.unwrap();
    srv.shutdown();
    let answered = tokio::time::timeout(
        Duration::from_secs(2),
        c.conn.getattr(&nfs3::GETATTR3args { object: root }),
    )
    .await;
    assert!(
        !matches!(answered, Ok(Ok(_))),
        "a stopped server still answers an old connection"
    );
}
