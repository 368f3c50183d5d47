//! What a Shoal volume is to the CO: its id, its context, and the capabilities it supports.
//!
//! The one place that decides which names and ids are acceptable. A volume id is always a
//! single safe path component, so `volumes/<id>` can never leave the share's `volumes/`
//! directory, whatever name the CO sends.

use std::collections::HashMap;

use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::volume_capability::AccessType;
use bpfman_csi::v1::VolumeCapability;
use tonic::Status;

/// The directory at the share's root that holds one directory per volume.
pub const VOLUMES_DIR: &str = "volumes";

/// Volume context key: the share's `HOST:PORT`.
pub const CTX_SHARE: &str = "share";
/// Volume context key: the volume's directory relative to the share's root.
pub const CTX_SUBDIR: &str = "subdir";

/// StorageClass parameter: permission bits of a new volume's directory, in octal.
pub const PARAM_MODE: &str = "mode";
/// Default permission bits of a new volume's directory: writable by any uid, because pods
/// mounting a shared filesystem run as arbitrary users and `fsGroup` does not apply to it.
pub const DEFAULT_MODE: u32 = 0o777;

/// Longest id that is used verbatim; longer or unsafe names are shortened and hashed.
const MAX_ID: usize = 128;
/// How much of a sanitized name is kept in front of its hash.
const HASHED_PREFIX: usize = 64;

/// True if `id` is a volume id this plugin could have issued: 1 to 128 characters from
/// `[A-Za-z0-9._-]`, starting with a letter or digit (so never `.`, `..` or a hidden name).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id.bytes().all(is_id_byte)
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
}

/// The volume id for a CreateVolume name. Deterministic, so retries of the same name find the
/// same volume. A name that is already a valid id (`pvc-<uuid>`, what Kubernetes sends) is
/// used as is; any other name becomes its sanitized prefix plus a hash of the whole name,
/// e.g. `a/../b` → `a_.._b-1c2d...`.
pub fn id_for_name(name: &str) -> String {
    if is_valid_id(name) {
        return name.to_string();
    }
    let mut prefix: String = name
        .bytes()
        .map(|b| if is_id_byte(b) { b as char } else { '_' })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(HASHED_PREFIX)
        .collect();
    if prefix.is_empty() {
        prefix.push_str("vol");
    }
    format!("{prefix}-{:016x}", fnv1a64(name.as_bytes()))
}

/// 64-bit FNV-1a. Stable forever (ids derived from it are stored on shares), not
/// cryptographic: the names it hashes come from the CO, which also picks them unique.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The directory of volume `id`, relative to the share's root.
pub fn subdir_of(id: &str) -> String {
    format!("{VOLUMES_DIR}/{id}")
}

/// The context the node needs to mount volume `id` from `share`.
pub fn context(share: &str, id: &str) -> HashMap<String, String> {
    HashMap::from([
        (CTX_SHARE.to_string(), share.to_string()),
        (CTX_SUBDIR.to_string(), subdir_of(id)),
    ])
}

/// Checks a share address from a context or the command line: `HOST:PORT`, nothing else.
pub fn check_share(share: &str) -> Result<(), String> {
    let ok = !share.is_empty()
        && !share.contains('/')
        && !share.chars().any(char::is_whitespace)
        && share
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!("share {share:?} is not HOST:PORT"))
    }
}

/// Checks a subdirectory from a context: relative, `/`-separated, no empty, `.` or `..`
/// component. (The share confines paths too; this keeps nonsense from reaching it.)
pub fn check_subdir(subdir: &str) -> Result<(), String> {
    let ok = !subdir.is_empty()
        && !subdir.starts_with('/')
        && !subdir.chars().any(|c| c.is_whitespace() || c.is_control())
        && subdir
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "subdir {subdir:?} must be a relative path without empty, '.' or '..' components"
        ))
    }
}

/// How a well-formed capability asks to access the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A filesystem mount with this access mode: what Shoal provides.
    Mount(Mode),
    /// A raw block device: never supported by a shared filesystem.
    Block,
}

impl Access {
    /// True for the modes that only ever read.
    pub fn read_only(self) -> bool {
        matches!(
            self,
            Access::Mount(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
        )
    }
}

/// Parses one capability, failing with INVALID_ARGUMENT if a required field is missing.
/// `what` names it in messages, e.g. `volume_capabilities[1]`.
pub fn parse_capability(cap: &VolumeCapability, what: &str) -> Result<Access, Status> {
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Status::invalid_argument(format!("{what}.access_mode is required")))?;
    let mode = match Mode::try_from(mode.mode) {
        Ok(Mode::Unknown) | Err(_) => {
            return Err(Status::invalid_argument(format!(
                "{what}.access_mode.mode {} is not a known access mode",
                mode.mode
            )))
        }
        Ok(m) => m,
    };
    match cap.access_type {
        None => Err(Status::invalid_argument(format!(
            "{what}.access_type is required (mount or block)"
        ))),
        Some(AccessType::Block(_)) => Ok(Access::Block),
        // fs_type and mount_flags are accepted and ignored: the filesystem is always Shoal's.
        Some(AccessType::Mount(_)) => Ok(Access::Mount(mode)),
    }
}

/// The message for a block capability, which no Shoal volume supports.
pub fn block_unsupported(what: &str) -> String {
    format!("{what}: block access is not supported, Shoal volumes are shared filesystems (use a mount access type)")
}

/// Checks every capability of a CreateVolume or NodePublish: present, well formed, mount.
pub fn require_mount_capabilities(caps: &[VolumeCapability]) -> Result<Vec<Access>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    caps.iter()
        .enumerate()
        .map(|(i, cap)| {
            let what = format!("volume_capabilities[{i}]");
            match parse_capability(cap, &what)? {
                Access::Block => Err(Status::invalid_argument(block_unsupported(&what))),
                access => Ok(access),
            }
        })
        .collect()
}

/// The permission bits a StorageClass asks for, or the default.
pub fn dir_mode(parameters: &HashMap<String, String>) -> Result<u32, Status> {
    match parameters.get(PARAM_MODE) {
        None => Ok(DEFAULT_MODE),
        Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "parameter {PARAM_MODE}={s:?} is not an octal permission mode like 0775"
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_ids() {
        let n = "pvc-0b5c8f2e-4d7a-4a8e-9a51-2f3c1d6e7a90";
        assert_eq!(id_for_name(n), n);
        assert!(is_valid_id(n));
    }

    #[test]
    fn unsafe_names_are_sanitized_and_hashed() {
        for name in ["..", ".", "a/b", "../../etc", "/abs", "x\0y", ".hidden", ""] {
            let id = id_for_name(name);
            assert!(is_valid_id(&id), "{name:?} -> {id:?}");
            assert!(!id.contains('/') && id != ".." && id != ".");
            assert_eq!(id, id_for_name(name), "deterministic");
        }
        assert_ne!(id_for_name("a/b"), id_for_name("a_b"));
        assert_ne!(id_for_name("a/b"), id_for_name("a:b"));
        let long = "p".repeat(300);
        let id = id_for_name(&long);
        assert!(is_valid_id(&id) && id.len() < MAX_ID, "{id}");
        assert_eq!(id_for_name(&"q".repeat(128)), "q".repeat(128));
    }

    #[test]
    fn shares_and_subdirs() {
        assert!(check_share("10.0.0.1:2049").is_ok());
        assert!(check_share("share.ns.svc:2049").is_ok());
        assert!(check_share("host").is_err());
        assert!(check_share("host:port").is_err());
        assert!(check_share("h:1/x").is_err());
        assert!(check_subdir("volumes/pvc-1").is_ok());
        for bad in ["", "/volumes", "volumes/../x", "volumes//x", "./x", "a b"] {
            assert!(check_subdir(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(dir_mode(&HashMap::new()).unwrap(), 0o777);
        let p = |v: &str| HashMap::from([(PARAM_MODE.to_string(), v.to_string())]);
        assert_eq!(dir_mode(&p("0775")).unwrap(), 0o775);
        assert_eq!(dir_mode(&p("0o2770")).unwrap(), 0o2770);
        assert!(dir_mode(&p("999")).is_err());
        assert!(dir_mode(&p("rwx")).is_err());
    }
}
