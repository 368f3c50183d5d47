//! The NFSv3 front end against an independent client: Debian's libnfs-utils (`nfs-ls`,
//! `nfs-cat`, `nfs-cp`), over real TCP, on a real directory.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use shoal_nfs::server::{start, Running, ServeOptions};

async fn serve(dir: &Path) -> Running {
    let opts = ServeOptions {
        export: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        lease_term: Duration::from_secs(10),
    };
    start(&opts).await.expect("server starts")
}

fn url(addr: SocketAddr, path: &str) -> String {
    let p = addr.port();
    format!("nfs://127.0.0.1{path}?nfsport={p}&mountport={p}")
}

/// Runs a libnfs tool off the async runtime, returning (success, stdout, stderr).
async fn tool(args: Vec<String>) -> (bool, Vec<u8>, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(&args[0])
            .args(&args[1..])
            .output()
            .expect("libnfs-utils installed");
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnfs_lists_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("site")).unwrap();
    std::fs::write(dir.path().join("site/index.html"), b"<h1>hello</h1>\n").unwrap();
    let srv = serve(dir.path()).await;

    let (ok, out, err) = tool(vec!["nfs-ls".into(), url(srv.nfs_addr, "/")]).await;
    assert!(ok, "nfs-ls failed: {err}");
    assert!(
        String::from_utf8_lossy(&out).contains("site"),
        "listing: {}",
        String::from_utf8_lossy(&out)
    );

    let (ok, out, err) = tool(vec![
        "nfs-cat".into(),
        url(srv.nfs_addr, "/site/index.html"),
    ])
    .await;
    assert!(ok, "nfs-cat failed: {err}");
    assert_eq!(out, b"<h1>hello</h1>\n");

    let local = dir.path().join("upload.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let (ok, _, err) = tool(vec![
        "nfs-cp".into(),
        local.display().to_string(),
        url(srv.nfs_addr, "/site/copy.bin"),
    ])
    .await;
    assert!(ok, "nfs-cp failed: {err}");
    assert_eq!(
        std::fs::read(dir.path().join("site/copy.bin")).unwrap(),
        data
    );
}
