//! A whole Shoal on one machine, for `shoal demo` and `shoal bench`: a share-manager
//! running in-process on a temporary export, and `shoal mount` processes (the "nodes")
//! mounting it.
//!
//! Owns the lifetime of what it starts: dropping a [`LocalMount`] unmounts it and reaps its
//! process, dropping a [`LocalShare`] stops the server and removes the temporary directory.
//! It never decides what the demo or the benchmark do with them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a `shoal mount` may take to appear in the mount table.
const MOUNT_WAIT: Duration = Duration::from_secs(10);
/// How long a `shoal mount` may take to unmount and exit after SIGTERM before it is killed.
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);

/// A share-manager serving a fresh temporary export on 127.0.0.1.
///
/// Fields drop in declaration order: the server stops before its runtime and before the
/// temporary directory is removed.
pub struct LocalShare {
    /// The running server (NFSv3 address, channel address, the share and its lease table).
    pub running: shoal_nfs::server::Running,
    /// The runtime the server's tasks run on.
    pub rt: tokio::runtime::Runtime,
    /// The exported directory, `export` inside the temporary directory.
    pub export: PathBuf,
    /// The temporary directory holding the export and the mountpoints.
    pub work: tempfile::TempDir,
}

impl LocalShare {
    /// Creates `PREFIX*/export` (under `parent`, or the system temporary directory) and
    /// starts serving it on free ports with the given lease term.
    pub fn start(
        prefix: &str,
        parent: Option<&Path>,
        lease_term: Duration,
    ) -> anyhow::Result<LocalShare> {
        let mut builder = tempfile::Builder::new();
        builder.prefix(prefix);
        let work = match parent {
            Some(p) => builder.tempdir_in(p),
            None => builder.tempdir(),
        }
        .context("creating a temporary directory")?;
        let export = work.path().join("export");
        std::fs::create_dir(&export)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let opts = shoal_nfs::server::ServeOptions {
            export: export.clone(),
            listen: "127.0.0.1:0".parse()?,
            lease_term,
        };
        let running = rt.block_on(shoal_nfs::server::start(&opts))?;
        Ok(LocalShare {
            running,
            rt,
            export,
            work,
        })
    }

    /// The share's address as `shoal mount` takes it.
    pub fn address(&self) -> String {
        self.running.nfs_addr.to_string()
    }

    /// Mounts the share at `<work>/<name>` with a `shoal mount` process (the binary running
    /// now) named `name`.
    pub fn mount(&self, name: &str) -> anyhow::Result<LocalMount> {
        let exe = std::env::current_exe().context("locating the shoal binary")?;
        LocalMount::start(&exe, &self.address(), self.work.path().join(name), name)
    }
}

/// One `shoal mount` process and its mountpoint, unmounted on drop.
pub struct LocalMount {
    /// The mountpoint.
    pub dir: PathBuf,
    child: Child,
}

impl LocalMount {
    /// Starts `EXE mount SHARE DIR --name NAME` and waits until DIR is a mountpoint.
    pub fn start(exe: &Path, share: &str, dir: PathBuf, name: &str) -> anyhow::Result<LocalMount> {
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
        let mut m = LocalMount { dir, child };
        let deadline = Instant::now() + MOUNT_WAIT;
        while !is_mounted(&m.dir) {
            if let Some(status) = m.child.try_wait()? {
                bail!("shoal mount {} exited with {status}", m.dir.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not appear as a mount within {MOUNT_WAIT:?}",
                    m.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }
}

impl Drop for LocalMount {
    fn drop(&mut self) {
        // `shoal mount` unmounts itself on SIGTERM.
        // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + UNMOUNT_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if is_mounted(&self.dir) {
            // A killed FUSE daemon leaves its mount behind ("transport endpoint is not
            // connected"); detach it so nothing outlives us.
            if let Ok(path) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2(2) with a valid NUL-terminated path that outlives the call.
                unsafe {
                    libc::umount2(path.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }
}

/// True if `dir` is a mountpoint in this mount namespace.
pub fn is_mounted(dir: &Path) -> bool {
    shoal_fuse::mountinfo::is_mounted(dir)
}
