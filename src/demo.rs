//! `shoal demo`: the main job on an embedded default. Exports a temporary directory, mounts
//! it three times with `shoal mount` (three "nodes"), writes on one mount and reads on the
//! others, prints what each saw and the lease counters, and cleans everything up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// One `shoal mount` process and its mountpoint, unmounted on drop.
struct DemoMount {
    dir: PathBuf,
    child: Child,
}

impl DemoMount {
    fn start(exe: &Path, share: &str, dir: PathBuf, name: &str) -> anyhow::Result<DemoMount> {
        std::fs::create_dir_all(&dir)?;
        let child = Command::new(exe)
            .args(["mount", share])
            .arg(&dir)
            .args(["--name", name])
            .stdin(Stdio::null())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .context("starting shoal mount")?;
        let mut m = DemoMount { dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_mounted(&m.dir) {
            if let Some(status) = m.child.try_wait()? {
                bail!("shoal mount {} exited with {status}", m.dir.display());
            }
            if Instant::now() > deadline {
                bail!("{} did not appear as a mount within 10 s", m.dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }
}

impl Drop for DemoMount {
    fn drop(&mut self) {
        // `shoal mount` unmounts itself on SIGTERM.
        // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True if `dir` is a mountpoint in this mount namespace.
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    table.lines().any(|l| l.split(' ').nth(4) == Some(&want))
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    let work = tempfile::Builder::new()
        .prefix("shoal-demo.")
        .tempdir()
        .context("creating a temporary directory")?;
    let export = work.path().join("export");
    std::fs::create_dir(&export)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let opts = shoal_nfs::server::ServeOptions {
        export: export.clone(),
        listen: "127.0.0.1:0".parse()?,
        lease_term: Duration::from_secs(10),
    };
    let running = rt.block_on(shoal_nfs::server::start(&opts))?;
    let share = running.nfs_addr.to_string();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "exporting {} on {} (NFSv3) and {} (lease channel)",
        export.display(),
        running.nfs_addr,
        running.channel_addr
    )?;

    let mounts = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| DemoMount::start(&exe, &share, work.path().join(n), n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for m in &mounts {
        writeln!(out, "mounted {}", m.dir.display())?;
    }

    let page = b"<h1>Hello from node-a</h1>\n";
    std::fs::write(mounts[0].dir.join("index.html"), page)?;
    writeln!(out, "node-a wrote index.html ({} bytes)", page.len())?;
    for m in &mounts[1..] {
        let seen = std::fs::read(m.dir.join("index.html"))?;
        writeln!(
            out,
            "{} reads: {}",
            m.dir.display(),
            String::from_utf8_lossy(&seen).trim_end()
        )?;
        if seen != page {
            bail!("{} saw different bytes", m.dir.display());
        }
    }
    let edit = b"<h1>Edited on node-c</h1>\n";
    std::fs::write(mounts[2].dir.join("index.html"), edit)?;
    writeln!(out, "node-c rewrote index.html")?;
    for m in &mounts[..2] {
        let seen = std::fs::read(m.dir.join("index.html"))?;
        writeln!(
            out,
            "{} reads: {}",
            m.dir.display(),
            String::from_utf8_lossy(&seen).trim_end()
        )?;
        if seen != edit {
            bail!("{} saw stale bytes", m.dir.display());
        }
    }
    let s = running.share.leases.stats();
    writeln!(
        out,
        "lease counters: {} sessions, {} leases held, {} recalls sent, recall round trip median {:?}, p99 {:?}",
        s.sessions, s.leases_held, s.recalls_sent, s.recall_rtt_median, s.recall_rtt_p99
    )?;
    if keep {
        writeln!(out, "mounts stay up; press Ctrl-C to unmount and clean up")?;
        out.flush()?;
        rt.block_on(crate::shutdown_signal());
    }
    drop(mounts);
    running.shutdown();
    writeln!(out, "unmounted and cleaned up")?;
    Ok(())
}
