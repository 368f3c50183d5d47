//! The wire format of the FUSE clients' channel: frames, requests, replies and recalls.
//!
//! Owns only types and their encoding. A frame on the wire is a big-endian `u32` length
//! followed by that many bytes of bincode. Nothing here touches the volume or the lease table.

use serde::{Deserialize, Serialize};

/// Protocol version carried in `Hello`; a server refuses any other.
pub const PROTOCOL_VERSION: u32 = 2;

/// Upper bound of one encoded frame (a 1 MiB write plus headers), so a corrupt length
/// prefix cannot make either side allocate without bound.
pub const MAX_FRAME: usize = 2 * 1024 * 1024;

/// Largest read or write payload a client may ask for in one call.
pub const MAX_IO: u32 = 1024 * 1024;

pub use crate::types::{
    Attr, CreateMode, DirEntry, FileKind, FsStat, NodeId, Owner, SetAttr, SetTime, Time,
};

/// What a client asks. Every request that returns attributes also grants the caller a lease
/// on the nodes it names (see `lease`): the client may cache the reply until the lease is
/// recalled or its session stops being renewed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// First frame of a connection. `client` is a human-readable name for logs. A client
    /// that caches nothing (`caching: false`: the CSI controller, `shoal stats`) is granted
    /// no leases, so no change ever waits for it.
    Hello {
        version: u32,
        client: String,
        caching: bool,
    },
    /// Extends the session's lease term. Reply: `Ok`.
    Renew,
    /// The client has dropped every cache entry named by recall `recall`. Reply: none.
    RecallAck {
        recall: u64,
    },
    /// The client no longer caches these nodes (the kernel forgot them). Reply: `Ok`.
    Release {
        nodes: Vec<NodeId>,
    },
    /// Resolves a `/`-separated path from the export root (for mounting a subdirectory).
    /// Reply: `Attr`.
    Resolve {
        path: String,
    },
    Lookup {
        dir: NodeId,
        name: Vec<u8>,
    },
    GetAttr {
        node: NodeId,
    },
    SetAttr {
        node: NodeId,
        set: SetAttr,
    },
    /// Reply: `Data`.
    Read {
        node: NodeId,
        offset: u64,
        len: u32,
    },
    /// Reply: `Written`. Acknowledged only after every other holder's lease on `node` has
    /// been recalled or has run out.
    Write {
        node: NodeId,
        offset: u64,
        data: Vec<u8>,
    },
    /// Reply: `Attr` of the new (or, for `Unchecked`, existing) file. A new node is given to
    /// `owner` before the reply (an existing one is left alone).
    Create {
        dir: NodeId,
        name: Vec<u8>,
        mode: u32,
        how: CreateMode,
        owner: Option<Owner>,
    },
    Mkdir {
        dir: NodeId,
        name: Vec<u8>,
        mode: u32,
        owner: Option<Owner>,
    },
    Symlink {
        dir: NodeId,
        name: Vec<u8>,
        target: Vec<u8>,
        owner: Option<Owner>,
    },
    /// Reply: `Link`.
    Readlink {
        node: NodeId,
    },
    /// Unlinks a non-directory. Reply: `Ok`.
    Remove {
        dir: NodeId,
        name: Vec<u8>,
    },
    /// Removes an empty directory. Reply: `Ok`.
    Rmdir {
        dir: NodeId,
        name: Vec<u8>,
    },
    /// Replaces `to_name` if it exists (POSIX rename). Reply: `Ok`.
    Rename {
        from_dir: NodeId,
        from_name: Vec<u8>,
        to_dir: NodeId,
        to_name: Vec<u8>,
        /// Fail with EEXIST instead of replacing (RENAME_NOREPLACE), atomically.
        no_replace: bool,
    },
    /// Entries after cookie `after` (0 = from the start), at most `max`, without "." and "..".
    /// Reply: `Entries`.
    ReadDir {
        dir: NodeId,
        after: u64,
        max: u32,
    },
    /// Makes every acknowledged write to `node` durable on disk. Reply: `Ok`.
    Fsync {
        node: NodeId,
    },
    /// Reply: `FsStat`.
    StatFs,
    /// The share's lease counters. Reply: `Counters`.
    Counters,
    /// The client opened `node` (counted per session). While a file is open anywhere, removing
    /// or replacing its last name keeps its data reachable by node id until the last `Close`
    /// (or the end of the session). Reply: none.
    Open {
        node: NodeId,
    },
    /// The client closed `node` once. Reply: none.
    Close {
        node: NodeId,
    },
}

impl Request {
    /// True for requests that change nothing, which a client may safely send twice.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self,
            Request::Resolve { .. }
                | Request::Lookup { .. }
                | Request::GetAttr { .. }
                | Request::Read { .. }
                | Request::Readlink { .. }
                | Request::ReadDir { .. }
                | Request::StatFs
                | Request::Counters
        )
    }
}

/// What the server answers, matched to a request by its call id.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answer to `Hello`. The client must renew within `lease_term_ms`; `root` is the export.
    Welcome {
        session: u64,
        lease_term_ms: u64,
        root: Attr,
    },
    Ok,
    Attr(Attr),
    Data {
        data: Vec<u8>,
        eof: bool,
    },
    Written {
        count: u32,
        attr: Attr,
    },
    Link(Vec<u8>),
    Entries {
        entries: Vec<DirEntry>,
        end: bool,
    },
    FsStat(FsStat),
    Counters(Counters),
    /// The call failed; `errno` is a Linux errno value (ENOENT, EEXIST, ESTALE, ...).
    Error {
        errno: i32,
        message: String,
    },
}

/// The share's lease counters, as `shoal stats` shows them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    pub sessions: u64,
    pub leases_held: u64,
    pub recalls_sent: u64,
    pub recalls_acked: u64,
    /// Recalls that ended because the holder's lease ran out instead of an ack.
    pub recalls_expired: u64,
    pub sessions_revoked: u64,
    /// Recall round trip (sent to acked), median and 99th percentile, in microseconds.
    pub recall_rtt_median_us: Option<u64>,
    pub recall_rtt_p99_us: Option<u64>,
}

/// The unit on the wire, in either direction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client to server.
    Call { id: u64, request: Request },
    /// Server to client, answering `Call { id }`.
    Reply { id: u64, reply: Reply },
    /// Server to client: stop trusting anything cached about `nodes` (attributes, data, and
    /// for directories their entries), then send `RecallAck { recall }`.
    Recall { recall: u64, nodes: Vec<NodeId> },
}

/// Encodes a frame with its length prefix.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let body = bincode::serialize(frame).expect("frames always serialize");
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Most bytes of queued frames gathered into one write.
const BATCH: usize = 1 << 20;

/// Writes `first` and whatever else is already queued in `more` (up to [`BATCH`] bytes) with
/// one write: a busy connection sends many frames per syscall.
pub(crate) async fn write_batch<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    first: Vec<u8>,
    more: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut buf = first;
    while buf.len() < BATCH {
        match more.try_recv() {
            Ok(next) => buf.extend_from_slice(&next),
            Err(_) => break,
        }
    }
    wr.write_all(&buf).await
}

/// Decodes a frame body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Frame, bincode::Error> {
    bincode::deserialize(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = Frame::Call {
            id: 7,
            request: Request::Write {
                node: 42,
                offset: 3,
                data: b"hello".to_vec(),
            },
        };
        let bytes = encode(&f);
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - 4
        );
        assert_eq!(decode(&bytes[4..]).unwrap(), f);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).is_err());
        assert!(decode(&[]).is_err());
    }
}
