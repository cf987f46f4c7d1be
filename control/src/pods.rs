//! The pods attached to this node (the pod registry), and their persistence. The list is written
//! to `<socket>.pods.json` after every attach and detach, and read back at start so a restart
//! re-attaches them by itself.
//!
//! Contract: a [`Pod`] carries everything compiling the tables needs about it, read from the
//! system once, at attach (its port's MAC, its interface index), so compiling never reads the
//! system and an interface that vanishes cannot make it fail. The file is replaced atomically:
//! written to a temporary file in the same directory, fsynced, renamed over the old one, and the
//! directory fsynced, so a crash or power loss leaves the old list or the new one, never half a
//! file.

use core::net::Ipv4Addr;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A pod attached to a port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// The host end of the pod's interface (vxnat's port).
    pub ifname: String,
    pub ip: Ipv4Addr,
    /// The pod's own MAC (the far end of its veth).
    pub mac: String,
    pub port: u16,
    /// The MAC of `ifname`, read once at attach so compiling tables never reads the system.
    #[serde(default)]
    pub port_mac: String,
    /// The interface index of `ifname` at attach: a link event names the interface that
    /// vanished by it, and a new interface under the same name is told apart by it (0: not
    /// known, from a file written before it was recorded).
    #[serde(default)]
    pub ifindex: u32,
}

/// Where the pods of the node whose ctl socket is `socket` are remembered.
pub fn pods_file(socket: &Path) -> PathBuf {
    let mut p = socket.to_path_buf().into_os_string();
    p.push(".pods.json");
    p.into()
}

/// Writes `pods` atomically: a temporary file beside the target (same directory, so the rename
/// cannot cross filesystems), fsynced before the rename (else a crash after it could leave an
/// empty file under the old name), then the directory fsynced so the rename itself is durable.
pub fn save(path: &Path, pods: &[Pod]) -> std::io::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(pods).map_err(std::io::Error::other)?;
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// The pods remembered at `path`; none if the file is missing or unreadable (reported).
pub fn load(path: &Path) -> Vec<Pod> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s).unwrap_or_else(|e| {
            tracing::warn!("{}: {e}; starting with no remembered pods", path.display());
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_round_trip_through_an_atomic_write() {
        let dir = std::env::temp_dir().join(format!("vxnat-pods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = pods_file(&dir.join("n.sock"));
        let pods = vec![Pod {
            ifname: "vxa1".into(),
            ip: Ipv4Addr::new(10, 244, 0, 2),
            mac: "02:00:00:00:00:02".into(),
            port: 2,
            port_mac: "02:00:00:00:00:01".into(),
            ifindex: 7,
        }];
        save(&path, &pods).expect("save");
        assert_eq!(load(&path), pods);
        assert!(std::fs::read_dir(&dir).expect("dir").all(|e| !e
            .expect("entry")
            .path()
            .display()
            .to_string()
            .ends_with(".tmp")));
        // A file from before port_mac existed still loads.
        std::fs::write(&path, r#"[{"ifname":"vxa1","ip":"10.244.0.2","mac":"02:00:00:00:00:02","port":2}]"#)
            .expect("old");
        assert_eq!((load(&path)[0].port_mac.as_str(), load(&path)[0].ifindex), ("", 0));
        std::fs::write(&path, "{ broken").expect("broken");
        assert!(load(&path).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
