//! Secret keys, the bloc binding and key derivation.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use hkdf::HkdfExtract;
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Bytes of every secret key (secondary, transient and derived).
pub const KEY_BYTES: usize = 32;

/// Length of the base64 text form of a [`SecretKey`] (standard alphabet, padded).
pub const KEY_BASE64_CHARS: usize = 44;

/// HKDF `info` labels. Every derivation also takes the bloc's salt (see [`Bloc`]).
pub(crate) mod label {
    pub const TRANSIENT_PACKET: &[u8] = b"crux-flock/v1/transient-packet";
    pub const HANDSHAKE: &[u8] = b"crux-flock/v1/handshake";
    pub const KEY_ID: &[u8] = b"crux-flock/v1/key-id";
    pub const JOIN_REPLY: &[u8] = b"crux-flock/v1/join-reply";
    pub const NODE_AUTH: &[u8] = b"crux-node/v1/auth";
}

/// A 32-byte secret: a secondary key, a transient key or a key derived from them.
///
/// Wiped from memory when dropped (and when replaced through [`Zeroize`]). `Debug` prints no key
/// material. Equality is constant-time.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; KEY_BYTES]);

impl SecretKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> SecretKey {
        SecretKey(bytes)
    }

    /// A fresh random key drawn from `rng` (the caller's seeded CSPRNG).
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> SecretKey {
        let mut key = SecretKey([0; KEY_BYTES]);
        rng.fill_bytes(&mut key.0);
        key
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// Parses the text form: 32 bytes in standard padded base64 (44 characters, as `crux keys
    /// generate` prints and Serf's `keygen` uses). Surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<SecretKey, KeyParseError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(KeyParseError::Empty);
        }
        if text.len() != KEY_BASE64_CHARS {
            return Err(KeyParseError::Length(text.len()));
        }
        let mut buf = Zeroizing::new([0u8; KEY_BYTES + 2]);
        let n = STANDARD
            .decode_slice(text.as_bytes(), &mut buf[..])
            .map_err(|_| KeyParseError::Base64)?;
        if n != KEY_BYTES {
            return Err(KeyParseError::Length(text.len()));
        }
        let mut key = SecretKey([0; KEY_BYTES]);
        key.0.copy_from_slice(&buf[..KEY_BYTES]);
        Ok(key)
    }

    /// The text form read by [`SecretKey::parse`]. The string is wiped when dropped.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0))
    }

    /// Constant-time comparison (also what `==` does).
    pub fn ct_eq(&self, other: &SecretKey) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl PartialEq for SecretKey {
    fn eq(&self, other: &SecretKey) -> bool {
        self.ct_eq(other)
    }
}

impl Eq for SecretKey {}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// Why a key's text form was refused. Comes from operator input (config, keyring file, CLI).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// Nothing to parse.
    #[error("the key is empty; expected 44 characters of base64 (32 bytes)")]
    Empty,
    /// Wrong length.
    #[error("the key is {0} characters long; expected 44 characters of base64 (32 bytes)")]
    Length(usize),
    /// Not base64.
    #[error("the key is not valid base64 (standard alphabet, padded)")]
    Base64,
}

/// Constant-time equality of two equally long byte strings: every byte is looked at whatever
/// the contents, and the result goes through an optimisation barrier before the branch.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// The bloc a node belongs to, as the security layer uses it.
///
/// Its [`tag`](Bloc::tag) goes in every header, so that datagrams of other blocs are dropped
/// before any cryptographic work; its salt goes into every key derivation (HKDF-SHA-256 salt),
/// so two blocs that share a secondary key still derive different keys and cannot read each
/// other even when their tags collide.
#[derive(Clone, PartialEq, Eq)]
pub struct Bloc {
    tag: u32,
    salt: [u8; 32],
}

impl Bloc {
    /// The binding of a bloc ID (the `bloc` of the flock config).
    pub fn new(bloc_id: &str) -> Bloc {
        let mut h = Sha256::new();
        h.update(b"crux-flock/v1/bloc\0");
        h.update(bloc_id.as_bytes());
        Bloc {
            tag: crate::config::bloc_tag(bloc_id),
            salt: h.finalize().into(),
        }
    }

    /// The header's bloc tag (FNV-1a of the bloc ID, [`crate::config::bloc_tag`]).
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// SHA-256 of the bloc ID under a domain label: the HKDF salt of every derivation.
    pub fn salt(&self) -> &[u8; 32] {
        &self.salt
    }

    /// HKDF-SHA-256 with this bloc's salt: `ikm` parts are concatenated, `info` names the use.
    pub(crate) fn derive(&self, ikm: &[&[u8]], info: &[u8]) -> SecretKey {
        let mut extract = HkdfExtract::<Sha256>::new(Some(&self.salt));
        for part in ikm {
            extract.input_ikm(part);
        }
        let (_, hkdf) = extract.finalize();
        let mut key = SecretKey([0; KEY_BYTES]);
        hkdf.expand(info, &mut key.0)
            .expect("32 bytes is a valid HKDF-SHA-256 length");
        key
    }
}

impl fmt::Debug for Bloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bloc(tag={:08x})", self.tag)
    }
}

/// The key id of a secondary key within a bloc: the first 4 bytes (little endian) of
/// `HKDF(bloc salt, secondary, "key-id")`. Carried as `header.key_id` of handshake datagrams so
/// that a responder knows which installed key to try (one attempt). It reveals nothing about the
/// key, and differs between blocs for the same key.
pub fn key_id(secondary: &SecretKey, bloc: &Bloc) -> u32 {
    let derived = bloc.derive(&[secondary.as_bytes()], label::KEY_ID);
    let b = derived.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The key that proves, on a node-to-node TCP connection, that its end holds `secondary`:
/// `HKDF(bloc salt, secondary, "crux-node/v1/auth")`, never the secondary key itself.
pub fn node_auth_key(secondary: &SecretKey, bloc: &Bloc) -> SecretKey {
    bloc.derive(&[secondary.as_bytes()], label::NODE_AUTH)
}

/// An AEAD key ready to seal and open datagrams: always derived from a transient or secondary key
/// and the [`Bloc`], never a raw key. Wiped on drop.
#[derive(Clone)]
pub struct PacketKey {
    pub(crate) cipher: XChaCha20Poly1305,
}

impl PacketKey {
    /// The key that seals flock datagrams under a transient key.
    pub fn transient(key: &SecretKey, bloc: &Bloc) -> PacketKey {
        PacketKey::from_derived(&bloc.derive(&[key.as_bytes()], label::TRANSIENT_PACKET))
    }

    /// The key that seals handshake datagrams under a secondary key.
    pub fn handshake(secondary: &SecretKey, bloc: &Bloc) -> PacketKey {
        PacketKey::from_derived(&bloc.derive(&[secondary.as_bytes()], label::HANDSHAKE))
    }

    pub(crate) fn from_derived(key: &SecretKey) -> PacketKey {
        PacketKey {
            cipher: XChaCha20Poly1305::new(key.as_bytes().into()),
        }
    }
}

impl fmt::Debug for PacketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PacketKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn base64_of_a_known_key() {
        let key = SecretKey::from_bytes([0; 32]);
        assert_eq!(
            key.to_base64().as_str(),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        );
        let key = SecretKey::from_bytes(core::array::from_fn(|i| i as u8));
        assert_eq!(
            key.to_base64().as_str(),
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        );
        assert_eq!(
            SecretKey::parse(" AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap(),
            key
        );
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        assert_eq!(SecretKey::parse("  ").unwrap_err(), KeyParseError::Empty);
        assert_eq!(
            SecretKey::parse("AAAA").unwrap_err(),
            KeyParseError::Length(4)
        );
        let bad = "!AECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        assert_eq!(SecretKey::parse(bad).unwrap_err(), KeyParseError::Base64);
        // 44 characters that decode to 33 bytes cannot exist; 44 without padding is 33 bytes.
        let long = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g";
        assert!(SecretKey::parse(long).is_err());
        assert!(KeyParseError::Length(4)
            .to_string()
            .contains("expected 44 characters"));
    }

    #[test]
    fn debug_prints_no_key_material() {
        let key = SecretKey::from_bytes([0xab; 32]);
        let text = format!("{key:?} {:?}", PacketKey::transient(&key, &Bloc::new("b")));
        assert_eq!(text, "SecretKey(..) PacketKey(..)");
        assert!(!text.contains("ab") && !text.contains("171"));
    }

    #[test]
    fn generate_is_deterministic_given_the_rng() {
        let a = SecretKey::generate(&mut ChaCha20Rng::seed_from_u64(7));
        let b = SecretKey::generate(&mut ChaCha20Rng::seed_from_u64(7));
        let c = SecretKey::generate(&mut ChaCha20Rng::seed_from_u64(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn zeroize_wipes_the_bytes() {
        let mut key = SecretKey::from_bytes([9; 32]);
        key.zeroize();
        assert_eq!(key.as_bytes(), &[0; 32]);
    }

    #[test]
    fn constant_time_eq_compares_every_byte() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        let mut x = [5u8; 32];
        let k = SecretKey::from_bytes(x);
        x[31] = 6;
        assert_ne!(k, SecretKey::from_bytes(x));
    }

    #[test]
    fn bloc_tag_matches_the_config_tag() {
        let bloc = Bloc::new("prod");
        assert_eq!(bloc.tag(), crate::config::bloc_tag("prod"));
        assert_ne!(bloc.salt(), Bloc::new("prod2").salt());
    }

    #[test]
    fn derivations_depend_on_the_bloc_and_the_label() {
        let key = SecretKey::from_bytes([1; 32]);
        let (a, b) = (Bloc::new("a"), Bloc::new("b"));
        let ka = a.derive(&[key.as_bytes()], label::HANDSHAKE);
        assert_ne!(ka, b.derive(&[key.as_bytes()], label::HANDSHAKE));
        assert_ne!(ka, a.derive(&[key.as_bytes()], label::TRANSIENT_PACKET));
        assert_eq!(
            ka,
            a.derive(
                &[&key.as_bytes()[..16], &key.as_bytes()[16..]],
                label::HANDSHAKE
            )
        );
        assert_ne!(key_id(&key, &a), key_id(&key, &b));
        assert_ne!(
            key_id(&key, &a),
            key_id(&SecretKey::from_bytes([2; 32]), &a)
        );
    }

    #[test]
    fn key_id_is_stable() {
        // A fixed vector (computed independently with Python's hmac/hashlib): changing the
        // derivation changes every deployed key id.
        let id = key_id(&SecretKey::from_bytes([0; 32]), &Bloc::new("crux"));
        assert_eq!(id, 0xec29_52db);
    }

    proptest! {
        #[test]
        fn base64_roundtrips(bytes in any::<[u8; 32]>()) {
            let key = SecretKey::from_bytes(bytes);
            let text = key.to_base64();
            prop_assert_eq!(text.len(), KEY_BASE64_CHARS);
            prop_assert_eq!(SecretKey::parse(&text).unwrap(), key);
        }

        #[test]
        fn parse_never_panics(text in ".{0,64}") {
            let _ = SecretKey::parse(&text);
        }
    }
}
