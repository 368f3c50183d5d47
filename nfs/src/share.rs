//! The share: a volume and its lease table, and the one place that says which nodes each
//! change affects and in which order a change, its recall and its acknowledgement happen.
//!
//! Every front end (NFSv3, the FUSE clients' channel) calls these methods; none of them
//! touches the volume or the lease table directly for a change. A change is made on disk,
//! then the leases on the nodes it affects are recalled from every other holder, and only
//! when the recall is over does the method return so the front end can acknowledge it.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use tracing::debug;

use crate::lease::{LeaseTable, Session, SessionId};
use crate::types::{Attr, CreateMode, FileKind, NodeId, Owner, SetAttr};
use crate::volume::{VolResult, Volume};

pub struct Share {
    pub volume: Volume,
    pub leases: LeaseTable,
    /// Files clients have open: node to open count per session. A file open anywhere keeps
    /// its data when its last name is removed (it becomes an orphan until its last close).
    opens: DashMap<NodeId, HashMap<SessionId, u32>>,
    /// Open files whose last name was removed, kept in the volume's orphans directory.
    orphans: DashMap<NodeId, ()>,
}

impl Share {
    pub fn new(volume: Volume, leases: LeaseTable) -> Arc<Share> {
        Arc::new(Share {
            volume,
            leases,
            opens: DashMap::new(),
            orphans: DashMap::new(),
        })
    }

    /// `session` opened `node`.
    pub fn open(&self, session: SessionId, node: NodeId) {
        *self
            .opens
            .entry(node)
            .or_default()
            .entry(session)
            .or_insert(0) += 1;
    }

    /// `session` closed `node` once.
    pub fn close(&self, session: SessionId, node: NodeId) {
        let closed = match self.opens.get_mut(&node) {
            Some(mut per) => {
                if let Some(n) = per.get_mut(&session) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        per.remove(&session);
                    }
                }
                per.is_empty()
            }
            None => false,
        };
        if closed {
            self.opens.remove_if(&node, |_, per| per.is_empty());
            self.reap_if_closed(node);
        }
    }

    /// A session ended: whatever it had open is closed.
    pub fn session_ended(&self, session: SessionId) {
        let mut closed = Vec::new();
        self.opens.retain(|node, per| {
            per.remove(&session);
            if per.is_empty() {
                closed.push(*node);
            }
            !per.is_empty()
        });
        for node in closed {
            self.reap_if_closed(node);
        }
    }

    fn is_open(&self, node: NodeId) -> bool {
        self.opens.contains_key(&node)
    }

    fn reap_if_closed(&self, node: NodeId) {
        if !self.is_open(node) && self.orphans.remove(&node).is_some() {
            self.volume.reap_orphan(node);
        }
    }

    /// Before `name` in `dir` loses its file (remove, or rename over it): if that is the
    /// file's last name and a client has it open, link it into the orphans directory so its
    /// data outlives the name. Returns the node to adopt once the change is made.
    fn keep_if_open(&self, dir: NodeId, name: &[u8], except: Option<NodeId>) -> Option<NodeId> {
        if self.opens.is_empty() {
            return None; // nothing open anywhere: no lookup on the hot path
        }
        let victim = self.volume.lookup(dir, name).ok()?;
        if victim.kind != FileKind::File || victim.nlink != 1 || Some(victim.node) == except {
            return None;
        }
        if !self.is_open(victim.node) {
            return None;
        }
        match self.volume.keep_orphan(dir, name, victim.node) {
            Ok(()) => Some(victim.node),
            Err(e) => {
                debug!(node = victim.node, "cannot keep open file: {}", e.message);
                None
            }
        }
    }

    /// After the change: the kept node's only name is now its orphan link (or, if the
    /// change failed, the extra link goes again).
    fn settle_orphan(&self, kept: Option<NodeId>, changed: bool) {
        let Some(node) = kept else { return };
        if changed && self.volume.adopt_orphan(node).is_ok() {
            self.orphans.insert(node, ());
            debug!(
                node,
                "removed while open: kept as an orphan until its last close"
            );
            self.reap_if_closed(node);
        } else {
            self.volume.reap_orphan(node);
        }
    }

    /// Recalls `nodes` from everyone but `by` and waits until that is done.
    async fn recall(&self, by: Option<SessionId>, nodes: &[NodeId]) {
        self.leases.recall(by, nodes).wait(&self.leases).await;
    }

    pub async fn write(
        &self,
        by: Option<SessionId>,
        node: NodeId,
        offset: u64,
        data: &[u8],
    ) -> VolResult<Attr> {
        let attr = self.volume.write(node, offset, data)?;
        self.recall(by, &[node]).await;
        Ok(attr)
    }

    pub async fn setattr(
        &self,
        by: Option<SessionId>,
        node: NodeId,
        set: &SetAttr,
    ) -> VolResult<Attr> {
        let attr = self.volume.setattr(node, set)?;
        self.recall(by, &[node]).await;
        Ok(attr)
    }

    pub async fn create(
        &self,
        by: Option<SessionId>,
        dir: NodeId,
        name: &[u8],
        mode: u32,
        how: CreateMode,
        owner: Option<Owner>,
    ) -> VolResult<Attr> {
        let attr = self.volume.create(dir, name, mode, how, owner)?;
        // An UNCHECKED create of an existing file changes nothing but the directory's view.
        self.recall(by, &[dir]).await;
        Ok(attr)
    }

    pub async fn mkdir(
        &self,
        by: Option<SessionId>,
        dir: NodeId,
        name: &[u8],
        mode: u32,
        owner: Option<Owner>,
    ) -> VolResult<Attr> {
        let attr = self.volume.mkdir(dir, name, mode, owner)?;
        self.recall(by, &[dir]).await;
        Ok(attr)
    }

    pub async fn symlink(
        &self,
        by: Option<SessionId>,
        dir: NodeId,
        name: &[u8],
        target: &[u8],
        owner: Option<Owner>,
    ) -> VolResult<Attr> {
        let attr = self.volume.symlink(dir, name, target, owner)?;
        self.recall(by, &[dir]).await;
        Ok(attr)
    }

    /// Unlinks; the removed node is recalled too (its link count and ctime changed).
    /// A file open on some client keeps its data until its last close.
    pub async fn remove(&self, by: Option<SessionId>, dir: NodeId, name: &[u8]) -> VolResult<()> {
        let kept = self.keep_if_open(dir, name, None);
        let removed = self.volume.remove(dir, name);
        self.settle_orphan(kept, removed.is_ok());
        let node = removed?;
        self.recall(by, &[dir, node]).await;
        Ok(())
    }

    pub async fn rmdir(&self, by: Option<SessionId>, dir: NodeId, name: &[u8]) -> VolResult<()> {
        let node = self.volume.rmdir(dir, name)?;
        self.recall(by, &[dir, node]).await;
        Ok(())
    }

    /// Renames; both directories, the moved node and a replaced node are recalled. A
    /// replaced file open on some client keeps its data until its last close.
    pub async fn rename(
        &self,
        by: Option<SessionId>,
        from_dir: NodeId,
        from: &[u8],
        to_dir: NodeId,
        to: &[u8],
        no_replace: bool,
    ) -> VolResult<()> {
        let kept = if no_replace || self.opens.is_empty() {
            None
        } else {
            let moving = self.volume.lookup(from_dir, from).ok().map(|a| a.node);
            self.keep_if_open(to_dir, to, moving)
        };
        let renamed = self.volume.rename(from_dir, from, to_dir, to, no_replace);
        self.settle_orphan(kept, renamed.is_ok());
        let (moved, replaced) = renamed?;
        let mut nodes = vec![from_dir, moved];
        if to_dir != from_dir {
            nodes.push(to_dir);
        }
        nodes.extend(replaced);
        self.recall(by, &nodes).await;
        Ok(())
    }

    /// A read whose reply `session` will cache. Grants the leases (`known` before reading,
    /// plus whatever `nodes_of` finds in the result, then reads again), and hands the result
    /// to `deliver` only if no recall of those nodes was queued to the session meanwhile;
    /// otherwise reads again, so a client never caches data older than a recall it received.
    pub fn cached_read<T>(
        &self,
        session: &Session,
        known: &[NodeId],
        op: impl Fn(&Volume) -> VolResult<T>,
        nodes_of: impl Fn(&T) -> Vec<NodeId>,
        deliver: impl FnOnce(VolResult<T>),
    ) {
        let mut deliver = Some(deliver);
        loop {
            let mark = session.recall_mark();
            self.leases.grant(session.id, known);
            let mut result = op(&self.volume);
            let mut nodes = known.to_vec();
            if let Ok(r) = &result {
                let found: Vec<NodeId> = nodes_of(r)
                    .into_iter()
                    .filter(|n| !known.contains(n))
                    .collect();
                if !found.is_empty() {
                    // Granted after the first read: read again so nothing predates the grant.
                    self.leases.grant(session.id, &found);
                    nodes.extend(found);
                    result = op(&self.volume);
                }
            }
            let mut slot = Some(result);
            let sent = session.reply_unless_recalled(mark, &nodes, || {
                (deliver.take().expect("delivered once"))(slot.take().expect("one result"))
            });
            if sent {
                return;
            }
        }
    }
}
