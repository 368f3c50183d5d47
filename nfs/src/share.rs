//! The share: a volume and its lease table, and the one place that says which nodes each
//! change affects and in which order a change, its recall and its acknowledgement happen.
//!
//! Every front end (NFSv3, the FUSE clients' channel) calls these methods; none of them
//! touches the volume or the lease table directly for a change. A change is made on disk,
//! then the leases on the nodes it affects are recalled from every other holder, and only
//! when the recall is over does the method return so the front end can acknowledge it.

use std::sync::Arc;

use crate::lease::{LeaseTable, Session, SessionId};
use crate::types::{Attr, CreateMode, NodeId, SetAttr};
use crate::volume::{VolResult, Volume};

pub struct Share {
    pub volume: Volume,
    pub leases: LeaseTable,
}

impl Share {
    pub fn new(volume: Volume, leases: LeaseTable) -> Arc<Share> {
        Arc::new(Share { volume, leases })
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
    ) -> VolResult<Attr> {
        let attr = self.volume.create(dir, name, mode, how)?;
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
    ) -> VolResult<Attr> {
        let attr = self.volume.mkdir(dir, name, mode)?;
        self.recall(by, &[dir]).await;
        Ok(attr)
    }

    pub async fn symlink(
        &self,
        by: Option<SessionId>,
        dir: NodeId,
        name: &[u8],
        target: &[u8],
    ) -> VolResult<Attr> {
        let attr = self.volume.symlink(dir, name, target)?;
        self.recall(by, &[dir]).await;
        Ok(attr)
    }

    /// Unlinks; the removed node is recalled too (its link count and ctime changed).
    pub async fn remove(&self, by: Option<SessionId>, dir: NodeId, name: &[u8]) -> VolResult<()> {
        let node = self.volume.remove(dir, name)?;
        self.recall(by, &[dir, node]).await;
        Ok(())
    }

    pub async fn rmdir(&self, by: Option<SessionId>, dir: NodeId, name: &[u8]) -> VolResult<()> {
        let node = self.volume.rmdir(dir, name)?;
        self.recall(by, &[dir, node]).await;
        Ok(())
    }

    /// Renames; both directories, the moved node and a replaced node are recalled.
    pub async fn rename(
        &self,
        by: Option<SessionId>,
        from_dir: NodeId,
        from: &[u8],
        to_dir: NodeId,
        to: &[u8],
    ) -> VolResult<()> {
        let (moved, replaced) = self.volume.rename(from_dir, from, to_dir, to)?;
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
