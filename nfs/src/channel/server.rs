//! The share-manager's end of the channel (to be written).
