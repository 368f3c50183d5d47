//! Shoal's share-manager.
//!
//! - [`types`]: the protocol-neutral vocabulary (node ids, attributes, entries).
//! - [`volume`]: the export: node ids, attributes and I/O over a real directory, and the one
//!   place that keeps every name and handle inside the export.
//! - [`beneath`]: the descriptor-relative syscalls the volume makes its changes with.
//! - [`lease`]: the lease table: sessions, who caches what, recalls and their counters.
//! - [`share`]: a volume with its lease table: which nodes each change recalls, and when a
//!   change may be acknowledged. Every front end goes through it.
//! - [`nfs3`]: the NFSv3 front end (on `nfsserve`): translation only.
//! - [`channel`]: the FUSE clients' protocol (wire types, client, server end).
//! - [`server`]: `shoal serve`: listeners, start-up checks, shutdown.

pub mod beneath;
pub mod channel;
pub mod lease;
pub mod nfs3;
pub mod server;
pub mod share;
pub mod types;
pub mod volume;
