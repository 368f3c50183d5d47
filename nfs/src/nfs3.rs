//! The NFSv3 front end: `nfsserve`'s `NFSFileSystem` over a [`Share`].
//!
//! Owns only translation: NFSv3 handles to node ids and back, `fattr3`/`sattr3` to the
//! volume's attributes, errno values to `nfsstat3`. NFSv3 clients hold no leases; their
//! changes go through the share like any other, so FUSE clients' leases are recalled first.
//!
//! A handle is `SHL2` + the export's fsid + the node id + the node's generation (its birth
//! time): 28 bytes, the same after a restart on the same data. A handle from another export
//! or of another shape is refused; one whose generation differs from the node's now (the
//! inode number was freed and reused by a new file) is stale. On a filesystem without birth
//! times the generation is 0 and reuse cannot be detected.

use std::sync::Arc;

use async_trait::async_trait;
use nfsserve::nfs::{
    fattr3, fileid3, filename3, ftype3, nfs_fh3, nfspath3, nfsstat3, nfstime3, sattr3, set_atime,
    set_gid3, set_mode3, set_mtime, set_size3, set_uid3, specdata3,
};
use nfsserve::vfs::{DirEntry as NfsDirEntry, NFSFileSystem, ReadDirResult, VFSCapabilities};

use crate::share::Share;
use crate::types::{Attr, CreateMode, FileKind, SetAttr, SetTime, Time};
use crate::volume::VolumeError;

/// Magic prefix of Shoal's NFSv3 handles (and their format version).
const HANDLE_MAGIC: &[u8; 4] = b"SHL2";
/// Length of a handle: magic, fsid, node id, generation.
const HANDLE_LEN: usize = 4 + 8 + 8 + 8;
/// What `fh_to_id` answers for a well-formed handle that names no node of this export
/// (another export's, or an earlier file's whose inode number was reused). Inode 0 names no
/// file, so every operation on it fails STALE in the volume. Failing in `fh_to_id` itself
/// would be simpler, but nfsserve 0.11 then sends SETATTR and READLINK replies without their
/// attribute fields, which strict clients cannot decode.
const STALE_ID: fileid3 = 0;

/// The NFSv3 view of a share.
pub struct Nfs3 {
    share: Arc<Share>,
    /// Write verifier: changes on every start, so clients know unstable writes may be lost.
    verifier: [u8; 8],
}

impl Nfs3 {
    pub fn new(share: Arc<Share>) -> Nfs3 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Nfs3 {
            share,
            verifier: (now.as_nanos() as u64).to_be_bytes(),
        }
    }
}

/// The NFSv3 status for a volume error.
pub fn status(e: VolumeError) -> nfsstat3 {
    tracing::debug!("nfs3: {}", e.message);
    match e.errno {
        libc::EPERM => nfsstat3::NFS3ERR_PERM,
        libc::ENOENT => nfsstat3::NFS3ERR_NOENT,
        libc::ENXIO => nfsstat3::NFS3ERR_NXIO,
        libc::EACCES => nfsstat3::NFS3ERR_ACCES,
        libc::EEXIST => nfsstat3::NFS3ERR_EXIST,
        libc::EXDEV => nfsstat3::NFS3ERR_XDEV,
        libc::ENODEV => nfsstat3::NFS3ERR_NODEV,
        libc::ENOTDIR => nfsstat3::NFS3ERR_NOTDIR,
        libc::EISDIR => nfsstat3::NFS3ERR_ISDIR,
        libc::EINVAL => nfsstat3::NFS3ERR_INVAL,
        libc::EFBIG => nfsstat3::NFS3ERR_FBIG,
        libc::ENOSPC => nfsstat3::NFS3ERR_NOSPC,
        libc::EROFS => nfsstat3::NFS3ERR_ROFS,
        libc::EMLINK => nfsstat3::NFS3ERR_MLINK,
        libc::ENAMETOOLONG => nfsstat3::NFS3ERR_NAMETOOLONG,
        libc::ENOTEMPTY => nfsstat3::NFS3ERR_NOTEMPTY,
        libc::EDQUOT => nfsstat3::NFS3ERR_DQUOT,
        libc::ESTALE => nfsstat3::NFS3ERR_STALE,
        libc::ELOOP => nfsstat3::NFS3ERR_INVAL,
        _ => nfsstat3::NFS3ERR_IO,
    }
}

fn time3(t: Time) -> nfstime3 {
    nfstime3 {
        seconds: t.secs.clamp(0, u32::MAX as i64) as u32,
        nseconds: t.nanos,
    }
}

fn fattr(a: &Attr, fsid: u64) -> fattr3 {
    let ftype = match a.kind {
        FileKind::File => ftype3::NF3REG,
        FileKind::Dir => ftype3::NF3DIR,
        FileKind::Symlink => ftype3::NF3LNK,
        FileKind::Other => ftype3::NF3FIFO,
    };
    fattr3 {
        ftype,
        mode: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        used: a.used,
        rdev: specdata3::default(),
        fsid,
        fileid: a.node,
        atime: time3(a.atime),
        mtime: time3(a.mtime),
        ctime: time3(a.ctime),
    }
}

fn set_time_of(t: SetTimeArg) -> Option<SetTime> {
    match t {
        SetTimeArg::Keep => None,
        SetTimeArg::Now => Some(SetTime::ServerNow),
        SetTimeArg::At(t) => Some(SetTime::At(Time {
            secs: t.seconds as i64,
            nanos: t.nseconds,
        })),
    }
}

enum SetTimeArg {
    Keep,
    Now,
    At(nfstime3),
}

/// The volume's attribute change for an NFSv3 `sattr3`.
pub fn setattr_of(s: &sattr3) -> SetAttr {
    let atime = match s.atime {
        set_atime::DONT_CHANGE => SetTimeArg::Keep,
        set_atime::SET_TO_SERVER_TIME => SetTimeArg::Now,
        set_atime::SET_TO_CLIENT_TIME(t) => SetTimeArg::At(t),
    };
    let mtime = match s.mtime {
        set_mtime::DONT_CHANGE => SetTimeArg::Keep,
        set_mtime::SET_TO_SERVER_TIME => SetTimeArg::Now,
        set_mtime::SET_TO_CLIENT_TIME(t) => SetTimeArg::At(t),
    };
    SetAttr {
        mode: match s.mode {
            set_mode3::mode(m) => Some(m),
            set_mode3::Void => None,
        },
        uid: match s.uid {
            set_uid3::uid(u) => Some(u),
            set_uid3::Void => None,
        },
        gid: match s.gid {
            set_gid3::gid(g) => Some(g),
            set_gid3::Void => None,
        },
        size: match s.size {
            set_size3::size(z) => Some(z),
            set_size3::Void => None,
        },
        atime: set_time_of(atime),
        mtime: set_time_of(mtime),
    }
}

impl Nfs3 {
    fn fattr(&self, a: &Attr) -> fattr3 {
        fattr(a, self.share.volume.fsid())
    }
}

#[async_trait]
impl NFSFileSystem for Nfs3 {
    fn capabilities(&self) -> VFSCapabilities {
        VFSCapabilities::ReadWrite
    }

    fn root_dir(&self) -> fileid3 {
        self.share.volume.root_id()
    }

    async fn lookup(&self, dirid: fileid3, filename: &filename3) -> Result<fileid3, nfsstat3> {
        let v = &self.share.volume;
        match filename.0.as_slice() {
            b"." => Ok(dirid),
            // ".." of the export root is the root: nothing above the export can be named.
            b".." => v.parent(dirid).map_err(status),
            name => v.lookup(dirid, name).map(|a| a.node).map_err(status),
        }
    }

    async fn getattr(&self, id: fileid3) -> Result<fattr3, nfsstat3> {
        self.share
            .volume
            .getattr(id)
            .map(|a| self.fattr(&a))
            .map_err(status)
    }

    async fn setattr(&self, id: fileid3, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        let a = self
            .share
            .setattr(None, id, &setattr_of(&setattr))
            .await
            .map_err(status)?;
        Ok(self.fattr(&a))
    }

    async fn read(
        &self,
        id: fileid3,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        self.share
            .volume
            .read(id, offset, count.min(crate::channel::proto::MAX_IO))
            .map_err(status)
    }

    async fn write(&self, id: fileid3, offset: u64, data: &[u8]) -> Result<fattr3, nfsstat3> {
        let a = self
            .share
            .write(None, id, offset, data)
            .await
            .map_err(status)?;
        Ok(self.fattr(&a))
    }

    async fn create(
        &self,
        dirid: fileid3,
        filename: &filename3,
        attr: sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let mut set = setattr_of(&attr);
        let mode = set.mode.take().unwrap_or(0o644);
        // nfsserve checks GUARDED itself before calling us; this is UNCHECKED.
        let a = self
            .share
            .create(None, dirid, &filename.0, mode, CreateMode::Unchecked, None)
            .await
            .map_err(status)?;
        let a = if set != SetAttr::default() {
            self.share
                .setattr(None, a.node, &set)
                .await
                .map_err(status)?
        } else {
            a
        };
        Ok((a.node, self.fattr(&a)))
    }

    async fn create_exclusive(
        &self,
        dirid: fileid3,
        filename: &filename3,
    ) -> Result<fileid3, nfsstat3> {
        let a = self
            .share
            .create(None, dirid, &filename.0, 0o644, CreateMode::Guarded, None)
            .await
            .map_err(status)?;
        Ok(a.node)
    }

    async fn mkdir(
        &self,
        dirid: fileid3,
        dirname: &filename3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let a = self
            .share
            .mkdir(None, dirid, &dirname.0, 0o755, None)
            .await
            .map_err(status)?;
        Ok((a.node, self.fattr(&a)))
    }

    async fn remove(&self, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3> {
        // nfsserve routes both REMOVE and RMDIR here.
        let v = &self.share.volume;
        let is_dir = matches!(v.lookup(dirid, &filename.0), Ok(a) if a.kind == FileKind::Dir);
        if is_dir {
            self.share
                .rmdir(None, dirid, &filename.0)
                .await
                .map_err(status)
        } else {
            self.share
                .remove(None, dirid, &filename.0)
                .await
                .map_err(status)
        }
    }

    async fn rename(
        &self,
        from_dirid: fileid3,
        from_filename: &filename3,
        to_dirid: fileid3,
        to_filename: &filename3,
    ) -> Result<(), nfsstat3> {
        self.share
            .rename(
                None,
                from_dirid,
                &from_filename.0,
                to_dirid,
                &to_filename.0,
                false,
            )
            .await
            .map_err(status)
    }

    async fn readdir(
        &self,
        dirid: fileid3,
        start_after: fileid3,
        max_entries: usize,
    ) -> Result<ReadDirResult, nfsstat3> {
        let (entries, end) = self
            .share
            .volume
            .readdir(dirid, start_after, max_entries.max(1))
            .map_err(status)?;
        Ok(ReadDirResult {
            entries: entries
                .iter()
                .map(|e| NfsDirEntry {
                    fileid: e.cookie,
                    name: e.name.clone().into(),
                    attr: self.fattr(&e.attr),
                })
                .collect(),
            end,
        })
    }

    async fn symlink(
        &self,
        dirid: fileid3,
        linkname: &filename3,
        symlink: &nfspath3,
        attr: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let a = self
            .share
            .symlink(None, dirid, &linkname.0, &symlink.0, None)
            .await
            .map_err(status)?;
        let set = setattr_of(attr);
        let a = if set.uid.is_some() || set.gid.is_some() {
            let owner = SetAttr {
                uid: set.uid,
                gid: set.gid,
                ..SetAttr::default()
            };
            self.share
                .setattr(None, a.node, &owner)
                .await
                .map_err(status)?
        } else {
            a
        };
        Ok((a.node, self.fattr(&a)))
    }

    async fn readlink(&self, id: fileid3) -> Result<nfspath3, nfsstat3> {
        self.share
            .volume
            .readlink(id)
            .map(|t| t.into())
            .map_err(status)
    }

    fn id_to_fh(&self, id: fileid3) -> nfs_fh3 {
        let volume = &self.share.volume;
        // A node that vanished since the caller saw it gets generation 0 (not checked).
        let generation = volume.generation(id).unwrap_or(0);
        let mut data = Vec::with_capacity(HANDLE_LEN);
        data.extend_from_slice(HANDLE_MAGIC);
        data.extend_from_slice(&volume.fsid().to_be_bytes());
        data.extend_from_slice(&id.to_be_bytes());
        data.extend_from_slice(&generation.to_be_bytes());
        nfs_fh3 { data }
    }

    fn fh_to_id(&self, fh: &nfs_fh3) -> Result<fileid3, nfsstat3> {
        let d = &fh.data;
        if d.len() != HANDLE_LEN || &d[..4] != HANDLE_MAGIC {
            return Err(nfsstat3::NFS3ERR_BADHANDLE);
        }
        let field = |at: usize| u64::from_be_bytes(d[at..at + 8].try_into().expect("8 bytes"));
        let (fsid, id, generation) = (field(4), field(12), field(20));
        let volume = &self.share.volume;
        if fsid != volume.fsid() {
            tracing::debug!(fsid, "nfs3: handle of another export");
            return Ok(STALE_ID);
        }
        if generation != 0 {
            match volume.generation(id) {
                Ok(now) if now == generation => {}
                Ok(_) => {
                    tracing::debug!(id, "nfs3: handle of an earlier file with the same inode");
                    return Ok(STALE_ID);
                }
                // Gone: let the operation itself answer (STALE) with a well-formed reply.
                Err(_) => return Ok(STALE_ID),
            }
        }
        Ok(id)
    }

    fn serverid(&self) -> [u8; 8] {
        self.verifier
    }
}
