//! The protocol-neutral vocabulary every front end shares: node ids, attributes,
//! attribute changes, directory entries, filesystem capacity.

use serde::{Deserialize, Serialize};

/// The volume's identifier of a file, directory or symlink (its inode number on the export's
/// filesystem). Stable across server restarts.
pub type NodeId = u64;

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// Sockets, fifos, devices: listed but not opened through Shoal.
    Other,
}

/// Attributes of one node, as the server's filesystem reports them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub node: NodeId,
    pub kind: FileKind,
    pub size: u64,
    /// Bytes allocated on disk.
    pub used: u64,
    /// Permission bits only (07777).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
}

/// A time to set: the server's clock, or a given time.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    ServerNow,
    At(Time),
}

/// Attribute changes; `None` leaves a field alone.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// Who a new file, directory or symlink belongs to: the caller on the client's side.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// How `Create` treats an existing name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateMode {
    /// Open the existing file (NFSv3 UNCHECKED; attributes still applied).
    Unchecked,
    /// Fail with EEXIST (NFSv3 GUARDED, O_EXCL).
    Guarded,
}

/// One directory entry with the attributes of its target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub attr: Attr,
    /// Resume point: pass it as `after` to continue the listing after this entry.
    pub cookie: u64,
}

/// Capacity of the export's filesystem.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FsStat {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    pub files: u64,
    pub files_free: u64,
    pub name_max: u32,
}
