//! The FUSE clients' channel: Shoal's own protocol between `shoal mount` and the
//! share-manager. It carries file operations and the lease traffic (renewals, recalls, acks)
//! on one TCP connection per client.

pub mod client;
pub mod proto;
pub mod server;
