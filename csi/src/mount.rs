//! The node's mounts: reading the mount table, starting `shoal mount` for a target, and
//! unmounting it.
//!
//! Each published target gets its own `shoal mount` process in its own session, so it
//! outlives a restart of the plugin; its output goes to `STATE/logs/<key>.log`, and what it
//! mounts is recorded in `STATE/mounts/<key>` (key: a hash of the target path) so a later
//! NodePublish can tell a mount of the same volume from a foreign one. Never unmounts or
//! removes anything but the target it is asked about.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tracing::{debug, info, warn};

use crate::volume::fnv1a64;

/// How long a new `shoal mount` has to make the mount appear.
pub const MOUNT_DEADLINE: Duration = Duration::from_secs(10);
/// How long an unmounted target has to disappear from the mount table.
pub const UNMOUNT_DEADLINE: Duration = Duration::from_secs(10);
/// How often the mount table is re-read while waiting.
const POLL: Duration = Duration::from_millis(50);
/// How much of a failed mount's log goes into the error.
const LOG_TAIL: u64 = 2048;

pub use shoal_fuse::mountinfo::{find_mount, parse_mountinfo, MountEntry};

/// What this plugin mounted at a target, as recorded in the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub volume_id: String,
    /// `HOST:PORT/SUBDIR`, as passed to `shoal mount`.
    pub source: String,
    pub read_only: bool,
}

impl Published {
    fn encode(&self, pid: Option<u32>) -> String {
        format!(
            "volume_id={}\nsource={}\nread_only={}\npid={}\n",
            self.volume_id,
            self.source,
            self.read_only,
            pid.unwrap_or(0)
        )
    }

    fn decode(text: &str) -> Option<Published> {
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
        };
        Some(Published {
            volume_id: get("volume_id")?,
            source: get("source")?,
            read_only: get("read_only")?.parse().ok()?,
        })
    }
}

/// Why a publish or unpublish failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0} is already a mount point of {1}")]
    Foreign(PathBuf, String),
    #[error("{target} already has volume {} mounted{}; asked for volume {} {}", .have.volume_id, if .have.read_only { " read-only" } else { "" }, .want.volume_id, if .want.read_only { "read-only" } else { "read-write" })]
    Conflict {
        target: PathBuf,
        have: Published,
        want: Published,
    },
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {}: {source}", .bin.display())]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("shoal mount of {source_spec} at {} {outcome}; its log ends with: {tail}", .target.display())]
    Failed {
        source_spec: String,
        target: PathBuf,
        outcome: String,
        tail: String,
    },
    #[error("{} is still mounted {:?} after unmounting", .0.display(), .1)]
    StillMounted(PathBuf, Duration),
}

/// Starts and stops `shoal mount` processes.
pub struct Mounter {
    /// The `shoal` executable.
    shoal_bin: PathBuf,
    /// Where mount records and logs live (next to the socket, on the host).
    state_dir: PathBuf,
}

impl Mounter {
    pub fn new(shoal_bin: PathBuf, state_dir: PathBuf) -> Mounter {
        Mounter {
            shoal_bin,
            state_dir,
        }
    }

    fn key(target: &Path) -> String {
        format!("{:016x}", fnv1a64(target.as_os_str().as_bytes()))
    }

    fn record_path(&self, target: &Path) -> PathBuf {
        self.state_dir.join("mounts").join(Self::key(target))
    }

    fn log_path(&self, target: &Path) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(format!("{}.log", Self::key(target)))
    }

    fn read_record(&self, target: &Path) -> Option<Published> {
        let text = std::fs::read_to_string(self.record_path(target)).ok()?;
        Published::decode(&text)
    }

    /// The pid of the `shoal mount` recorded for `target`, if one was recorded.
    fn recorded_pid(&self, target: &Path) -> Option<u32> {
        let text = std::fs::read_to_string(self.record_path(target)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("pid=")?.parse().ok())
            .filter(|pid| *pid != 0)
    }

    /// Why the mount at `target` no longer works, or `None` if it seems to. The FUSE
    /// attributes of a mount's root may be cached for a long time, so a plain stat proves
    /// nothing: the recorded process must be alive, and statfs (never cached) must not
    /// answer ENOTCONN. A statfs that is merely slow (share unreachable) does not count.
    async fn broken(&self, target: &Path) -> Option<String> {
        if let Some(pid) = self.recorded_pid(target) {
            if !process_alive(pid, target) {
                return Some(format!("its shoal mount process {pid} is gone"));
            }
        }
        let t = target.to_path_buf();
        let check = tokio::task::spawn_blocking(move || statfs(&t));
        match tokio::time::timeout(Duration::from_secs(2), check).await {
            Ok(Ok(Err(e))) if e.raw_os_error() == Some(libc::ENOTCONN) => Some(e.to_string()),
            _ => None,
        }
    }

    fn write_record(
        &self,
        target: &Path,
        p: &Published,
        pid: Option<u32>,
    ) -> Result<(), MountError> {
        let path = self.record_path(target);
        let io = |source| MountError::Io {
            what: "cannot write mount record",
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().expect("has parent")).map_err(io)?;
        let text = format!("target={}\n{}", target.display(), p.encode(pid));
        std::fs::write(&path, text).map_err(io)
    }

    fn remove_record(&self, target: &Path) {
        let _ = std::fs::remove_file(self.record_path(target));
    }

    /// True if `want` is already mounted at `target` by this plugin and answering. A mount
    /// of ours whose process has died (the target answers ENOTCONN) is unmounted and false
    /// returned, so it is mounted afresh; any other mount there is an error.
    pub async fn is_published(&self, target: &Path, want: &Published) -> Result<bool, MountError> {
        let Some(m) = find_mount(target).map_err(|source| MountError::Io {
            what: "cannot read the mount table for",
            path: target.to_path_buf(),
            source,
        })?
        else {
            return Ok(false);
        };
        let have = self.read_record(target).or_else(|| {
            // No record (state lost): recognise our own mount by its source.
            // `shoal mount` names its mounts `shoal:HOST:PORT/SUBDIR`.
            let ours = m.source == want.source
                || m.source.strip_prefix("shoal:") == Some(want.source.as_str());
            ours.then(|| Published {
                read_only: m.read_only(),
                ..want.clone()
            })
        });
        match have {
            Some(have) if have == *want => match self.broken(target).await {
                None => {
                    debug!(target = %target.display(), "already published");
                    Ok(true)
                }
                Some(why) => {
                    warn!(target = %target.display(), "published mount is broken ({why}); remounting");
                    self.unmount(target).await?;
                    Ok(false)
                }
            },
            Some(have) => Err(MountError::Conflict {
                target: target.to_path_buf(),
                have,
                want: want.clone(),
            }),
            None => Err(MountError::Foreign(
                target.to_path_buf(),
                format!("{} ({})", m.source, m.fs_type),
            )),
        }
    }

    /// Mounts `want.source` at `target` unless it is already mounted there (see
    /// [`Mounter::is_published`]).
    pub async fn publish(&self, target: &Path, want: &Published) -> Result<(), MountError> {
        if self.is_published(target, want).await? {
            return Ok(());
        }
        self.mount(target, want).await
    }

    /// Creates `target` if missing and mounts `want.source` there with a detached
    /// `shoal mount`, waiting up to [`MOUNT_DEADLINE`] for the mount to appear.
    pub async fn mount(&self, target: &Path, want: &Published) -> Result<(), MountError> {
        std::fs::create_dir_all(target).map_err(|source| MountError::Io {
            what: "cannot create target",
            path: target.to_path_buf(),
            source,
        })?;
        self.spawn_and_wait(target, want).await
    }

    async fn spawn_and_wait(&self, target: &Path, want: &Published) -> Result<(), MountError> {
        let log = self.log_path(target);
        let io = |source| MountError::Io {
            what: "cannot open mount log",
            path: log.clone(),
            source,
        };
        std::fs::create_dir_all(log.parent().expect("has parent")).map_err(io)?;
        let out = std::fs::File::create(&log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;

        let mut cmd = Command::new(&self.shoal_bin);
        cmd.arg("mount").arg(&want.source).arg(target);
        if want.read_only {
            cmd.arg("--read-only");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent. A session of
        // its own detaches the mount from the plugin's process group and terminal, so signals
        // meant for the plugin (and its exit) do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| MountError::Spawn {
            bin: self.shoal_bin.clone(),
            source,
        })?;
        let pid = child.id();
        self.write_record(target, want, pid)?;
        info!(source = %want.source, target = %target.display(), pid, read_only = want.read_only, "started shoal mount");

        let started = Instant::now();
        let outcome = loop {
            if let Ok(Some(_)) = find_mount(target) {
                info!(target = %target.display(), elapsed = ?started.elapsed(), "mounted");
                return Ok(());
            }
            match child.try_wait() {
                Ok(Some(status)) => break format!("exited with {status} before mounting"),
                Ok(None) => {}
                Err(e) => break format!("could not be waited for: {e}"),
            }
            if started.elapsed() >= MOUNT_DEADLINE {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                break format!("did not mount within {MOUNT_DEADLINE:?} and was killed");
            }
            tokio::time::sleep(POLL).await;
        };
        self.remove_record(target);
        Err(MountError::Failed {
            source_spec: want.source.clone(),
            target: target.to_path_buf(),
            outcome,
            tail: log_tail(&log),
        })
    }

    /// Unmounts `target` (every mount stacked on it) and removes the directory. A target
    /// that is not mounted, or does not exist, is success.
    pub async fn unpublish(&self, target: &Path) -> Result<(), MountError> {
        self.unmount(target).await?;
        self.remove_record(target);
        match std::fs::remove_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(target = %target.display(), "target left in place: {e}"),
        }
        Ok(())
    }

    /// Unmounts until nothing is mounted at `target`, within [`UNMOUNT_DEADLINE`].
    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let started = Instant::now();
        let io = |source| MountError::Io {
            what: "cannot unmount",
            path: target.to_path_buf(),
            source,
        };
        loop {
            if find_mount(target).map_err(io)?.is_none() {
                return Ok(());
            }
            if started.elapsed() >= UNMOUNT_DEADLINE {
                return Err(MountError::StillMounted(
                    target.to_path_buf(),
                    UNMOUNT_DEADLINE,
                ));
            }
            umount(target).await.map_err(io)?;
            info!(target = %target.display(), "unmounted");
            tokio::time::sleep(POLL).await;
        }
    }
}

/// True if `pid` is a live (not zombie) process whose command line names `target`: the
/// `shoal mount` this plugin started, not a process that reused its pid.
fn process_alive(pid: u32, target: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .any(|arg| arg == target.as_os_str().as_bytes())
        })
        .unwrap_or(false)
}

/// statfs(2) of `path`.
fn statfs(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path; `buf` is a properly sized out-parameter.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One unmount of `target`: `umount2`, lazily if the mount is busy, and `fusermount3 -u`
/// when not privileged. A target that turns out not to be mounted is success.
async fn umount(target: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the calls.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        Some(libc::EBUSY) => {
            warn!(target = %target.display(), "target busy; detaching it");
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        Some(libc::EPERM) => {
            let out = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(target)
                .stdin(Stdio::null())
                .output()
                .await?;
            if out.status.success() {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "fusermount3 -u: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        }
        _ => Err(e),
    }
}

/// The last bytes of a log file, for an error message.
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return "(no log)".to_string();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).trim().to_string();
    if text.is_empty() {
        "(empty log)".to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let p = Published {
            volume_id: "pvc-1".into(),
            source: "h:1/volumes/pvc-1".into(),
            read_only: true,
        };
        let text = format!("target=/x\n{}", p.encode(Some(42)));
        assert_eq!(Published::decode(&text), Some(p));
        assert_eq!(Published::decode("garbage"), None);
    }

    #[tokio::test]
    async fn unpublish_of_a_missing_target_is_success() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mounter::new("/bin/false".into(), dir.path().join("state"));
        m.unpublish(&dir.path().join("missing")).await.unwrap();
        let plain = dir.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        m.unpublish(&plain).await.unwrap();
        assert!(!plain.exists());
    }

    #[tokio::test]
    async fn a_mount_that_exits_reports_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-shoal");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"cannot reach share $2\" >&2\nexit 3\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let m = Mounter::new(script, dir.path().join("state"));
        let want = Published {
            volume_id: "v".into(),
            source: "127.0.0.1:1/volumes/v".into(),
            read_only: false,
        };
        let target = dir.path().join("target");
        let e = m.publish(&target, &want).await.unwrap_err().to_string();
        assert!(e.contains("exited with"), "{e}");
        assert!(
            e.contains("cannot reach share 127.0.0.1:1/volumes/v"),
            "{e}"
        );
        assert!(target.is_dir(), "target created");
    }
}
