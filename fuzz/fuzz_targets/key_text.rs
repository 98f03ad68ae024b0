//! Operator-supplied and announced key material: `SecretKey::parse`, `Keyring::parse` and
//! `KeyAnnouncement::decode` and `KeyringOp::decode` never panic, and what they accept writes back the same.
#![no_main]

use std::path::Path;

use crux_flock::crypto::{KeyAnnouncement, Keyring, KeyringOp, SecretKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ann) = KeyAnnouncement::decode(data) {
        assert_eq!(&ann.encode()[..], data);
    }
    if let Some(op) = KeyringOp::decode(data) {
        assert_eq!(&op.encode()[..], data);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = SecretKey::parse(text) {
        assert_eq!(SecretKey::parse(&key.to_base64()).unwrap(), key);
    }
    if let Ok(ring) = Keyring::parse(text, Path::new("fuzz")) {
        let back = Keyring::parse(&ring.to_text(), Path::new("fuzz")).unwrap();
        assert_eq!(back.list(), ring.list());
    }
});
