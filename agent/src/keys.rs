//! The secondary keyring, as the local API and the CLI see it.
//!
//! The flock core owns the keyring ([`crux_flock::crypto::Keyring`]): `install`, `use` and
//! `remove` go to the core as [`KeyringOp`]s, which applies them and spreads them to every member
//! (Serf's rotation: install everywhere, use, remove the old key). Every change, made here or
//! spread by the flock, comes back through the driver's keyring watch and is saved to the keyring
//! file (mode 0600, written atomically) by [`save_changes`].
//!
//! Keys are shown by id (the 8-hex-digit key id of the bloc, as in handshake headers), never as
//! key material. `use` and `remove` take the key itself or its id.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context};
use crux_flock::crypto::{key_id, node_auth_key, Bloc, Keyring, KeyringOp, SecretKey};
use crux_flock::driver::DriverHandle;
use tracing::{info, warn};

/// One key of the keyring, as listed (ids only, never key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// Key id (8 hex digits).
    pub id: String,
    /// Whether it is the primary key.
    pub primary: bool,
}

/// The id of a key in a bloc, as shown.
pub fn show_id(id: u32) -> String {
    format!("{id:08x}")
}

/// Loads the keyring file the agent needs to start.
pub fn load(path: &Path) -> anyhow::Result<Keyring> {
    if !path.exists() {
        bail!(
            "no keyring at {}: every node of a bloc needs the same secondary key there \
             (make one with `crux keygen`, put the same line in each node's keyring file, mode 0600)",
            path.display()
        );
    }
    Keyring::load(path).map_err(|e| anyhow!("keyring: {e}"))
}

/// The keyring side of the local API.
pub struct Keys {
    flock: DriverHandle,
    bloc: Bloc,
    /// The keyring as last published by the core (to resolve key ids to keys).
    latest: Mutex<Keyring>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").finish_non_exhaustive()
    }
}

impl Keys {
    /// The keyring API over the driver of a secure flock started with `initial`.
    pub fn new(flock: DriverHandle, bloc_id: &str, initial: Keyring) -> Keys {
        Keys {
            flock,
            bloc: Bloc::new(bloc_id),
            latest: Mutex::new(initial),
        }
    }

    fn refresh(&self) {
        if let Some(ring) = self.flock.keyring_watch().borrow().clone() {
            *self.latest.lock().expect("keyring lock") = ring;
        }
    }

    /// The keys of this node, primary first.
    pub fn list(&self) -> Vec<KeyEntry> {
        self.flock
            .snapshot()
            .keys
            .iter()
            .map(|k| KeyEntry {
                id: show_id(k.id),
                primary: k.primary,
            })
            .collect()
    }

    /// Resolves `text` (a base64 key, or the id of an installed key) to a key.
    fn resolve(&self, text: &str) -> anyhow::Result<SecretKey> {
        let text = text.trim();
        if let Ok(key) = SecretKey::parse(text) {
            return Ok(key);
        }
        self.refresh();
        let ring = self.latest.lock().expect("keyring lock");
        let want = text.to_ascii_lowercase();
        let found: Vec<&SecretKey> = ring
            .list()
            .into_iter()
            .filter(|k| show_id(key_id(k, &self.bloc)) == want)
            .collect();
        match found.as_slice() {
            [k] => Ok(SecretKey::from_bytes(*k.as_bytes())),
            [] => bail!("{text:?} is neither a key (base64) nor the id of an installed key"),
            _ => bail!("key id {text} is ambiguous: give the key itself"),
        }
    }

    async fn apply(&self, op: KeyringOp) -> anyhow::Result<Vec<KeyEntry>> {
        match self.flock.keyring(op).await {
            Err(_) => bail!("the agent is shutting down"),
            Ok(Err(reason)) => bail!("{reason}"),
            // The driver publishes the changed keyring before it replies.
            Ok(Ok(())) => Ok(self.list()),
        }
    }

    /// Installs a key everywhere.
    pub async fn install(&self, text: &str) -> anyhow::Result<Vec<KeyEntry>> {
        let key = SecretKey::parse(text.trim()).map_err(|e| anyhow!("not a key: {e}"))?;
        self.apply(KeyringOp::Install(key)).await
    }

    /// Makes an installed key the primary everywhere.
    pub async fn use_key(&self, text: &str) -> anyhow::Result<Vec<KeyEntry>> {
        let key = self.resolve(text)?;
        self.apply(KeyringOp::Use(key)).await
    }

    /// Removes a key that is not the primary, everywhere.
    pub async fn remove(&self, text: &str) -> anyhow::Result<Vec<KeyEntry>> {
        let key = self.resolve(text)?;
        self.apply(KeyringOp::Remove(key)).await
    }
}

/// Saves every keyring the core publishes to `path`, until the driver stops.
pub async fn save_changes(flock: DriverHandle, path: PathBuf) {
    let mut watch = flock.keyring_watch();
    while watch.changed().await.is_ok() {
        let Some(ring) = watch.borrow_and_update().clone() else {
            continue;
        };
        let p = path.clone();
        let saved = tokio::task::spawn_blocking(move || ring.save(&p).map(|()| ring.len())).await;
        match saved {
            Ok(Ok(n)) => info!(keyring = %path.display(), keys = n, "keyring saved"),
            Ok(Err(e)) => warn!(keyring = %path.display(), error = %e, "keyring not saved"),
            Err(e) => warn!(error = %e, "keyring save task failed"),
        }
    }
}

/// The node plane's bloc keys ([`crux_transport::BlocKeys`]) of a keyring: one derived from
/// each secondary key, by key id, the primary first.
pub fn bloc_keys(ring: &Keyring, bloc: &Bloc) -> Option<crux_transport::BlocKeys> {
    crux_transport::BlocKeys::new(
        ring.list()
            .into_iter()
            .map(|k| (key_id(k, bloc), *node_auth_key(k, bloc).as_bytes()))
            .collect(),
    )
}

/// Gives `transport` the bloc keys of `initial`, then follows every keyring change (made here
/// or spread by the flock) until the driver ends: a key installed is accepted from then on, a
/// key put in use is the one this node connects with, a key removed closes the connections made
/// under it and is refused.
/// Returns the task that follows, for the caller to spawn and own.
pub fn follow_bloc_keys(
    flock: &DriverHandle,
    bloc_id: &str,
    initial: &Keyring,
    transport: crux_transport::Transport,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let bloc = Bloc::new(bloc_id);
    transport.set_bloc_keys(bloc_keys(initial, &bloc));
    let mut watch = flock.keyring_watch();
    async move {
        while watch.changed().await.is_ok() {
            let keys = watch
                .borrow_and_update()
                .as_ref()
                .map(|ring| bloc_keys(ring, &bloc));
            if let Some(keys) = keys {
                transport.set_bloc_keys(keys);
            }
        }
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
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_output_is_a_keyring_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        assert!(load(&path).unwrap_err().to_string().contains("crux keygen"));
        std::fs::write(&path, format!("{}\n", generate())).unwrap();
        assert_eq!(load(&path).unwrap().len(), 1);
        let other = dir.path().join("other");
        write_new(&other, &generate()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&other).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(write_new(&other, "not a key").is_err());
    }
}
