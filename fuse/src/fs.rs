//! The `fuser::Filesystem` implementation: translates kernel requests into channel calls.
//!
//! Owns the translation only: inode numbers to node ids, kernel flags to protocol fields,
//! replies and errnos back. Caching rules live in [`crate::cache`]; recalls in
//! [`crate::recall`]. Every request that needs the server is spawned onto the tokio runtime
//! and answered from there, so a slow call (a write waiting for another node's recall) never
//! holds up the kernel's other requests. Nothing here may block on the kernel.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    TimeOrNow, WriteFlags,
};
use shoal_nfs::channel::client::Client;
use shoal_nfs::channel::proto::{
    self, Attr, CreateMode, FileKind, NodeId, Owner, Reply, Request, SetAttr, SetTime, Time,
};
use tracing::{debug, warn};

use crate::cache::{Cache, Lookup, NameNow, Ticket};

/// Longest attribute TTL handed to the kernel, even under a long lease.
const ATTR_TTL_CAP: Duration = Duration::from_secs(60);
/// Dentries are never cached by the kernel: every path walk asks `lookup`, which the daemon
/// answers from its leased cache. This keeps recalls to `inval_inode` (no `inval_entry`,
/// which can deadlock on the kernel's directory locks).
const ENTRY_TTL: Duration = Duration::ZERO;
/// Entries asked for per `ReadDir` call (a kernel readdir buffer is usually one page).
const READDIR_BATCH: u32 = 128;
/// An open file.
#[derive(Debug)]
struct Handle {
    node: NodeId,
    /// Written through this handle since the last flush (so flush must fsync).
    dirty: AtomicBool,
    /// The session generation whose server counted this open (0: none yet). A new session
    /// knows nothing of earlier opens, so each is registered again, once.
    registered: AtomicU64,
}

/// Per-node bookkeeping of what the kernel holds.
#[derive(Debug, Default)]
pub struct Nodes {
    /// Kernel lookup counts (FUSE's nlookup): a node with a count is known to the kernel.
    lookups: HashMap<NodeId, u64>,
    /// Open file handles per node.
    opens: HashMap<NodeId, u32>,
    /// Nodes the kernel forgot, to be released to the server in one batch.
    pending_release: Vec<NodeId>,
}

/// Activity counters, logged at debug level.
#[derive(Debug, Default)]
pub struct Stats {
    pub recalls: AtomicU64,
    pub invalidations: AtomicU64,
    pub slow_invalidations: AtomicU64,
    pub calls: AtomicU64,
}

/// State shared by the request handlers, the recall thread and the background tasks.
pub struct Shared {
    pub client: Client,
    pub rt: tokio::runtime::Handle,
    /// Node id of the mounted directory (FUSE's inode 1).
    pub root: NodeId,
    pub read_only: bool,
    pub cache: Mutex<Cache>,
    pub nodes: Mutex<Nodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    pub stats: Stats,
    /// Writes the kernel has sent and this daemon has not answered yet, by node: the kernel
    /// holds their pages locked, so invalidating those pages waits for them.
    writing: Mutex<HashMap<NodeId, u32>>,
}

/// Counts a write as in flight until dropped.
struct Writing<'a>(&'a Shared, NodeId);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut w = self.0.writing.lock().unwrap();
        if let Some(n) = w.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.1);
            }
        }
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn to_system_time(t: Time) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos as u64)
    }
}

fn to_time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Time { secs, nanos }
        }
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::ServerNow,
        TimeOrNow::SpecificTime(s) => SetTime::At(to_time(s)),
    })
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        // Listed but never opened through Shoal; a socket cannot be opened by the kernel.
        FileKind::Other => FileType::Socket,
    }
}

/// Swaps FUSE's root inode number with the mounted directory's node id. The swap is its own
/// inverse, so it maps both ways and stays a bijection even if some node has id 1.
pub fn swap_root(root: NodeId, x: u64) -> u64 {
    if x == 1 {
        root
    } else if x == root {
        1
    } else {
        x
    }
}

impl Shared {
    pub fn new(
        client: Client,
        rt: tokio::runtime::Handle,
        root: &Attr,
        read_only: bool,
    ) -> Arc<Shared> {
        let mut cache = Cache::new(client.generation());
        let (_, until) = lease_window(&client);
        let t = cache.ticket();
        cache.put_attr(t, root, until);
        let mut nodes = Nodes::default();
        nodes.lookups.insert(root.node, 1);
        Arc::new(Shared {
            client,
            rt,
            root: root.node,
            read_only,
            cache: Mutex::new(cache),
            nodes: Mutex::new(nodes),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            stats: Stats::default(),
            writing: Mutex::new(HashMap::new()),
        })
    }

    fn node(&self, ino: INodeNo) -> NodeId {
        swap_root(self.root, ino.0)
    }

    pub fn ino(&self, node: NodeId) -> INodeNo {
        INodeNo(swap_root(self.root, node))
    }

    fn file_attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: self.ino(a.node),
            size: a.size,
            blocks: a.used.div_ceil(512),
            atime: to_system_time(a.atime),
            mtime: to_system_time(a.mtime),
            ctime: to_system_time(a.ctime),
            crtime: to_system_time(a.ctime),
            kind: kind(a.kind),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: 0,
            blksize: 128 * 1024,
            flags: 0,
        }
    }

    /// Brings the cache in line with the session: a new generation or a lapsed lease voids it.
    fn check(&self, cache: &mut Cache) {
        cache.sync_generation(self.client.generation());
        if !self.client.cache_valid() {
            cache.clear();
        }
    }

    /// One server call, with the cache ticket taken just before it.
    async fn call(&self, request: Request) -> (Ticket, Result<Reply, Errno>) {
        let ticket = {
            let mut c = self.cache.lock().unwrap();
            self.check(&mut c);
            c.ticket()
        };
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let res = self.client.call(request).await.map_err(|e| {
            debug!("call failed: {e}");
            errno(e.errno())
        });
        self.cache
            .lock()
            .unwrap()
            .sync_generation(self.client.generation());
        (ticket, res)
    }

    async fn call_attr(&self, request: Request) -> (Ticket, Result<Attr, Errno>) {
        let (t, r) = self.call(request).await;
        (t, r.and_then(expect_attr))
    }

    fn cached_attr(&self, node: NodeId) -> Option<Attr> {
        let mut c = self.cache.lock().unwrap();
        self.check(&mut c);
        c.attr(node, Instant::now())
    }

    fn cached_lookup(&self, dir: NodeId, name: &[u8]) -> Option<Lookup> {
        let mut c = self.cache.lock().unwrap();
        self.check(&mut c);
        c.lookup(dir, name, Instant::now())
    }

    /// Caches `attr` and returns the TTL the kernel may keep it for (zero if it raced a
    /// recall and was not cached).
    fn keep_attr(&self, t: Ticket, attr: &Attr, own_change: bool) -> Duration {
        let (ttl, until) = lease_window(&self.client);
        let mut c = self.cache.lock().unwrap();
        let kept = if own_change {
            c.put_written(t, attr, until)
        } else {
            c.put_attr(t, attr, until)
        };
        if kept {
            ttl
        } else {
            Duration::ZERO
        }
    }

    /// Answers an entry request and counts the kernel's new reference.
    fn reply_entry(&self, ttl: Duration, attr: &Attr, reply: ReplyEntry) {
        *self
            .nodes
            .lock()
            .unwrap()
            .lookups
            .entry(attr.node)
            .or_insert(0) += 1;
        reply.entry_with_ttls(&ttl, &ENTRY_TTL, &self.file_attr(attr), Generation(0));
    }

    /// Forgets what this client cached about nodes its own change touched.
    fn changed(&self, nodes: &[NodeId]) {
        self.cache.lock().unwrap().recall(nodes);
    }

    /// Records this client's own change of `name` in `dir`, sent under ticket `t` (see
    /// `Cache::own_change`).
    fn own_change(&self, t: Ticket, dir: NodeId, name: &[u8], now: NameNow<'_>) {
        let (_, until) = lease_window(&self.client);
        self.cache
            .lock()
            .unwrap()
            .own_change(t, dir, name, now, until);
    }

    fn write_started(&self, node: NodeId) -> Writing<'_> {
        *self.writing.lock().unwrap().entry(node).or_insert(0) += 1;
        Writing(self, node)
    }

    /// True if a write to one of `nodes` is in flight through this mount.
    pub fn writing_any(&self, nodes: &[NodeId]) -> bool {
        let w = self.writing.lock().unwrap();
        nodes.iter().any(|n| w.contains_key(n))
    }

    /// Tells the server this client opened `node` once more: while it is open here, the
    /// server keeps its data if another client removes or replaces its last name.
    async fn opened(&self, fh: FileHandle) {
        if let Some(h) = self.handle(fh) {
            self.register(&h).await;
        }
    }

    async fn register(&self, h: &Handle) {
        match self.client.send(Request::Open { node: h.node }).await {
            Ok(()) => h
                .registered
                .store(self.client.generation(), Ordering::SeqCst),
            Err(e) => debug!(node = h.node, "open not registered: {e}"),
        }
    }

    /// After a new session: registers again every open the new session does not know.
    pub async fn reopen_all(&self) {
        let now = self.client.generation();
        let handles: Vec<Arc<Handle>> = self.handles.lock().unwrap().values().cloned().collect();
        for h in handles {
            if h.registered.load(Ordering::SeqCst) != now {
                self.register(&h).await;
            }
        }
    }

    fn new_handle(&self, node: NodeId) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(
            fh,
            Arc::new(Handle {
                node,
                dirty: AtomicBool::new(false),
                registered: AtomicU64::new(0),
            }),
        );
        *self.nodes.lock().unwrap().opens.entry(node).or_insert(0) += 1;
        FileHandle(fh)
    }

    fn handle(&self, fh: FileHandle) -> Option<Arc<Handle>> {
        self.handles.lock().unwrap().get(&fh.0).cloned()
    }

    /// Drops an open handle; returns its node if the current session counted the open.
    fn close_handle(&self, fh: FileHandle) -> Option<NodeId> {
        let h = self.handles.lock().unwrap().remove(&fh.0)?;
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(n) = nodes.opens.get_mut(&h.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                nodes.opens.remove(&h.node);
            }
        }
        (h.registered.load(Ordering::SeqCst) == self.client.generation()).then_some(h.node)
    }

    /// Sends one `Release` for every forgotten node the kernel has not looked up again.
    pub async fn flush_releases(&self) {
        let nodes: Vec<NodeId> = {
            let mut n = self.nodes.lock().unwrap();
            let pending = std::mem::take(&mut n.pending_release);
            pending
                .into_iter()
                .filter(|x| !n.lookups.contains_key(x) && !n.opens.contains_key(x))
                .collect()
        };
        if nodes.is_empty() {
            return;
        }
        self.cache.lock().unwrap().release(&nodes);
        debug!(count = nodes.len(), "releasing forgotten nodes");
        if let Err(e) = self.client.call(Request::Release { nodes }).await {
            debug!("release failed: {e}");
        }
    }

    /// Nodes the kernel currently knows (for invalidating everything).
    pub fn known_nodes(&self) -> Vec<NodeId> {
        self.nodes.lock().unwrap().lookups.keys().copied().collect()
    }

    fn forget(&self, node: NodeId, n: u64) {
        if node == self.root {
            return;
        }
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(c) = nodes.lookups.get_mut(&node) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                nodes.lookups.remove(&node);
                nodes.pending_release.push(node);
            }
        }
    }
}

/// The TTL the kernel may cache under the current lease, and the instant the daemon's own
/// cache must stop trusting what it stores now.
pub fn lease_window(client: &Client) -> (Duration, Instant) {
    let rem = client.cache_remaining();
    (rem.min(ATTR_TTL_CAP), Instant::now() + rem)
}

fn expect_attr(r: Reply) -> Result<Attr, Errno> {
    match r {
        Reply::Attr(a) => Ok(a),
        other => Err(unexpected(other)),
    }
}

fn unexpected(r: Reply) -> Errno {
    warn!("unexpected reply: {r:?}");
    Errno::EIO
}

/// The `fuser` filesystem: a thin handle on [`Shared`].
pub struct ShoalFs {
    pub shared: Arc<Shared>,
}

impl ShoalFs {
    /// Runs `f` on the runtime, so the session loop is free for the next request at once.
    fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let s = self.shared.clone();
        self.shared.rt.spawn(f(s));
    }

    fn read_only(&self) -> bool {
        self.shared.read_only
    }

    /// Removes `name` from `parent` with the request `remove` builds, and records the change.
    fn remove_name(
        &self,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEmpty,
        remove: impl FnOnce(NodeId, Vec<u8>) -> Request + Send + 'static,
    ) {
        if self.read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        let dir = self.shared.node(parent);
        let name = name.as_bytes().to_vec();
        self.spawn(move |s| async move {
            let child = s.cache.lock().unwrap().peek_entry(dir, &name);
            let (t, r) = s.call(remove(dir, name.clone())).await;
            after_removal(&s, t, dir, &name, child, r.is_ok());
            match r {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    /// Makes a node named `name` in `parent` for the caller of `req` with the request `make`
    /// builds (directory, name, owner), and answers with its entry.
    fn make_node(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
        make: impl FnOnce(NodeId, Vec<u8>, Owner) -> Request + Send + 'static,
    ) {
        if self.read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        let dir = self.shared.node(parent);
        let name = name.as_bytes().to_vec();
        let owner = Owner {
            uid: req.uid(),
            gid: req.gid(),
        };
        self.spawn(move |s| async move {
            let r = s.call_attr(make(dir, name.clone(), owner)).await;
            match finish_create(&s, dir, &name, r).await {
                Ok((ttl, a)) => s.reply_entry(ttl, &a, reply),
                Err(e) => reply.error(e),
            }
        });
    }
}

impl Filesystem for ShoalFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // An mtime or size change seen by getattr drops the page cache; and every cached read
        // revalidates attributes once their TTL (bounded by the lease) ran out.
        if let Err(e) = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA) {
            warn!("kernel lacks FUSE_AUTO_INVAL_DATA ({e:?}): page cache relies on recalls only");
        }
        // With entry TTL 0 every path walk is a lookup: let them run in parallel.
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_write(proto::MAX_IO);
        Ok(())
    }

    fn lookup(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let dir = self.shared.node(parent);
        let name = name.as_bytes().to_vec();
        match self.shared.cached_lookup(dir, &name) {
            Some(Lookup::Found(a)) => {
                let (ttl, _) = lease_window(&self.shared.client);
                self.shared.reply_entry(ttl, &a, reply);
                return;
            }
            Some(Lookup::Missing) => {
                reply.error(Errno::ENOENT);
                return;
            }
            None => {}
        }
        self.spawn(move |s| async move {
            let (t, r) = s
                .call_attr(Request::Lookup {
                    dir,
                    name: name.clone(),
                })
                .await;
            let (ttl, until) = lease_window(&s.client);
            match r {
                Ok(a) => {
                    let kept = s
                        .cache
                        .lock()
                        .unwrap()
                        .put_entry(t, dir, &name, Some(&a), until);
                    s.reply_entry(if kept { ttl } else { Duration::ZERO }, &a, reply);
                }
                Err(e) => {
                    if e == Errno::ENOENT {
                        s.cache
                            .lock()
                            .unwrap()
                            .put_entry(t, dir, &name, None, until);
                    }
                    reply.error(e)
                }
            }
        });
    }

    fn forget(&self, _req: &fuser::Request, ino: INodeNo, nlookup: u64) {
        self.shared.forget(self.shared.node(ino), nlookup);
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        let node = self.shared.node(ino);
        if let Some(a) = self.shared.cached_attr(node) {
            let (ttl, _) = lease_window(&self.shared.client);
            reply.attr(&ttl, &self.shared.file_attr(&a));
            return;
        }
        self.spawn(move |s| async move {
            let (t, r) = s.call_attr(Request::GetAttr { node }).await;
            match r {
                Ok(a) => {
                    let ttl = s.keep_attr(t, &a, false);
                    reply.attr(&ttl, &s.file_attr(&a));
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn setattr(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if self.read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        let node = self.shared.node(ino);
        let set = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        self.spawn(move |s| async move {
            let (t, r) = s.call_attr(Request::SetAttr { node, set }).await;
            match r {
                Ok(a) => {
                    let ttl = s.keep_attr(t, &a, true);
                    reply.attr(&ttl, &s.file_attr(&a));
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &fuser::Request, ino: INodeNo, reply: ReplyData) {
        let node = self.shared.node(ino);
        self.spawn(move |s| async move {
            match s.call(Request::Readlink { node }).await.1 {
                Ok(Reply::Link(l)) => reply.data(&l),
                Ok(other) => reply.error(unexpected(other)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn mknod(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Fifos, sockets and devices are not served through Shoal.
            reply.error(Errno::EPERM);
            return;
        }
        self.make_node(req, parent, name, reply, move |dir, name, owner| {
            Request::Create {
                dir,
                name,
                mode: mode & 0o7777,
                how: CreateMode::Guarded,
                owner: Some(owner),
            }
        });
    }

    fn mkdir(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.make_node(req, parent, name, reply, move |dir, name, owner| {
            Request::Mkdir {
                dir,
                name,
                mode: mode & 0o7777,
                owner: Some(owner),
            }
        });
    }

    fn unlink(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        // The server keeps the file's data for whoever still has it open (here or on another
        // node) until the last close.
        self.remove_name(parent, name, reply, |dir, name| Request::Remove {
            dir,
            name,
        });
    }

    fn rmdir(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove_name(parent, name, reply, |dir, name| Request::Rmdir {
            dir,
            name,
        });
    }

    fn symlink(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = target.as_os_str().as_bytes().to_vec();
        self.make_node(req, parent, link_name, reply, move |dir, name, owner| {
            Request::Symlink {
                dir,
                name,
                target,
                owner: Some(owner),
            }
        });
    }

    fn rename(
        &self,
        _req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if self.read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            // RENAME_EXCHANGE / RENAME_WHITEOUT have no counterpart in the protocol.
            reply.error(Errno::EINVAL);
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let from_dir = self.shared.node(parent);
        let to_dir = self.shared.node(newparent);
        let from_name = name.as_bytes().to_vec();
        let to_name = newname.as_bytes().to_vec();
        self.spawn(move |s| async move {
            let (moved, replaced) = {
                let c = s.cache.lock().unwrap();
                (
                    c.peek_entry(from_dir, &from_name),
                    c.peek_entry(to_dir, &to_name),
                )
            };
            let (t, r) = s
                .call(Request::Rename {
                    from_dir,
                    from_name: from_name.clone(),
                    to_dir,
                    to_name: to_name.clone(),
                    // Decided by the server's kernel (renameat2), atomically.
                    no_replace: noreplace,
                })
                .await;
            let nodes: Vec<NodeId> = moved.into_iter().chain(replaced).collect();
            if r.is_ok() {
                s.own_change(t, from_dir, &from_name, NameNow::Gone);
                // The first own_change moved the ticket on: this one only forgets the name.
                s.own_change(t, to_dir, &to_name, NameNow::Unknown);
                s.changed(&nodes);
            } else {
                s.changed(&[&[from_dir, to_dir][..], &nodes].concat());
            }
            match r {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn open(&self, _req: &fuser::Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let wants_write =
            flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        if self.read_only() && wants_write {
            reply.error(Errno::EROFS);
            return;
        }
        let node = self.shared.node(ino);
        self.spawn(move |s| async move {
            let attr = match s.cached_attr(node) {
                Some(a) => a,
                None => {
                    let (t, r) = s.call_attr(Request::GetAttr { node }).await;
                    match r {
                        Ok(a) => {
                            s.keep_attr(t, &a, false);
                            a
                        }
                        Err(e) => {
                            reply.error(e);
                            return;
                        }
                    }
                }
            };
            let keep = {
                let (_, until) = lease_window(&s.client);
                let mut c = s.cache.lock().unwrap();
                s.check(&mut c);
                // Only a lease held continuously since the page cache was filled, with the
                // contents unchanged, lets the kernel keep it; otherwise it drops it now.
                s.client.cache_valid() && c.open_keep_cache(node, &attr, until)
            };
            let fh = s.new_handle(node);
            s.opened(fh).await;
            let flags = if keep {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            };
            debug!(node, keep, "open");
            reply.opened(fh, flags);
        });
    }

    fn read(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let node = self.shared.node(ino);
        self.spawn(move |s| async move {
            let mut out: Vec<u8> = Vec::with_capacity(size as usize);
            while out.len() < size as usize {
                let len = (size - out.len() as u32).min(proto::MAX_IO);
                match s
                    .call(Request::Read {
                        node,
                        offset: offset + out.len() as u64,
                        len,
                    })
                    .await
                    .1
                {
                    Ok(Reply::Data { data, eof }) => {
                        let short = data.is_empty() || eof;
                        out.extend_from_slice(&data);
                        if short {
                            break;
                        }
                    }
                    Ok(other) => {
                        reply.error(unexpected(other));
                        return;
                    }
                    Err(e) => {
                        reply.error(e);
                        return;
                    }
                }
            }
            reply.data(&out);
        });
    }

    fn write(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        let node = self.shared.node(ino);
        let data = data.to_vec();
        let handle = self.shared.handle(fh);
        self.spawn(move |s| async move {
            let _writing = s.write_started(node);
            if let Some(h) = &handle {
                h.dirty.store(true, Ordering::Relaxed);
            }
            let mut done: usize = 0;
            for chunk in data.chunks(proto::MAX_IO as usize) {
                let (t, r) = s
                    .call(Request::Write {
                        node,
                        offset: offset + done as u64,
                        data: chunk.to_vec(),
                    })
                    .await;
                match r {
                    Ok(Reply::Written { count, attr }) => {
                        s.keep_attr(t, &attr, true);
                        done += count as usize;
                        if (count as usize) < chunk.len() {
                            break;
                        }
                    }
                    Ok(other) => {
                        reply.error(unexpected(other));
                        return;
                    }
                    Err(e) => {
                        if done == 0 {
                            reply.error(e);
                            return;
                        }
                        break;
                    }
                }
            }
            reply.written(done as u32);
        });
    }

    fn flush(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let node = self.shared.node(ino);
        let dirty = self
            .shared
            .handle(fh)
            .is_some_and(|h| h.dirty.swap(false, Ordering::Relaxed));
        if !dirty {
            reply.ok();
            return;
        }
        self.spawn(move |s| async move {
            match s.call(Request::Fsync { node }).await.1 {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn release(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let closed = self.shared.close_handle(fh);
        reply.ok();
        if let Some(node) = closed {
            self.spawn(move |s| async move {
                if let Err(e) = s.client.send(Request::Close { node }).await {
                    debug!(node, "close not registered: {e}");
                }
            });
        }
    }

    fn fsync(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let node = self.shared.node(ino);
        self.spawn(move |s| async move {
            match s.call(Request::Fsync { node }).await.1 {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // Kernel offsets: 1 is after ".", 2 after "..", and cookie + 2 after a server entry
        // with that cookie, so a listing resumes statelessly from any offset.
        let dir = self.shared.node(ino);
        if offset == 0 && reply.add(ino, 1, FileType::Directory, ".") {
            reply.ok();
            return;
        }
        if offset <= 1 && reply.add(ino, 2, FileType::Directory, "..") {
            reply.ok();
            return;
        }
        let after = offset.saturating_sub(2);
        self.spawn(move |s| async move {
            let (_, r) = s
                .call(Request::ReadDir {
                    dir,
                    after,
                    max: READDIR_BATCH,
                })
                .await;
            let entries = match r {
                Ok(Reply::Entries { entries, .. }) => entries,
                Ok(other) => {
                    reply.error(unexpected(other));
                    return;
                }
                Err(e) => {
                    reply.error(e);
                    return;
                }
            };
            // Not cached: a listing grants a lease on the directory only, not on the entries'
            // nodes, so their attributes would not be recalled when they change.
            for e in entries {
                let Some(off) = e.cookie.checked_add(2) else {
                    warn!(dir, cookie = e.cookie, "directory cookie out of range");
                    break;
                };
                if reply.add(
                    s.ino(e.attr.node),
                    off,
                    kind(e.attr.kind),
                    OsStr::from_bytes(&e.name),
                ) {
                    break;
                }
            }
            reply.ok();
        });
    }

    // Extended attributes are not shared (the channel has no calls for them). ENOSYS, said
    // quietly: the kernel then stops asking for the rest of the mount, where the default
    // implementation would log a warning first (the kernel asks for security.capability on
    // the first write of every mount).
    fn getxattr(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &fuser::Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &fuser::Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn(move |s| async move {
            match s.call(Request::StatFs).await.1 {
                Ok(Reply::FsStat(f)) => reply.statfs(
                    f.blocks,
                    f.blocks_free,
                    f.blocks_avail,
                    f.files,
                    f.files_free,
                    f.block_size,
                    f.name_max,
                    f.block_size,
                ),
                Ok(other) => reply.error(unexpected(other)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn create(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if self.read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        let dir = self.shared.node(parent);
        let created_name = name.as_bytes().to_vec();
        let how = if flags & libc::O_EXCL != 0 {
            CreateMode::Guarded
        } else {
            CreateMode::Unchecked
        };
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn(move |s| async move {
            let r = s
                .call_attr(Request::Create {
                    dir,
                    name: created_name.clone(),
                    mode: mode & 0o7777,
                    how,
                    owner: Some(Owner { uid, gid }),
                })
                .await;
            match finish_create(&s, dir, &created_name, r).await {
                Ok((ttl, a)) => {
                    {
                        let (_, until) = lease_window(&s.client);
                        s.cache.lock().unwrap().open_keep_cache(a.node, &a, until);
                    }
                    let fh = s.new_handle(a.node);
                    s.opened(fh).await;
                    *s.nodes.lock().unwrap().lookups.entry(a.node).or_insert(0) += 1;
                    reply.created(
                        &ttl,
                        &s.file_attr(&a),
                        Generation(0),
                        fh,
                        FopenFlags::empty(),
                    );
                }
                Err(e) => reply.error(e),
            }
        });
    }
}

/// After this client removed `name` from `dir`: the name is gone (or, if the call failed,
/// what it means is unknown); the removed node's attributes are stale either way.
fn after_removal(
    s: &Shared,
    t: Ticket,
    dir: NodeId,
    name: &[u8],
    child: Option<NodeId>,
    done: bool,
) {
    let now = if done {
        NameNow::Gone
    } else {
        NameNow::Unknown
    };
    s.own_change(t, dir, name, now);
    if let Some(c) = child {
        s.changed(&[c]);
    }
}

/// After a create, mkdir or symlink (the server gave the new node to the caller): `name` in
/// `dir` now names the new node, which this client may cache (it holds its lease).
async fn finish_create(
    s: &Shared,
    dir: NodeId,
    name: &[u8],
    created: (Ticket, Result<Attr, Errno>),
) -> Result<(Duration, Attr), Errno> {
    let (t, r) = created;
    let a = r?;
    s.own_change(t, dir, name, NameNow::Node(&a));
    let (ttl, _) = lease_window(&s.client);
    Ok((ttl, a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_swap_is_a_bijection() {
        for root in [1u64, 2, 77] {
            for x in [1u64, 2, 3, 77, 1000] {
                assert_eq!(swap_root(root, swap_root(root, x)), x);
            }
            assert_eq!(swap_root(root, 1), root);
            assert_eq!(swap_root(root, root), 1);
        }
    }

    #[test]
    fn times_round_trip() {
        for t in [
            Time { secs: 0, nanos: 0 },
            Time {
                secs: 1_700_000_000,
                nanos: 123,
            },
            Time {
                secs: -5,
                nanos: 250_000_000,
            },
        ] {
            assert_eq!(to_time(to_system_time(t)), t);
        }
    }
}
