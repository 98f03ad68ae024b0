//! The secondary keyring (Serf-style install / use / remove / list) and its file.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::keys::{key_id, Bloc, KeyParseError, PacketKey, SecretKey};

/// Most keys a keyring holds (a rotation needs two; the bound keeps the handshake lookup and the
/// spread of the ring small).
pub const MAX_KEYS: usize = 16;

/// File mode of the keyring file: read and write by the owner only.
pub const KEYRING_FILE_MODE: u32 = 0o600;

/// The first line [`Keyring::save`] writes.
const FILE_COMMENT: &str = "# crux flock keyring: one base64 key per line, the primary key first";

/// The secondary keys of a bloc, as in Serf: every installed key admits a joiner (the handshake
/// responder tries the key the request's key id names); the primary key is the one this node's
/// own handshakes use. A rotation is `install(new)` everywhere, `use_key(new)`, `remove(old)`.
///
/// File format ([`Keyring::load`], [`Keyring::save`]): UTF-8 text, one key per line in the
/// base64 text form of [`SecretKey::parse`], the primary key first; blank lines and lines
/// starting with `#` are ignored. At least one key, at most [`MAX_KEYS`], no duplicates.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<SecretKey>,
    primary: usize,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.keys.len())
            .field("primary", &self.primary)
            .finish()
    }
}

/// Why a keyring operation, load or save failed. Comes from operator input or the file system,
/// never from the network; a failed operation leaves the keyring (and the file) unchanged.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// `use` or `remove` of a key that is not installed.
    #[error("the key is not installed in the keyring")]
    NotInstalled,
    /// `remove` of the primary key.
    #[error("the primary key cannot be removed: `use` another key first")]
    RemovePrimary,
    /// `install` beyond [`MAX_KEYS`].
    #[error("the keyring is full ({MAX_KEYS} keys): remove a key first")]
    Full,
    /// A keyring with no key.
    #[error("the keyring has no key")]
    Empty,
    /// A line of the file is not a key.
    #[error("{path}: line {line}: {error}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        error: KeyParseError,
    },
    /// The same key twice in the file.
    #[error("{path}: line {line}: the key is already on line {first}")]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the repeat.
        line: usize,
        /// 1-based line number of the first occurrence.
        first: usize,
    },
    /// More than [`MAX_KEYS`] keys in the file.
    #[error("{path}: more than {MAX_KEYS} keys")]
    TooManyKeys {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no key.
    #[error("{path}: no key in the file")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// Reading or writing the file failed.
    #[error("{path}: {action}: {source}")]
    Io {
        /// The file (or the temporary file, or the directory).
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl Keyring {
    /// A keyring holding one key, which is primary.
    pub fn new(primary: SecretKey) -> Keyring {
        Keyring {
            keys: vec![primary],
            primary: 0,
        }
    }

    /// The primary key (this node's own handshakes use it).
    pub fn primary(&self) -> &SecretKey {
        &self.keys[self.primary]
    }

    /// Every installed key, the primary first, then in installation order.
    pub fn list(&self) -> Vec<&SecretKey> {
        let mut out = vec![&self.keys[self.primary]];
        out.extend(
            self.keys
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != self.primary)
                .map(|(_, k)| k),
        );
        out
    }

    /// Number of installed keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a keyring has at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `key` is installed (constant-time comparisons).
    pub fn contains(&self, key: &SecretKey) -> bool {
        self.position(key).is_some()
    }

    fn position(&self, key: &SecretKey) -> Option<usize> {
        // Compare with every key, whatever matches, so timing says nothing about the position.
        let mut found = None;
        for (i, k) in self.keys.iter().enumerate() {
            if k.ct_eq(key) {
                found = Some(i);
            }
        }
        found
    }

    /// Installs a key (not primary). Returns false if it was already installed.
    pub fn install(&mut self, key: SecretKey) -> Result<bool, KeyringError> {
        if self.contains(&key) {
            return Ok(false);
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(KeyringError::Full);
        }
        self.keys.push(key);
        Ok(true)
    }

    /// Makes an installed key the primary.
    pub fn use_key(&mut self, key: &SecretKey) -> Result<(), KeyringError> {
        self.primary = self.position(key).ok_or(KeyringError::NotInstalled)?;
        Ok(())
    }

    /// Removes an installed key other than the primary (the removed key is wiped).
    pub fn remove(&mut self, key: &SecretKey) -> Result<(), KeyringError> {
        let i = self.position(key).ok_or(KeyringError::NotInstalled)?;
        if i == self.primary {
            return Err(KeyringError::RemovePrimary);
        }
        self.keys.remove(i);
        if self.primary > i {
            self.primary -= 1;
        }
        Ok(())
    }

    /// The installed key whose [`key_id`] in `bloc` is `id` (the one key a handshake responder
    /// tries), with its handshake packet key.
    pub fn by_key_id(&self, id: u32, bloc: &Bloc) -> Option<(&SecretKey, PacketKey)> {
        self.keys
            .iter()
            .find(|k| key_id(k, bloc) == id)
            .map(|k| (k, PacketKey::handshake(k, bloc)))
    }

    /// Parses the text of a keyring file; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Keyring, KeyringError> {
        let mut keys: Vec<(usize, SecretKey)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = SecretKey::parse(line).map_err(|error| KeyringError::BadKey {
                path: path.to_owned(),
                line: n + 1,
                error,
            })?;
            if let Some((first, _)) = keys.iter().find(|(_, k)| k.ct_eq(&key)) {
                return Err(KeyringError::Duplicate {
                    path: path.to_owned(),
                    line: n + 1,
                    first: *first,
                });
            }
            if keys.len() == MAX_KEYS {
                return Err(KeyringError::TooManyKeys {
                    path: path.to_owned(),
                });
            }
            keys.push((n + 1, key));
        }
        if keys.is_empty() {
            return Err(KeyringError::EmptyFile {
                path: path.to_owned(),
            });
        }
        Ok(Keyring {
            keys: keys.into_iter().map(|(_, k)| k).collect(),
            primary: 0,
        })
    }

    /// The file text: a comment line, then one key per line, the primary first. Wiped on drop.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(64 + 45 * self.keys.len()));
        text.push_str(FILE_COMMENT);
        text.push('\n');
        for key in self.list() {
            text.push_str(&key.to_base64());
            text.push('\n');
        }
        text
    }

    /// Reads a keyring file (see the type's doc for the format).
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let bytes = Zeroizing::new(fs::read(path).map_err(|source| KeyringError::Io {
            path: path.to_owned(),
            action: "reading the keyring",
            source,
        })?);
        let text = std::str::from_utf8(&bytes).map_err(|e| KeyringError::Io {
            path: path.to_owned(),
            action: "reading the keyring",
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Keyring::parse(text, path)
    }

    /// Writes the keyring to `path` atomically: the text is validated by parsing it back, then
    /// written to `<path>.tmp` created with mode 0600, fsynced, renamed over `path`, and the
    /// directory is fsynced. On error `path` is unchanged.
    pub fn save(&self, path: &Path) -> Result<(), KeyringError> {
        if self.keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        let text = self.to_text();
        let check = Keyring::parse(&text, path)?;
        if check != self.canonical() {
            return Err(KeyringError::Io {
                path: path.to_owned(),
                action: "validating the keyring",
                source: std::io::Error::other("the written text does not read back the same"),
            });
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let io = |action: &'static str, p: &Path| {
            let p = p.to_owned();
            move |source| KeyringError::Io {
                path: p,
                action,
                source,
            }
        };
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(KEYRING_FILE_MODE)
                .open(&tmp)
                .map_err(io("creating the temporary keyring", &tmp))?;
            // The mode only applies when the file is created; a leftover file keeps its own.
            file.set_permissions(fs::Permissions::from_mode(KEYRING_FILE_MODE))
                .map_err(io("setting mode 0600", &tmp))?;
            file.write_all(text.as_bytes())
                .map_err(io("writing the keyring", &tmp))?;
            file.sync_all().map_err(io("syncing the keyring", &tmp))?;
            fs::rename(&tmp, path).map_err(io("renaming the temporary keyring", path))?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing the keyring's directory", dir))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The same keyring with the primary first (the order the file has).
    fn canonical(&self) -> Keyring {
        Keyring {
            keys: self.list().into_iter().cloned().collect(),
            primary: 0,
        }
    }
}

/// A keyring change as it spreads through the flock (the body of a core message sealed under the
/// transient key; the operator's `crux keys install|use|remove` on one node becomes one of these
/// everywhere). Encoded as fixed-size bytes: `op (1) || key (32)`, op 1 = install, 2 = use,
/// 3 = remove.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum KeyringOp {
    /// Install a key.
    Install(SecretKey),
    /// Make an installed key the primary.
    Use(SecretKey),
    /// Remove a key that is not the primary.
    Remove(SecretKey),
}

/// Bytes of an encoded [`KeyringOp`].
pub const KEYRING_OP_BYTES: usize = 1 + super::keys::KEY_BYTES;

impl KeyringOp {
    /// The fixed-size encoding (it holds a key: wipe it after use).
    pub fn encode(&self) -> [u8; KEYRING_OP_BYTES] {
        let (op, key) = match self {
            KeyringOp::Install(k) => (1, k),
            KeyringOp::Use(k) => (2, k),
            KeyringOp::Remove(k) => (3, k),
        };
        let mut out = [0u8; KEYRING_OP_BYTES];
        out[0] = op;
        out[1..].copy_from_slice(key.as_bytes());
        out
    }

    /// Decodes exactly [`KEYRING_OP_BYTES`] bytes; None for anything else.
    pub fn decode(bytes: &[u8]) -> Option<KeyringOp> {
        if bytes.len() != KEYRING_OP_BYTES {
            return None;
        }
        let mut raw = Zeroizing::new([0u8; super::keys::KEY_BYTES]);
        raw.copy_from_slice(&bytes[1..]);
        let key = SecretKey::from_bytes(*raw);
        match bytes[0] {
            1 => Some(KeyringOp::Install(key)),
            2 => Some(KeyringOp::Use(key)),
            3 => Some(KeyringOp::Remove(key)),
            _ => None,
        }
    }
}

impl Keyring {
    /// Applies an operation; Ok(true) when the keyring changed (save it then), Ok(false) when it
    /// already was that way (a repeated install or use, a remove of a key already gone).
    pub fn apply(&mut self, op: &KeyringOp) -> Result<bool, KeyringError> {
        match op {
            KeyringOp::Install(k) => self.install(k.clone()),
            KeyringOp::Use(k) => {
                let changed = !self.primary().ct_eq(k);
                self.use_key(k)?;
                Ok(changed)
            }
            KeyringOp::Remove(k) => match self.remove(k) {
                Ok(()) => Ok(true),
                Err(KeyringError::NotInstalled) => Ok(false),
                Err(e) => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    #[test]
    fn install_use_remove_list() {
        let mut r = Keyring::new(k(1));
        assert!(r.install(k(2)).unwrap());
        assert!(!r.install(k(2)).unwrap());
        assert_eq!(r.list(), [&k(1), &k(2)]);
        assert!(matches!(r.remove(&k(1)), Err(KeyringError::RemovePrimary)));
        assert!(matches!(r.use_key(&k(3)), Err(KeyringError::NotInstalled)));
        assert!(matches!(r.remove(&k(3)), Err(KeyringError::NotInstalled)));
        r.use_key(&k(2)).unwrap();
        assert_eq!(r.primary(), &k(2));
        assert_eq!(r.list(), [&k(2), &k(1)]);
        r.remove(&k(1)).unwrap();
        assert_eq!(r.list(), [&k(2)]);
        assert_eq!(r.primary(), &k(2));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn remove_before_the_primary_keeps_the_primary() {
        let mut r = Keyring::new(k(1));
        r.install(k(2)).unwrap();
        r.install(k(3)).unwrap();
        r.use_key(&k(3)).unwrap();
        r.remove(&k(1)).unwrap();
        assert_eq!(r.primary(), &k(3));
        assert_eq!(r.list(), [&k(3), &k(2)]);
    }

    #[test]
    fn keyring_is_bounded() {
        let mut r = Keyring::new(k(0));
        for b in 1..MAX_KEYS as u8 {
            r.install(k(b)).unwrap();
        }
        assert!(matches!(r.install(k(200)), Err(KeyringError::Full)));
        assert!(!r.install(k(3)).unwrap());
    }

    #[test]
    fn by_key_id_finds_every_installed_key() {
        let bloc = Bloc::new("b");
        let mut r = Keyring::new(k(1));
        r.install(k(2)).unwrap();
        for key in [k(1), k(2)] {
            let (found, _) = r.by_key_id(key_id(&key, &bloc), &bloc).unwrap();
            assert_eq!(found, &key);
        }
        assert!(r.by_key_id(key_id(&k(3), &bloc), &bloc).is_none());
        assert!(r
            .by_key_id(key_id(&k(1), &bloc), &Bloc::new("other"))
            .is_none());
    }

    #[test]
    fn text_format() {
        let mut r = Keyring::new(k(0));
        r.install(k(1)).unwrap();
        r.use_key(&k(1)).unwrap();
        let text = r.to_text();
        assert_eq!(
            text.as_str(),
            "# crux flock keyring: one base64 key per line, the primary key first\n\
             AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\
             AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
        );
        let back = Keyring::parse(&text, Path::new("x")).unwrap();
        assert_eq!(back.primary(), &k(1));
        assert_eq!(back.list(), r.list());
    }

    #[test]
    fn parse_errors_name_the_file_and_line() {
        let p = Path::new("/data/keyring");
        let e = Keyring::parse("# c\n\nAAAA\n", p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/data/keyring: line 3: the key is 4 characters long; expected 44 characters of base64 (32 bytes)"
        );
        let key = k(1).to_base64();
        let e = Keyring::parse(&format!("{}\n{}\n", *key, *key), p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/data/keyring: line 2: the key is already on line 1"
        );
        let e = Keyring::parse("# only a comment\n", p).unwrap_err();
        assert_eq!(e.to_string(), "/data/keyring: no key in the file");
        let many: String = (0..=MAX_KEYS as u8)
            .map(|b| format!("{}\n", *k(b).to_base64()))
            .collect();
        assert!(matches!(
            Keyring::parse(&many, p),
            Err(KeyringError::TooManyKeys { .. })
        ));
    }

    #[test]
    fn debug_prints_no_key() {
        assert_eq!(
            format!("{:?}", Keyring::new(k(7))),
            "Keyring { keys: 1, primary: 0 }"
        );
    }

    #[test]
    fn ops_encode_and_apply() {
        let ops = [
            KeyringOp::Install(k(2)),
            KeyringOp::Use(k(2)),
            KeyringOp::Remove(k(1)),
        ];
        let mut r = Keyring::new(k(1));
        for op in &ops {
            let bytes = op.encode();
            assert_eq!(bytes[1..], [op_key(op); 32]);
            assert_eq!(KeyringOp::decode(&bytes).as_ref(), Some(op));
            assert!(r.apply(op).unwrap(), "{op:?}");
            assert!(!r.apply(op).unwrap(), "{op:?} again changes nothing");
        }
        assert_eq!(r.list(), [&k(2)]);
        assert!(matches!(
            r.apply(&KeyringOp::Remove(k(2))),
            Err(KeyringError::RemovePrimary)
        ));
        assert!(matches!(
            r.apply(&KeyringOp::Use(k(9))),
            Err(KeyringError::NotInstalled)
        ));
        assert_eq!(KeyringOp::decode(&[0; 33]), None);
        assert_eq!(KeyringOp::decode(&[1; 32]), None);
        assert_eq!(KeyringOp::Install(k(3)).encode()[0], 1);
        assert!(!format!("{:?}", KeyringOp::Use(k(3))).contains('3'));
    }

    fn op_key(op: &KeyringOp) -> u8 {
        match op {
            KeyringOp::Install(k) | KeyringOp::Use(k) | KeyringOp::Remove(k) => k.as_bytes()[0],
        }
    }
}
