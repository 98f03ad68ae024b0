//! Node identity kept in the data dir: `node-id` (made once, kept for the node's life) and
//! `boot-id` (new at every start, always greater than the last one, so that the flock orders
//! restarts even if the wall clock stepped back).

use std::path::Path;

use anyhow::{bail, Context};
use crux_flock::{BootId, NodeId};
use rand::RngCore;

/// Node id file name in the data dir.
pub const NODE_ID_FILE: &str = "node-id";
/// Boot id file name in the data dir.
pub const BOOT_ID_FILE: &str = "boot-id";
/// The node-plane key pair's file name in the data dir (Ed25519, PKCS#8, mode 0600).
pub const NODE_KEY_FILE: &str = "node-key";

/// This node's end of the node plane, with the key pair kept in the data dir (made on first
/// start).
pub fn node_transport(data_dir: &Path) -> anyhow::Result<crux_transport::Transport> {
    let identity = crux_transport::NodeIdentity::load_or_create(&data_dir.join(NODE_KEY_FILE))?;
    Ok(crux_transport::Transport::new(
        identity,
        crux_transport::TransportConfig::default(),
    )?)
}

/// Loads the node id, or makes and stores a random one on first start.
pub fn load_or_create_node_id(data_dir: &Path) -> anyhow::Result<NodeId> {
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id: NodeId = text.trim().parse().map_err(|_| {
                anyhow::anyhow!("{}: not a node id (16 hex digits)", path.display())
            })?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut id = 0;
            while id == 0 {
                id = rand::rngs::OsRng.next_u64();
            }
            let id = NodeId(id);
            write_atomic(&path, &format!("{id}\n"))?;
            Ok(id)
        }
        Err(e) => bail!("reading {}: {e}", path.display()),
    }
}

/// A new boot id for this start, greater than the stored one, and stores it.
pub fn next_boot_id(data_dir: &Path, unix_ms: u64) -> anyhow::Result<BootId> {
    let path = data_dir.join(BOOT_ID_FILE);
    let last = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| u64::from_str_radix(t.trim(), 16).ok())
        .unwrap_or(0);
    let random = (rand::rngs::OsRng.next_u32() & 0xffff) as u16;
    let mut boot = crux_flock::boot_id(unix_ms, random);
    if boot.0 <= last {
        boot = BootId(last + 1);
    }
    write_atomic(&path, &format!("{:016x}\n", boot.0))?;
    Ok(boot)
}

/// Writes `path` through a temp file and a rename, so a crash never leaves half a file.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_survives_restarts_and_boot_ids_grow() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_node_id(dir.path()).unwrap();
        let b = load_or_create_node_id(dir.path()).unwrap();
        assert_eq!(a, b);
        let b1 = next_boot_id(dir.path(), 1_000_000).unwrap();
        // The clock stepped back: the boot id still grows.
        let b2 = next_boot_id(dir.path(), 10).unwrap();
        assert!(b2 > b1);
    }

    #[test]
    fn corrupt_node_id_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_ID_FILE), "not hex").unwrap();
        let e = load_or_create_node_id(dir.path()).unwrap_err();
        assert!(e.to_string().contains("node-id"), "{e}");
    }
}
