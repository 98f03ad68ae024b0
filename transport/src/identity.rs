//! A node's static identity on the node plane: an Ed25519 key pair, made once and kept in the
//! data dir (PKCS#8, mode 0600). Its public half is the [`NodeKey`] the node announces in its
//! flock membership record; peers accept the node only while the flock lists that key for it.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crux_proto::flock::NodeKey;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use zeroize::Zeroizing;

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the raw 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why an identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The key file does not hold an Ed25519 PKCS#8 key.
    #[error("{0}: not an Ed25519 PKCS#8 key (delete it to make a new identity; the node's peers learn the new key from the flock)")]
    Malformed(String),
    /// The system's random source failed.
    #[error("no randomness to make a key from")]
    Random,
}

/// A node's Ed25519 key pair. The secret is wiped on drop.
#[derive(Clone)]
pub struct NodeIdentity {
    pkcs8: Arc<Zeroizing<Vec<u8>>>,
    public: NodeKey,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// A new random identity.
    pub fn generate() -> Result<NodeIdentity, IdentityError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| IdentityError::Random)?;
        Self::from_pkcs8(doc.as_ref()).ok_or(IdentityError::Random)
    }

    /// The identity a PKCS#8 document holds, if it is an Ed25519 key.
    pub fn from_pkcs8(der: &[u8]) -> Option<NodeIdentity> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).ok()?;
        let public = NodeKey(pair.public_key().as_ref().try_into().ok()?);
        Some(NodeIdentity {
            pkcs8: Arc::new(Zeroizing::new(der.to_vec())),
            public,
        })
    }

    /// Loads the identity at `path`, or makes one and stores it there (mode 0600, through a
    /// temp file and a rename, so a crash never leaves half a key).
    pub fn load_or_create(path: &Path) -> Result<NodeIdentity, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(path) {
            Ok(der) => {
                let der = Zeroizing::new(der);
                Self::from_pkcs8(&der)
                    .ok_or_else(|| IdentityError::Malformed(path.display().to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate()?;
                let tmp = path.with_extension("tmp");
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&tmp).map_err(io)?;
                f.write_all(&id.pkcs8).map_err(io)?;
                f.sync_all().map_err(io)?;
                std::fs::rename(&tmp, path).map_err(io)?;
                Ok(id)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The public key, as the flock carries it.
    pub fn public(&self) -> NodeKey {
        self.public
    }

    /// The key as rustls presents it: the public key in place of a certificate (RFC 7250 raw
    /// public key) with its signer.
    pub(crate) fn certified_key(
        &self,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<Arc<CertifiedKey>, rustls::Error> {
        let key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                self.pkcs8.to_vec(),
            )))?;
        Ok(Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(spki(&self.public))],
            key,
        )))
    }
}

/// The SubjectPublicKeyInfo DER of a node key.
pub fn spki(key: &NodeKey) -> Vec<u8> {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(&key.0);
    der
}

/// The node key a SubjectPublicKeyInfo DER holds, if it is exactly an Ed25519 one.
pub fn key_of_spki(der: &[u8]) -> Option<NodeKey> {
    let raw = der.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    raw.try_into().ok().map(NodeKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_survives_a_restart_and_its_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-key");
        let a = NodeIdentity::load_or_create(&path).unwrap();
        let b = NodeIdentity::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let c = NodeIdentity::generate().unwrap();
        assert_ne!(a.public(), c.public());
    }

    #[test]
    fn a_corrupt_key_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-key");
        std::fs::write(&path, b"not a key").unwrap();
        let e = NodeIdentity::load_or_create(&path).unwrap_err();
        assert!(e.to_string().contains("node-key"), "{e}");
    }

    #[test]
    fn spki_round_trips_and_rejects_other_keys() {
        let k = NodeKey([7; 32]);
        assert_eq!(key_of_spki(&spki(&k)), Some(k));
        let mut other = spki(&k);
        other[8] = 0x71; // Ed448's OID
        assert_eq!(key_of_spki(&other), None);
        assert_eq!(key_of_spki(&spki(&k)[..40]), None);
    }
}
