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
    assert!(
        !write.is_finished(),
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
