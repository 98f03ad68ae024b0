//! The transient keys a node holds: the one key schedule of the flock.
//!
//! A node holds the transient keys of its own flock (the current one and the previous one, the
//! leader rotating them) and, while two flocks merge, those of the other flock: at most
//! [`TRANSIENT_KEYS_MAX`]. Every key is tagged with the leader that made it and is accepted for
//! 1.5 × the longest rotation period after this node installed it. One key is this node's own
//! sealing key (the key the claim of the leader it follows names). Opening tries exactly the one
//! key the header's key id names ([`TransientKeys::key_for`]). Keys once dropped are retired:
//! never taken back unless wanted (a late or re-gossiped announcement of an old key would
//! otherwise restart its life).
//!
//! The flock core (`core/secure.rs`) owns one [`TransientKeys`]: the leader makes keys
//! ([`TransientKeys::make_key`]) on its rotation schedule and gossips them, members install
//! them ([`TransientKeys::install`]) and switch as the leader's claim names them
//! ([`TransientKeys::follow_claim`]), and a handshake responder hands out
//! [`TransientKeys::join_keys`] ([`JoinKeys`], the payload of a join reply).

use std::collections::VecDeque;
use std::time::Duration;

use crux_proto::flock::NodeId;
use rand::{CryptoRng, RngCore};
use zeroize::Zeroize;

use super::envelope::OpenError;
use super::keys::{Bloc, PacketKey, SecretKey, KEY_BYTES};

/// Shortest rotation period: the leader makes a new transient key every 30–60 s (DESIGN.md).
pub const ROTATION_MIN: Duration = Duration::from_secs(30);
/// Longest rotation period.
pub const ROTATION_MAX: Duration = Duration::from_secs(60);
/// Most transient keys held at once (own flock: current and previous; a merging flock's two).
pub const TRANSIENT_KEYS_MAX: usize = 4;
/// Epochs remembered as dropped (never installed again).
const RETIRED_MAX: usize = 64;

/// One held key.
struct TransientKey {
    epoch: u32,
    key: SecretKey,
    packet: PacketKey,
    since: Duration,
    leader: NodeId,
}

/// The transient keys a node holds, its own sealing key among them, and the epochs it dropped.
pub struct TransientKeys {
    bloc: Bloc,
    keys: Vec<TransientKey>,
    own: Option<u32>,
    /// Epochs dropped lately, newest last: never installed again (unless wanted).
    retired: VecDeque<u32>,
    max_age: Duration,
}

impl std::fmt::Debug for TransientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<_> = self.keys.iter().map(|k| (k.epoch, k.since)).collect();
        f.debug_struct("TransientKeys")
            .field("keys", &keys)
            .field("own", &self.own)
            .field("max_age", &self.max_age)
            .finish()
    }
}

impl TransientKeys {
    /// No key yet. Keys are accepted for 1.5 × `rotation_max` after they are installed.
    pub fn new(bloc: Bloc, rotation_max: Duration) -> TransientKeys {
        TransientKeys {
            bloc,
            keys: Vec::new(),
            own: None,
            retired: VecDeque::new(),
            max_age: rotation_max * 3 / 2,
        }
    }

    /// The bloc the packet keys are bound to.
    pub fn bloc(&self) -> &Bloc {
        &self.bloc
    }

    /// How long after installation a key is still accepted.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    fn fresh(&self, k: &TransientKey, now: Duration) -> bool {
        now.saturating_sub(k.since) <= self.max_age
    }

    fn find(&self, epoch: u32) -> Option<&TransientKey> {
        self.keys.iter().find(|k| k.epoch == epoch)
    }

    /// The epoch this node seals with by default, if it holds a fresh one.
    pub fn own_epoch(&self, now: Duration) -> Option<u32> {
        let e = self.own?;
        self.find(e).filter(|k| self.fresh(k, now)).map(|k| k.epoch)
    }

    /// True when this node holds no fresh key to seal with: it must (re)join by handshake.
    pub fn needs_key(&self, now: Duration) -> bool {
        self.own_epoch(now).is_none()
    }

    /// Whether this node holds `epoch` with exactly these key bytes.
    pub fn holds_key(&self, epoch: u32, key: &SecretKey) -> bool {
        self.find(epoch).is_some_and(|k| &k.key == key)
    }

    /// Whether this node holds a fresh key of `epoch`.
    pub fn holds(&self, epoch: u32, now: Duration) -> bool {
        self.find(epoch).is_some_and(|k| self.fresh(k, now))
    }

    /// The packet key for `epoch` (a datagram's `key_id`): the one key to try.
    /// [`OpenError::StaleKey`] for a held key past its age, [`OpenError::UnknownKey`] for an
    /// epoch not held.
    pub fn key_for(&self, epoch: u32, now: Duration) -> Result<&PacketKey, OpenError> {
        match self.find(epoch) {
            Some(k) if self.fresh(k, now) => Ok(&k.packet),
            Some(_) => Err(OpenError::StaleKey(epoch)),
            None => Err(OpenError::UnknownKey(epoch)),
        }
    }

    /// The epoch and packet key to seal with for a peer last heard under `peer_epoch`: that
    /// key when [`peer_key_better`](Self::peer_key_better), else our own. None when this node
    /// holds no fresh key of its own (it must join).
    pub fn sealing_key(&self, peer_epoch: Option<u32>, now: Duration) -> Option<(u32, &PacketKey)> {
        let epoch = match peer_epoch.filter(|e| self.peer_key_better(*e, now)) {
            Some(e) => e,
            None => self.own_epoch(now)?,
        };
        Some((epoch, &self.find(epoch).expect("held").packet))
    }

    /// Makes `epoch` (held) this node's sealing key. This key, the one it replaces and keys
    /// learnt after it (announced ahead of their use) stay: members accept the current and the
    /// previous epoch (in a merge: the winning flock's key and the former one, for the members
    /// that have not switched yet).
    pub fn set_own(&mut self, epoch: u32) {
        let Some(since) = self.find(epoch).map(|k| k.since) else {
            return;
        };
        let previous = self.own.replace(epoch);
        if previous != Some(epoch) {
            self.keep(|k| k.epoch == epoch || Some(k.epoch) == previous || k.since >= since);
        }
    }

    /// Keeps the keys `f` accepts; the others are wiped and retired.
    fn keep(&mut self, f: impl Fn(&TransientKey) -> bool) {
        let mut i = 0;
        while i < self.keys.len() {
            if f(&self.keys[i]) {
                i += 1;
            } else {
                let k = self.keys.remove(i);
                self.retire(k.epoch);
            }
        }
    }

    fn retire(&mut self, epoch: u32) {
        if !self.retired.contains(&epoch) {
            if self.retired.len() >= RETIRED_MAX {
                self.retired.pop_front();
            }
            self.retired.push_back(epoch);
        }
    }

    /// Installs a key of `leader`; returns false if it was already held, or held before and
    /// dropped — unless `wanted`: the key our leader's claim names, or the one a handshake
    /// answer brings us when we need one (a key dropped while we lagged, or evicted by other
    /// flocks' keys). Expired keys go; past [`TRANSIENT_KEYS_MAX`], the oldest go (never our own
    /// sealing key, never the key just learnt). Dropped keys wipe themselves.
    pub fn install(
        &mut self,
        epoch: u32,
        key: SecretKey,
        leader: NodeId,
        now: Duration,
        wanted: bool,
    ) -> bool {
        if self.find(epoch).is_some() {
            return false;
        }
        if let Some(i) = self.retired.iter().position(|e| *e == epoch) {
            if !wanted {
                return false;
            }
            self.retired.remove(i);
        }
        let packet = PacketKey::transient(&key, &self.bloc);
        self.keys.push(TransientKey {
            epoch,
            key,
            packet,
            since: now,
            leader,
        });
        let max_age = self.max_age;
        let own = self.own;
        self.keep(|k| now.saturating_sub(k.since) <= max_age || Some(k.epoch) == own);
        while self.keys.len() > TRANSIENT_KEYS_MAX {
            let oldest = self
                .keys
                .iter()
                .enumerate()
                .filter(|(_, k)| Some(k.epoch) != own && k.epoch != epoch)
                .min_by_key(|(_, k)| k.since)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    let k = self.keys.remove(i);
                    self.retire(k.epoch);
                }
                None => break,
            }
        }
        true
    }

    /// Leader side: makes and installs a fresh key under a random epoch (two leaders that
    /// rotate apart, in a partition, never make two different keys under one epoch, which
    /// members could not tell apart). Returns its epoch.
    pub fn make_key<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        me: NodeId,
        rng: &mut R,
    ) -> Option<u32> {
        let mut epoch = rng.next_u32();
        while epoch == 0 || self.find(epoch).is_some() || self.retired.contains(&epoch) {
            epoch = rng.next_u32();
        }
        let key = SecretKey::generate(rng);
        self.install(epoch, key, me, now, false).then_some(epoch)
    }

    /// The keys a handshake responder hands out: our own key and, as the second one, the key
    /// our leader announced next if we hold it (the asker needs it within seconds), else the
    /// one before ours. None when this node holds no fresh key of its own.
    pub fn join_keys(&self, now: Duration) -> Option<JoinKeys> {
        let own = self.find(self.own?).filter(|k| self.fresh(k, now))?;
        let others = || {
            self.keys
                .iter()
                .filter(|k| k.leader == own.leader && k.epoch != own.epoch && self.fresh(k, now))
        };
        let next = others()
            .filter(|k| k.since >= own.since)
            .max_by_key(|k| k.since);
        let previous = next
            .or_else(|| others().max_by_key(|k| k.since))
            .map(|k| KeyAnnouncement {
                epoch: k.epoch,
                key: k.key.clone(),
            });
        Some(JoinKeys {
            current: KeyAnnouncement {
                epoch: own.epoch,
                key: own.key.clone(),
            },
            previous,
        })
    }

    /// The raw key of a held epoch (to spread it to other members).
    pub fn key_bytes(&self, epoch: u32) -> Option<[u8; 32]> {
        self.find(epoch).map(|k| *k.key.as_bytes())
    }

    /// Whether a peer last heard under `epoch` should get that key rather than ours: a key learnt
    /// after ours (a flock merging: the other flock's key a handshake just brought; or we lag
    /// behind the peer). Any key older than ours, whichever leader made it, may be gone from the
    /// peer by now (a key of a solo leader of the cold boot, last heard from that peer a minute
    /// ago, is).
    pub fn peer_key_better(&self, epoch: u32, now: Duration) -> bool {
        let Some(k) = self.find(epoch).filter(|k| self.fresh(k, now)) else {
            return false;
        };
        match self.own.and_then(|e| self.find(e)) {
            Some(own) => k.since > own.since,
            None => true,
        }
    }

    /// A datagram from a member came under `epoch`, a key of `leader` (the leader we follow)
    /// learnt after our own sealing key: the leader switched to it and we missed the claim that
    /// said so. Seal with it too. Returns whether we switched.
    pub fn follow_newer(&mut self, epoch: u32, leader: NodeId, now: Duration) -> bool {
        let newer = match (self.find(epoch), self.own.and_then(|e| self.find(e))) {
            (Some(k), Some(own)) => {
                k.leader == leader
                    && own.leader == leader
                    && k.since > own.since
                    && self.fresh(k, now)
            }
            _ => false,
        };
        if newer {
            self.set_own(epoch);
        }
        newer
    }

    /// Seals with `epoch` (held), the key the claim of `leader` names, unless we already seal
    /// with a key of that leader learnt after it ([`follow_newer`](Self::follow_newer) ran
    /// ahead of the claim).
    pub fn follow_claim(&mut self, epoch: u32, leader: NodeId, now: Duration) {
        if self.own_epoch(now) == Some(epoch) {
            return;
        }
        let ahead = match (self.find(epoch), self.own.and_then(|e| self.find(e))) {
            (Some(k), Some(own)) => {
                own.leader == leader && k.leader == leader && own.since > k.since
            }
            _ => false,
        };
        if !ahead || self.needs_key(now) {
            self.set_own(epoch);
        }
    }

    /// Epochs held (oldest first), for metrics and tests.
    pub fn epochs(&self) -> Vec<u32> {
        let mut v: Vec<_> = self.keys.iter().map(|k| (k.since, k.epoch)).collect();
        v.sort();
        v.into_iter().map(|x| x.1).collect()
    }

    /// Drops the keys past their age (our own sealing key too: we then need a key).
    pub fn forget_expired(&mut self, now: Duration) {
        let max_age = self.max_age;
        self.keep(|k| now.saturating_sub(k.since) <= max_age);
        if self.own.is_some_and(|e| self.find(e).is_none()) {
            self.own = None;
        }
    }
}

/// The transient keys a join reply carries: the responder's own key and a second one of the
/// same leader ([`TransientKeys::join_keys`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct JoinKeys {
    /// The responder's sealing epoch and key.
    pub current: KeyAnnouncement,
    /// The key its leader announced next, or the one before the current, if held.
    pub previous: Option<KeyAnnouncement>,
}

/// Bytes of an encoded [`KeyAnnouncement`].
pub const ANNOUNCEMENT_BYTES: usize = 4 + KEY_BYTES;

/// One transient key with its epoch, as a join reply carries it. Encoded as fixed-size bytes:
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

    const LEADER: NodeId = NodeId(1);
    const OTHER: NodeId = NodeId(2);

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn keys() -> TransientKeys {
        TransientKeys::new(Bloc::new("b"), ROTATION_MAX)
    }

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    #[test]
    fn nothing_older_than_one_and_a_half_periods() {
        let mut k = keys();
        assert_eq!(k.max_age(), s(90));
        assert!(k.needs_key(s(0)));
        assert_eq!(k.key_for(1, s(0)).unwrap_err(), OpenError::UnknownKey(1));
        assert!(k.install(1, key(1), LEADER, s(0), false));
        k.set_own(1);
        assert_eq!(k.own_epoch(s(90)), Some(1));
        assert!(k.key_for(1, s(90)).is_ok());
        assert_eq!(k.key_for(1, s(91)).unwrap_err(), OpenError::StaleKey(1));
        assert!(k.needs_key(s(91)), "missed rotations: ask again");
        assert!(k.sealing_key(None, s(91)).is_none());
        k.forget_expired(s(91));
        assert_eq!(k.key_for(1, s(91)).unwrap_err(), OpenError::UnknownKey(1));
        assert!(k.epochs().is_empty());
    }

    #[test]
    fn switching_keeps_the_previous_key_and_later_ones_and_retires_the_rest() {
        let mut k = keys();
        for (e, t) in [(1, 0), (2, 10), (3, 20)] {
            assert!(k.install(e, key(e as u8), LEADER, s(t), false));
        }
        k.set_own(1);
        k.set_own(2);
        assert_eq!(k.epochs(), [1, 2, 3], "previous (1) and next (3) stay");
        k.set_own(3);
        assert_eq!(k.epochs(), [2, 3], "1 is neither current nor previous");
        assert!(!k.install(1, key(1), LEADER, s(21), false), "retired");
        assert!(k.install(1, key(1), LEADER, s(21), true), "unless wanted");
        assert!(!k.install(1, key(1), LEADER, s(22), true), "already held");
    }

    #[test]
    fn at_most_four_keys_and_never_the_own_one_evicted() {
        let mut k = keys();
        k.install(10, key(10), LEADER, s(0), false);
        k.set_own(10);
        for e in 11..=15 {
            k.install(e, key(e as u8), OTHER, s(e as u64), false);
        }
        assert_eq!(k.epochs().len(), TRANSIENT_KEYS_MAX);
        assert_eq!(k.epochs(), [10, 13, 14, 15]);
        assert_eq!(k.own_epoch(s(20)), Some(10));
    }

    #[test]
    fn a_peer_gets_its_own_key_only_when_learnt_after_ours() {
        let mut k = keys();
        k.install(1, key(1), LEADER, s(0), false);
        k.install(2, key(2), OTHER, s(5), false);
        k.set_own(1);
        assert_eq!(
            k.sealing_key(Some(2), s(6)).unwrap().0,
            2,
            "a merging flock's key"
        );
        assert_eq!(k.sealing_key(Some(1), s(6)).unwrap().0, 1);
        assert_eq!(k.sealing_key(Some(9), s(6)).unwrap().0, 1, "unknown: ours");
        k.set_own(2);
        assert_eq!(k.sealing_key(Some(1), s(7)).unwrap().0, 2, "older: ours");
    }

    #[test]
    fn members_follow_the_leaders_newer_keys_but_never_go_back() {
        let mut k = keys();
        k.install(1, key(1), LEADER, s(0), false);
        k.set_own(1);
        k.install(2, key(2), LEADER, s(10), false);
        assert!(!k.follow_newer(2, OTHER, s(11)), "another leader's key");
        assert!(k.follow_newer(2, LEADER, s(11)));
        assert_eq!(k.own_epoch(s(11)), Some(2));
        assert!(!k.follow_newer(1, LEADER, s(12)), "older");
        k.follow_claim(1, LEADER, s(12));
        assert_eq!(k.own_epoch(s(12)), Some(2), "a late claim of the older key");
        k.install(3, key(3), LEADER, s(13), false);
        k.follow_claim(3, LEADER, s(13));
        assert_eq!(k.own_epoch(s(13)), Some(3));
    }

    #[test]
    fn join_keys_carry_the_own_key_and_the_leaders_next_or_previous() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let mut k = keys();
        assert!(k.join_keys(s(0)).is_none(), "no key: nothing to hand out");
        let a = k.make_key(s(0), LEADER, &mut rng).unwrap();
        k.set_own(a);
        let only = k.join_keys(s(1)).unwrap();
        assert_eq!((only.current.epoch, only.previous), (a, None));
        let b = k.make_key(s(30), LEADER, &mut rng).unwrap();
        let ahead = k.join_keys(s(31)).unwrap();
        assert_eq!(ahead.current.epoch, a);
        assert_eq!(ahead.previous.map(|p| p.epoch), Some(b), "announced next");
        k.set_own(b);
        let after = k.join_keys(s(32)).unwrap();
        assert_eq!(after.current.epoch, b);
        assert_eq!(after.previous.map(|p| p.epoch), Some(a));
        k.install(7, key(7), OTHER, s(33), false);
        assert_ne!(
            k.join_keys(s(33)).unwrap().previous.map(|p| p.epoch),
            Some(7)
        );
        assert!(k.join_keys(s(121)).is_none(), "b is stale");
        assert_eq!(k.key_bytes(b), Some(*after.current.key.as_bytes()));
    }

    #[test]
    fn made_keys_take_fresh_random_epochs() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut k = keys();
        let epochs: Vec<_> = (0..3)
            .map(|i| k.make_key(s(i), LEADER, &mut rng).unwrap())
            .collect();
        assert!(epochs.iter().all(|e| *e != 0));
        assert_eq!(k.epochs(), epochs);
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
        k.install(3, SecretKey::from_bytes([0xee; 32]), LEADER, s(0), false);
        let text = format!("{k:?}");
        assert!(text.contains("keys: [(3,"), "{text}");
        assert!(!text.contains("238"));
    }
}
