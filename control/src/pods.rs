//! The pods attached to this node, and their persistence. The list is written to
//! `<socket>.pods.json` after every attach and detach (to a temporary file, then renamed over
//! the old one, so a crash never leaves half a file), and read back at start so a restart
//! re-attaches them by itself.

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
}

/// Where the pods of the node whose ctl socket is `socket` are remembered.
pub fn pods_file(socket: &Path) -> PathBuf {
    let mut p = socket.to_path_buf().into_os_string();
    p.push(".pods.json");
    p.into()
}

/// Writes `pods` atomically: a temporary file beside the target, then a rename.
pub fn save(path: &Path, pods: &[Pod]) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(pods).map_err(std::io::Error::other)?;
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
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
        assert_eq!(load(&path)[0].port_mac, "");
        std::fs::write(&path, "{ broken").expect("broken");
        assert!(load(&path).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
