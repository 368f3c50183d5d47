//! Shared by the NFSv3 tests: a server on a real directory and a strict, independent client
//! (`nfs3_client`) with one helper per procedure that returns the NFS status on failure.
//!
//! Never unmount: nfsserve's UMNT reply is 4 bytes too long and `nfs3_client` rejects it.
//! Dropping the connection is enough.

#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::{
    cookieverf3, createhow3, diropargs3, fattr3, filename3, nfs_fh3, nfspath3, nfsstat3, sattr3,
    stable_how, symlinkdata3, CREATE3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Option,
    Nfs3Result, READ3args, READDIRPLUS3args, READLINK3args, REMOVE3args, RENAME3args, RMDIR3args,
    SETATTR3args, SYMLINK3args, WRITE3args,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::{TokioConnector, TokioIo};
use nfs3_client::{Nfs3Connection, Nfs3ConnectionBuilder};
use shoal_nfs::server::{start, Running, ServeOptions};
use tokio::net::TcpStream;

#[allow(unused_imports)]
pub use nfs3_client::nfs3_types::nfs3;

/// Starts a server on `dir`; port 0 picks a free one. Retries a busy fixed port for a few
/// seconds (the previous server on it is still closing its listener).
pub async fn serve_on(dir: &Path, port: u16) -> Running {
    let opts = ServeOptions {
        export: dir.to_path_buf(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        lease_term: Duration::from_secs(10),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match start(&opts).await {
            Ok(r) => return r,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("server starts: {e}"),
        }
    }
}

pub async fn serve(dir: &Path) -> Running {
    serve_on(dir, 0).await
}

pub type Conn = Nfs3Connection<TokioIo<TcpStream>>;

/// A mounted client: the connection and the export's root handle.
pub struct Client {
    pub conn: Conn,
    pub root: nfs_fh3,
}

/// One READDIRPLUS entry: name, file id, cookie, handle.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: Vec<u8>,
    pub fileid: u64,
    pub cookie: u64,
    pub fh: Option<nfs_fh3>,
}

pub fn fh(data: Vec<u8>) -> nfs_fh3 {
    nfs_fh3 {
        data: Opaque::owned(data),
    }
}

pub fn name(n: &[u8]) -> filename3<'static> {
    filename3(Opaque::owned(n.to_vec()))
}

fn dirop(dir: &nfs_fh3, n: &[u8]) -> diropargs3<'static> {
    diropargs3 {
        dir: dir.clone(),
        name: name(n),
    }
}

fn after_attr(a: Nfs3Option<fattr3>) -> Option<fattr3> {
    match a {
        Nfs3Option::Some(a) => Some(a),
        Nfs3Option::None => None,
    }
}

pub fn sattr_mode(mode: u32) -> sattr3 {
    sattr3 {
        mode: Nfs3Option::Some(mode),
        ..sattr3::default()
    }
}

pub fn sattr_size(size: u64) -> sattr3 {
    sattr3 {
        size: Nfs3Option::Some(size),
        ..sattr3::default()
    }
}

impl Client {
    pub async fn mount(addr: SocketAddr) -> Client {
        let conn = Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", "/")
            .mount_port(addr.port())
            .nfs3_port(addr.port())
            .connect_from_privileged_port(false)
            .mount()
            .await
            .expect("mount");
        let root = conn.root_nfs_fh3();
        Client { conn, root }
    }

    pub async fn getattr(&mut self, f: &nfs_fh3) -> Result<fattr3, nfsstat3> {
        match self
            .conn
            .getattr(&GETATTR3args { object: f.clone() })
            .await
            .expect("rpc getattr")
        {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    /// The handle of `n` in `dir`, with its attributes when the server sent them.
    pub async fn lookup(
        &mut self,
        dir: &nfs_fh3,
        n: &[u8],
    ) -> Result<(nfs_fh3, Option<fattr3>), nfsstat3> {
        match self
            .conn
            .lookup(&LOOKUP3args {
                what: dirop(dir, n),
            })
            .await
            .expect("rpc lookup")
        {
            Nfs3Result::Ok(ok) => Ok((ok.object, after_attr(ok.obj_attributes))),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    /// Looks up a `/`-separated path from the root, one component at a time.
    pub async fn walk(&mut self, path: &str) -> Result<nfs_fh3, nfsstat3> {
        let mut at = self.root.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at = self.lookup(&at, part.as_bytes()).await?.0;
        }
        Ok(at)
    }

    pub async fn setattr(&mut self, f: &nfs_fh3, set: sattr3) -> Result<fattr3, nfsstat3> {
        match self
            .conn
            .setattr(&SETATTR3args {
                object: f.clone(),
                new_attributes: set,
                guard: Nfs3Option::None,
            })
            .await
            .expect("rpc setattr")
        {
            Nfs3Result::Ok(ok) => Ok(after_attr(ok.obj_wcc.after).expect("post-op attributes")),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn read(
        &mut self,
        f: &nfs_fh3,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        match self
            .conn
            .read(&READ3args {
                file: f.clone(),
                offset,
                count,
            })
            .await
            .expect("rpc read")
        {
            Nfs3Result::Ok(ok) => Ok((ok.data.as_ref().to_vec(), ok.eof)),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    /// Writes; returns the count and how the server committed it.
    pub async fn write(
        &mut self,
        f: &nfs_fh3,
        offset: u64,
        data: &[u8],
    ) -> Result<(u32, stable_how), nfsstat3> {
        match self
            .conn
            .write(&WRITE3args {
                file: f.clone(),
                offset,
                count: data.len() as u32,
                stable: stable_how::UNSTABLE,
                data: Opaque::borrowed(data),
            })
            .await
            .expect("rpc write")
        {
            Nfs3Result::Ok(ok) => Ok((ok.count, ok.committed)),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn create(
        &mut self,
        dir: &nfs_fh3,
        n: &[u8],
        how: createhow3,
    ) -> Result<nfs_fh3, nfsstat3> {
        match self
            .conn
            .create(&CREATE3args {
                where_: dirop(dir, n),
                how,
            })
            .await
            .expect("rpc create")
        {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(h) => Ok(h),
                Nfs3Option::None => panic!("create returned no handle"),
            },
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn create_file(&mut self, dir: &nfs_fh3, n: &[u8]) -> Result<nfs_fh3, nfsstat3> {
        self.create(dir, n, createhow3::UNCHECKED(sattr3::default()))
            .await
    }

    pub async fn mkdir(&mut self, dir: &nfs_fh3, n: &[u8]) -> Result<nfs_fh3, nfsstat3> {
        match self
            .conn
            .mkdir(&MKDIR3args {
                where_: dirop(dir, n),
                attributes: sattr3::default(),
            })
            .await
            .expect("rpc mkdir")
        {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(h) => Ok(h),
                Nfs3Option::None => panic!("mkdir returned no handle"),
            },
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn symlink(
        &mut self,
        dir: &nfs_fh3,
        n: &[u8],
        target: &[u8],
    ) -> Result<nfs_fh3, nfsstat3> {
        match self
            .conn
            .symlink(&SYMLINK3args {
                where_: dirop(dir, n),
                symlink: symlinkdata3 {
                    symlink_attributes: sattr3::default(),
                    symlink_data: nfspath3(Opaque::owned(target.to_vec())),
                },
            })
            .await
            .expect("rpc symlink")
        {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(h) => Ok(h),
                Nfs3Option::None => panic!("symlink returned no handle"),
            },
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn readlink(&mut self, f: &nfs_fh3) -> Result<Vec<u8>, nfsstat3> {
        match self
            .conn
            .readlink(&READLINK3args { symlink: f.clone() })
            .await
            .expect("rpc readlink")
        {
            Nfs3Result::Ok(ok) => Ok(ok.data.0.as_ref().to_vec()),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn remove(&mut self, dir: &nfs_fh3, n: &[u8]) -> Result<(), nfsstat3> {
        match self
            .conn
            .remove(&REMOVE3args {
                object: dirop(dir, n),
            })
            .await
            .expect("rpc remove")
        {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn rmdir(&mut self, dir: &nfs_fh3, n: &[u8]) -> Result<(), nfsstat3> {
        match self
            .conn
            .rmdir(&RMDIR3args {
                object: dirop(dir, n),
            })
            .await
            .expect("rpc rmdir")
        {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn rename(
        &mut self,
        from_dir: &nfs_fh3,
        from: &[u8],
        to_dir: &nfs_fh3,
        to: &[u8],
    ) -> Result<(), nfsstat3> {
        match self
            .conn
            .rename(&RENAME3args {
                from: dirop(from_dir, from),
                to: dirop(to_dir, to),
            })
            .await
            .expect("rpc rename")
        {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    /// One READDIRPLUS page: entries, eof, and the verifier to send with the next page.
    pub async fn readdirplus_page(
        &mut self,
        dir: &nfs_fh3,
        cookie: u64,
        verf: cookieverf3,
        maxcount: u32,
    ) -> Result<(Vec<Entry>, bool, cookieverf3), nfsstat3> {
        match self
            .conn
            .readdirplus(&READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf: verf,
                dircount: maxcount / 4,
                maxcount,
            })
            .await
            .expect("rpc readdirplus")
        {
            Nfs3Result::Ok(ok) => {
                let entries = ok
                    .reply
                    .entries
                    .into_inner()
                    .into_iter()
                    .map(|e| Entry {
                        name: e.name.0.as_ref().to_vec(),
                        fileid: e.fileid,
                        cookie: e.cookie,
                        fh: match e.name_handle {
                            Nfs3Option::Some(h) => Some(h),
                            Nfs3Option::None => None,
                        },
                    })
                    .collect();
                Ok((entries, ok.reply.eof, ok.cookieverf))
            }
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    /// A whole directory through READDIRPLUS, page by page.
    pub async fn readdirplus_all(&mut self, dir: &nfs_fh3) -> Result<Vec<Entry>, nfsstat3> {
        let mut all = Vec::new();
        let mut cookie = 0;
        let mut verf = cookieverf3::default();
        loop {
            let (page, eof, v) = self.readdirplus_page(dir, cookie, verf, 64 * 1024).await?;
            verf = v;
            if let Some(last) = page.last() {
                cookie = last.cookie;
            }
            let empty = page.is_empty();
            all.extend(page);
            if eof {
                return Ok(all);
            }
            assert!(!empty, "a page with no entries that is not the last");
        }
    }
}

/// The node id carried in a Shoal handle (bytes 12..20: magic, fsid, node id, ...).
pub fn node_of(h: &nfs_fh3) -> u64 {
    u64::from_be_bytes(h.data.as_ref()[12..20].try_into().unwrap())
}

/// A copy of `h` naming another node id, everything else kept.
pub fn with_node(h: &nfs_fh3, node: u64) -> nfs_fh3 {
    let mut d = h.data.as_ref().to_vec();
    d[12..20].copy_from_slice(&node.to_be_bytes());
    fh(d)
}
