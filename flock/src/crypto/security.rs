//! One node's whole security state behind one type: what the flock core holds.
//!
//! [`Security`] strings the primitives together in the order the module doc gives, so that the
//! core calls one method per input: [`seal`](Security::seal) for everything it sends,
//! [`open_datagram`](Security::open_datagram) / [`open_frame`](Security::open_frame) for
//! everything it receives, [`start_handshake`](Security::start_handshake) to join or ask for the
//! key again, and, on the leader, [`rotate_if_due`](Security::rotate_if_due).
//!
//! ```
//! use std::net::IpAddr;
//! use std::time::Duration;
//! use crux_flock::crypto::{Inbound, Keyring, Purpose, SecretKey, Security, SecurityConfig};
//! use crux_flock::{BootId, NodeId};
//! use rand::SeedableRng;
//!
//! let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7); // the core's seeded RNG
//! let secondary = SecretKey::generate(&mut rng);
//! let config = SecurityConfig::new("my-bloc", 1400);
//! let mut leader = Security::new(&config, Keyring::new(secondary.clone()), NodeId(1), BootId(1));
//! let mut joiner = Security::new(&config, Keyring::new(secondary), NodeId(2), BootId(1));
//! let now = Duration::from_secs(1);
//! let (leader_ip, joiner_ip) = (IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3]));
//! let mut body = Vec::new();
//!
//! // Alone, the leader makes the first transient key (and spreads nothing: nobody to tell).
//! leader.rotate_if_due(now, &mut rng).unwrap();
//! // A node without a key probes with a join request ...
//! let request = joiner.start_handshake(now, Purpose::Join, b"", &mut rng);
//! // ... any member answers it (the reply goes back to the request's source address) ...
//! let Ok(Inbound::Reply { reply, .. }) =
//!     leader.open_datagram(now, joiner_ip, &request, b"", &mut rng, &mut body)
//! else { unreachable!() };
//! // ... and the reply brings the transient key.
//! let joined = joiner.open_datagram(now, leader_ip, &reply, b"", &mut rng, &mut body);
//! assert!(matches!(joined, Ok(Inbound::Joined { .. })));
//!
//! // From now on every message is sealed and opened with the transient key.
//! let mut datagram = Vec::new();
//! joiner.seal(now, b"encoded flock message", &mut rng, &mut datagram).unwrap();
//! let got = leader.open_datagram(now, joiner_ip, &datagram, b"", &mut rng, &mut body);
//! assert!(matches!(got, Ok(Inbound::Flock(_))));
//! assert_eq!(body, b"encoded flock message");
//! ```

use std::net::IpAddr;
use std::time::Duration;

use crux_proto::flock::{BootId, Header, Kind, NodeId};
use rand::{CryptoRng, RngCore};

use super::envelope::{check, seal, OpenError, MAX_SEALED_FRAME_BYTES};
use super::handshake::{respond, HandshakeInitiator, Origin, Purpose, REPLY_BYTES, REQUEST_BYTES};
use super::keyring::{Keyring, KeyringError, KeyringOp};
use super::keys::Bloc;
use super::ratelimit::RateLimiter;
use super::receive::{receive, Received};
use super::replay::ReplayTable;
use super::transient::{
    next_rotation, Installed, KeyAnnouncement, TransientKeys, ROTATION_MAX, ROTATION_MIN,
    SWITCH_DELAY,
};
use crate::DropReason;

/// Default bound of the replay table (senders × boots remembered).
pub const DEFAULT_MAX_SENDERS: usize = 4096;
/// Default bound of the handshake rate limiter's table (source addresses remembered).
pub const DEFAULT_MAX_SOURCES: usize = 4096;

/// Settings of the security layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityConfig {
    /// The bloc ID (the flock config's `bloc`).
    pub bloc: String,
    /// Largest datagram accepted (the flock config's `mtu`).
    pub mtu: usize,
    /// Shortest transient rotation period ([`ROTATION_MIN`], 30 s).
    pub rotation_min: Duration,
    /// Longest transient rotation period ([`ROTATION_MAX`], 60 s); keys are accepted for 1.5 × it.
    pub rotation_max: Duration,
    /// How long a new key is accepted but not yet sealed with ([`SWITCH_DELAY`], 10 s).
    pub switch_delay: Duration,
    /// Replay windows kept ([`DEFAULT_MAX_SENDERS`]; a few times the flock size).
    pub max_senders: usize,
    /// Handshake sources rate-limited at once ([`DEFAULT_MAX_SOURCES`]).
    pub max_sources: usize,
}

impl SecurityConfig {
    /// The defaults for a bloc and an MTU.
    pub fn new(bloc: impl Into<String>, mtu: usize) -> SecurityConfig {
        SecurityConfig {
            bloc: bloc.into(),
            mtu,
            rotation_min: ROTATION_MIN,
            rotation_max: ROTATION_MAX,
            switch_delay: SWITCH_DELAY,
            max_senders: DEFAULT_MAX_SENDERS,
            max_sources: DEFAULT_MAX_SOURCES,
        }
    }
}

/// What an incoming datagram turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// An authenticated, fresh flock datagram; its body is in `out`.
    Flock(Header),
    /// A join or key request that this node answered: send `reply` to the source address.
    Reply {
        /// The request's authenticated header.
        request: Header,
        /// Why the other node asked.
        purpose: Purpose,
        /// The initiator's context.
        context: Vec<u8>,
        /// The reply datagram (never larger than the request).
        reply: Vec<u8>,
    },
    /// The reply to this node's handshake: it now holds the transient key.
    Joined {
        /// The reply's authenticated header (who answered).
        responder: Header,
        /// The current epoch now held.
        epoch: u32,
        /// The responder's context.
        context: Vec<u8>,
    },
}

/// [`Security::seal`] has no transient key to seal with: the node must join first
/// ([`Security::start_handshake`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no transient key yet: join the flock first")]
pub struct NoKey;

struct Pending {
    state: HandshakeInitiator,
    started: Duration,
}

/// One node's security state: keyring, transient keys, replay windows, handshake rate limit,
/// its datagram counter, the handshake it is waiting on, and (on the leader) the rotation
/// schedule. Deterministic: time and randomness are passed in.
pub struct Security {
    bloc: Bloc,
    mtu: usize,
    id: NodeId,
    boot: BootId,
    counter: u64,
    keyring: Keyring,
    transient: TransientKeys,
    replay: ReplayTable,
    limiter: RateLimiter,
    rotation: (Duration, Duration),
    next_rotation: Option<Duration>,
    pending: Option<Pending>,
    epoch_ahead: bool,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("bloc", &self.bloc)
            .field("id", &self.id)
            .field("counter", &self.counter)
            .field("keyring", &self.keyring)
            .field("transient", &self.transient)
            .field("next_rotation", &self.next_rotation)
            .field(
                "pending",
                &self
                    .pending
                    .as_ref()
                    .map(|p| (p.state.purpose(), p.started)),
            )
            .finish_non_exhaustive()
    }
}

impl Security {
    /// A node's security state, holding no transient key yet.
    pub fn new(config: &SecurityConfig, keyring: Keyring, id: NodeId, boot: BootId) -> Security {
        let bloc = Bloc::new(&config.bloc);
        Security {
            transient: TransientKeys::new(bloc.clone(), config.rotation_max)
                .with_switch_delay(config.switch_delay),
            bloc,
            mtu: config.mtu,
            id,
            boot,
            counter: 0,
            keyring,
            replay: ReplayTable::new(config.max_senders),
            limiter: RateLimiter::new(config.max_sources),
            rotation: (config.rotation_min, config.rotation_max),
            next_rotation: None,
            pending: None,
            epoch_ahead: false,
        }
    }

    /// The bloc binding.
    pub fn bloc(&self) -> &Bloc {
        &self.bloc
    }

    /// The secondary keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Applies a keyring change (from the operator or spread by the flock); Ok(true) when it
    /// changed something, and the agent should then save the keyring file.
    pub fn apply_keyring_op(&mut self, op: &KeyringOp) -> Result<bool, KeyringError> {
        self.keyring.apply(op)
    }

    /// The transient keys.
    pub fn transient(&self) -> &TransientKeys {
        &self.transient
    }

    /// The replay table (for its size).
    pub fn replay(&self) -> &ReplayTable {
        &self.replay
    }

    /// The handshake rate limiter (for its size).
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// True when this node holds no fresh transient key: it cannot seal, and must join (or ask
    /// again) with [`start_handshake`](Self::start_handshake).
    pub fn needs_key(&self, now: Duration) -> bool {
        self.transient.is_stale(now)
    }

    /// True when a datagram under an epoch ahead of ours arrived since our key last changed: we
    /// probably missed an announcement. The datagram did not authenticate (it could not), so
    /// anyone can set this: rate-limit the key requests it prompts.
    pub fn epoch_ahead_seen(&self) -> bool {
        self.epoch_ahead
    }

    /// The counter of the next datagram this node seals (one sequence per boot, shared by flock
    /// datagrams, frames and handshakes).
    pub fn next_counter(&self) -> u64 {
        self.counter + 1
    }

    fn take_counter(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// Seals a flock message body (a datagram, or a stream frame) under the key this node sends
    /// with now ([`TransientKeys::sealing_key`]); appends it to `out` and returns its header.
    pub fn seal<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        body: &[u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<Header, NoKey> {
        if self.transient.is_stale(now) {
            return Err(NoKey);
        }
        let counter = self.take_counter();
        let (epoch, key) = self.transient.sealing_key(now).ok_or(NoKey)?;
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: self.bloc.tag(),
            key_id: epoch,
            sender: self.id,
            boot: self.boot,
            counter,
        };
        seal(key, &header, body, rng, out);
        Ok(header)
    }

    /// Handles one incoming datagram from `from` (its source address) at `now`.
    ///
    /// Flock datagrams: size, header, bloc, own id, the epoch's key, one decryption, the replay
    /// window; the body lands in `out`. Handshake datagrams: size, header, bloc, own id, the rate
    /// limit of the source, then a request is answered (with `context` attached) or a reply
    /// completes this node's pending handshake (installing the keys it brings). Anything else is
    /// a drop: nothing is answered, nothing changes but the counters of the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn open_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        from: IpAddr,
        bytes: &[u8],
        context: &[u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<Inbound, DropReason> {
        out.clear();
        let header = check(bytes, self.mtu, self.bloc.tag()).map_err(|e| e.drop_reason())?;
        if header.sender == self.id {
            return Err(DropReason::FromSelf);
        }
        if header.kind == Kind::Handshake {
            return self.handshake(now, from, bytes, context, rng);
        }
        let tag = self.bloc.tag();
        match receive(
            bytes,
            self.mtu,
            tag,
            &self.transient,
            &mut self.replay,
            now,
            out,
        ) {
            Ok(Received::Flock(h)) => Ok(Inbound::Flock(h)),
            Ok(Received::Handshake(_)) => Err(DropReason::Malformed),
            Err(OpenError::UnknownKey(epoch)) => {
                if self.transient.is_ahead(epoch) {
                    self.epoch_ahead = true;
                }
                Err(DropReason::UnknownKey)
            }
            Err(e) => Err(e.drop_reason()),
        }
    }

    fn handshake<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        from: IpAddr,
        bytes: &[u8],
        context: &[u8],
        rng: &mut R,
    ) -> Result<Inbound, DropReason> {
        if !self.limiter.allow(from, now) {
            return Err(DropReason::RateLimited);
        }
        match bytes.len() {
            REQUEST_BYTES => {
                let origin = Origin {
                    sender: self.id,
                    boot: self.boot,
                    counter: self.next_counter(),
                };
                let r = respond(
                    &self.keyring,
                    &self.bloc,
                    bytes,
                    &self.transient,
                    now,
                    origin,
                    context,
                    rng,
                )
                .map_err(|e| e.drop_reason())?;
                if !self
                    .replay
                    .accept(r.request.sender, r.request.boot, r.request.counter)
                {
                    return Err(DropReason::Replay);
                }
                self.take_counter();
                Ok(Inbound::Reply {
                    request: r.request,
                    purpose: r.purpose,
                    context: r.context,
                    reply: r.reply,
                })
            }
            REPLY_BYTES => {
                let pending = self.pending.as_ref().ok_or(DropReason::Unexpected)?;
                let joined = pending.state.finish(bytes).map_err(|e| e.drop_reason())?;
                let h = joined.header;
                if !self.replay.accept(h.sender, h.boot, h.counter) {
                    return Err(DropReason::Replay);
                }
                let epoch = joined.keys.current.epoch;
                self.transient.install_join(joined.keys, now);
                self.pending = None;
                self.epoch_ahead = false;
                Ok(Inbound::Joined {
                    responder: h,
                    epoch,
                    context: joined.context,
                })
            }
            _ => Err(DropReason::Malformed),
        }
    }

    /// Opens a sealed stream frame (a request or a reply): like a flock datagram, with the frame
    /// limit ([`MAX_SEALED_FRAME_BYTES`]) instead of the MTU. The body lands in `out`.
    pub fn open_frame(
        &mut self,
        now: Duration,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Header, DropReason> {
        out.clear();
        let tag = self.bloc.tag();
        let header = check(bytes, MAX_SEALED_FRAME_BYTES, tag).map_err(|e| e.drop_reason())?;
        if header.sender == self.id {
            return Err(DropReason::FromSelf);
        }
        let limit = MAX_SEALED_FRAME_BYTES;
        match receive(
            bytes,
            limit,
            tag,
            &self.transient,
            &mut self.replay,
            now,
            out,
        ) {
            Ok(Received::Flock(h)) => Ok(h),
            Ok(Received::Handshake(_)) => Err(DropReason::Malformed),
            Err(e) => Err(e.drop_reason()),
        }
    }

    /// Starts a handshake under the keyring's primary key ([`Purpose::Join`] while the node
    /// holds no key, [`Purpose::KeyRequest`] when it missed rotations) and returns the request
    /// datagram to send (to seeds, discovered addresses or members). A handshake already pending
    /// is replaced; the first valid reply completes it ([`Inbound::Joined`]).
    pub fn start_handshake<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        purpose: Purpose,
        context: &[u8],
        rng: &mut R,
    ) -> Vec<u8> {
        let origin = Origin {
            sender: self.id,
            boot: self.boot,
            counter: self.take_counter(),
        };
        let (state, request) = HandshakeInitiator::new(
            rng,
            self.keyring.primary(),
            &self.bloc,
            purpose,
            origin,
            context,
        );
        self.pending = Some(Pending {
            state,
            started: now,
        });
        request
    }

    /// The handshake this node waits on: why, and since when.
    pub fn pending_handshake(&self) -> Option<(Purpose, Duration)> {
        self.pending
            .as_ref()
            .map(|p| (p.state.purpose(), p.started))
    }

    /// Gives up the pending handshake (its ephemeral secret is wiped).
    pub fn cancel_handshake(&mut self) {
        self.pending = None;
    }

    /// Leader side: when a rotation is due, makes the next transient key and returns its
    /// announcement, to be sent in a flock message sealed with [`seal`](Self::seal) (which still
    /// uses the previous key for the switch delay, so every member can open it). A leader that
    /// holds no fresh key makes one at once; otherwise the next rotation is 30–60 s (jittered)
    /// after its current key was installed, so a new leader keeps the rhythm of the old one.
    pub fn rotate_if_due<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        rng: &mut R,
    ) -> Option<KeyAnnouncement> {
        let (min, max) = self.rotation;
        let due = match self.next_rotation {
            _ if self.transient.is_stale(now) => true,
            Some(at) => now >= at,
            None => {
                let since = self.transient.current_since().unwrap_or(now);
                let at = next_rotation(since, min, max, rng).max(now);
                self.next_rotation = Some(at);
                now >= at
            }
        };
        if !due {
            return None;
        }
        let ann = self.transient.rotate(now, rng);
        self.next_rotation = Some(next_rotation(now, min, max, rng));
        self.epoch_ahead = false;
        Some(ann)
    }

    /// When the leader's next rotation is due (a deadline for the core's timer), if scheduled.
    pub fn rotation_deadline(&self) -> Option<Duration> {
        self.next_rotation
    }

    /// This node no longer leads: it stops rotating (and reschedules if it leads again).
    pub fn stop_rotating(&mut self) {
        self.next_rotation = None;
    }

    /// Member side: installs the leader's announcement if it is newer than the current key.
    pub fn install_announced(&mut self, ann: KeyAnnouncement, now: Duration) -> Installed {
        let installed = self.transient.install_announced(ann, now);
        if installed == Installed::New {
            self.epoch_ahead = false;
        }
        installed
    }

    /// Forgets a reaped member's replay windows.
    pub fn forget(&mut self, sender: NodeId) {
        self.replay.forget(sender);
    }

    /// Housekeeping, about once a second: forgets rate-limit entries that are full again.
    pub fn prune(&mut self, now: Duration) {
        self.limiter.prune(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use crux_proto::flock::DEFAULT_MTU;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    const S: Duration = Duration::from_secs(1);

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    fn node(id: u64, secondary: &SecretKey) -> Security {
        let config = SecurityConfig::new("bloc", DEFAULT_MTU);
        Security::new(
            &config,
            Keyring::new(secondary.clone()),
            NodeId(id),
            BootId(id),
        )
    }

    /// A leader with a key, and a member that joined through it.
    fn pair(rng: &mut ChaCha20Rng) -> (Security, Security) {
        let secondary = SecretKey::generate(rng);
        let (mut a, mut b) = (node(1, &secondary), node(2, &secondary));
        assert!(a.needs_key(S) && b.needs_key(S));
        let first = a
            .rotate_if_due(S, rng)
            .expect("a leader without a key makes one");
        let request = b.start_handshake(S, Purpose::Join, b"", rng);
        assert_eq!(b.pending_handshake(), Some((Purpose::Join, S)));
        let mut out = Vec::new();
        let Inbound::Reply { reply, purpose, .. } = a
            .open_datagram(S, ip(2), &request, b"a", rng, &mut out)
            .unwrap()
        else {
            panic!("expected a reply")
        };
        assert_eq!(purpose, Purpose::Join);
        assert!(reply.len() <= request.len());
        let joined = b
            .open_datagram(S, ip(1), &reply, b"", rng, &mut out)
            .unwrap();
        assert_eq!(
            joined,
            Inbound::Joined {
                responder: Header::parse(&reply).unwrap().0,
                epoch: first.epoch,
                context: b"a".to_vec()
            }
        );
        assert!(!b.needs_key(S) && b.pending_handshake().is_none());
        (a, b)
    }

    #[test]
    fn join_then_talk_both_ways() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (mut a, mut b) = pair(&mut rng);
        let mut d = Vec::new();
        let h = a.seal(2 * S, b"ping", &mut rng, &mut d).unwrap();
        assert_eq!(h.sender, NodeId(1));
        let mut out = Vec::new();
        assert_eq!(
            b.open_datagram(2 * S, ip(1), &d, b"", &mut rng, &mut out),
            Ok(Inbound::Flock(h))
        );
        assert_eq!(out, b"ping");
        assert_eq!(
            b.open_datagram(2 * S, ip(1), &d, b"", &mut rng, &mut out),
            Err(DropReason::Replay)
        );
        assert_eq!(
            a.open_datagram(2 * S, ip(1), &d, b"", &mut rng, &mut out),
            Err(DropReason::FromSelf)
        );
        d.clear();
        let h = b.seal(2 * S, b"ack", &mut rng, &mut d).unwrap();
        assert_eq!(
            a.open_datagram(2 * S, ip(2), &d, b"", &mut rng, &mut out),
            Ok(Inbound::Flock(h))
        );
        // Counters: one sequence per node, handshakes included.
        assert_eq!(b.next_counter(), h.counter + 1);
    }

    #[test]
    fn a_node_without_a_key_cannot_seal() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut n = node(1, &SecretKey::generate(&mut rng));
        assert_eq!(n.seal(S, b"x", &mut rng, &mut Vec::new()), Err(NoKey));
    }

    #[test]
    fn handshake_abuse_is_dropped() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (mut a, mut b) = pair(&mut rng);
        let mut out = Vec::new();
        // A replayed request gets no second reply.
        let request = b.start_handshake(2 * S, Purpose::KeyRequest, b"", &mut rng);
        assert!(a
            .open_datagram(2 * S, ip(2), &request, b"", &mut rng, &mut out)
            .is_ok());
        assert_eq!(
            a.open_datagram(2 * S, ip(2), &request, b"", &mut rng, &mut out),
            Err(DropReason::Replay)
        );
        // A reply nobody waits for.
        let c_request = {
            let mut c = node(3, a.keyring().primary());
            c.start_handshake(2 * S, Purpose::Join, b"", &mut rng)
        };
        let Inbound::Reply { reply, .. } = a
            .open_datagram(2 * S, ip(3), &c_request, b"", &mut rng, &mut out)
            .unwrap()
        else {
            panic!()
        };
        b.cancel_handshake();
        assert_eq!(
            b.open_datagram(2 * S, ip(1), &reply, b"", &mut rng, &mut out),
            Err(DropReason::Unexpected)
        );
        // Rate limit: a burst of 5 per source (the bucket refilled since the last second).
        let mut results = Vec::new();
        for _ in 0..5 {
            let r = b.start_handshake(3 * S, Purpose::KeyRequest, b"", &mut rng);
            results.push(
                a.open_datagram(3 * S, ip(2), &r, b"", &mut rng, &mut out)
                    .is_ok(),
            );
        }
        assert_eq!(results, [true; 5]);
        let r = b.start_handshake(3 * S, Purpose::KeyRequest, b"", &mut rng);
        assert_eq!(
            a.open_datagram(3 * S, ip(2), &r, b"", &mut rng, &mut out),
            Err(DropReason::RateLimited)
        );
        // A handshake of neither size.
        let mut odd = r.clone();
        odd.truncate(200);
        assert_eq!(
            a.open_datagram(5 * S, ip(4), &odd, b"", &mut rng, &mut out),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn rotation_keeps_everyone_reading() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let (mut a, mut b) = pair(&mut rng);
        let deadline = a.rotation_deadline().unwrap();
        assert!(deadline >= S + ROTATION_MIN && deadline <= S + ROTATION_MAX);
        assert_eq!(a.rotate_if_due(deadline - S, &mut rng), None);
        let ann = a.rotate_if_due(deadline, &mut rng).unwrap();
        let mut d = Vec::new();
        let h = a.seal(deadline, &ann.encode(), &mut rng, &mut d).unwrap();
        assert_ne!(h.key_id, ann.epoch, "announced under the previous key");
        let mut out = Vec::new();
        assert!(b
            .open_datagram(deadline, ip(1), &d, b"", &mut rng, &mut out)
            .is_ok());
        let got = KeyAnnouncement::decode(&out).unwrap();
        assert_eq!(b.install_announced(got, deadline), Installed::New);
        let later = deadline + SWITCH_DELAY;
        d.clear();
        let h = b.seal(later, b"x", &mut rng, &mut d).unwrap();
        assert_eq!(h.key_id, ann.epoch);
        assert!(a
            .open_datagram(later, ip(2), &d, b"", &mut rng, &mut out)
            .is_ok());
    }

    #[test]
    fn a_new_leader_keeps_the_rhythm_and_an_epoch_ahead_is_noticed() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (mut a, mut b) = pair(&mut rng);
        // b becomes leader at 50 s: its key was installed at 1 s, so it rotates by 61 s.
        let t = Duration::from_secs(50);
        let first = b.rotate_if_due(t, &mut rng);
        let deadline = b.rotation_deadline().unwrap();
        assert!(first.is_none() || deadline > t);
        assert!(deadline <= S + ROTATION_MAX || first.is_some());
        b.stop_rotating();
        assert_eq!(b.rotation_deadline(), None);
        // a rotates twice without b hearing: b sees an epoch ahead.
        a.rotate_if_due(Duration::from_secs(70), &mut rng);
        let ann = a.rotate_if_due(Duration::from_secs(140), &mut rng).unwrap();
        let now = Duration::from_secs(150);
        let mut d = Vec::new();
        a.seal(now, b"x", &mut rng, &mut d).unwrap();
        assert_eq!(Header::parse(&d).unwrap().0.key_id, ann.epoch);
        let mut out = Vec::new();
        assert!(!b.epoch_ahead_seen());
        assert_eq!(
            b.open_datagram(now, ip(1), &d, b"", &mut rng, &mut out),
            Err(DropReason::UnknownKey)
        );
        assert!(b.epoch_ahead_seen());
        // The key request brings b back.
        let request = b.start_handshake(now, Purpose::KeyRequest, b"", &mut rng);
        let Inbound::Reply { reply, .. } = a
            .open_datagram(now, ip(2), &request, b"", &mut rng, &mut out)
            .unwrap()
        else {
            panic!()
        };
        assert!(matches!(
            b.open_datagram(now, ip(1), &reply, b"", &mut rng, &mut out),
            Ok(Inbound::Joined { epoch, .. }) if epoch == ann.epoch
        ));
        assert!(!b.epoch_ahead_seen());
        assert_eq!(
            b.open_datagram(now, ip(1), &d, b"", &mut rng, &mut out),
            Ok(Inbound::Flock(Header::parse(&d).unwrap().0))
        );
    }

    #[test]
    fn frames_may_exceed_the_mtu() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let (mut a, mut b) = pair(&mut rng);
        let body = vec![3u8; 100_000];
        let mut d = Vec::new();
        let h = a.seal(2 * S, &body, &mut rng, &mut d).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            b.open_datagram(2 * S, ip(1), &d, b"", &mut rng, &mut out),
            Err(DropReason::Oversized)
        );
        assert_eq!(b.open_frame(2 * S, &d, &mut out), Ok(h));
        assert_eq!(out, body);
        assert_eq!(b.open_frame(2 * S, &d, &mut out), Err(DropReason::Replay));
        let request = b.start_handshake(2 * S, Purpose::KeyRequest, b"", &mut rng);
        assert_eq!(
            a.open_frame(2 * S, &request, &mut out),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn keyring_ops_apply() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (mut a, _) = pair(&mut rng);
        let new = SecretKey::generate(&mut rng);
        assert!(a
            .apply_keyring_op(&KeyringOp::Install(new.clone()))
            .unwrap());
        assert_eq!(a.keyring().len(), 2);
        assert!(format!("{a:?}").contains("Keyring { keys: 2"));
    }
}
