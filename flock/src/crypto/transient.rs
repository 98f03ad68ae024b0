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
/// How long a node keeps sealing under the previous key after it installed a new one, while
/// already accepting the new one: the time the announcement needs to reach every member by gossip
/// (a third of the shortest period). Without it, members that have not heard of the new key yet
/// would drop everything sealed under it.
pub const SWITCH_DELAY: Duration = Duration::from_secs(10);

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
///
/// Rotation is make-before-break: a node that installs a new key accepts it at once but keeps
/// *sealing* under the previous key for [`SWITCH_DELAY`] ([`TransientKeys::sealing_key`]), so the
/// announcement (itself sealed under the previous key) has time to reach everyone first. A
/// datagram under an epoch ahead of ours ([`TransientKeys::is_ahead`]) means this node missed an
/// announcement: ask for the key again.
pub struct TransientKeys {
    bloc: Bloc,
    max_age: Duration,
    switch_delay: Duration,
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
    /// No key yet. Keys are accepted for 1.5 × `rotation_max` after they are installed; the
    /// switch delay is [`SWITCH_DELAY`].
    pub fn new(bloc: Bloc, rotation_max: Duration) -> TransientKeys {
        TransientKeys {
            bloc,
            max_age: rotation_max * 3 / 2,
            switch_delay: SWITCH_DELAY,
            current: None,
            previous: None,
        }
    }

    /// Changes the switch delay (the simulator's compressed timings; zero disables it).
    pub fn with_switch_delay(mut self, delay: Duration) -> TransientKeys {
        self.switch_delay = delay;
        self
    }

    /// The switch delay ([`SWITCH_DELAY`] unless changed).
    pub fn switch_delay(&self) -> Duration {
        self.switch_delay
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

    /// The current epoch and its raw key.
    pub fn current(&self) -> Option<(u32, &SecretKey)> {
        self.current.as_ref().map(|e| (e.epoch, &e.key))
    }

    /// The epoch and packet key to seal outgoing datagrams with at `now` (`header.key_id =
    /// epoch`): the previous key during the [`SWITCH_DELAY`] after a new key was installed (if the
    /// previous one is still accepted), the current key otherwise. Leaders seal the
    /// announcement of a key they just made with this too, so members that hold only the old key
    /// can open it.
    pub fn sealing_key(&self, now: Duration) -> Option<(u32, &PacketKey)> {
        let cur = self.current.as_ref()?;
        if now.saturating_sub(cur.since) < self.switch_delay {
            if let Some(prev) = &self.previous {
                if now.saturating_sub(prev.since) <= self.max_age {
                    return Some((prev.epoch, &prev.packet));
                }
            }
        }
        Some((cur.epoch, &cur.packet))
    }

    /// True when `epoch` is newer than the current epoch (serial-number arithmetic): a datagram
    /// under it means this node missed an announcement and should send a key request.
    pub fn is_ahead(&self, epoch: u32) -> bool {
        self.current
            .as_ref()
            .is_some_and(|cur| epoch_newer(epoch, cur.epoch))
    }

    /// What a handshake responder hands out at `now`: the current key and, if still accepted,
    /// the previous one (the one still being sealed with during a switch). None when this node
    /// holds no fresh key ([`is_stale`](Self::is_stale)).
    pub fn join_keys(&self, now: Duration) -> Option<JoinKeys> {
        if self.is_stale(now) {
            return None;
        }
        let cur = self.current.as_ref()?;
        let previous = self
            .previous
            .as_ref()
            .filter(|p| now.saturating_sub(p.since) <= self.max_age)
            .map(|p| KeyAnnouncement {
                epoch: p.epoch,
                key: p.key.clone(),
            });
        Some(JoinKeys {
            current: KeyAnnouncement {
                epoch: cur.epoch,
                key: cur.key.clone(),
            },
            previous,
        })
    }

    /// Installs the keys a handshake brought ([`JoinKeys`]): the previous key (if any), then the
    /// current one, both as of `now`. Replaces whatever this node held.
    pub fn install_join(&mut self, keys: JoinKeys, now: Duration) {
        self.current = None;
        self.previous = None;
        if let Some(prev) = keys.previous {
            if prev.epoch != keys.current.epoch {
                self.install(prev.epoch, prev.key, now);
            }
        }
        self.install(keys.current.epoch, keys.current.key, now);
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

/// The transient keys a join reply carries: the responder's current key and, during a switch,
/// the previous one.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct JoinKeys {
    /// The responder's current epoch and key.
    pub current: KeyAnnouncement,
    /// The responder's previous epoch and key, if it still accepts it.
    pub previous: Option<KeyAnnouncement>,
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
        // The leader keeps sealing under the old key during the switch delay, then the new one.
        assert_eq!(leader.sealing_key(s(30)).unwrap().0, first.epoch);
        assert_eq!(leader.sealing_key(s(39)).unwrap().0, first.epoch);
        assert_eq!(leader.sealing_key(s(40)).unwrap().0, second.epoch);
        assert!(member.accepts(second.epoch, s(31)));
    }

    #[test]
    fn make_before_break() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut k = keys();
        assert!(k.sealing_key(s(0)).is_none());
        k.install(1, SecretKey::generate(&mut rng), s(0));
        assert_eq!(
            k.sealing_key(s(0)).unwrap().0,
            1,
            "no previous key: seal under the new one"
        );
        k.install(2, SecretKey::generate(&mut rng), s(50));
        assert_eq!(k.sealing_key(s(55)).unwrap().0, 1);
        assert!(k.accepts(2, s(55)));
        assert_eq!(k.sealing_key(s(60)).unwrap().0, 2);
        // A previous key past its age is never sealed with.
        let mut late = keys();
        late.install(1, SecretKey::generate(&mut rng), s(0));
        late.install(2, SecretKey::generate(&mut rng), s(95));
        assert_eq!(late.sealing_key(s(95)).unwrap().0, 2);
        let zero = keys().with_switch_delay(Duration::ZERO);
        let mut zero = zero;
        zero.install(1, SecretKey::generate(&mut rng), s(0));
        zero.install(2, SecretKey::generate(&mut rng), s(1));
        assert_eq!(zero.sealing_key(s(1)).unwrap().0, 2);
    }

    #[test]
    fn an_epoch_ahead_means_a_missed_announcement() {
        let mut k = keys();
        assert!(
            !k.is_ahead(5),
            "no key: nothing is ahead (the node joins instead)"
        );
        k.install(5, SecretKey::from_bytes([1; 32]), s(0));
        assert!(k.is_ahead(6) && k.is_ahead(1000));
        assert!(!k.is_ahead(5) && !k.is_ahead(4));
        assert_eq!(k.key_for(6, s(0)).unwrap_err(), OpenError::UnknownKey(6));
    }

    #[test]
    fn join_keys_carry_current_and_previous() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let mut leader = keys();
        assert!(leader.join_keys(s(0)).is_none());
        let a = leader.rotate(s(0), &mut rng);
        let only = leader.join_keys(s(1)).unwrap();
        assert_eq!(
            (only.current.clone(), only.previous.clone()),
            (a.clone(), None)
        );
        let b = leader.rotate(s(40), &mut rng);
        let both = leader.join_keys(s(41)).unwrap();
        assert_eq!(both.current, b);
        assert_eq!(both.previous, Some(a.clone()));
        assert!(
            leader.join_keys(s(91)).unwrap().previous.is_none(),
            "a is past its age"
        );
        assert!(
            leader.join_keys(s(131)).is_none(),
            "b is stale: nothing to hand out"
        );
        let mut joiner = keys();
        joiner.install(99, SecretKey::from_bytes([9; 32]), s(0));
        joiner.install_join(both, s(41));
        assert_eq!(joiner.current_epoch(), Some(b.epoch));
        assert_eq!(joiner.previous_epoch(), Some(a.epoch));
        assert_eq!(
            joiner.sealing_key(s(41)).unwrap().0,
            a.epoch,
            "seals like everyone else"
        );
        joiner.install_join(only, s(42));
        assert_eq!(
            (joiner.current_epoch(), joiner.previous_epoch()),
            (Some(a.epoch), None)
        );
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
