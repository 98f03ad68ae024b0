//! The node's secondary keyring, as the local API and the CLI see it.
//!
//! The keyring file format and key handling belong to `crux_flock::crypto`; until its keyring
//! lands, every call reports that keyrings are not available yet.

use std::path::PathBuf;

/// One key of the keyring, as listed (ids only, never key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// Key id.
    pub id: String,
    /// Whether it is the primary key.
    pub primary: bool,
}

/// The keyring file of this node.
#[derive(Debug)]
pub struct LocalKeyring {
    path: PathBuf,
}

impl LocalKeyring {
    /// The keyring at `path`.
    pub fn open(path: PathBuf) -> anyhow::Result<LocalKeyring> {
        Ok(LocalKeyring { path })
    }

    fn unavailable(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "keyring {} is not available: keyrings come with the flock security work",
            self.path.display()
        )
    }

    /// The keys.
    pub fn list(&self) -> anyhow::Result<Vec<KeyEntry>> {
        Err(self.unavailable())
    }

    /// Adds a key.
    pub fn install(&self, _key: &str) -> anyhow::Result<Vec<KeyEntry>> {
        Err(self.unavailable())
    }

    /// Makes a key primary.
    pub fn use_key(&self, _key: &str) -> anyhow::Result<Vec<KeyEntry>> {
        Err(self.unavailable())
    }

    /// Removes a key.
    pub fn remove(&self, _key: &str) -> anyhow::Result<Vec<KeyEntry>> {
        Err(self.unavailable())
    }
}

/// A new random key as base64 text.
pub fn generate() -> anyhow::Result<String> {
    anyhow::bail!("key generation comes with the flock security work")
}
