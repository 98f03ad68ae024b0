//! The keyring file: format, mode 0600, atomic replacement, and errors that say what is wrong.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crux_flock::crypto::{Keyring, KeyringError, SecretKey, KEYRING_FILE_MODE};

fn k(b: u8) -> SecretKey {
    SecretKey::from_bytes([b; 32])
}

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn save_then_load_keeps_keys_and_primary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    let mut ring = Keyring::new(k(1));
    ring.install(k(2)).unwrap();
    ring.install(k(3)).unwrap();
    ring.use_key(&k(3)).unwrap();
    ring.save(&path).unwrap();
    let back = Keyring::load(&path).unwrap();
    assert_eq!(back.primary(), &k(3));
    assert_eq!(back.list(), [&k(3), &k(1), &k(2)]);
    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(lines[0].starts_with('#'));
    assert_eq!(lines[1], k(3).to_base64().as_str());
}

#[test]
fn the_file_has_mode_0600_even_over_a_leftover_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    let tmp = dir.path().join("keyring.tmp");
    fs::write(&tmp, "junk").unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    Keyring::new(k(1)).save(&path).unwrap();
    assert_eq!(KEYRING_FILE_MODE, 0o600);
    assert_eq!(mode(&path), 0o600);
    assert!(!tmp.exists(), "the temp file was renamed into place");
    // Replacing an existing, more open file also yields 0600.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    Keyring::new(k(2)).save(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(Keyring::load(&path).unwrap().primary(), &k(2));
}

#[test]
fn a_failed_save_leaves_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    Keyring::new(k(1)).save(&path).unwrap();
    // The target is a non-empty directory: the rename fails.
    let blocked = dir.path().join("blocked");
    fs::create_dir(&blocked).unwrap();
    fs::write(blocked.join("x"), "x").unwrap();
    let err = Keyring::new(k(2)).save(&blocked).unwrap_err();
    assert!(
        matches!(
            err,
            KeyringError::Io {
                action: "renaming the temporary keyring",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("blocked"), "{err}");
    assert!(
        !dir.path().join("blocked.tmp").exists(),
        "temp file cleaned up"
    );
    assert_eq!(Keyring::load(&path).unwrap().primary(), &k(1));
}

#[test]
fn errors_name_the_file_and_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = Keyring::load(&missing).unwrap_err().to_string();
    assert!(
        err.contains("nope") && err.contains("reading the keyring"),
        "{err}"
    );

    let path = dir.path().join("bad");
    fs::write(&path, format!("# ring\n{}\nnot-a-key\n", *k(1).to_base64())).unwrap();
    let err = Keyring::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("bad: line 3: the key is 9 characters long"),
        "{err}"
    );

    fs::write(&path, "\n# nothing\n").unwrap();
    let err = Keyring::load(&path).unwrap_err().to_string();
    assert!(err.ends_with("no key in the file"), "{err}");

    fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
    assert!(matches!(Keyring::load(&path), Err(KeyringError::Io { .. })));

    let no_dir = dir.path().join("missing-dir").join("keyring");
    let err = Keyring::new(k(1)).save(&no_dir).unwrap_err().to_string();
    assert!(err.contains("creating the temporary keyring"), "{err}");
}

#[test]
fn a_rotation_serf_style() {
    // install new everywhere, use it, remove the old: every step saves and loads.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    let mut ring = Keyring::new(k(1));
    ring.save(&path).unwrap();
    ring.install(k(2)).unwrap();
    ring.save(&path).unwrap();
    assert_eq!(Keyring::load(&path).unwrap().list(), [&k(1), &k(2)]);
    ring.use_key(&k(2)).unwrap();
    ring.save(&path).unwrap();
    assert_eq!(Keyring::load(&path).unwrap().primary(), &k(2));
    assert!(matches!(
        ring.remove(&k(2)),
        Err(KeyringError::RemovePrimary)
    ));
    ring.remove(&k(1)).unwrap();
    ring.save(&path).unwrap();
    assert_eq!(Keyring::load(&path).unwrap().list(), [&k(2)]);
}
