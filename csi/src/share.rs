//! The controller's view of the share: `volumes/<id>` directories and their capacity records,
//! created, inspected and removed through the channel client, never through a local path.
//!
//! Owns one lazily opened [`Client`] and answers its recalls at once (the controller caches
//! nothing, so a recall never has to wait for it). Ids reaching this module are already
//! valid (see [`crate::volume`]); this module only talks to the share.

use shoal_nfs::channel::client::{Client, ClientError, ClientOptions};
use shoal_nfs::channel::proto::{Attr, CreateMode, FileKind, NodeId, Reply, Request, SetAttr};
use tokio::sync::Mutex;
use tracing::{debug, info};

use crate::volume::VOLUMES_DIR;

/// Entries asked for per ReadDir while removing a tree.
const READDIR_BATCH: u32 = 512;
/// How often an `rmdir` that found its directory refilled (a writer still active) is retried
/// before DeleteVolume gives up and lets the CO retry later.
const RMDIR_RETRIES: u32 = 5;

/// Errors of a share operation.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("share {addr}: {source}")]
    Client { addr: String, source: ClientError },
    #[error("share {addr}: {path} exists but is not a directory")]
    NotADirectory { addr: String, path: String },
    #[error("share {addr}: unexpected reply to {op}: {reply}")]
    Unexpected {
        addr: String,
        op: &'static str,
        reply: String,
    },
    #[error("share {addr}: {path} keeps being refilled while it is removed")]
    Busy { addr: String, path: String },
}

impl ShareError {
    /// True if the share could not be reached (as opposed to refusing an operation).
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            ShareError::Client {
                source: ClientError::Connect { .. }
                    | ClientError::Timeout(..)
                    | ClientError::Lost
                    | ClientError::Refused(_),
                ..
            }
        )
    }

    /// The errno the share answered with, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ShareError::Client {
                source: ClientError::Remote { errno, .. },
                ..
            } => Some(*errno),
            _ => None,
        }
    }
}

/// One share, as the controller uses it.
pub struct Share {
    addr: String,
    conn: Mutex<Option<(Client, NodeId)>>,
}

impl Share {
    /// A share at `addr` (`HOST:PORT`); nothing is connected until the first operation.
    pub fn new(addr: String) -> Share {
        Share {
            addr,
            conn: Mutex::new(None),
        }
    }

    /// The share's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The client and the export's root node, connecting on first use. The client reconnects
    /// by itself after a loss; a failed first connect is retried by the next call.
    async fn client(&self) -> Result<(Client, NodeId), ShareError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let opts = ClientOptions {
            name: format!("shoal-csi-controller-{}", std::process::id()),
            // The controller caches nothing: no pod's change should wait for it.
            caching: false,
            ..ClientOptions::default()
        };
        let (client, session, mut recalls) = Client::connect(&self.addr, opts)
            .await
            .map_err(|e| self.err(e))?;
        info!(share = %self.addr, session = session.id, "controller connected to share");
        let acker = client.clone();
        tokio::spawn(async move {
            while let Some(recall) = recalls.recv().await {
                debug!(recall = recall.recall, "acknowledging recall");
                acker.ack_recall(recall.recall);
            }
        });
        let c = (client, session.root.node);
        *slot = Some(c.clone());
        Ok(c)
    }

    fn err(&self, source: ClientError) -> ShareError {
        ShareError::Client {
            addr: self.addr.clone(),
            source,
        }
    }

    fn unexpected(&self, op: &'static str, reply: Reply) -> ShareError {
        ShareError::Unexpected {
            addr: self.addr.clone(),
            op,
            reply: format!("{reply:?}"),
        }
    }

    async fn call(&self, request: Request) -> Result<Reply, ShareError> {
        let (client, _) = self.client().await?;
        client.call(request).await.map_err(|e| self.err(e))
    }

    /// `name` in `dir`, or `None` if it does not exist.
    async fn lookup(&self, dir: NodeId, name: &str) -> Result<Option<Attr>, ShareError> {
        let request = Request::Lookup {
            dir,
            name: name.as_bytes().to_vec(),
        };
        match self.call(request).await {
            Ok(Reply::Attr(a)) => Ok(Some(a)),
            Ok(other) => Err(self.unexpected("Lookup", other)),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The directory `name` in `dir`, made with `mode` if missing (a concurrent maker wins
    /// harmlessly). Returns it and whether this call made it.
    async fn ensure_dir(
        &self,
        dir: NodeId,
        name: &str,
        mode: u32,
        path: &str,
    ) -> Result<(Attr, bool), ShareError> {
        if let Some(a) = self.lookup(dir, name).await? {
            return self.as_dir(a, path).map(|a| (a, false));
        }
        let request = Request::Mkdir {
            dir,
            name: name.as_bytes().to_vec(),
            mode,
            owner: None,
        };
        match self.call(request).await {
            Ok(Reply::Attr(a)) => Ok((a, true)),
            Ok(other) => Err(self.unexpected("Mkdir", other)),
            Err(e) if e.errno() == Some(libc::EEXIST) => match self.lookup(dir, name).await? {
                Some(a) => self.as_dir(a, path).map(|a| (a, false)),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn as_dir(&self, a: Attr, path: &str) -> Result<Attr, ShareError> {
        if a.kind == FileKind::Dir {
            Ok(a)
        } else {
            Err(ShareError::NotADirectory {
                addr: self.addr.clone(),
                path: path.to_string(),
            })
        }
    }

    /// The `volumes/` directory, created if `create` and missing.
    async fn volumes_dir(&self, create: bool) -> Result<Option<NodeId>, ShareError> {
        let (_, root) = self.client().await?;
        if create {
            let (a, made) = self
                .ensure_dir(root, VOLUMES_DIR, 0o755, VOLUMES_DIR)
                .await?;
            if made {
                info!(share = %self.addr, "created {VOLUMES_DIR}/");
            }
            return Ok(Some(a.node));
        }
        match self.lookup(root, VOLUMES_DIR).await? {
            Some(a) => self.as_dir(a, VOLUMES_DIR).map(|a| Some(a.node)),
            None => Ok(None),
        }
    }

    /// Makes the directory of volume `id` with permission bits `mode` if it is missing.
    /// Returns true if this call made it.
    pub async fn create_volume_dir(&self, id: &str, mode: u32) -> Result<bool, ShareError> {
        let vols = self.volumes_dir(true).await?.expect("created");
        let path = format!("{VOLUMES_DIR}/{id}");
        let (a, made) = self.ensure_dir(vols, id, mode, &path).await?;
        if made {
            // Mkdir is subject to the server's umask; set the bits the volume asked for.
            let set = SetAttr {
                mode: Some(mode),
                ..SetAttr::default()
            };
            self.call(Request::SetAttr { node: a.node, set }).await?;
            info!(share = %self.addr, volume = id, mode = format!("{mode:o}"), "created volume directory");
        }
        Ok(made)
    }

    /// True if the directory of volume `id` exists.
    pub async fn volume_exists(&self, id: &str) -> Result<bool, ShareError> {
        let Some(vols) = self.volumes_dir(false).await? else {
            return Ok(false);
        };
        Ok(self
            .lookup(vols, id)
            .await?
            .is_some_and(|a| a.kind == FileKind::Dir))
    }

    /// True if `path` (relative to the export's root) is a directory on the share: the
    /// node's check that a volume exists before mounting it.
    pub async fn dir_exists(&self, path: &str) -> Result<bool, ShareError> {
        match self
            .call(Request::Resolve {
                path: path.to_string(),
            })
            .await
        {
            Ok(Reply::Attr(a)) => Ok(a.kind == FileKind::Dir),
            Ok(other) => Err(self.unexpected("Resolve", other)),
            Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The capacity recorded when volume `id` was created, if a record exists.
    pub async fn read_capacity(&self, id: &str) -> Result<Option<i64>, ShareError> {
        let Some(vols) = self.volumes_dir(false).await? else {
            return Ok(None);
        };
        let Some(a) = self.lookup(vols, &record_name(id)).await? else {
            return Ok(None);
        };
        let request = Request::Read {
            node: a.node,
            offset: 0,
            len: 4096,
        };
        let data = match self.call(request).await? {
            Reply::Data { data, .. } => data,
            other => return Err(self.unexpected("Read", other)),
        };
        Ok(parse_record(&data))
    }

    /// Records the capacity volume `id` was created with, replacing an earlier record.
    /// The record is a hidden sibling of the volume's directory (`volumes/.<id>.capacity`),
    /// outside what any pod mounts; ids never start with `.`, so it cannot be a volume.
    pub async fn write_capacity(&self, id: &str, capacity: i64) -> Result<(), ShareError> {
        let vols = self.volumes_dir(true).await?.expect("created");
        let request = Request::Create {
            dir: vols,
            name: record_name(id).into_bytes(),
            mode: 0o644,
            how: CreateMode::Unchecked,
            owner: None,
        };
        let node = match self.call(request).await? {
            Reply::Attr(a) => a.node,
            other => return Err(self.unexpected("Create", other)),
        };
        let data = format!("capacity_bytes={capacity}\n").into_bytes();
        let len = data.len() as u64;
        match self
            .call(Request::Write {
                node,
                offset: 0,
                data,
            })
            .await?
        {
            Reply::Written { .. } => {}
            other => return Err(self.unexpected("Write", other)),
        }
        let set = SetAttr {
            size: Some(len),
            ..SetAttr::default()
        };
        self.call(Request::SetAttr { node, set }).await?;
        self.call(Request::Fsync { node }).await?;
        Ok(())
    }

    /// Removes volume `id`: its whole directory tree and its capacity record. Removing a
    /// volume that does not exist (or no longer does) succeeds.
    pub async fn delete_volume(&self, id: &str) -> Result<(), ShareError> {
        let Some(vols) = self.volumes_dir(false).await? else {
            return Ok(());
        };
        self.remove_tree(vols, id).await?;
        match self
            .call(Request::Remove {
                dir: vols,
                name: record_name(id).into_bytes(),
            })
            .await
        {
            Ok(_) => {}
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        info!(share = %self.addr, volume = id, "removed volume");
        Ok(())
    }

    /// Removes `name` in `parent` and, if it is a directory, everything below it, depth first
    /// with an explicit stack (trees can be deeper than the async stack should be). Entries
    /// that vanish underneath (a concurrent remover) are not errors.
    async fn remove_tree(&self, parent: NodeId, name: &str) -> Result<(), ShareError> {
        let Some(top) = self.lookup(parent, name).await? else {
            return Ok(());
        };
        if top.kind != FileKind::Dir {
            return self.remove_file(parent, name.as_bytes()).await;
        }
        // (parent, name, node, path for messages, rmdir attempts)
        let mut stack: Vec<(NodeId, Vec<u8>, NodeId, String, u32)> = vec![(
            parent,
            name.as_bytes().to_vec(),
            top.node,
            format!("{VOLUMES_DIR}/{name}"),
            0,
        )];
        while let Some((dir_parent, dir_name, node, path, tries)) = stack.last().cloned() {
            let entries = match self
                .call(Request::ReadDir {
                    dir: node,
                    after: 0,
                    max: READDIR_BATCH,
                })
                .await
            {
                Ok(Reply::Entries { entries, .. }) => entries,
                Ok(other) => return Err(self.unexpected("ReadDir", other)),
                Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::ESTALE)) => {
                    stack.pop();
                    continue;
                }
                Err(e) => return Err(e),
            };
            if entries.is_empty() {
                match self
                    .call(Request::Rmdir {
                        dir: dir_parent,
                        name: dir_name.clone(),
                    })
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.errno() == Some(libc::ENOENT) => {}
                    Err(e) if e.errno() == Some(libc::ENOTEMPTY) => {
                        if tries >= RMDIR_RETRIES {
                            return Err(ShareError::Busy {
                                addr: self.addr.clone(),
                                path,
                            });
                        }
                        stack.last_mut().expect("non-empty").4 = tries + 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                stack.pop();
                continue;
            }
            let mut subdir = None;
            for entry in entries {
                if entry.attr.kind == FileKind::Dir {
                    subdir.get_or_insert(entry);
                } else {
                    self.remove_file(node, &entry.name).await?;
                }
            }
            if let Some(d) = subdir {
                let sub_path = format!("{path}/{}", String::from_utf8_lossy(&d.name));
                stack.push((node, d.name, d.attr.node, sub_path, 0));
            }
        }
        Ok(())
    }

    /// Unlinks a non-directory; one that is already gone is fine.
    async fn remove_file(&self, dir: NodeId, name: &[u8]) -> Result<(), ShareError> {
        let request = Request::Remove {
            dir,
            name: name.to_vec(),
        };
        match self.call(request).await {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The name of volume `id`'s capacity record in `volumes/`.
fn record_name(id: &str) -> String {
    format!(".{id}.capacity")
}

/// The capacity in a record, `None` if the record is unreadable (treated as unknown).
fn parse_record(data: &[u8]) -> Option<i64> {
    std::str::from_utf8(data)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("capacity_bytes="))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records() {
        assert_eq!(parse_record(b"capacity_bytes=1073741824\n"), Some(1 << 30));
        assert_eq!(parse_record(b"capacity_bytes=0\n"), Some(0));
        assert_eq!(parse_record(b"garbage"), None);
        assert_eq!(record_name("pvc-1"), ".pvc-1.capacity");
    }
}
