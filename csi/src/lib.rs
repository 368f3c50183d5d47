//! Shoal's CSI plugin (to be written).
