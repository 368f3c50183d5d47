//! The lease channel over real TCP: two clients of one real server, a recall between them,
//! the counters that show it, and malformed input that must change nothing.

use std::time::Duration;

use shoal_nfs::channel::client::{Client, ClientError, ClientOptions};
use shoal_nfs::channel::proto::{self, CreateMode, Frame, Reply, Request};
use shoal_nfs::server::{start, Running, ServeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn serve(dir: &std::path::Path) -> Running {
    let opts = ServeOptions {
        export: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        lease_term: Duration::from_secs(10),
    };
    start(&opts).await.expect("server starts")
}

fn opts(name: &str) -> ClientOptions {
    ClientOptions {
        name: name.into(),
        ..ClientOptions::default()
    }
}

fn attr(r: Reply) -> proto::Attr {
    match r {
        Reply::Attr(a) => a,
        other => panic!("expected attributes, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_recalls_the_other_clients_lease_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let srv = serve(dir.path()).await;
    let share = srv.nfs_addr.to_string();
    let (a, sa, mut a_recalls) = Client::connect(&share, opts("a")).await.unwrap();
    let (b, _sb, _b_recalls) = Client::connect(&share, opts("b")).await.unwrap();

    let file = attr(
        a.call(Request::Create {
            dir: sa.root.node,
            name: b"f".to_vec(),
            mode: 0o644,
            how: CreateMode::Guarded,
            owner: None,
        })
        .await
        .unwrap(),
    );
    // a reads the file: it now holds a lease on it.
    a.call(Request::Read {
        node: file.node,
        offset: 0,
        len: 10,
    })
    .await
    .unwrap();

    // b writes; the write must not complete before a has been told.
    let b2 = b.clone();
    let write = tokio::spawn(async move {
        b2.call(Request::Write {
            node: file.node,
            offset: 0,
            data: b"new".to_vec(),
        })
        .await
    });
    let recall = tokio::time::timeout(Duration::from_secs(5), a_recalls.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recall.nodes, vec![file.node]);
    // Unacknowledged, the write stays pending (a's lease has 10 s left).
    let mut write = write;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut write)
            .await
            .is_err(),
        "the write waits for the recall to be acknowledged"
    );
    a.ack_recall(recall.recall);
    let written = tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(written, Reply::Written { count: 3, .. }),
        "{written:?}"
    );

    let counters = match b.call(Request::Counters).await.unwrap() {
        Reply::Counters(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(counters.sessions, 2);
    assert_eq!(
        (
            counters.recalls_sent,
            counters.recalls_acked,
            counters.recalls_expired
        ),
        (1, 1, 0)
    );
    assert!(counters.recall_rtt_median_us.is_some() && counters.recall_rtt_p99_us.is_some());
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep"), b"unchanged").unwrap();
    let srv = serve(dir.path()).await;

    // Garbage instead of Hello, a length prefix far over the limit, and a frame cut short:
    // each connection is closed by the server without a reply.
    let bad: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\n\r\n",
        &[0xff, 0xff, 0xff, 0xf0, 1, 2, 3],
        &[0, 0, 0, 100, 1, 2],
    ];
    for bytes in bad {
        let mut s = TcpStream::connect(srv.channel_addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let _ = s.shutdown().await;
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(12), s.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "no reply to {bytes:?}");
    }

    // A client that speaks another protocol version is refused with a message.
    let mut s = TcpStream::connect(srv.channel_addr).await.unwrap();
    let hello = Frame::Call {
        id: 1,
        request: Request::Hello {
            version: 999,
            client: "old".into(),
            caching: true,
        },
    };
    s.write_all(&proto::encode(&hello)).await.unwrap();
    let len = s.read_u32().await.unwrap() as usize;
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.unwrap();
    match proto::decode(&body).unwrap() {
        Frame::Reply {
            reply: Reply::Error { message, .. },
            ..
        } => assert!(message.contains("version 999"), "{message}"),
        other => panic!("{other:?}"),
    }

    // The server still serves a well-behaved client, and nothing changed on disk.
    let (c, sc, _r) = Client::connect(&srv.nfs_addr.to_string(), opts("c"))
        .await
        .unwrap();
    let keep = attr(
        c.call(Request::Lookup {
            dir: sc.root.node,
            name: b"keep".to_vec(),
        })
        .await
        .unwrap(),
    );
    assert_eq!(keep.size, 9);
    assert_eq!(
        std::fs::read(dir.path().join("keep")).unwrap(),
        b"unchanged"
    );

    // Names that try to leave the export are refused and change nothing.
    for name in [&b".."[..], b"../escape", b"a/b", b""] {
        let err = c
            .call(Request::Create {
                dir: sc.root.node,
                name: name.to_vec(),
                mode: 0o644,
                how: CreateMode::Guarded,
                owner: None,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Remote {
                    errno: libc::EINVAL,
                    ..
                }
            ),
            "{name:?}: {err}"
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(!dir.path().parent().unwrap().join("escape").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_share_fails_fast() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let started = std::time::Instant::now();
    let err = Client::connect(&addr.to_string(), opts("x"))
        .await
        .err()
        .expect("no server there");
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(6));
}

fn data(r: Reply) -> Vec<u8> {
    match r {
        Reply::Data { data, .. } => data,
        other => panic!("expected data, got {other:?}"),
    }
}

fn orphans(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join(".shoal/orphans"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_open_on_one_client_outlives_its_removal_by_another() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("doomed"), b"still here").unwrap();
    std::fs::write(dir.path().join("current"), b"old release").unwrap();
    std::fs::write(dir.path().join("next"), b"new release").unwrap();
    let srv = serve(dir.path()).await;
    let share = srv.nfs_addr.to_string();
    let (a, sa, ar) = Client::connect(&share, opts("a")).await.unwrap();
    let (b, sb, br) = Client::connect(&share, opts("b")).await.unwrap();
    // Both clients honour recalls at once (a client that does not is revoked, and its
    // opens end with its session).
    let acks = [(a.clone(), ar), (b.clone(), br)].map(|(c, mut rx)| {
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                c.ack_recall(r.recall);
            }
        })
    });
    let root = sa.root.node;
    assert_eq!(sb.root.node, root);

    // a opens both files; b removes one and replaces the other (an atomic deploy).
    let doomed = attr(
        a.call(Request::Lookup {
            dir: root,
            name: b"doomed".to_vec(),
        })
        .await
        .unwrap(),
    );
    let current = attr(
        a.call(Request::Lookup {
            dir: root,
            name: b"current".to_vec(),
        })
        .await
        .unwrap(),
    );
    a.send(Request::Open { node: doomed.node }).await.unwrap();
    a.send(Request::Open { node: current.node }).await.unwrap();
    // Opens are queued before this call, and counted before calls are answered.
    a.call(Request::GetAttr { node: root }).await.unwrap();
    b.call(Request::Remove {
        dir: root,
        name: b"doomed".to_vec(),
    })
    .await
    .unwrap();
    b.call(Request::Rename {
        from_dir: root,
        from_name: b"next".to_vec(),
        to_dir: root,
        to_name: b"current".to_vec(),
        no_replace: false,
    })
    .await
    .unwrap();

    // a still reads what it opened; the names now mean what b made of them.
    let read = |node| Request::Read {
        node,
        offset: 0,
        len: 100,
    };
    assert_eq!(
        data(a.call(read(doomed.node)).await.unwrap()),
        b"still here"
    );
    assert_eq!(
        data(a.call(read(current.node)).await.unwrap()),
        b"old release"
    );
    assert!(!dir.path().join("doomed").exists());
    assert_eq!(
        std::fs::read(dir.path().join("current")).unwrap(),
        b"new release"
    );
    assert_eq!(orphans(dir.path()), 2);

    // The keeping place is Shoal's own: no client sees or touches it.
    let listed = match b
        .call(Request::ReadDir {
            dir: root,
            after: 0,
            max: 100,
        })
        .await
        .unwrap()
    {
        Reply::Entries { entries, .. } => entries.into_iter().map(|e| e.name).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(listed, vec![b"current".to_vec()]);
    let hidden = b
        .call(Request::Lookup {
            dir: root,
            name: b".shoal".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(hidden.errno(), libc::ENOENT);
    let refused = b
        .call(Request::Mkdir {
            dir: root,
            name: b".shoal".to_vec(),
            mode: 0o755,
            owner: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.errno(), libc::EACCES);

    // Not by node id either: a client that learns the inode numbers of `.shoal` and of
    // `.shoal/orphans` can neither list nor change them.
    for reserved in [".shoal", ".shoal/orphans"] {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::metadata(dir.path().join(reserved)).unwrap().ino();
        let listed = b
            .call(Request::ReadDir {
                dir: id,
                after: 0,
                max: 10,
            })
            .await
            .unwrap_err();
        assert_eq!(listed.errno(), libc::EACCES, "{reserved}: {listed}");
        let made = b
            .call(Request::Create {
                dir: id,
                name: b"planted".to_vec(),
                mode: 0o644,
                how: CreateMode::Guarded,
                owner: None,
            })
            .await
            .unwrap_err();
        assert_eq!(made.errno(), libc::EACCES, "{reserved}: {made}");
        let looked = b
            .call(Request::Lookup {
                dir: id,
                name: doomed.node.to_string().into_bytes(),
            })
            .await;
        assert!(
            looked.is_err(),
            "{reserved}: an orphan is not reachable by name"
        );
    }
    assert_eq!(orphans(dir.path()), 2);

    // Closing releases the data: once by a's close, once by a's session ending.
    a.send(Request::Close { node: doomed.node }).await.unwrap();
    a.call(Request::GetAttr { node: root }).await.unwrap();
    assert_eq!(orphans(dir.path()), 1);
    drop(a);
    acks[0].abort();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while orphans(dir.path()) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "orphan of a closed session not removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A file nobody has open is simply removed.
    b.call(Request::Remove {
        dir: root,
        name: b"current".to_vec(),
    })
    .await
    .unwrap();
    assert_eq!(orphans(dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_nodes_belong_to_the_caller_and_existing_ones_keep_their_owner() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let srv = serve(dir.path()).await;
    let (c, sc, _r) = Client::connect(&srv.nfs_addr.to_string(), opts("c"))
        .await
        .unwrap();
    let root = sc.root.node;
    let nginx = Some(proto::Owner { uid: 101, gid: 102 });

    let f = attr(
        c.call(Request::Create {
            dir: root,
            name: b"f".to_vec(),
            mode: 0o640,
            how: CreateMode::Guarded,
            owner: nginx,
        })
        .await
        .unwrap(),
    );
    let d = attr(
        c.call(Request::Mkdir {
            dir: root,
            name: b"d".to_vec(),
            mode: 0o750,
            owner: nginx,
        })
        .await
        .unwrap(),
    );
    let l = attr(
        c.call(Request::Symlink {
            dir: root,
            name: b"l".to_vec(),
            target: b"f".to_vec(),
            owner: nginx,
        })
        .await
        .unwrap(),
    );
    for (a, name) in [(&f, "f"), (&d, "d"), (&l, "l")] {
        assert_eq!((a.uid, a.gid), (101, 102), "{name} in the reply");
        let m = std::fs::symlink_metadata(dir.path().join(name)).unwrap();
        assert_eq!((m.uid(), m.gid()), (101, 102), "{name} on disk");
    }
    assert_eq!(
        std::fs::symlink_metadata(dir.path().join("f"))
            .unwrap()
            .mode()
            & 0o7777,
        0o640
    );

    // An unchecked create of an existing file opens it and leaves its owner alone.
    let again = attr(
        c.call(Request::Create {
            dir: root,
            name: b"f".to_vec(),
            mode: 0o600,
            how: CreateMode::Unchecked,
            owner: Some(proto::Owner { uid: 7, gid: 7 }),
        })
        .await
        .unwrap(),
    );
    assert_eq!((again.node, again.uid, again.mode), (f.node, 101, 0o640));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_without_replace_refuses_an_existing_target() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lock"), b"held by someone").unwrap();
    std::fs::write(dir.path().join("mine"), b"my claim").unwrap();
    let srv = serve(dir.path()).await;
    let (c, sc, _r) = Client::connect(&srv.nfs_addr.to_string(), opts("c"))
        .await
        .unwrap();
    let root = sc.root.node;
    let rename = |to: &[u8]| Request::Rename {
        from_dir: root,
        from_name: b"mine".to_vec(),
        to_dir: root,
        to_name: to.to_vec(),
        no_replace: true,
    };
    let err = c.call(rename(b"lock")).await.unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST, "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("lock")).unwrap(),
        b"held by someone"
    );
    assert!(dir.path().join("mine").exists());
    c.call(rename(b"free")).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("free")).unwrap(), b"my claim");
}
