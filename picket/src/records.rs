//! `children.json`: the plugin processes picket runs, so that an agent that restarts finds them
//! again. Written atomically (temp file, fsync, rename, fsync of the directory).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::UnitSpec;

/// The file name in picket's directory.
pub(crate) const FILE: &str = "children.json";

/// One running child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The unit key.
    pub key: String,
    /// What was started.
    pub spec: UnitSpec,
    /// Its pid.
    pub pid: u32,
    /// Its process group (its own pid: it is started as a group leader).
    pub pgid: u32,
    /// Its start time, `/proc/<pid>/stat` field 22: with the pid, it names this process.
    pub start_time: u64,
    /// The Unix socket of its control API (from the handshake).
    pub socket: PathBuf,
    /// The version it reported in the handshake.
    #[serde(default)]
    pub version: String,
    /// The one-time token it was given.
    pub token: String,
    /// When it was started, Unix ms.
    #[serde(default)]
    pub started_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    children: Vec<Record>,
}

/// Reads the records; a missing file is no records.
pub(crate) fn load(dir: &Path) -> anyhow::Result<Vec<Record>> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    };
    let f: File = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a picket records file: {e}", path.display()))?;
    Ok(f.children)
}

/// Replaces the records with `children`.
pub(crate) fn save(dir: &Path, children: &[Record]) -> std::io::Result<()> {
    let f = File {
        children: children.to_vec(),
    };
    let text = serde_json::to_vec_pretty(&f).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        let mut out = std::fs::File::create(&tmp)?;
        out.write_all(&text)?;
        out.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let r = Record {
            key: "k".into(),
            spec: UnitSpec {
                key: "k".into(),
                horde: "default".into(),
                api: "galumph2".into(),
                inst: "galumph2_3".into(),
                function: "galumph2_3".into(),
                digest: "sha256:00".into(),
                exe: "/bin/true".into(),
            },
            pid: 7,
            pgid: 7,
            start_time: 99,
            socket: "/tmp/s.sock".into(),
            version: "2.3".into(),
            token: "ab".into(),
            started_ms: 1,
        };
        save(dir.path(), std::slice::from_ref(&r)).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![r]);
        assert!(!dir.path().join("children.json.tmp").exists());
        std::fs::write(dir.path().join(FILE), "{nope").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("children.json is not a picket records file"),
            "{e}"
        );
    }
}
