//! The volume: one exported directory, seen as nodes (files, directories, symlinks) named by
//! their inode numbers.
//!
//! Owns the map from node id to a place inside the export, every I/O on the real directory,
//! and containment: names are single components (never `.`, `..`, or containing `/`), paths
//! are only ever built from the node table under the export root, and they are resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` from the open root.
//! Changes are made on descriptors ([`crate::beneath`]): a directory opened that way plus
//! one name, or the node itself opened `O_PATH`; no symlink is followed, and a directory
//! swapped for a symlink after the check cannot redirect a change. Nothing outside the
//! export can be named, opened or changed through a volume. It knows nothing of protocols
//! or leases.
//!
//! Node ids are inode numbers, so they survive a restart of the server on the same data. A
//! node the table does not know yet (after a restart) is found by walking the export once.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::beneath::{self, Dir};
use tracing::{debug, info, warn};

use crate::types::{
    Attr, CreateMode, DirEntry, FileKind, FsStat, NodeId, Owner, SetAttr, SetTime, Time,
};

/// A failed volume operation: a Linux errno and what went wrong, for the caller's log and reply.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct VolumeError {
    pub errno: i32,
    pub message: String,
}

impl VolumeError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        VolumeError {
            errno,
            message: message.into(),
        }
    }
    fn io(what: &str, e: io::Error) -> Self {
        VolumeError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: format!("{what}: {e}"),
        }
    }
    fn stale(node: NodeId) -> Self {
        VolumeError::new(
            libc::ESTALE,
            format!("node {node} is not in the export (stale handle)"),
        )
    }
}

pub type VolResult<T> = Result<T, VolumeError>;

/// Where a node sits: its parent directory and its name there.
#[derive(Clone, Debug)]
struct Place {
    parent: NodeId,
    name: OsString,
    /// The node's generation (birth time) when it was seen there: handles carry it.
    generation: u64,
}

/// A directory listing sorted by node id, so a cookie (the last node id returned) keeps its
/// meaning while entries come and go.
struct Listing {
    mtime: (i64, i64),
    entries: Arc<Vec<(NodeId, OsString)>>,
}

/// After a walk of the whole export that did not find its node, how long other unknown
/// nodes are answered stale without walking again.
const WALK_COOLDOWN: Duration = Duration::from_secs(2);

/// The directory at the export root that Shoal keeps for itself: hidden from every client,
/// refused as a name to create. It holds `orphans/`.
pub const RESERVED: &[u8] = b".shoal";

/// Inside [`RESERVED`]: files whose last name was removed while a client had them open,
/// linked here as `<node id>` until their last close.
const ORPHANS: &str = "orphans";

/// Most open files kept for reuse by read and write.
const OPEN_FILES_MAX: usize = 512;

/// An exported directory.
pub struct Volume {
    /// The export root, canonical.
    root: PathBuf,
    /// The export root, open: files are opened relative to it with `openat2`, so no path
    /// leaves the export even if the tree changes between a check and the open.
    root_dir: File,
    /// The root's inode number: node id of the export.
    root_id: NodeId,
    /// The device of the export; nodes on other devices (mounts inside it) are not exported.
    dev: u64,
    /// Node id to place. The root has no entry.
    places: DashMap<NodeId, Place>,
    /// Sorted listings of directories, reused while the directory's mtime stays the same.
    listings: DashMap<NodeId, Listing>,
    /// Open files by node id, reused across reads and writes.
    open_files: DashMap<NodeId, Arc<File>>,
    /// Serializes the full walk that finds nodes unknown after a restart, and remembers when
    /// the last walk went through the whole export without finding its node.
    walk: Mutex<Option<Instant>>,
    /// Walks that covered the whole export (for tests and diagnostics).
    full_walks: AtomicU64,
    /// Node ids of `.shoal` and `.shoal/orphans` once made: no client may list or change
    /// them, whichever way it names them.
    reserved_dirs: DashMap<NodeId, ()>,
}

impl Volume {
    /// Opens the export at `root`: it must exist, be a directory and be readable.
    pub fn open(root: &Path) -> VolResult<Volume> {
        let shown = root.display();
        let canon =
            fs::canonicalize(root).map_err(|e| VolumeError::io(&format!("export {shown}"), e))?;
        let meta =
            fs::metadata(&canon).map_err(|e| VolumeError::io(&format!("export {shown}"), e))?;
        if !meta.is_dir() {
            return Err(VolumeError::new(
                libc::ENOTDIR,
                format!("export {shown}: not a directory"),
            ));
        }
        fs::read_dir(&canon).map_err(|e| VolumeError::io(&format!("export {shown}"), e))?;
        let root_dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&canon)
            .map_err(|e| VolumeError::io(&format!("export {shown}"), e))?;
        info!(export = %canon.display(), "volume opened");
        clear_orphans(&canon);
        Ok(Volume {
            root: canon,
            root_dir,
            root_id: meta.ino(),
            dev: meta.dev(),
            places: DashMap::new(),
            listings: DashMap::new(),
            open_files: DashMap::new(),
            walk: Mutex::new(None),
            full_walks: AtomicU64::new(0),
            reserved_dirs: DashMap::new(),
        })
    }

    /// The export's own directory.
    pub fn root_id(&self) -> NodeId {
        self.root_id
    }

    /// The export's path on disk.
    pub fn root_path(&self) -> &Path {
        &self.root
    }

    /// An id for the export's filesystem, stable across restarts (its device number).
    pub fn fsid(&self) -> u64 {
        self.dev
    }

    /// Walks of the whole export made so far to find unknown nodes.
    pub fn full_walks(&self) -> u64 {
        self.full_walks.load(Ordering::Relaxed)
    }

    /// Number of nodes whose place the volume remembers.
    pub fn known_nodes(&self) -> usize {
        self.places.len()
    }

    // ---- resolving nodes ----

    /// The path of `node`, checked to still be that node. Finds nodes unknown to the table
    /// (a restart, a change made directly on disk) by walking the export once.
    fn path(&self, node: NodeId) -> VolResult<(PathBuf, fs::Metadata)> {
        if node == 0 {
            // Inode 0 names no file: front ends use it for handles that name nothing.
            return Err(VolumeError::stale(node));
        }
        if let Some(found) = self.try_path(node) {
            return Ok(found);
        }
        self.rediscover(node)?;
        self.try_path(node).ok_or_else(|| VolumeError::stale(node))
    }

    fn try_path(&self, node: NodeId) -> Option<(PathBuf, fs::Metadata)> {
        let path = self.path_from_table(node)?;
        // Resolved beneath the root with no symlink anywhere on the way: a directory of the
        // path replaced by a symlink (even to the same inode, moved out) makes the path fail.
        let meta = self
            .open_beneath(&path, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .and_then(|f| f.metadata())
            .ok()?;
        (meta.ino() == node && meta.dev() == self.dev).then_some((path, meta))
    }

    fn path_from_table(&self, node: NodeId) -> Option<PathBuf> {
        let mut names = Vec::new();
        let mut at = node;
        while at != self.root_id {
            let place = self.places.get(&at)?;
            names.push(place.name.clone());
            at = place.parent;
            if names.len() > 4096 {
                return None; // a cycle in the table: treat as unknown
            }
        }
        let mut path = self.root.clone();
        for name in names.iter().rev() {
            path.push(name);
        }
        Some(path)
    }

    /// Walks the export, recording the place of every node, until `node` is found.
    ///
    /// A walk that goes through the whole export without finding the node has recorded every
    /// node there is, so for `WALK_COOLDOWN` after it any other unknown node is answered
    /// stale without walking again: forged or long-gone ids cost one walk per cooldown, not
    /// one per call. Only the walk visits directories, and only below the export root, so a
    /// node outside the export is never found.
    fn rediscover(&self, node: NodeId) -> VolResult<()> {
        let mut last_full = self.walk.lock().unwrap();
        if self.try_path(node).is_some() {
            return Ok(());
        }
        if last_full.is_some_and(|at| at.elapsed() < WALK_COOLDOWN) {
            return Err(VolumeError::stale(node));
        }
        debug!(node, "walking the export to find a node");
        let mut stack = vec![(self.root_id, self.root.clone())];
        while let Some((dir_id, dir_path)) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir_path) else {
                continue;
            };
            for entry in rd.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.dev() != self.dev {
                    continue;
                }
                let id = meta.ino();
                self.places.insert(
                    id,
                    Place {
                        parent: dir_id,
                        name: entry.file_name(),
                        generation: generation_of(&meta),
                    },
                );
                if meta.is_dir() {
                    stack.push((id, entry.path()));
                }
                if id == node {
                    return Ok(());
                }
            }
        }
        *last_full = Some(Instant::now());
        self.full_walks.fetch_add(1, Ordering::Relaxed);
        Err(VolumeError::stale(node))
    }

    /// The generation of `node`: its birth time in nanoseconds since the epoch, or 0 where
    /// the filesystem keeps no birth time. An inode number reused by a new file comes with a
    /// new birth time, so a handle carrying the generation of the old file can be told stale.
    /// Remembered with the node's place, so handles are made and checked without a syscall
    /// for every node the volume has seen (the call that follows resolves the node anyway).
    pub fn generation(&self, node: NodeId) -> VolResult<u64> {
        if let Some(p) = self.places.get(&node) {
            return Ok(p.generation);
        }
        Ok(generation_of(&self.path(node)?.1))
    }

    /// The path of directory `dir`.
    fn dir_path(&self, dir: NodeId) -> VolResult<PathBuf> {
        let (path, meta) = self.path(dir)?;
        if !meta.is_dir() {
            return Err(VolumeError::new(
                libc::ENOTDIR,
                format!("node {dir} is not a directory"),
            ));
        }
        Ok(path)
    }

    /// The path of `name` inside directory `dir`, after checking the name is one component.
    fn child_path(&self, dir: NodeId, name: &[u8]) -> VolResult<PathBuf> {
        check_name(name)?;
        if self.is_reserved(dir, name) {
            return Err(VolumeError::new(
                libc::EACCES,
                format!("{}: reserved by Shoal at the export root", lossy(name)),
            ));
        }
        Ok(self.dir_path(dir)?.join(OsStr::from_bytes(name)))
    }

    /// Directory `dir`, opened beneath the export root (`O_PATH`) and checked to be that node:
    /// every change inside it is made relative to this descriptor, never to a path string.
    fn dir(&self, dir: NodeId) -> VolResult<Dir> {
        let path = self.dir_path(dir)?;
        let f = self
            .open_beneath(
                &path,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| VolumeError::io(&format!("directory {dir}"), e))?;
        let m = f
            .metadata()
            .map_err(|e| VolumeError::io(&format!("directory {dir}"), e))?;
        if m.ino() != dir || m.dev() != self.dev {
            return Err(VolumeError::stale(dir));
        }
        Ok(Dir(f))
    }

    /// `name` in directory `dir`, checked to be one component and not reserved: the open
    /// directory and the name for a `*at` call.
    fn entry(&self, dir: NodeId, name: &[u8]) -> VolResult<(Dir, CString)> {
        check_name(name)?;
        if self.is_reserved(dir, name) {
            return Err(VolumeError::new(
                libc::EACCES,
                format!("{}: reserved by Shoal at the export root", lossy(name)),
            ));
        }
        let c = CString::new(name).map_err(|_| VolumeError::new(libc::EINVAL, "NUL in name"))?;
        Ok((self.dir(dir)?, c))
    }

    /// Records that `meta` sits at `name` in `dir` and returns its attributes.
    fn remember(&self, dir: NodeId, name: &[u8], meta: &fs::Metadata) -> Attr {
        self.remember_attr(dir, name, attr_of(meta), generation_of(meta))
    }

    fn remember_attr(&self, dir: NodeId, name: &[u8], attr: Attr, generation: u64) -> Attr {
        self.places.insert(
            attr.node,
            Place {
                parent: dir,
                name: OsStr::from_bytes(name).to_owned(),
                generation,
            },
        );
        attr
    }

    // ---- reading ----

    pub fn getattr(&self, node: NodeId) -> VolResult<Attr> {
        Ok(attr_of(&self.path(node)?.1))
    }

    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> VolResult<Attr> {
        if self.is_reserved(dir, name) {
            return Err(VolumeError::new(
                libc::ENOENT,
                format!("{}: no such entry", lossy(name)),
            ));
        }
        let (d, c) = self.entry(dir, name)?;
        let (attr, dev, generation) = d
            .child_attr(&c)
            .map_err(|e| VolumeError::io(&lossy(name), e))?;
        if dev != self.dev {
            return Err(VolumeError::new(
                libc::EXDEV,
                format!("{}: another filesystem", lossy(name)),
            ));
        }
        Ok(self.remember_attr(dir, name, attr, generation))
    }

    /// The directory holding `node`; the export root is its own parent, so nothing above
    /// the export can be reached.
    pub fn parent(&self, node: NodeId) -> VolResult<NodeId> {
        if node == self.root_id {
            return Ok(node);
        }
        self.path(node)?;
        self.places
            .get(&node)
            .map(|p| p.parent)
            .ok_or_else(|| VolumeError::stale(node))
    }

    /// Resolves a `/`-separated path below the export root, one lookup per component.
    pub fn resolve(&self, path: &str) -> VolResult<Attr> {
        let mut attr = self.getattr(self.root_id)?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            attr = self.lookup(attr.node, part.as_bytes())?;
        }
        Ok(attr)
    }

    /// Reads up to `len` bytes at `offset`; `eof` is true when the read reached the end.
    pub fn read(&self, node: NodeId, offset: u64, len: u32) -> VolResult<(Vec<u8>, bool)> {
        let file = self.open_file(node)?;
        let mut buf = vec![0u8; len as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VolumeError::io("read", e)),
            }
        }
        buf.truncate(got);
        let size = file
            .metadata()
            .map_err(|e| VolumeError::io("read", e))?
            .len();
        Ok((buf, offset + got as u64 >= size))
    }

    pub fn readlink(&self, node: NodeId) -> VolResult<Vec<u8>> {
        let (path, meta) = self.path(node)?;
        if !meta.file_type().is_symlink() {
            return Err(VolumeError::new(
                libc::EINVAL,
                format!("node {node} is not a symlink"),
            ));
        }
        let target = fs::read_link(&path).map_err(|e| VolumeError::io("readlink", e))?;
        Ok(target.into_os_string().into_vec())
    }

    /// Up to `max` entries of `dir` whose cookie is greater than `after`, in cookie order.
    /// The cookie of an entry is its node id: a resumed listing neither repeats nor skips an
    /// entry that stayed in the directory, whatever else was added or removed meanwhile.
    pub fn readdir(&self, dir: NodeId, after: u64, max: usize) -> VolResult<(Vec<DirEntry>, bool)> {
        if self.reserved_dirs.contains_key(&dir) {
            return Err(VolumeError::new(libc::EACCES, "reserved by Shoal"));
        }
        let d = self.dir(dir)?;
        let listing = self.listing(dir, &d)?;
        let start = listing.partition_point(|(id, _)| *id <= after);
        let mut out = Vec::new();
        let mut i = start;
        while i < listing.len() && out.len() < max {
            let (id, name) = &listing[i];
            i += 1;
            if self.is_reserved(dir, name.as_bytes()) {
                continue;
            }
            // The entry may have gone since the listing was taken; skip it then.
            let Ok(c) = CString::new(name.as_bytes()) else {
                continue;
            };
            let Ok((attr, _, generation)) = d.child_attr(&c) else {
                continue;
            };
            if attr.node != *id {
                continue;
            }
            let attr = self.remember_attr(dir, name.as_bytes(), attr, generation);
            out.push(DirEntry {
                name: name.as_bytes().to_vec(),
                attr,
                cookie: *id,
            });
        }
        Ok((out, i >= listing.len()))
    }

    fn listing(&self, dir: NodeId, d: &Dir) -> VolResult<Arc<Vec<(NodeId, OsString)>>> {
        let meta = d.0.metadata().map_err(|e| VolumeError::io("readdir", e))?;
        let mtime = (meta.mtime(), meta.mtime_nsec());
        if let Some(l) = self.listings.get(&dir) {
            if l.mtime == mtime {
                return Ok(l.entries.clone());
            }
        }
        let mut entries = Vec::new();
        for entry in d.read_dir().map_err(|e| VolumeError::io("readdir", e))? {
            let entry = entry.map_err(|e| VolumeError::io("readdir", e))?;
            use std::os::unix::fs::DirEntryExt;
            entries.push((entry.ino(), entry.file_name()));
        }
        entries.sort();
        let entries = Arc::new(entries);
        self.listings.insert(
            dir,
            Listing {
                mtime,
                entries: entries.clone(),
            },
        );
        Ok(entries)
    }

    pub fn statfs(&self) -> VolResult<FsStat> {
        let c = CString::new(self.root.as_os_str().as_bytes())
            .map_err(|_| VolumeError::new(libc::EINVAL, "root"))?;
        // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized, writable
        // statvfs that the kernel fills; we read it only when the call reports success.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(VolumeError::io("statfs", io::Error::last_os_error()));
        }
        Ok(FsStat {
            block_size: st.f_frsize as u32,
            blocks: st.f_blocks,
            blocks_free: st.f_bfree,
            blocks_avail: st.f_bavail,
            files: st.f_files,
            files_free: st.f_ffree,
            name_max: st.f_namemax as u32,
        })
    }

    // ---- changing ----

    pub fn write(&self, node: NodeId, offset: u64, data: &[u8]) -> VolResult<Attr> {
        let file = self.open_file(node)?;
        file.write_all_at(data, offset)
            .map_err(|e| VolumeError::io("write", e))?;
        Ok(attr_of(
            &file.metadata().map_err(|e| VolumeError::io("write", e))?,
        ))
    }

    /// Makes acknowledged writes to `node` durable.
    pub fn fsync(&self, node: NodeId) -> VolResult<()> {
        let file = self.open_file(node)?;
        file.sync_all().map_err(|e| VolumeError::io("fsync", e))
    }

    pub fn setattr(&self, node: NodeId, set: &SetAttr) -> VolResult<Attr> {
        let (path, meta) = self.path(node)?;
        let what = |w: &str| format!("setattr {w}");
        if let Some(size) = set.size {
            if meta.is_dir() {
                return Err(VolumeError::new(
                    libc::EISDIR,
                    "cannot truncate a directory",
                ));
            }
            self.open_file(node)?
                .set_len(size)
                .map_err(|e| VolumeError::io(&what("size"), e))?;
        }
        // The node itself, opened beneath the root without following it: owner, mode and
        // times are changed on that inode, whatever is renamed over its path meanwhile.
        let f = self
            .open_beneath(&path, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(|e| VolumeError::io(&what("open"), e))?;
        let meta = f
            .metadata()
            .map_err(|e| VolumeError::io(&what("open"), e))?;
        if meta.ino() != node {
            return Err(VolumeError::stale(node));
        }
        let symlink = meta.file_type().is_symlink();
        if set.uid.is_some() || set.gid.is_some() {
            beneath::chown(&f, set.uid, set.gid).map_err(|e| VolumeError::io(&what("owner"), e))?;
        }
        if let Some(mode) = set.mode {
            if !symlink {
                beneath::chmod(&f, mode).map_err(|e| VolumeError::io(&what("mode"), e))?;
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            if symlink {
                set_times(&path, set.atime, set.mtime)
            } else {
                beneath::set_times(&f, set.atime, set.mtime)
            }
            .map_err(|e| VolumeError::io(&what("times"), e))?;
        }
        self.getattr(node)
    }

    /// Creates a regular file. `Unchecked` on an existing file opens it (and leaves its mode
    /// and owner alone); `Guarded` fails with EEXIST. A new file is given to `owner`.
    pub fn create(
        &self,
        dir: NodeId,
        name: &[u8],
        mode: u32,
        how: CreateMode,
        owner: Option<Owner>,
    ) -> VolResult<Attr> {
        let path = self.child_path(dir, name)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_EXCL;
        let (file, new) = match self.open_beneath(&path, flags, mode & 0o7777) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && how == CreateMode::Unchecked => {
                let f = self
                    .open_beneath(&path, libc::O_WRONLY | libc::O_NOFOLLOW, 0)
                    .map_err(|e| VolumeError::io(&lossy(name), e))?;
                (f, false)
            }
            Err(e) => return Err(VolumeError::io(&lossy(name), e)),
        };
        let mut meta = file
            .metadata()
            .map_err(|e| VolumeError::io(&lossy(name), e))?;
        if !meta.is_file() {
            return Err(VolumeError::new(
                libc::EEXIST,
                format!("{}: exists and is not a file", lossy(name)),
            ));
        }
        if new {
            meta = give(&file, meta, owner).map_err(|e| VolumeError::io(&lossy(name), e))?;
        }
        Ok(self.remember(dir, name, &meta))
    }

    pub fn mkdir(
        &self,
        dir: NodeId,
        name: &[u8],
        mode: u32,
        owner: Option<Owner>,
    ) -> VolResult<Attr> {
        let (d, c) = self.entry(dir, name)?;
        d.mkdir(&c, mode & 0o7777)
            .map_err(|e| VolumeError::io(&lossy(name), e))?;
        let meta = made(&d, &c, owner).map_err(|e| VolumeError::io(&lossy(name), e))?;
        Ok(self.remember(dir, name, &meta))
    }

    /// Creates a symlink. The target is stored as given: the server never follows it, a
    /// client resolves it on its own side.
    pub fn symlink(
        &self,
        dir: NodeId,
        name: &[u8],
        target: &[u8],
        owner: Option<Owner>,
    ) -> VolResult<Attr> {
        let (d, c) = self.entry(dir, name)?;
        let target = match CString::new(target) {
            Ok(t) if !target.is_empty() => t,
            _ => {
                return Err(VolumeError::new(
                    libc::EINVAL,
                    "symlink target is empty or has a NUL byte",
                ))
            }
        };
        d.symlink(&target, &c)
            .map_err(|e| VolumeError::io(&lossy(name), e))?;
        let meta = made(&d, &c, owner).map_err(|e| VolumeError::io(&lossy(name), e))?;
        Ok(self.remember(dir, name, &meta))
    }

    /// Unlinks a non-directory; returns the node that was removed.
    pub fn remove(&self, dir: NodeId, name: &[u8]) -> VolResult<NodeId> {
        let (d, c) = self.entry(dir, name)?;
        let meta = d
            .child_meta(&c)
            .map_err(|e| VolumeError::io(&lossy(name), e))?;
        if meta.is_dir() {
            return Err(VolumeError::new(
                libc::EISDIR,
                format!("{}: is a directory", lossy(name)),
            ));
        }
        d.unlink(&c, false)
            .map_err(|e| VolumeError::io(&lossy(name), e))?;
        self.forget(meta.ino(), meta.nlink() <= 1);
        Ok(meta.ino())
    }

    /// Removes an empty directory; returns its node id.
    pub fn rmdir(&self, dir: NodeId, name: &[u8]) -> VolResult<NodeId> {
        let (d, c) = self.entry(dir, name)?;
        let meta = d
            .child_meta(&c)
            .map_err(|e| VolumeError::io(&lossy(name), e))?;
        if !meta.is_dir() {
            return Err(VolumeError::new(
                libc::ENOTDIR,
                format!("{}: not a directory", lossy(name)),
            ));
        }
        d.unlink(&c, true)
            .map_err(|e| VolumeError::io(&lossy(name), e))?;
        self.forget(meta.ino(), true);
        Ok(meta.ino())
    }

    /// Renames, replacing an existing target unless `no_replace` (then EEXIST, atomically).
    /// Returns the moved node and the replaced one.
    pub fn rename(
        &self,
        from_dir: NodeId,
        from: &[u8],
        to_dir: NodeId,
        to: &[u8],
        no_replace: bool,
    ) -> VolResult<(NodeId, Option<NodeId>)> {
        let (sd, sc) = self.entry(from_dir, from)?;
        let (dd, dc) = self.entry(to_dir, to)?;
        let moved = sd
            .child_meta(&sc)
            .map_err(|e| VolumeError::io(&lossy(from), e))?;
        let replaced = dd.child_meta(&dc).ok().filter(|m| m.ino() != moved.ino());
        // The kernel refuses to move a directory into itself (EINVAL).
        sd.rename(&sc, &dd, &dc, no_replace)
            .map_err(|e| VolumeError::io(&format!("rename {}", lossy(from)), e))?;
        if let Some(r) = &replaced {
            self.forget(r.ino(), r.is_dir() || r.nlink() <= 1);
        }
        self.remember(to_dir, to, &moved);
        Ok((moved.ino(), replaced.map(|m| m.ino())))
    }

    // ---- orphans: files removed while open ----

    /// True for the name the volume keeps for itself, and for anything inside it.
    fn is_reserved(&self, dir: NodeId, name: &[u8]) -> bool {
        (dir == self.root_id && name == RESERVED) || self.reserved_dirs.contains_key(&dir)
    }

    /// `.shoal/orphans` (made if missing), remembered in the node table.
    fn orphans_dir(&self) -> VolResult<(NodeId, PathBuf)> {
        let shoal = self.root.join(OsStr::from_bytes(RESERVED));
        let orphans = shoal.join(ORPHANS);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&orphans)
            .map_err(|e| VolumeError::io("creating .shoal/orphans", e))?;
        let shoal_meta = fs::symlink_metadata(&shoal).map_err(|e| VolumeError::io(".shoal", e))?;
        let meta =
            fs::symlink_metadata(&orphans).map_err(|e| VolumeError::io(".shoal/orphans", e))?;
        if !shoal_meta.is_dir() || !meta.is_dir() {
            return Err(VolumeError::new(
                libc::ENOTDIR,
                ".shoal/orphans is not a directory",
            ));
        }
        self.remember(self.root_id, RESERVED, &shoal_meta);
        self.remember(shoal_meta.ino(), ORPHANS.as_bytes(), &meta);
        self.reserved_dirs.insert(shoal_meta.ino(), ());
        self.reserved_dirs.insert(meta.ino(), ());
        Ok((meta.ino(), orphans))
    }

    /// Links the file `node`, now at `name` in `dir`, into the orphans directory, so it
    /// keeps a name (and its data) when `name` is removed or replaced. Call before the
    /// change; then [`Volume::adopt_orphan`] after it, or [`Volume::reap_orphan`] to undo.
    pub fn keep_orphan(&self, dir: NodeId, name: &[u8], node: NodeId) -> VolResult<()> {
        let (d, c) = self.entry(dir, name)?;
        let meta = d
            .child_meta(&c)
            .map_err(|e| VolumeError::io(&lossy(name), e))?;
        if meta.ino() != node || !meta.is_file() {
            return Err(VolumeError::stale(node));
        }
        let (orphans_id, orphans) = self.orphans_dir()?;
        let link = orphans.join(node.to_string());
        let od = self.dir(orphans_id)?;
        let lc = CString::new(node.to_string()).expect("digits only");
        match d.link(&c, &od, &lc) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let there =
                    fs::symlink_metadata(&link).map_err(|e| VolumeError::io("orphan", e))?;
                if there.ino() == node {
                    Ok(())
                } else {
                    Err(VolumeError::new(
                        libc::EEXIST,
                        format!("orphan {node} exists"),
                    ))
                }
            }
            Err(e) => Err(VolumeError::io("linking an orphan", e)),
        }
    }

    /// Records that `node`'s only name is now its orphan link.
    pub fn adopt_orphan(&self, node: NodeId) -> VolResult<()> {
        let (orphans_id, _) = self.orphans_dir()?;
        let generation = self.places.get(&node).map_or(0, |p| p.generation);
        self.places.insert(
            node,
            Place {
                parent: orphans_id,
                name: node.to_string().into(),
                generation,
            },
        );
        Ok(())
    }

    /// Removes `node`'s orphan link (its last close, or an undo).
    pub fn reap_orphan(&self, node: NodeId) {
        let link = self
            .root
            .join(OsStr::from_bytes(RESERVED))
            .join(ORPHANS)
            .join(node.to_string());
        match fs::symlink_metadata(&link) {
            Ok(m) if m.ino() == node => {
                let gone = m.nlink() <= 1;
                if let Err(e) = fs::remove_file(&link) {
                    warn!(node, "cannot remove orphan: {e}");
                    return;
                }
                debug!(node, "orphan removed");
                if gone {
                    self.forget(node, true);
                }
            }
            _ => {}
        }
    }

    /// Drops what the volume remembers of a node that left its place.
    fn forget(&self, node: NodeId, gone: bool) {
        self.places.remove(&node);
        self.listings.remove(&node);
        if gone {
            self.open_files.remove(&node);
        }
    }

    /// An open file for `node`, reused across calls.
    fn open_file(&self, node: NodeId) -> VolResult<Arc<File>> {
        if let Some(f) = self.open_files.get(&node) {
            return Ok(f.clone());
        }
        let (path, meta) = self.path(node)?;
        if meta.is_dir() {
            return Err(VolumeError::new(
                libc::EISDIR,
                format!("node {node} is a directory"),
            ));
        }
        if !meta.is_file() {
            return Err(VolumeError::new(
                libc::EINVAL,
                format!("node {node} is not a regular file"),
            ));
        }
        let file = self
            .open_beneath(&path, libc::O_RDWR | libc::O_NOFOLLOW, 0)
            .or_else(|_| self.open_beneath(&path, libc::O_RDONLY | libc::O_NOFOLLOW, 0))
            .map_err(|e| VolumeError::io("open", e))?;
        // The path was checked before the open; make sure the open found the same node.
        let opened = file.metadata().map_err(|e| VolumeError::io("open", e))?;
        if opened.ino() != node || opened.dev() != self.dev {
            return Err(VolumeError::stale(node));
        }
        let file = Arc::new(file);
        if self.open_files.len() >= OPEN_FILES_MAX {
            // Evict an arbitrary half: cheap, and reopening costs one open(2).
            let victims: Vec<NodeId> = self
                .open_files
                .iter()
                .map(|e| *e.key())
                .step_by(2)
                .collect();
            for v in victims {
                self.open_files.remove(&v);
            }
        }
        self.open_files.insert(node, file.clone());
        Ok(file)
    }

    /// Opens `path`, a path inside the export, relative to the export root with `openat2`:
    /// the kernel refuses to follow any symlink on the way (also in the middle of the path),
    /// to cross a mount, or to leave the root, whatever was swapped in since `path` was
    /// checked. Kernels before 5.6 have no `openat2`; there the path is opened as it is,
    /// with `O_NOFOLLOW` guarding the last component only.
    fn open_beneath(&self, path: &Path, flags: i32, mode: u32) -> io::Result<File> {
        let rel = path
            .strip_prefix(&self.root)
            .map_err(|_| io::Error::from_raw_os_error(libc::EXDEV))?;
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let c = CString::new(rel.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: u64::from(mode),
            resolve: libc::RESOLVE_BENEATH
                | libc::RESOLVE_NO_SYMLINKS
                | libc::RESOLVE_NO_MAGICLINKS
                | libc::RESOLVE_NO_XDEV,
        };
        // SAFETY: openat2 reads a NUL-terminated path (`c`, alive for the call) and an
        // `open_how` of the size passed (`how`, #[repr(C)] with the kernel's layout, alive
        // for the call); it returns a new descriptor or -1 and touches no other memory.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root_dir.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` is a descriptor the kernel just opened for us and nothing else
            // owns; the File takes ownership and closes it once.
            return Ok(unsafe { File::from_raw_fd(fd as i32) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOSYS) {
            return Err(err);
        }
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            warn!(
                "this kernel has no openat2 (Linux < 5.6): paths are opened with O_NOFOLLOW on \
                 the last component only, and a directory swapped for a symlink by someone with \
                 direct access to the export could redirect an open"
            )
        });
        let mut opts = OpenOptions::new();
        opts.custom_flags(flags & !(libc::O_ACCMODE)).mode(mode);
        match flags & libc::O_ACCMODE {
            libc::O_RDONLY => opts.read(true),
            libc::O_WRONLY => opts.write(true),
            _ => opts.read(true).write(true),
        };
        opts.open(path)
    }
}

/// `struct open_how` of linux/openat2.h (libc's is non-exhaustive, so not constructible).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Gives the node just made at `path` to `owner` (without following a symlink), returning its
/// attributes as they are then.
fn give(f: &File, meta: fs::Metadata, owner: Option<Owner>) -> io::Result<fs::Metadata> {
    match owner {
        Some(o) if o.uid != meta.uid() || o.gid != meta.gid() => {
            beneath::chown(f, Some(o.uid), Some(o.gid))?;
            f.metadata()
        }
        _ => Ok(meta),
    }
}

/// The node just made at `name` in `d`, given to `owner`: its attributes as they are then.
fn made(d: &Dir, name: &CStr, owner: Option<Owner>) -> io::Result<fs::Metadata> {
    let f = d.open_child(name)?;
    let meta = f.metadata()?;
    give(&f, meta, owner)
}

/// Removes orphans a previous run left behind: no client of this run has them open.
fn clear_orphans(root: &Path) {
    let dir = root.join(OsStr::from_bytes(RESERVED)).join(ORPHANS);
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) && fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    if n > 0 {
        info!(
            count = n,
            "removed files a previous run kept for clients that had them open"
        );
    }
}

/// A name must be one path component: not empty, not `.` or `..`, no `/` or NUL, at most 255 bytes.
pub fn check_name(name: &[u8]) -> VolResult<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(VolumeError::new(
            libc::EINVAL,
            format!("invalid name {:?}", lossy(name)),
        ));
    }
    if name.len() > 255 {
        return Err(VolumeError::new(
            libc::ENAMETOOLONG,
            "name longer than 255 bytes",
        ));
    }
    Ok(())
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// See [`Volume::generation`]. `std` takes metadata with statx, which reports the birth
/// time where the filesystem has one (ext4, xfs, btrfs, tmpfs).
fn generation_of(m: &fs::Metadata) -> u64 {
    m.created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

fn attr_of(m: &fs::Metadata) -> Attr {
    let ft = m.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    let t = |s: i64, n: i64| Time {
        secs: s,
        nanos: n as u32,
    };
    Attr {
        node: m.ino(),
        kind,
        size: m.size(),
        used: m.blocks() * 512,
        mode: m.mode() & 0o7777,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
    }
}

/// Sets the times of the symlink at `path` itself (its last component is not followed).
fn set_times(path: &Path, atime: Option<SetTime>, mtime: Option<SetTime>) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    beneath::utimens(&c, libc::AT_SYMLINK_NOFOLLOW, atime, mtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lookups and listings read attributes with one statx; everything else from
    /// `fs::Metadata`. Both must agree, the generation above all: handles carry it.
    #[test]
    fn statx_attributes_match_metadata() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"12345").unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let d = Dir(File::open(dir.path()).unwrap());
        for name in ["f", "l", "d"] {
            let c = CString::new(name).unwrap();
            let (attr, dev, generation) = d.child_attr(&c).unwrap();
            let meta = fs::symlink_metadata(dir.path().join(name)).unwrap();
            assert_eq!(attr, attr_of(&meta), "{name}");
            assert_eq!(dev, meta.dev(), "{name}");
            assert_eq!(generation, generation_of(&meta), "{name}");
        }
    }
}
