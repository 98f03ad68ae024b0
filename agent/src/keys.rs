//! The node's secondary keyring, as the local API and the CLI see it: a
//! [`crux_flock::crypto::Keyring`] kept in the keyring file (mode 0600), changed by
//! install / use / remove and saved atomically after each change.
//!
//! Keys are shown by id (the 8-hex-digit key id of the bloc, as in handshake headers), never as
//! key material. `use` and `remove` take the key itself or its id.
//!
//! Scope today: these calls change this node's keyring file. Spreading a keyring change to every
//! member, and the flock core sealing its handshakes with the keyring, come with the integration of
//! the security work into the core; until then a rotation is done node by node (as `crux keys`
//! against each node's socket).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail};
use crux_flock::crypto::{key_id, Bloc, Keyring, SecretKey};

/// One key of the keyring, as listed (ids only, never key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// Key id (8 hex digits).
    pub id: String,
    /// Whether it is the primary key.
    pub primary: bool,
}

/// The keyring file of this node.
pub struct LocalKeyring {
    path: PathBuf,
    bloc: Bloc,
    ring: Mutex<Option<Keyring>>,
}

impl std::fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyring")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The id of a key in a bloc, as shown.
pub fn show_id(key: &SecretKey, bloc: &Bloc) -> String {
    format!("{:08x}", key_id(key, bloc))
}

impl LocalKeyring {
    /// Opens the keyring at `path` for bloc `bloc_id`. A missing file is an empty keyring (the
    /// first key installed becomes primary and creates the file); an unreadable or malformed one
    /// is an error.
    pub fn open(path: PathBuf, bloc_id: &str) -> anyhow::Result<LocalKeyring> {
        let ring = if path.exists() {
            Some(Keyring::load(&path).map_err(|e| anyhow!("keyring: {e}"))?)
        } else {
            None
        };
        Ok(LocalKeyring {
            path,
            bloc: Bloc::new(bloc_id),
            ring: Mutex::new(ring),
        })
    }

    /// Number of keys (0 when no keyring file exists yet).
    pub fn len(&self) -> usize {
        self.ring
            .lock()
            .expect("keyring lock")
            .as_ref()
            .map_or(0, |r| r.len())
    }

    fn entries(&self, ring: &Keyring) -> Vec<KeyEntry> {
        let primary = show_id(ring.primary(), &self.bloc);
        ring.list()
            .into_iter()
            .map(|k| {
                let id = show_id(k, &self.bloc);
                KeyEntry {
                    primary: id == primary,
                    id,
                }
            })
            .collect()
    }

    /// Resolves `text` (a base64 key or a key id) to an installed key.
    fn resolve(&self, ring: &Keyring, text: &str) -> anyhow::Result<SecretKey> {
        let text = text.trim();
        if let Ok(key) = SecretKey::parse(text) {
            return Ok(key);
        }
        let want = text.to_ascii_lowercase();
        let found: Vec<&SecretKey> = ring
            .list()
            .into_iter()
            .filter(|k| show_id(k, &self.bloc) == want)
            .collect();
        match found.as_slice() {
            [k] => Ok(SecretKey::from_bytes(*k.as_bytes())),
            [] => bail!("{text:?} is neither a key (base64) nor the id of an installed key"),
            _ => bail!("key id {text} is ambiguous: give the key itself"),
        }
    }

    /// The keys, primary first.
    pub fn list(&self) -> anyhow::Result<Vec<KeyEntry>> {
        let guard = self.ring.lock().expect("keyring lock");
        match guard.as_ref() {
            Some(ring) => Ok(self.entries(ring)),
            None => bail!(
                "no keyring at {} yet (install a key: `crux keys install $(crux keygen)`)",
                self.path.display()
            ),
        }
    }

    /// Adds a key; the first key of a new keyring becomes primary.
    pub fn install(&self, text: &str) -> anyhow::Result<Vec<KeyEntry>> {
        let key = SecretKey::parse(text.trim()).map_err(|e| anyhow!("not a key: {e}"))?;
        let mut guard = self.ring.lock().expect("keyring lock");
        let mut ring = match guard.as_ref() {
            Some(r) => r.clone(),
            None => Keyring::new(SecretKey::from_bytes(*key.as_bytes())),
        };
        ring.install(key).map_err(|e| anyhow!("{e}"))?;
        self.commit(&mut guard, ring)
    }

    /// Makes an installed key primary.
    pub fn use_key(&self, text: &str) -> anyhow::Result<Vec<KeyEntry>> {
        let mut guard = self.ring.lock().expect("keyring lock");
        let mut ring = guard
            .clone()
            .ok_or_else(|| anyhow!("no keyring yet: install a key"))?;
        let key = self.resolve(&ring, text)?;
        ring.use_key(&key).map_err(|e| anyhow!("{e}"))?;
        self.commit(&mut guard, ring)
    }

    /// Removes an installed key that is not primary.
    pub fn remove(&self, text: &str) -> anyhow::Result<Vec<KeyEntry>> {
        let mut guard = self.ring.lock().expect("keyring lock");
        let mut ring = guard
            .clone()
            .ok_or_else(|| anyhow!("no keyring yet: install a key"))?;
        let key = self.resolve(&ring, text)?;
        ring.remove(&key).map_err(|e| anyhow!("{e}"))?;
        self.commit(&mut guard, ring)
    }

    /// Saves `ring`, then makes it current: on a failed save nothing changes.
    fn commit(&self, guard: &mut Option<Keyring>, ring: Keyring) -> anyhow::Result<Vec<KeyEntry>> {
        ring.save(&self.path)
            .map_err(|e| anyhow!("saving the keyring: {e}"))?;
        let entries = self.entries(&ring);
        *guard = Some(ring);
        Ok(entries)
    }
}

/// A new random key as base64 text.
pub fn generate() -> String {
    let key = SecretKey::generate(&mut rand::rngs::OsRng);
    key.to_base64().to_string()
}

/// Writes a new keyring file holding `key` as primary (used by `crux dev`).
pub fn write_new(path: &Path, key: &str) -> anyhow::Result<()> {
    let key = SecretKey::parse(key).map_err(|e| anyhow!("not a key: {e}"))?;
    Keyring::new(key)
        .save(path)
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_install_use_remove_by_key_or_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let ring = LocalKeyring::open(path.clone(), "bloc").unwrap();
        assert!(ring.list().is_err());
        let (a, b) = (generate(), generate());
        let keys = ring.install(&a).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].primary);
        let keys = ring.install(&b).unwrap();
        assert_eq!(keys.len(), 2);
        let b_id = keys.iter().find(|k| !k.primary).unwrap().id.clone();
        let keys = ring.use_key(&b_id).unwrap();
        assert_eq!(keys[0].id, b_id);
        assert!(ring.remove(&b).is_err(), "the primary cannot be removed");
        let keys = ring.remove(&a).unwrap();
        assert_eq!(keys.len(), 1);
        // The file says the same, with mode 0600.
        let again = LocalKeyring::open(path.clone(), "bloc").unwrap();
        assert_eq!(again.list().unwrap(), keys);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(ring.use_key("deadbeef").is_err());
        assert!(ring.install("not a key").is_err());
    }
}
