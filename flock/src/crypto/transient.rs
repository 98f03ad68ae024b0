//! Transient group keys: current and previous epoch, rotation by the leader, announcements.

use std::time::Duration;

use rand::{CryptoRng, Rng, RngCore};
use zeroize::Zeroize;

use super::envelope::OpenError;
use super::keys::{Bloc, PacketKey, SecretKey, KEY_BYTES};

/// Shortest rotation period: the leader makes a new transient key every 30–60 s (DESIGN.md).
pub const ROTATION_MIN: Duration = Duration::from_secs(30);
/// Longest rotation period.
pub const ROTATION_MAX: Duration = Duration::from_secs(60);

/// When the rotation after one made at `now` is due: `now` plus a period drawn uniformly from
/// `[min, max]` (jitter, so that two leaders after a partition do not rotate in step). `min >
/// max` is treated as `max..=max`.
pub fn next_rotation<R: RngCore + CryptoRng>(
    now: Duration,
    min: Duration,
    max: Duration,
    rng: &mut R,
) -> Duration {
    let (lo, hi) = (min.min(max).as_millis() as u64, max.as_millis() as u64);
    now + Duration::from_millis(rng.gen_range(lo..=hi))
}

/// One epoch's key.
struct Epoch {
    epoch: u32,
    key: SecretKey,
    packet: PacketKey,
    since: Duration,
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // `key` and `packet` wipe themselves; this is only the epoch number.
        self.epoch.zeroize();
    }
}

/// The transient keys a node holds: the current epoch and the one before it.
///
/// A key is accepted for at most `max_age` after this node installed it: 1.5 × the longest
/// rotation period by default ([`TransientKeys::new`]), so the previous key stays usable for the
/// in-flight datagrams of a rotation and nothing older ever is. When the current key passes that
/// age this node has missed rotations ([`TransientKeys::is_stale`]): it must run the handshake
/// again (a key request). Replaced keys are wiped (`SecretKey` is `ZeroizeOnDrop`).
pub struct TransientKeys {
    bloc: Bloc,
    max_age: Duration,
    current: Option<Epoch>,
    previous: Option<Epoch>,
}

impl std::fmt::Debug for TransientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransientKeys")
            .field(
                "current",
                &self.current.as_ref().map(|e| (e.epoch, e.since)),
            )
            .field(
                "previous",
                &self.previous.as_ref().map(|e| (e.epoch, e.since)),
            )
            .field("max_age", &self.max_age)
            .finish()
    }
}

/// What [`TransientKeys::install_announced`] did with an announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The key became current; the former current key is now the previous one.
    New,
    /// This epoch with this key is already current or previous: nothing changed.
    Known,
    /// Not newer than the current epoch (or a different key for a known epoch): ignored.
    Ignored,
}

impl TransientKeys {
    /// No key yet. Keys are accepted for 1.5 × `rotation_max` after they are installed.
    pub fn new(bloc: Bloc, rotation_max: Duration) -> TransientKeys {
        TransientKeys {
            bloc,
            max_age: rotation_max * 3 / 2,
            current: None,
            previous: None,
        }
    }

    /// How long after installation a key is still accepted.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// The bloc the packet keys are bound to.
    pub fn bloc(&self) -> &Bloc {
        &self.bloc
    }

    /// The current epoch, if any key is held.
    pub fn current_epoch(&self) -> Option<u32> {
        self.current.as_ref().map(|e| e.epoch)
    }

    /// The previous epoch, if held.
    pub fn previous_epoch(&self) -> Option<u32> {
        self.previous.as_ref().map(|e| e.epoch)
    }

    /// The current epoch and its raw key (what a handshake responder hands out and the leader
    /// announces).
    pub fn current(&self) -> Option<(u32, &SecretKey)> {
        self.current.as_ref().map(|e| (e.epoch, &e.key))
    }

    /// The epoch and packet key to seal outgoing datagrams with (`header.key_id = epoch`).
    pub fn sealing_key(&self) -> Option<(u32, &PacketKey)> {
        self.current.as_ref().map(|e| (e.epoch, &e.packet))
    }

    /// When the current key was installed.
    pub fn current_since(&self) -> Option<Duration> {
        self.current.as_ref().map(|e| e.since)
    }

    /// True when no key is held, or the current one is older than [`max_age`](Self::max_age):
    /// this node missed rotations and must ask for the key again through the handshake.
    pub fn is_stale(&self, now: Duration) -> bool {
        self.current
            .as_ref()
            .is_none_or(|e| now.saturating_sub(e.since) > self.max_age)
    }

    /// Whether a datagram under `epoch` is acceptable now: it is the current or the previous
    /// epoch, and that key is at most [`max_age`](Self::max_age) old.
    pub fn accepts(&self, epoch: u32, now: Duration) -> bool {
        self.key_for(epoch, now).is_ok()
    }

    /// The packet key for `epoch` (a datagram's `key_id`): the one key to try. Errors with
    /// [`OpenError::StaleKey`] for a known epoch past its age or an epoch just behind the
    /// previous one, [`OpenError::UnknownKey`] for anything else.
    pub fn key_for(&self, epoch: u32, now: Duration) -> Result<&PacketKey, OpenError> {
        for e in [&self.current, &self.previous].into_iter().flatten() {
            if e.epoch == epoch {
                if now.saturating_sub(e.since) > self.max_age {
                    return Err(OpenError::StaleKey(epoch));
                }
                return Ok(&e.packet);
            }
        }
        match self.current.as_ref() {
            Some(cur) if epoch_newer(cur.epoch, epoch) => Err(OpenError::StaleKey(epoch)),
            _ => Err(OpenError::UnknownKey(epoch)),
        }
    }

    /// Makes `key` the current key of `epoch` unconditionally (a key learnt from a handshake, or
    /// made by this node); the former current key becomes the previous one, and the former
    /// previous one is wiped. Installing the current epoch again with another key replaces it.
    pub fn install(&mut self, epoch: u32, key: SecretKey, now: Duration) {
        let packet = PacketKey::transient(&key, &self.bloc);
        let fresh = Epoch {
            epoch,
            key,
            packet,
            since: now,
        };
        match self.current.take() {
            Some(cur) if cur.epoch == epoch => {
                // Same epoch: a replacement, not a rotation; keep the previous key.
                drop(cur);
            }
            Some(cur) => self.previous = Some(cur),
            None => {}
        }
        self.current = Some(fresh);
    }

    /// Installs an announced key if its epoch is newer than the current one (serial-number
    /// arithmetic, so epochs may wrap), as members do with the leader's announcements.
    pub fn install_announced(&mut self, ann: KeyAnnouncement, now: Duration) -> Installed {
        let known = [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|e| e.epoch == ann.epoch);
        if let Some(e) = known {
            return if e.key == ann.key {
                Installed::Known
            } else {
                Installed::Ignored
            };
        }
        match self.current.as_ref() {
            Some(cur) if !epoch_newer(ann.epoch, cur.epoch) => Installed::Ignored,
            _ => {
                self.install(ann.epoch, ann.key.clone(), now);
                Installed::New
            }
        }
    }

    /// Leader side: makes a fresh key for the next epoch (current + 1, or a random epoch when no
    /// key is held), installs it, and returns the announcement to spread sealed under the *old*
    /// current key (members that hold it can open the announcement; the new key is not usable by
    /// anyone until they do). Schedule the next one with [`next_rotation`].
    pub fn rotate<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        rng: &mut R,
    ) -> KeyAnnouncement {
        let epoch = match self.current.as_ref() {
            Some(cur) => cur.epoch.wrapping_add(1),
            None => rng.next_u32(),
        };
        let key = SecretKey::generate(rng);
        self.install(epoch, key.clone(), now);
        KeyAnnouncement { epoch, key }
    }
}

/// RFC 1982 serial-number comparison: `a` is newer than `b`.
fn epoch_newer(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

/// Bytes of an encoded [`KeyAnnouncement`].
pub const ANNOUNCEMENT_BYTES: usize = 4 + KEY_BYTES;

/// A new transient key, as the leader announces it (the body of a core message sealed under the
/// current transient key) and as a handshake reply carries it. Encoded as fixed-size bytes:
/// `epoch (u32 little endian) || key (32 bytes)`. Wiped on drop.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct KeyAnnouncement {
    /// The epoch (the `key_id` of datagrams sealed under this key).
    pub epoch: u32,
    /// The transient key.
    pub key: SecretKey,
}

impl KeyAnnouncement {
    /// The fixed-size encoding (wipe it after use: `zeroize::Zeroize` on the array).
    pub fn encode(&self) -> [u8; ANNOUNCEMENT_BYTES] {
        let mut out = [0u8; ANNOUNCEMENT_BYTES];
        out[..4].copy_from_slice(&self.epoch.to_le_bytes());
        out[4..].copy_from_slice(self.key.as_bytes());
        out
    }

    /// Decodes exactly [`ANNOUNCEMENT_BYTES`] bytes ([`OpenError::Malformed`] otherwise).
    pub fn decode(bytes: &[u8]) -> Result<KeyAnnouncement, OpenError> {
        if bytes.len() != ANNOUNCEMENT_BYTES {
            return Err(OpenError::Malformed);
        }
        let epoch = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let mut key = [0u8; KEY_BYTES];
        key.copy_from_slice(&bytes[4..]);
        let ann = KeyAnnouncement {
            epoch,
            key: SecretKey::from_bytes(key),
        };
        key.zeroize();
        Ok(ann)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn keys() -> TransientKeys {
        TransientKeys::new(Bloc::new("b"), ROTATION_MAX)
    }

    #[test]
    fn next_rotation_is_jittered_within_30_to_60_seconds() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let draws: Vec<_> = (0..200)
            .map(|_| next_rotation(s(100), ROTATION_MIN, ROTATION_MAX, &mut rng))
            .collect();
        assert!(draws.iter().all(|t| *t >= s(130) && *t <= s(160)));
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 150);
        let mut a = ChaCha20Rng::seed_from_u64(9);
        let mut b = ChaCha20Rng::seed_from_u64(9);
        assert_eq!(
            next_rotation(s(0), ROTATION_MIN, ROTATION_MAX, &mut a),
            next_rotation(s(0), ROTATION_MIN, ROTATION_MAX, &mut b)
        );
        assert_eq!(next_rotation(s(0), s(5), s(5), &mut a), s(5));
        assert_eq!(next_rotation(s(0), s(9), s(5), &mut a), s(5));
    }

    #[test]
    fn accepts_current_and_previous_only() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut k = keys();
        assert!(k.is_stale(s(0)));
        assert_eq!(k.key_for(0, s(0)).unwrap_err(), OpenError::UnknownKey(0));
        k.install(10, SecretKey::generate(&mut rng), s(0));
        assert!(k.accepts(10, s(0)) && !k.accepts(9, s(0)) && !k.accepts(11, s(0)));
        let ann = k.rotate(s(40), &mut rng);
        assert_eq!(ann.epoch, 11);
        assert_eq!(k.current_epoch(), Some(11));
        assert_eq!(k.previous_epoch(), Some(10));
        assert!(k.accepts(10, s(40)) && k.accepts(11, s(40)));
        k.rotate(s(80), &mut rng);
        assert!(!k.accepts(10, s(80)));
        assert_eq!(k.key_for(10, s(80)).unwrap_err(), OpenError::StaleKey(10));
        assert_eq!(k.key_for(13, s(80)).unwrap_err(), OpenError::UnknownKey(13));
        assert!(k.accepts(11, s(80)) && k.accepts(12, s(80)));
    }

    #[test]
    fn nothing_older_than_one_and_a_half_periods() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut k = keys();
        assert_eq!(k.max_age(), s(90));
        k.install(1, SecretKey::generate(&mut rng), s(0));
        k.rotate(s(60), &mut rng);
        assert!(k.accepts(1, s(90)));
        assert!(!k.accepts(1, s(91)), "previous key is past 1.5 × 60 s");
        assert_eq!(k.key_for(1, s(91)).unwrap_err(), OpenError::StaleKey(1));
        assert!(k.accepts(2, s(91)));
        assert!(!k.is_stale(s(150)));
        assert!(k.is_stale(s(151)), "missed rotations: ask again");
        assert!(!k.accepts(2, s(151)));
    }

    #[test]
    fn announcements_install_only_newer_epochs() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut leader = keys();
        let mut member = keys();
        let first = leader.rotate(s(0), &mut rng);
        assert_eq!(
            member.install_announced(first.clone(), s(0)),
            Installed::New
        );
        assert_eq!(
            member.install_announced(first.clone(), s(1)),
            Installed::Known
        );
        let second = leader.rotate(s(30), &mut rng);
        assert_eq!(
            member.install_announced(second.clone(), s(30)),
            Installed::New
        );
        assert_eq!(
            member.install_announced(first.clone(), s(31)),
            Installed::Known
        );
        let forged = KeyAnnouncement {
            epoch: second.epoch,
            key: SecretKey::from_bytes([0; 32]),
        };
        assert_eq!(member.install_announced(forged, s(31)), Installed::Ignored);
        let old = KeyAnnouncement {
            epoch: first.epoch.wrapping_sub(1),
            key: first.key.clone(),
        };
        assert_eq!(member.install_announced(old, s(31)), Installed::Ignored);
        assert_eq!(member.current().unwrap().1, &second.key);
        // Both seal and open with the same packet key.
        let (e, _) = leader.sealing_key().unwrap();
        assert_eq!(e, second.epoch);
        assert!(member.accepts(e, s(31)));
    }

    #[test]
    fn epochs_wrap() {
        assert!(epoch_newer(0, u32::MAX));
        assert!(!epoch_newer(u32::MAX, 0));
        assert!(!epoch_newer(5, 5));
        let mut k = keys();
        k.install(u32::MAX, SecretKey::from_bytes([1; 32]), s(0));
        let ann = KeyAnnouncement {
            epoch: 0,
            key: SecretKey::from_bytes([2; 32]),
        };
        assert_eq!(k.install_announced(ann, s(1)), Installed::New);
        assert_eq!(
            k.key_for(u32::MAX - 1, s(1)).unwrap_err(),
            OpenError::StaleKey(u32::MAX - 1)
        );
    }

    #[test]
    fn reinstalling_the_current_epoch_keeps_the_previous() {
        let mut k = keys();
        k.install(1, SecretKey::from_bytes([1; 32]), s(0));
        k.install(2, SecretKey::from_bytes([2; 32]), s(1));
        k.install(2, SecretKey::from_bytes([3; 32]), s(2));
        assert_eq!(k.previous_epoch(), Some(1));
        assert_eq!(k.current().unwrap().1, &SecretKey::from_bytes([3; 32]));
    }

    #[test]
    fn announcement_encoding_is_fixed() {
        let ann = KeyAnnouncement {
            epoch: 0x0102_0304,
            key: SecretKey::from_bytes([7; 32]),
        };
        let bytes = ann.encode();
        assert_eq!(&bytes[..4], &[4, 3, 2, 1]);
        assert_eq!(&bytes[4..], &[7; 32]);
        assert_eq!(KeyAnnouncement::decode(&bytes).unwrap(), ann);
        assert_eq!(
            KeyAnnouncement::decode(&bytes[..35]).unwrap_err(),
            OpenError::Malformed
        );
        assert!(format!("{ann:?}").contains("SecretKey(..)"));
    }

    #[test]
    fn debug_prints_no_key() {
        let mut k = keys();
        k.install(3, SecretKey::from_bytes([0xee; 32]), s(0));
        let text = format!("{k:?}");
        assert!(text.contains("current: Some((3,"), "{text}");
        assert!(!text.contains("238"));
    }
}
