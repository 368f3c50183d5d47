//! The plugin's unix socket: which path an endpoint names, and binding it.
//!
//! Owns only the socket file. Never removes anything that is not a socket.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tracing::{debug, warn};

use crate::CsiError;

/// The socket path of `unix:///abs/path` or of a bare absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CsiError> {
    let bad = |reason: &str| CsiError::Endpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let path = if let Some(rest) = endpoint.strip_prefix("unix://") {
        rest
    } else if endpoint.contains("://") {
        return Err(bad("only unix:// endpoints are supported"));
    } else {
        endpoint
    };
    if path.is_empty() {
        return Err(bad("the socket path is empty"));
    }
    if !path.starts_with('/') {
        return Err(bad(
            "the socket path must be absolute (unix:///abs/path or /abs/path)",
        ));
    }
    Ok(PathBuf::from(path))
}

/// Binds a listener at `path`, first removing a stale socket left by an earlier run.
pub fn bind(path: &Path) -> Result<UnixListener, CsiError> {
    let err = |source| CsiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.is_dir() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            debug!(path = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    UnixListener::bind(path).map_err(err)
}

/// Removes the socket file at shutdown; a missing file is fine.
pub fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), "cannot remove socket: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/csi/csi.sock").unwrap(),
            PathBuf::from("/run/csi/csi.sock")
        );
        assert_eq!(
            socket_path("/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(socket_path("unix://relative.sock").is_err());
        assert!(socket_path("tcp://127.0.0.1:10000").is_err());
        assert!(socket_path("").is_err());
        assert!(socket_path("unix://").is_err());
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let e = bind(Path::new("/nonexistent-shoal-dir/csi.sock")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
