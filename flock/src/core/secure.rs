//! The core's security state, [`Sec`]: the transient keys it holds
//! ([`TransientKeys`], the one key schedule), the secondary keyring, replay windows, the
//! handshake rate limit and the handshake it waits on, and the leader's rotation schedule.
//!
//! Built from the primitives of [`crate::crypto`]. This file seals and opens flock datagrams and
//! runs the leader's rotation; `handshake.rs` opens everything else (join requests, replies,
//! cookies) and `ring.rs` repairs the keyring.
//!
//! Rotation is make-before-break: the leader announces a new key a third of the shortest
//! rotation period ([`SecurityTiming::switch_delay`]) before it seals with it and names it in its
//! claim, so that the key has reached (nearly) every member before anyone needs it; members then
//! switch as the claim reaches them, and keep accepting the key they switched from. A node seals
//! to a peer under the peer's own key only when we learnt that key after ours (two flocks
//! merging, or we lag behind); an older key a peer was last heard under, whichever leader made
//! it, says nothing about what the peer holds *now* (probes reach a given peer only every N
//! probe intervals), so those peers get our own key
//! ([`TransientKeys::peer_key_better`]). An *answer* (to the datagram or stream request being
//! handled) goes under the key the request came under while we hold it: the peer holds that key
//! now. A member that missed a rotation and a keyring change at once can then still read the
//! push-pull answer that repairs its keyring, and ask for the new key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{BootId, Header, Kind, NodeId};
use rand::{CryptoRng, Rng, RngCore};

use super::handshake::Handshakes;
use super::ring::RingSync;
use crate::crypto::{
    receive, seal_for, Bloc, CookieSecrets, HandshakeLoad, InitiationStamps, Keyring, RateLimiter,
    ReplayTable, Tai64N, TransientKeys, COOKIE_REUSE_MAX, MAX_SEALED_FRAME_BYTES,
};
use crate::DropReason;

pub use crate::crypto::TRANSIENT_KEYS_MAX;

/// Replay windows kept.
const REPLAY_SENDERS_MAX: usize = 16_384;
/// Handshake sources rate-limited at once.
const HANDSHAKE_SOURCES_MAX: usize = 4096;
/// Initiators whose newest initiation is remembered.
const INITIATORS_MAX: usize = 16_384;
/// Source addresses remembered with the node last heard from there.
pub(super) const PEERS_MAX: usize = 16_384;
/// Cookies kept (one per responder address).
pub(super) const COOKIES_HELD_MAX: usize = 1024;
/// How far behind ours another node's clock may be: a join request stamped more than this before
/// this node started is refused ([`DropReason::OldInitiation`]), so that a request recorded before
/// a restart is not answered after it. Nodes are expected to keep their clocks within this of
/// each other (NTP does, by orders of magnitude); a node whose clock lags further is refused by a
/// freshly started node until the lag has passed, and still talks to every other node.
pub const CLOCK_SKEW_MAX: Duration = Duration::from_secs(10);

/// Security settings the core needs (given to [`FlockBuilder::keys`](crate::FlockBuilder::keys)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityTiming {
    /// Shortest period between two rotations of the transient key.
    pub rotation_min: Duration,
    /// Longest period; keys are accepted for 1.5 × this after they were installed.
    pub rotation_max: Duration,
}

impl SecurityTiming {
    /// How long the leader announces a new key before it seals with it (and names it in its
    /// claim): a third of the shortest rotation period (10 s with the agent's 30–60 s), the time
    /// gossip needs to bring the key to every member.
    pub fn switch_delay(&self) -> Duration {
        self.rotation_min / 3
    }
}

impl Default for SecurityTiming {
    /// 30–60 s, as DESIGN.md.
    fn default() -> Self {
        SecurityTiming {
            rotation_min: crate::crypto::ROTATION_MIN,
            rotation_max: crate::crypto::ROTATION_MAX,
        }
    }
}

/// What [`Sec::rotate_if_due`] did.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rotation {
    /// A new key was made: announce it.
    pub(crate) announced: Option<u32>,
    /// The leader now seals with this key: name it in the claim.
    pub(crate) switched: Option<u32>,
}

/// The security state of one node.
pub(crate) struct Sec {
    pub(super) bloc: Bloc,
    pub(super) mtu: usize,
    pub(super) id: NodeId,
    pub(super) boot: BootId,
    /// This node's flock address: join requests addressed elsewhere are refused.
    pub(super) addr: SocketAddr,
    // Keys and their schedule.
    /// The transient keys held, this node's sealing key among them.
    pub(crate) transient: TransientKeys,
    pub(super) timing: SecurityTiming,
    /// Leader side: when the next rotation is due (None: not scheduled in this term yet).
    pub(crate) next_rotation: Option<Duration>,
    /// Leader side: a key announced and not sealed with yet, and when to switch to it.
    pub(crate) pending_switch: Option<(Duration, u32)>,
    // Receiving.
    pub(super) replay: ReplayTable,
    /// The node whose authenticated datagram came last from each source address: a reply to an
    /// address is sealed for that node.
    pub(super) peers: HashMap<SocketAddr, NodeId>,
    // The secondary keyring (handshakes use it) and its repair (`ring.rs`).
    pub(crate) keyring: Keyring,
    pub(crate) ring: RingSync,
    /// Handshakes, ours and those we answer (`handshake.rs`).
    pub(crate) hs: Handshakes,
}

/// The wall-clock start of a boot, from its id ([`crate::boot_id`]: milliseconds in the high 48
/// bits), in nanoseconds since the Unix epoch.
fn boot_wall_nanos(boot: BootId) -> u128 {
    u128::from(boot.0 >> 16) * 1_000_000
}

impl Sec {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        bloc: &str,
        mtu: usize,
        keyring: Keyring,
        timing: SecurityTiming,
        id: NodeId,
        boot: BootId,
        addr: SocketAddr,
        now: Duration,
    ) -> Sec {
        let wall = (now, boot_wall_nanos(boot));
        let started = Tai64N::from_unix_nanos(wall.1);
        let bloc = Bloc::new(bloc);
        Sec {
            transient: TransientKeys::new(bloc.clone(), timing.rotation_max),
            bloc,
            mtu,
            keyring,
            replay: ReplayTable::new(REPLAY_SENDERS_MAX),
            timing,
            next_rotation: None,
            pending_switch: None,
            ring: RingSync::default(),
            hs: Handshakes {
                limiter: RateLimiter::new(HANDSHAKE_SOURCES_MAX),
                pending: None,
                unanswered_since: None,
                key_index: 0,
                stamps: InitiationStamps::new(INITIATORS_MAX),
                cookie_secrets: CookieSecrets::new(),
                load: HandshakeLoad::default(),
                cookies: HashMap::new(),
                wall,
                started,
                last_stamp: Tai64N::default(),
            },
            addr,
            peers: HashMap::new(),
            id,
            boot,
        }
    }

    /// Remembers that an authenticated datagram of `sender` came from `from`.
    pub(super) fn heard(&mut self, from: SocketAddr, sender: NodeId) {
        if self.peers.get(&from) == Some(&sender) {
            return;
        }
        if self.peers.len() >= PEERS_MAX {
            self.peers.clear();
        }
        self.peers.insert(from, sender);
    }

    /// The node a datagram to `to` is sealed for: the member the table puts there (`member`:
    /// its id and whether it is live) if live, else the node last heard from that address, else
    /// the table's (dead) member.
    pub(crate) fn recipient(
        &self,
        to: SocketAddr,
        member: Option<(NodeId, bool)>,
    ) -> Option<NodeId> {
        match (member, self.peers.get(&to).copied()) {
            (Some((m, true)), _) => Some(m),
            (_, Some(h)) => Some(h),
            (Some((m, false)), None) => Some(m),
            (None, None) => None,
        }
    }

    /// Seals a flock body for `recipient`: an answer under `answer_epoch` (the key the datagram
    /// it answers came under) while we hold it; otherwise under our own key, or under
    /// `dest_epoch` (the key the peer was last heard under) when
    /// [`TransientKeys::peer_key_better`]. False when this node holds no key to seal with.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn seal<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        counter: u64,
        answer_epoch: Option<u32>,
        dest_epoch: Option<u32>,
        recipient: NodeId,
        body: &[u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> bool {
        let sealing = match answer_epoch.filter(|e| self.transient.holds(*e, now)) {
            Some(e) => self.transient.key_for(e, now).ok().map(|k| (e, k)),
            None => self.transient.sealing_key(dest_epoch, now),
        };
        let Some((epoch, key)) = sealing else {
            return false;
        };
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: self.bloc.tag(),
            key_id: epoch,
            sender: self.id,
            boot: self.boot,
            counter,
        };
        seal_for(key, &header, recipient, body, rng, out);
        true
    }

    /// Opens a flock datagram or frame: one key (the header's), one decryption, replay window
    /// ([`receive()`]).
    pub(super) fn open_flock(
        &mut self,
        now: Duration,
        bytes: &[u8],
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Header, DropReason> {
        receive(
            bytes,
            max,
            self.id,
            &self.transient,
            &mut self.replay,
            now,
            out,
        )
    }

    /// Opens a stream frame.
    pub(crate) fn open_frame(
        &mut self,
        now: Duration,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Header, DropReason> {
        out.clear();
        self.open_flock(now, bytes, MAX_SEALED_FRAME_BYTES, out)
    }

    /// Leader side: announces a new key when the rotation is due (the next rotation is 30–60 s
    /// later, jittered), and switches to it [`SecurityTiming::switch_delay`] later. A leader
    /// without a fresh key of its own makes one and switches at once.
    pub(crate) fn rotate_if_due<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        me: NodeId,
        rng: &mut R,
    ) -> Rotation {
        let mut r = Rotation::default();
        if self.transient.needs_key(now) {
            self.pending_switch = None;
            if let Some(epoch) = self.transient.make_key(now, me, rng) {
                self.transient.set_own(epoch);
                self.next_rotation = Some(self.jittered(now, rng));
                r.announced = Some(epoch);
                r.switched = Some(epoch);
            }
            return r;
        }
        if let Some((at, epoch)) = self.pending_switch {
            if now >= at {
                self.pending_switch = None;
                if self.transient.holds(epoch, now) {
                    self.transient.set_own(epoch);
                    r.switched = Some(epoch);
                }
            }
            return r;
        }
        // A new leader keeps the key it inherited (every member holds it) until its first
        // rotation is due.
        match self.next_rotation {
            Some(at) if now >= at => {}
            Some(_) => return r,
            None => {
                self.next_rotation = Some(self.jittered(now, rng));
                return r;
            }
        }
        if let Some(epoch) = self.transient.make_key(now, me, rng) {
            self.pending_switch = Some((now + self.timing.switch_delay(), epoch));
            self.next_rotation = Some(self.jittered(now, rng));
            r.announced = Some(epoch);
        }
        r
    }

    pub(super) fn jittered<R: RngCore + CryptoRng>(&self, now: Duration, rng: &mut R) -> Duration {
        let (lo, hi) = (
            self.timing.rotation_min,
            self.timing.rotation_max.max(self.timing.rotation_min),
        );
        let span = (hi - lo).as_millis() as u64;
        now + lo
            + Duration::from_millis(if span == 0 {
                0
            } else {
                rng.gen_range(0..=span)
            })
    }

    /// Drops expired keys, rate-limit entries and cookies.
    pub(crate) fn forget_expired(&mut self, now: Duration) {
        self.transient.forget_expired(now);
        self.hs.limiter.prune(now);
        self.hs
            .cookies
            .retain(|_, (_, at)| now.saturating_sub(*at) < COOKIE_REUSE_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn new_sec(timing: SecurityTiming) -> Sec {
        Sec::new(
            "bloc",
            1400,
            Keyring::new(crate::crypto::SecretKey::from_bytes([1; 32])),
            timing,
            NodeId(1),
            BootId(1),
            "127.0.0.2:7700".parse().unwrap(),
            Duration::ZERO,
        )
    }

    #[test]
    fn rotations_are_jittered_within_30_to_60_seconds() {
        let sec = new_sec(SecurityTiming::default());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let draws: Vec<_> = (0..200).map(|_| sec.jittered(s(100), &mut rng)).collect();
        assert!(draws.iter().all(|t| *t >= s(130) && *t <= s(160)));
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 150);
        let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(9), ChaCha8Rng::seed_from_u64(9));
        assert_eq!(sec.jittered(s(0), &mut a), sec.jittered(s(0), &mut b));
        let fixed = SecurityTiming {
            rotation_min: s(5),
            rotation_max: s(5),
        };
        assert_eq!(new_sec(fixed).jittered(s(0), &mut a), s(5));
    }

    #[test]
    fn a_leader_without_a_key_makes_one_and_seals_with_it_at_once() {
        let mut sec = new_sec(SecurityTiming::default());
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let r = sec.rotate_if_due(s(1), NodeId(1), &mut rng);
        assert!(r.announced.is_some() && r.announced == r.switched);
        assert_eq!(sec.transient.own_epoch(s(1)), r.switched);
        let due = sec.next_rotation.expect("scheduled");
        assert!(due >= s(31) && due <= s(61));
        // Nothing until the rotation is due; then announce first, switch a third of the
        // shortest period (10 s) later.
        assert_eq!(
            sec.rotate_if_due(due - s(1), NodeId(1), &mut rng),
            Rotation::default()
        );
        let r = sec.rotate_if_due(due, NodeId(1), &mut rng);
        let new = r.announced.expect("a new key");
        assert_eq!(r.switched, None);
        assert_ne!(sec.transient.own_epoch(due), Some(new));
        let r = sec.rotate_if_due(due + s(10), NodeId(1), &mut rng);
        assert_eq!(r.switched, Some(new));
        assert_eq!(sec.transient.own_epoch(due + s(10)), Some(new));
    }
}
