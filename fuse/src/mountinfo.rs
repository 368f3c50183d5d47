//! The mount table: `/proc/self/mountinfo` parsed into the fields Shoal needs. Shared by
//! `shoal mount` (which connection is ours), the CSI node plugin (what is mounted at a
//! target) and the binary's local mounts.

use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`, the fields Shoal needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The device, `major:minor` (for FUSE, the minor names the connection).
    pub dev: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, ...).
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    /// True if the mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Decodes the octal escapes (`\040` for a space) mountinfo uses in paths.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            if sep < 6 || fields.len() < sep + 3 {
                return None;
            }
            Some(MountEntry {
                dev: fields[2].to_string(),
                mount_point: PathBuf::from(unescape(fields[4])),
                options: fields[5].to_string(),
                fs_type: fields[sep + 1].to_string(),
                source: unescape(fields[sep + 2]),
            })
        })
        .collect()
}

/// The topmost mount at exactly `target` (also matching its canonical form), if any.
pub fn find_mount(target: &Path) -> std::io::Result<Option<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let canonical = std::fs::canonicalize(target).ok();
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == target || Some(&m.mount_point) == canonical.as_ref()))
}

/// True if something is mounted at exactly `dir`.
pub fn is_mounted(dir: &Path) -> bool {
    matches!(find_mount(dir), Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 0:52 / /var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pvc-1/mount rw,nosuid,nodev,relatime shared:50 - fuse.shoal 10.0.0.1:2049/volumes/pvc-1 rw,user_id=0,group_id=0
99 22 0:53 / /mnt/with\\040space ro,relatime - fuse shoal ro
bad line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].fs_type, "fuse.shoal");
        assert_eq!(m[1].dev, "0:52");
        assert_eq!(m[1].source, "10.0.0.1:2049/volumes/pvc-1");
        assert!(!m[1].read_only());
        assert_eq!(m[2].mount_point, PathBuf::from("/mnt/with space"));
        assert!(m[2].read_only());
    }
}
