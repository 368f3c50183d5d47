//! Shoal's share-manager.
//!
//! - [`volume`]: the export: handles, attributes and I/O over a real directory, and the one
//!   place that keeps every name and handle inside the export.
//! - [`lease`]: the lease table: who caches what, renewal, and the recall a change waits for.
//! - [`nfs3`]: the NFSv3 front end (on `nfsserve`): translates NFSv3 calls to the volume.
//! - [`channel`]: the FUSE clients' protocol (wire types, client, server end).
//! - [`server`]: `shoal serve`: listeners, start-up checks, shutdown.

pub mod channel;
