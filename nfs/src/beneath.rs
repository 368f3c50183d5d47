//! Descriptor-relative file operations: every call takes a directory descriptor (opened
//! beneath the export root by the volume) and one name, and never follows a symlink.
//!
//! Owns the `*at` syscalls and their safety arguments, nothing else. A path string is never
//! handed to the kernel here, so a directory swapped for a symlink between the volume's check
//! and the call cannot redirect the call outside the export: the descriptor still names the
//! directory that was checked, and the last component is not followed.

use std::ffi::CStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use crate::types::{Attr, FileKind, SetTime, Time};

/// A directory, open with `O_PATH`.
pub struct Dir(pub File);

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The `/proc/self/fd` path of a descriptor: a magic link to exactly that inode.
pub fn proc_path(f: &File) -> String {
    format!("/proc/self/fd/{}", f.as_raw_fd())
}

impl Dir {
    /// Opens `name` in this directory with `O_PATH | O_NOFOLLOW`: a symlink is opened as
    /// itself.
    pub fn open_child(&self, name: &CStr) -> io::Result<File> {
        // SAFETY: openat reads the NUL-terminated `name`, alive for the call; the directory
        // descriptor is owned by `self`. It returns a new descriptor or -1.
        let fd = unsafe {
            libc::openat(
                self.0.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened for us and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The metadata of `name` itself (a symlink is not followed).
    pub fn child_meta(&self, name: &CStr) -> io::Result<fs::Metadata> {
        self.open_child(name)?.metadata()
    }

    /// The attributes of `name` itself (a symlink is not followed) with one `statx`: the
    /// hot path of lookups and listings. Also returns the device and the generation (birth
    /// time in nanoseconds, 0 where the filesystem keeps none), computed as the volume does
    /// from `fs::Metadata`.
    pub fn child_attr(&self, name: &CStr) -> io::Result<(Attr, u64, u64)> {
        // SAFETY: statx reads the NUL-terminated `name` and fills the `statx` buffer we own,
        // which is read only after success.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::statx(
                self.0.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                libc::STATX_BASIC_STATS | libc::STATX_BTIME,
                &mut st,
            )
        };
        check(rc)?;
        let kind = match u32::from(st.stx_mode) & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        };
        let t = |ts: libc::statx_timestamp| Time {
            secs: ts.tv_sec,
            nanos: ts.tv_nsec,
        };
        let generation = if st.stx_mask & libc::STATX_BTIME != 0 && st.stx_btime.tv_sec >= 0 {
            st.stx_btime.tv_sec as u64 * 1_000_000_000 + u64::from(st.stx_btime.tv_nsec)
        } else {
            0
        };
        let dev = libc::makedev(st.stx_dev_major, st.stx_dev_minor);
        let attr = Attr {
            node: st.stx_ino,
            kind,
            size: st.stx_size,
            used: st.stx_blocks * 512,
            mode: u32::from(st.stx_mode) & 0o7777,
            nlink: st.stx_nlink,
            uid: st.stx_uid,
            gid: st.stx_gid,
            atime: t(st.stx_atime),
            mtime: t(st.stx_mtime),
            ctime: t(st.stx_ctime),
        };
        Ok((attr, dev, generation))
    }

    pub fn mkdir(&self, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: mkdirat reads the NUL-terminated `name`, alive for the call.
        check(unsafe { libc::mkdirat(self.0.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })
    }

    pub fn symlink(&self, target: &CStr, name: &CStr) -> io::Result<()> {
        // SAFETY: symlinkat reads two NUL-terminated strings, both alive for the call.
        check(unsafe { libc::symlinkat(target.as_ptr(), self.0.as_raw_fd(), name.as_ptr()) })
    }

    /// Removes `name`: a directory with `dir`, anything else without.
    pub fn unlink(&self, name: &CStr, dir: bool) -> io::Result<()> {
        let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: unlinkat reads the NUL-terminated `name`, alive for the call.
        check(unsafe { libc::unlinkat(self.0.as_raw_fd(), name.as_ptr(), flags) })
    }

    /// Renames `name` here to `to_name` in `to`, replacing what is there unless
    /// `no_replace` (then EEXIST, decided by the kernel atomically).
    pub fn rename(
        &self,
        name: &CStr,
        to: &Dir,
        to_name: &CStr,
        no_replace: bool,
    ) -> io::Result<()> {
        let flags = if no_replace {
            libc::RENAME_NOREPLACE
        } else {
            0
        };
        // SAFETY: renameat2 reads two NUL-terminated strings, both alive for the call.
        check(unsafe {
            libc::renameat2(
                self.0.as_raw_fd(),
                name.as_ptr(),
                to.0.as_raw_fd(),
                to_name.as_ptr(),
                flags,
            )
        })
    }

    /// Adds the name `to_name` in `to` for the file at `name` here (a symlink is linked as
    /// itself).
    pub fn link(&self, name: &CStr, to: &Dir, to_name: &CStr) -> io::Result<()> {
        // SAFETY: linkat reads two NUL-terminated strings, both alive for the call; flags 0
        // means the last component is not followed.
        check(unsafe {
            libc::linkat(
                self.0.as_raw_fd(),
                name.as_ptr(),
                to.0.as_raw_fd(),
                to_name.as_ptr(),
                0,
            )
        })
    }

    /// Opens this directory for listing.
    pub fn read_dir(&self) -> io::Result<fs::ReadDir> {
        fs::read_dir(proc_path(&self.0))
    }
}

/// Changes the owner of the inode `f` (opened with `O_PATH`, a symlink as itself).
pub fn chown(f: &File, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let keep = u32::MAX; // (uid_t)-1: leave unchanged
    let empty = c"";
    // SAFETY: fchownat with AT_EMPTY_PATH acts on the descriptor itself; `empty` is a static
    // NUL-terminated string.
    check(unsafe {
        libc::fchownat(
            f.as_raw_fd(),
            empty.as_ptr(),
            uid.unwrap_or(keep),
            gid.unwrap_or(keep),
            libc::AT_EMPTY_PATH,
        )
    })
}

/// Changes the permission bits of the inode `f` (opened with `O_PATH`; not a symlink).
pub fn chmod(f: &File, mode: u32) -> io::Result<()> {
    fs::set_permissions(
        proc_path(f),
        std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777),
    )
}

/// Sets the times of the inode `f` (opened with `O_PATH`; not a symlink).
pub fn set_times(f: &File, atime: Option<SetTime>, mtime: Option<SetTime>) -> io::Result<()> {
    let path = std::ffi::CString::new(proc_path(f)).expect("no NUL in a /proc path");
    // The magic link resolves to the inode of `f`.
    utimens(&path, 0, atime, mtime)
}

/// `utimensat(AT_FDCWD, path, times, flags)` with `None` meaning "leave it".
pub fn utimens(
    path: &CStr,
    flags: libc::c_int,
    atime: Option<SetTime>,
    mtime: Option<SetTime>,
) -> io::Result<()> {
    let ts = |t: Option<SetTime>| match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::ServerNow) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(Time { secs, nanos })) => libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos as i64,
        },
    };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: `path` is NUL-terminated and `times` holds exactly the two timespecs utimensat
    // reads; both are alive for the call.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), flags) })
}
