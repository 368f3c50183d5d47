//! Shoal's FUSE client (to be written).
