//! Honouring the server's recalls: drop the daemon's cache, invalidate the kernel's, ack.
//!
//! Owns the dedicated invalidation thread. Kernel invalidations are sent from here and never
//! from a FUSE request handler: `inval_inode` can block on a page locked by an in-flight
//! write on this very node, whose handler may itself be waiting for the server, which waits
//! for this ack. So an invalidation still running after [`INVAL_WAIT`] while a write to one
//! of its nodes is in flight here is left to finish in the background and the recall is
//! acked anyway. Any other lock (a read in flight) is waited for, up to [`INVAL_GIVE_UP`]:
//! acking before the pages are gone would let old pages outlive the change.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use fuser::Notifier;
use shoal_nfs::channel::client::Recall;
use shoal_nfs::channel::proto::NodeId;
use tracing::{debug, info, warn};

use crate::fs::Shared;

/// How long a recall's kernel invalidation may take before the ack goes out, if a write to
/// one of its nodes is in flight here (the write may be what the invalidation waits for).
pub const INVAL_WAIT: Duration = Duration::from_secs(1);

/// How long an invalidation is waited for at most; past it the server would revoke the
/// session anyway.
pub const INVAL_GIVE_UP: Duration = Duration::from_secs(8);

/// Work for the invalidation thread.
#[derive(Debug)]
pub enum Job {
    /// A recall from the server.
    Recall(Recall),
    /// The session was replaced: every lease is gone, invalidate everything the kernel holds.
    All,
}

/// Runs the invalidation loop until every sender of `jobs` is gone.
pub fn run(shared: Arc<Shared>, notifier: Notifier, jobs: mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Recall(r) => {
                shared.stats.recalls.fetch_add(1, Ordering::Relaxed);
                shared.cache.lock().unwrap().recall(&r.nodes);
                invalidate(&shared, &notifier, r.nodes.clone());
                shared.client.ack_recall(r.recall);
                debug!(recall = r.recall, nodes = ?r.nodes, "recall honoured");
            }
            Job::All => {
                shared.cache.lock().unwrap().clear();
                let nodes = shared.known_nodes();
                info!(
                    count = nodes.len(),
                    "new session: invalidating every cached node"
                );
                invalidate(&shared, &notifier, nodes);
            }
        }
        let s = &shared.stats;
        let c = shared.cache.lock().unwrap();
        debug!(
            recalls = s.recalls.load(Ordering::Relaxed),
            invalidations = s.invalidations.load(Ordering::Relaxed),
            slow = s.slow_invalidations.load(Ordering::Relaxed),
            calls = s.calls.load(Ordering::Relaxed),
            cache_hits = c.hits,
            cache_misses = c.misses,
            "counters"
        );
    }
}

/// Invalidates the kernel's attributes and page cache of `nodes` on a helper thread, waiting
/// at most [`INVAL_WAIT`] for it.
fn invalidate(shared: &Arc<Shared>, notifier: &Notifier, nodes: Vec<NodeId>) {
    if nodes.is_empty() {
        return;
    }
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let inos: Vec<_> = nodes.iter().map(|n| shared.ino(*n)).collect();
    let notifier = notifier.clone();
    let count = inos.len() as u64;
    let spawned = std::thread::Builder::new()
        .name("shoal-inval".into())
        .spawn(move || {
            for ino in inos {
                // ENOENT (an inode the kernel does not know) is already ignored by fuser.
                if let Err(e) = notifier.inval_inode(ino, 0, 0) {
                    debug!(%ino, "inval_inode: {e}");
                }
            }
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        warn!("cannot start an invalidation thread: {e}");
        return;
    }
    shared
        .stats
        .invalidations
        .fetch_add(count, Ordering::Relaxed);
    let started = std::time::Instant::now();
    loop {
        match done_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let waited = started.elapsed();
        let writing = shared.writing_any(&nodes);
        if (waited >= INVAL_WAIT && writing) || waited >= INVAL_GIVE_UP {
            shared
                .stats
                .slow_invalidations
                .fetch_add(1, Ordering::Relaxed);
            warn!(
                ?nodes,
                writing,
                "kernel invalidation still running after {waited:?}; acknowledging, it \
                 completes in the background"
            );
            return;
        }
    }
}
