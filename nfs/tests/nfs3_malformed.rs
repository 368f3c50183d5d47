//! Malformed RPCs on raw TCP connections to the NFS port: garbage, truncated records,
//! oversized records, bad arguments. The server must survive each, and a well-formed client
//! must still be served afterwards.
//!
//! Not sent here, because nfsserve 0.11 would allocate and zero the memory before noticing:
//! a record-marking header claiming 2 GiB (`read_fragment` resizes its buffer to the claimed
//! length), or an opaque whose length field claims 4 GiB (XDR `Vec<u8>` is resized to it).
//! Either costs that much memory per connection; see the report of this change.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NFS_PROGRAM: u32 = 100003;

/// An RPC call header (AUTH_NONE) for `prog`/`vers`/`proc` followed by `args`.
fn call(xid: u32, prog: u32, vers: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    for w in [xid, 0, 2, prog, vers, proc_, 0, 0, 0, 0] {
        m.extend_from_slice(&w.to_be_bytes());
    }
    m.extend_from_slice(args);
    m
}

/// One record: the last-fragment bit and the length, then the bytes.
fn record(body: &[u8]) -> Vec<u8> {
    let mut r = (0x8000_0000u32 | body.len() as u32).to_be_bytes().to_vec();
    r.extend_from_slice(body);
    r
}

fn opaque(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v.resize(v.len() + (4 - data.len() % 4) % 4, 0);
    v
}

/// Sends `bytes`, then reads until the server closes the connection, one whole reply
/// record has arrived, or `wait` passes. Returns what was read.
async fn send(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may close the connection before it has read everything.
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(wait, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.len() >= 4 {
                let len = u32::from_be_bytes(got[..4].try_into().unwrap()) & 0x7fff_ffff;
                if got.len() >= 4 + len as usize {
                    break;
                }
            }
        }
    })
    .await;
    got
}

/// A NULL call on a fresh connection is answered: the listener is alive.
async fn answers_null(addr: std::net::SocketAddr) {
    let reply = send(
        addr,
        &record(&call(77, NFS_PROGRAM, 3, 0, &[])),
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.len() >= 28, "NULL answered: {reply:?}");
    assert_eq!(&reply[4..8], &77u32.to_be_bytes(), "reply to our xid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_records_do_not_hurt_the_server() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/f"), b"still here").unwrap();
    let srv = serve(dir.path()).await;
    let addr = srv.nfs_addr;
    // Long enough for a reply; calls that get none (the server waits for more) wait it out.
    let short = Duration::from_millis(100);

    // A well-formed client, connected before and used after the abuse.
    let mut before = Client::mount(addr).await;
    let f = before.walk("d/f").await.unwrap();

    // Garbage inside a well-formed record: not an RPC call.
    send(addr, &record(&[0xde; 64]), short).await;
    // Garbage that is not even record marking (a small claimed length, then junk).
    send(addr, b"\x80\x00\x00\x10GET / HTTP/1.1\r\n\r\n", short).await;
    // An RPC reply instead of a call.
    let mut reply_msg = call(5, NFS_PROGRAM, 3, 0, &[]);
    reply_msg[4..8].copy_from_slice(&1u32.to_be_bytes());
    send(addr, &record(&reply_msg), short).await;
    // Wrong RPC version, unknown program, wrong NFS version, unknown procedure.
    let mut bad_rpc = call(6, NFS_PROGRAM, 3, 0, &[]);
    bad_rpc[8..12].copy_from_slice(&7u32.to_be_bytes());
    for msg in [
        bad_rpc,
        call(7, 123_456, 1, 0, &[]),
        call(8, NFS_PROGRAM, 4, 0, &[]),
        call(9, NFS_PROGRAM, 3, 999, &[]),
        call(10, NFS_PROGRAM, 3, 15, &[]), // LINK: not served
    ] {
        // A reply is expected: wait for it (returns as soon as it is complete), so a loaded
        // machine does not make this flaky.
        let r = send(addr, &record(&msg), Duration::from_secs(10)).await;
        assert!(!r.is_empty(), "an RPC-level error reply");
    }
    // Truncated: the header promises more than is sent, then the client goes away.
    let full = record(&call(11, NFS_PROGRAM, 3, 1, &opaque(&[1; 28])));
    send(addr, &full[..full.len() / 2], short).await;
    // A record that ends inside the arguments (a handle claiming 64 bytes, 8 sent).
    let mut cut = call(12, NFS_PROGRAM, 3, 1, &64u32.to_be_bytes());
    cut.extend_from_slice(&[0; 8]);
    send(addr, &record(&cut), short).await;
    // A handle of 64 bytes that is not ours, on every procedure that takes one first.
    for proc_ in 1..=21u32 {
        let mut args = opaque(&[0xab; 64]);
        args.extend_from_slice(&[0; 64]);
        let r = send(
            addr,
            &record(&call(100 + proc_, NFS_PROGRAM, 3, proc_, &args)),
            short,
        )
        .await;
        assert!(!r.is_empty(), "procedure {proc_} answered");
    }
    // A fragment that is not the last, then the connection drops.
    let mut frag = (16u32).to_be_bytes().to_vec();
    frag.extend_from_slice(&[0; 16]);
    send(addr, &frag, short).await;
    // A record claiming 16 MiB of which only a little arrives.
    let mut big = (0x8000_0000u32 | 16 << 20).to_be_bytes().to_vec();
    big.extend_from_slice(&[0; 1024]);
    send(addr, &big, short).await;
    // An opaque claiming 16 MiB inside a small record.
    let mut huge_fh = call(13, NFS_PROGRAM, 3, 1, &(16u32 << 20).to_be_bytes());
    huge_fh.extend_from_slice(&[0; 16]);
    send(addr, &record(&huge_fh), short).await;
    // Many connections opened and dropped at once.
    let mut conns = Vec::new();
    for _ in 0..50 {
        conns.push(TcpStream::connect(addr).await.unwrap());
    }
    drop(conns);

    answers_null(addr).await;
    // The client connected before still works; a new one too.
    assert_eq!(before.read(&f, 0, 100).await.unwrap().0, b"still here");
    let mut after = Client::mount(addr).await;
    let f = after.walk("d/f").await.unwrap();
    after.write(&f, 0, b"STILL").await.unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("d/f")).unwrap(),
        b"STILL here"
    );
}

/// READDIR and READDIRPLUS with counts too small for any reply. nfsserve subtracts 128 from
/// the count without checking; in a debug build that panics the task serving the call (the
/// client gets no reply), in a release build it wraps. Either way the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_directory_counts_do_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let srv = serve(dir.path()).await;
    let addr = srv.nfs_addr;
    let c = Client::mount(addr).await;
    let root = c.root.data.as_ref().to_vec();
    for (proc_, counts) in [(16u32, vec![0u32]), (17, vec![0, 0]), (17, vec![4096, 8])] {
        let mut args = opaque(&root);
        args.extend_from_slice(&[0; 16]); // cookie, cookieverf
        for n in counts {
            args.extend_from_slice(&n.to_be_bytes());
        }
        send(
            addr,
            &record(&call(40, NFS_PROGRAM, 3, proc_, &args)),
            Duration::from_millis(300),
        )
        .await;
    }
    answers_null(addr).await;
    let mut c = Client::mount(addr).await;
    let r = c.root.clone();
    c.readdirplus_all(&r).await.unwrap();
}

/// Connections reset by the peer right after connecting must not stop the listener.
///
/// nfsserve 0.11's accept loop calls `peer_addr().unwrap()`, which panics for a connection
/// already reset, and the panic ends `handle_forever`; `server.rs` starts it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_at_once_do_not_stop_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let srv = serve(dir.path()).await;
    let addr = srv.nfs_addr;
    for _ in 0..50 {
        let s = TcpStream::connect(addr).await.unwrap();
        // Closing with a zero linger sends RST instead of FIN.
        s.set_zero_linger().unwrap();
        drop(s);
    }
    answers_null(addr).await;
}
