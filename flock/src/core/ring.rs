//! Keyring repair ([`Sec`]'s half): versions and digests of the secondary keyring, so that a
//! member that missed a change learns the whole ring.
//!
//! Keyring changes spread as gossip (and straight to every member from the node where the
//! operator made them); a member that missed one learns the whole ring. Every change raises
//! the ring's version; the leader's claim names its version, and push-pull carries the
//! sender's version and digest (and the keys, to a peer that is behind). Of two rings the
//! higher version wins, at equal versions the higher digest.

use std::time::Duration;

use crux_proto::flock::KeyringState;
use rand::Rng;
use sha2::{Digest as _, Sha256};

use super::secure::Sec;
use crate::crypto::{Keyring, SecretKey, MAX_KEYS};

/// Versions of the secondary keyring, as this node knows them.
#[derive(Default)]
pub(crate) struct RingSync {
    /// Version of our keyring ([`KeyringState::version`]).
    pub(crate) version: u64,
    /// Highest keyring version seen anywhere (a local change goes above it).
    pub(super) seen: u64,
    /// Since when the leader's claim names another keyring version than ours.
    pub(super) mismatch_since: Option<Duration>,
    /// When we last push-pulled with the leader over the keyring.
    pub(super) last_repair: Option<Duration>,
}

impl Sec {
    /// A digest of the ring: the primary key, then the others in byte order.
    pub(super) fn ring_digest(&self) -> u64 {
        let list = self.keyring.list();
        let mut others: Vec<&[u8; 32]> = list[1..].iter().map(|k| k.as_bytes()).collect();
        others.sort();
        let mut h = Sha256::new();
        h.update(b"crux flock keyring digest v1");
        h.update(list[0].as_bytes());
        for k in others {
            h.update(k);
        }
        let d = h.finalize();
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
    }

    /// Our ring for push-pull, with its keys if `with_keys`.
    pub(super) fn ring_state(&self, with_keys: bool) -> KeyringState {
        KeyringState {
            version: self.ring.version,
            digest: self.ring_digest(),
            keys: if with_keys {
                self.keyring.list().iter().map(|k| *k.as_bytes()).collect()
            } else {
                Vec::new()
            },
        }
    }

    pub(super) fn ring_order(&self, theirs: &KeyringState) -> std::cmp::Ordering {
        (theirs.version, theirs.digest).cmp(&(self.ring.version, self.ring_digest()))
    }

    /// Whether a peer's ring wins over ours (we are behind).
    pub(super) fn ring_behind(&mut self, theirs: &KeyringState) -> bool {
        self.ring.seen = self.ring.seen.max(theirs.version);
        self.ring_order(theirs).is_gt()
    }

    /// Whether our ring wins over a peer's (it is behind: answer with our keys).
    pub(super) fn ring_ahead_of(&self, theirs: &KeyringState) -> bool {
        self.ring_order(theirs).is_lt()
    }

    /// Takes a peer's ring that wins over ours (keys included, at most [`MAX_KEYS`], matching
    /// its digest). Returns whether our ring changed.
    pub(super) fn adopt_ring(&mut self, theirs: &KeyringState) -> bool {
        if !self.ring_behind(theirs) || theirs.keys.is_empty() || theirs.keys.len() > MAX_KEYS {
            return false;
        }
        let mut ring = Keyring::new(SecretKey::from_bytes(theirs.keys[0]));
        for k in &theirs.keys[1..] {
            if !matches!(ring.install(SecretKey::from_bytes(*k)), Ok(true)) {
                return false; // a repeated key: not a ring any node keeps
            }
        }
        let before = self.ring_digest();
        let previous = std::mem::replace(&mut self.keyring, ring);
        if self.ring_digest() != theirs.digest {
            self.keyring = previous;
            return false;
        }
        self.ring.version = theirs.version;
        self.hs.key_index = 0;
        before != theirs.digest
    }
}

impl RingSync {
    /// The version a change made here gets: above every version seen.
    pub(super) fn next_version(&mut self) -> u64 {
        self.version = self.version.max(self.seen) + 1;
        self.seen = self.version;
        self.version
    }

    /// Whether a change spread at `version` is news to us (older changes are already in our
    /// ring, or were undone by later ones: a late gossip must not bring back a removed key).
    pub(super) fn change_is_news(&self, version: u64) -> bool {
        version > self.version
    }

    /// A change spread at `version` was applied.
    pub(super) fn changed_to(&mut self, version: u64) {
        self.version = self.version.max(version);
        self.seen = self.seen.max(version);
    }

    /// Member side, at each election tick: whether to push-pull with the leader over the
    /// keyring, its claim naming version `leader_ring`. When the versions have differed for
    /// `grace` (the time gossip needs to bring a change everywhere): pull if we are behind;
    /// if we are ahead (the leader missed a change) push, with probability `push_odds` so that
    /// not every member does. At most once per `grace`.
    pub(super) fn repair_due<R: Rng>(
        &mut self,
        now: Duration,
        leader_ring: u64,
        grace: Duration,
        push_odds: f64,
        rng: &mut R,
    ) -> bool {
        self.seen = self.seen.max(leader_ring);
        if leader_ring == self.version {
            self.mismatch_since = None;
            return false;
        }
        let since = *self.mismatch_since.get_or_insert(now);
        let rested = self.last_repair.is_none_or(|t| now >= t + grace);
        if now < since + grace || !rested {
            return false;
        }
        if leader_ring < self.version && !rng.gen_bool(push_odds.clamp(0.0, 1.0)) {
            self.last_repair = Some(now);
            return false;
        }
        self.last_repair = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::secure::SecurityTiming;
    use crux_proto::flock::{BootId, NodeId};

    fn sec(ring: &[u8]) -> Sec {
        let mut keyring = Keyring::new(SecretKey::from_bytes([ring[0]; 32]));
        for b in &ring[1..] {
            keyring.install(SecretKey::from_bytes([*b; 32])).unwrap();
        }
        Sec::new(
            "bloc",
            1400,
            keyring,
            SecurityTiming::default(),
            NodeId(1),
            BootId(1),
            "127.0.0.2:7700".parse().unwrap(),
            Duration::ZERO,
        )
    }

    #[test]
    fn a_ring_is_taken_only_when_it_wins_and_is_whole() {
        let mut behind = sec(&[1, 2]);
        let mut ahead = sec(&[2]);
        ahead.ring.version = 3;
        let state = ahead.ring_state(true);
        assert!(behind.ring_behind(&state));
        assert!(ahead.ring_ahead_of(&behind.ring_state(false)));
        // Without keys, a repeated key, too many keys, or keys that do not match the digest:
        // nothing changes.
        let mut junk = state.clone();
        junk.keys.clear();
        assert!(!behind.adopt_ring(&junk));
        junk.keys = vec![[2; 32], [2; 32]];
        assert!(!behind.adopt_ring(&junk));
        junk.keys = (0..=MAX_KEYS as u8).map(|b| [b; 32]).collect();
        assert!(!behind.adopt_ring(&junk));
        junk.keys = vec![[5; 32]];
        assert!(!behind.adopt_ring(&junk));
        assert_eq!(behind.keyring.len(), 2);
        assert_eq!(behind.ring.version, 0);
        // The whole ring of a higher version is taken, and then nothing older is.
        assert!(behind.adopt_ring(&state));
        assert_eq!(behind.keyring.list(), [&SecretKey::from_bytes([2; 32])]);
        assert_eq!(behind.ring.version, 3);
        assert!(!behind.ring.change_is_news(2));
        let older = sec(&[1, 2]).ring_state(true);
        assert!(!behind.adopt_ring(&older));
        // A change made here goes above every version seen.
        let mut other = sec(&[1]);
        let _ = other.ring_behind(&state);
        assert_eq!(other.ring.next_version(), 4);
    }

    #[test]
    fn a_member_repairs_its_ring_with_the_leader_after_a_grace_and_pushes_only_by_odds() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let s = Duration::from_secs;
        let grace = s(4);
        let mut r = RingSync::default();
        assert!(!r.repair_due(s(0), 0, grace, 1.0, &mut rng), "same version");
        assert!(
            !r.repair_due(s(1), 2, grace, 1.0, &mut rng),
            "behind, in grace"
        );
        assert!(r.repair_due(s(5), 2, grace, 1.0, &mut rng), "behind: pull");
        assert!(!r.repair_due(s(6), 2, grace, 1.0, &mut rng), "rested");
        assert!(r.repair_due(s(9), 2, grace, 1.0, &mut rng));
        assert_eq!(r.next_version(), 3, "above every version seen");
        // Ahead of the leader: push, with the odds given.
        assert!(!r.repair_due(s(20), 1, grace, 0.0, &mut rng));
        assert!(!r.repair_due(s(30), 1, grace, 0.0, &mut rng));
        assert!(r.repair_due(s(40), 1, grace, 1.0, &mut rng));
        r.changed_to(7);
        assert!(!r.change_is_news(7) && r.change_is_news(8));
        assert_eq!(r.next_version(), 8);
    }
}
