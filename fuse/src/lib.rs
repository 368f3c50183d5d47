//! Shoal's FUSE client: `shoal mount ADDR:PORT[/SUBDIR] MOUNTPOINT`.
//!
//! A mount talks to the share-manager over the channel (`shoal_nfs::channel`) and lets the
//! kernel and itself cache only what a lease covers, so a change made on one node is seen by
//! every other node the moment the change returns.
//!
//! - [`cache`]: the daemon's lease-bound cache (attributes, lookups, page-cache continuity)
//!   and the one place that decides what may be served without the server.
//! - [`fs`]: the `fuser::Filesystem` implementation; translation only. Requests run on a
//!   tokio runtime so a slow call never blocks the others.
//! - [`recall`]: the thread that honours recalls (daemon cache, kernel `inval_inode`, ack).
//! - this file: [`mount`]: connect, mount, run, and unmount on signal or external unmount.
//!
//! Caching rules, in short: writes are write-through; attribute TTLs given to the kernel never
//! exceed the time the lease is still trusted; dentries get TTL 0 and every lookup is
//! answered from the daemon's leased cache; an open keeps the page cache only if the lease on
//! the file was held continuously since it was filled; a recall invalidates the kernel's
//! inode (attributes and pages) before it is acknowledged (or after [`recall::INVAL_WAIT`]).
//!
//! Unlink while open: every open and close is registered with the server (`Open`/`Close`,
//! sent without waiting), and the server keeps a file whose last name is removed or
//! replaced, by any client, until its last close. So a file unlinked here or on another node
//! while open here stays readable and writable through its handle.

pub mod cache;
pub mod fs;
pub mod mountinfo;
pub mod recall;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, OnceLock, Weak};
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};
use shoal_nfs::channel::client::{Client, ClientError, ClientOptions};
use shoal_nfs::channel::proto::{FileKind, NodeId, Reply, Request};
use tracing::{debug, info, warn};

/// What to mount and how.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// `HOST:PORT` of the share's NFS port (the channel is on the next port up).
    pub share: String,
    /// A directory of the export to mount instead of its root, e.g. `vol1/data`.
    pub subdir: Option<String>,
    pub mountpoint: PathBuf,
    pub read_only: bool,
    /// Client name shown in the server's logs.
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot start the client runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot connect to share {share}: {source}")]
    Connect { share: String, source: ClientError },
    #[error("share {share} has no directory {subdir:?}: {source}")]
    Subdir {
        share: String,
        subdir: String,
        source: ClientError,
    },
    #[error("{subdir:?} on share {share} is not a directory")]
    NotADirectory { share: String, subdir: String },
    #[error("mountpoint {0} is not an existing directory")]
    Mountpoint(PathBuf),
    #[error("cannot mount at {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("FUSE session at {path} ended with an error: {source}")]
    Session {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long after a signal's unmount the session may take to end before the mount is
/// detached lazily and the FUSE connection aborted.
const UNMOUNT_GRACE: Duration = Duration::from_secs(3);

/// Events that end [`mount`]'s wait.
enum Event {
    /// The session loop returned (the filesystem was unmounted).
    Ended(std::io::Result<()>),
    /// SIGTERM or SIGINT.
    Signal(&'static str),
}

/// Connects (failing within ~5 s with a clear error if the share is unreachable), mounts, and
/// blocks until the mount is unmounted (`fusermount3 -u` / `umount`) or the process gets
/// SIGTERM/SIGINT, in which case it unmounts itself. Returns `Ok(())` leaving no mount behind.
pub fn mount(opts: MountOptions) -> Result<(), MountError> {
    if !opts.mountpoint.is_dir() {
        return Err(MountError::Mountpoint(opts.mountpoint.clone()));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shoal-fuse-rt")
        .enable_all()
        .build()
        .map_err(MountError::Runtime)?;
    // The daemon's cache drops recalled nodes inside the connection's reader, before any
    // reply that follows the recall is delivered (the kernel's caches are invalidated after,
    // on the recall thread, before the ack).
    let cache_of: Arc<OnceLock<Weak<fs::Shared>>> = Arc::default();
    let hook_cache = cache_of.clone();
    let copts = ClientOptions {
        name: opts.name.clone(),
        on_recall: Some(Arc::new(move |nodes: &[NodeId]| {
            if let Some(s) = hook_cache.get().and_then(|w| w.upgrade()) {
                s.cache.lock().unwrap().recall(nodes);
            }
        })),
        ..ClientOptions::default()
    };
    let (client, session, recalls) =
        rt.block_on(Client::connect(&opts.share, copts))
            .map_err(|source| MountError::Connect {
                share: opts.share.clone(),
                source,
            })?;
    let subdir = opts
        .subdir
        .as_deref()
        .map(|s| s.trim_matches('/'))
        .filter(|s| !s.is_empty());
    let root = match subdir {
        None => session.root.clone(),
        Some(path) => {
            let err = |source| MountError::Subdir {
                share: opts.share.clone(),
                subdir: path.to_string(),
                source,
            };
            match rt
                .block_on(client.call(Request::Resolve {
                    path: path.to_string(),
                }))
                .map_err(err)?
            {
                Reply::Attr(a) => a,
                other => {
                    return Err(err(ClientError::Protocol(format!(
                        "unexpected reply from share: {other:?}"
                    ))));
                }
            }
        }
    };
    if root.kind != FileKind::Dir {
        return Err(MountError::NotADirectory {
            share: opts.share.clone(),
            subdir: subdir.unwrap_or("/").to_string(),
        });
    }

    let shared = fs::Shared::new(client, rt.handle().clone(), &root, opts.read_only);
    let _ = cache_of.set(Arc::downgrade(&shared));
    let fsname = match subdir {
        Some(s) => format!("shoal:{}/{}", opts.share, s),
        None => format!("shoal:{}", opts.share),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype("shoal".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    if let Some(helper) = find_in_path("fusermount3") {
        // fusermount3 then stays behind and unmounts if this process dies without doing it
        // (SIGKILL, crash), so a dead client never leaves a "transport endpoint is not
        // connected" mount for the pod.
        debug!(helper = %helper.display(), "mounting with auto_unmount");
        config.mount_options.push(MountOption::AutoUnmount);
    } else {
        warn!("fusermount3 not found: a killed client would leave its mount behind");
    }
    config.acl = SessionACL::All;
    let filesystem = fs::ShoalFs {
        shared: shared.clone(),
    };
    let mut session =
        fuser::Session::new(filesystem, &opts.mountpoint, &config).map_err(|source| {
            MountError::Mount {
                path: opts.mountpoint.clone(),
                source,
            }
        })?;
    info!(share = %opts.share, mountpoint = %opts.mountpoint.display(), root = root.node, "mounted");
    let minor = mount_minor(&opts.mountpoint);
    let notifier = session.notifier();
    let mut unmounter = session.unmount_callable();

    // Recalls: forwarded from the client's stream to the invalidation thread, which is also
    // told to invalidate everything when the session is replaced.
    let (jobs_tx, jobs_rx) = mpsc::channel::<recall::Job>();
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("shoal-recall".into())
            .spawn(move || recall::run(shared, notifier, jobs_rx))
            .map_err(MountError::Thread)?;
    }
    let background = rt.spawn(background(shared.clone(), recalls, jobs_tx));

    let (ev_tx, ev_rx) = mpsc::channel::<Event>();
    let signals = {
        let ev_tx = ev_tx.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                warn!("cannot install signal handlers");
                return;
            };
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let _ = ev_tx.send(Event::Signal(name));
        })
    };
    std::thread::Builder::new()
        .name("shoal-fuse".into())
        .spawn(move || {
            let _ = ev_tx.send(Event::Ended(session.run()));
        })
        .map_err(MountError::Thread)?;

    let mountpoint = opts.mountpoint.clone();
    let ended = match ev_rx.recv() {
        Ok(Event::Ended(r)) => r,
        Ok(Event::Signal(name)) => {
            info!(signal = name, mountpoint = %mountpoint.display(), "unmounting");
            if let Err(e) = unmounter.unmount() {
                warn!("unmount failed ({e}); detaching lazily");
                detach(&mountpoint);
            }
            // With auto_unmount, fuser's unmount only lets go of fusermount3, which unmounts
            // when it notices; unmount here too so the session ends now. A busy mount refuses
            // (EBUSY) and gets the grace period of `wait_end`.
            umount(&mountpoint);
            wait_end(&ev_rx, &mountpoint, minor)
        }
        Err(_) => Ok(()),
    };
    signals.abort();
    background.abort();
    drop(shared);
    rt.shutdown_timeout(Duration::from_secs(1));
    info!(mountpoint = %mountpoint.display(), "unmounted");
    ended.map_err(|source| MountError::Session {
        path: mountpoint,
        source,
    })
}

/// Waits for the session loop after an unmount; if files kept it busy, detaches the mount and
/// aborts the FUSE connection so the loop ends.
fn wait_end(
    ev_rx: &mpsc::Receiver<Event>,
    mountpoint: &Path,
    minor: Option<u32>,
) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + UNMOUNT_GRACE;
    let mut aborted = false;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match ev_rx.recv_timeout(left.max(Duration::from_millis(10))) {
            Ok(Event::Ended(r)) => return r,
            Ok(Event::Signal(_)) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) if !aborted => {
                warn!("FUSE session still busy; detaching and aborting the connection");
                detach(mountpoint);
                abort_connection(minor);
                aborted = true;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warn!("FUSE session did not end; leaving it to process exit");
                return Ok(());
            }
        }
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Unmounts `path` if nothing uses it; errors (not mounted any more, busy, not root) are left
/// to the caller's fallbacks.
fn umount(path: &Path) {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; umount2 only reads
    // it and has no other memory effects on this process.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    if rc != 0 {
        debug!(
            "umount2({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// Lazily detaches the mount at `path` (MNT_DETACH): gone from the namespace at once, torn
/// down when the last user lets go.
fn detach(path: &Path) {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; umount2 only reads
    // it and has no other memory effects on this process.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        debug!(
            "umount2({}, MNT_DETACH): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// The device minor of the mount at `path`, from the mount table (no FUSE request is made:
/// the session loop may not be running yet).
fn mount_minor(path: &Path) -> Option<u32> {
    let m = mountinfo::find_mount(path).ok()??;
    m.dev.split_once(':')?.1.parse().ok()
}

/// Aborts the FUSE connection `minor` through fusectl (when fusectl is mounted), so a session
/// loop held by open files ends.
fn abort_connection(minor: Option<u32>) {
    let Some(minor) = minor else { return };
    let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
    match std::fs::write(&abort, b"1") {
        Ok(()) => info!("aborted FUSE connection {minor}"),
        Err(e) => debug!("cannot abort FUSE connection via {abort}: {e}"),
    }
}

/// Background work on the runtime: forwards recalls, notices a replaced session, and sends
/// batched releases of forgotten nodes.
async fn background(
    shared: std::sync::Arc<fs::Shared>,
    mut recalls: tokio::sync::mpsc::UnboundedReceiver<shoal_nfs::channel::client::Recall>,
    jobs: mpsc::Sender<recall::Job>,
) {
    let mut generation = shared.client.generation();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            r = recalls.recv() => {
                let Some(r) = r else { break };
                if jobs.send(recall::Job::Recall(r)).is_err() {
                    break;
                }
            }
            _ = tick.tick() => {
                ticks += 1;
                let now = shared.client.generation();
                if now != generation {
                    generation = now;
                    if jobs.send(recall::Job::All).is_err() {
                        break;
                    }
                    shared.reopen_all().await;
                }
                if ticks.is_multiple_of(4) {
                    shared.flush_releases().await;
                }
            }
        }
    }
}
