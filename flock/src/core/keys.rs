//! Keys, as the state machine uses them: the security state ([`Sec`]), when to ask for keys
//! (a rotation missed, a member we cannot read), which key each peer seals with, the leader's
//! rotations and the keyring changes spread by the flock.

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{Header, LeaderClaim, Message, NodeId, Update};
use tracing::debug;

use super::handshake::{decode_claim, encode_claim};
use super::machine::Flock;
use super::secure::Sec;
use super::table::addr_key;
use super::throttle::AddrThrottle;
use super::{DropReason, Event, FastMap, Transmit, TransmitKind};
use crate::crypto::{JoinKeys, Joined, Keyring, KeyringOp, Purpose, SecretKey, TransientKeys};

/// Unanswered key requests after which a node says it is shut out (and every as many after).
pub(super) const SHUT_OUT_REQUESTS: u32 = 10;

/// The key state of the state machine.
#[derive(Default)]
pub(super) struct Keys {
    /// Security state (None: plain datagrams, for tests of the protocol alone).
    pub(super) sec: Option<Sec>,
    /// A member sealed under a key we do not hold (ask for keys at the next check).
    pub(super) hint: bool,
    /// Key requests sent since a handshake of ours was last answered.
    pub(super) unanswered_requests: u32,
    /// Members we could not read lately, and when we last asked them for their keys.
    pub(super) unreadable: AddrThrottle,
    /// Key epoch each peer address ([`addr_key`](super::table::addr_key())) last sealed with.
    pub(super) peer_epoch: FastMap<u64, u32>,
}

/// What the keys a handshake brought (`keys`, from a flock that follows `theirs`) are to us
/// (following `ours`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct JoinedKeys {
    /// Seal with them: we hold no fresh key, or they are another flock's that wins a merge.
    pub(super) switch: bool,
    /// The keys we seal with already, by their bytes (epochs of flocks that split may
    /// coincide).
    pub(super) same_keys: bool,
    /// The responder follows our leader.
    pub(super) same_leader: bool,
}

impl JoinedKeys {
    pub(super) fn judge(
        held: &TransientKeys,
        now: Duration,
        keys: &JoinKeys,
        theirs: Option<LeaderClaim>,
        ours: Option<LeaderClaim>,
    ) -> JoinedKeys {
        let current = keys.current.epoch;
        let same_keys = held.own_epoch(now).is_some_and(|o| {
            (o == current && held.holds_key(current, &keys.current.key))
                || keys
                    .previous
                    .as_ref()
                    .is_some_and(|p| o == p.epoch && held.holds_key(p.epoch, &p.key))
        });
        let same_leader = matches!((theirs, ours), (Some(t), Some(o)) if t.leader == o.leader);
        let switch = held.needs_key(now)
            || (!same_keys
                && match (theirs, ours) {
                    (Some(t), Some(o)) => t.leader != o.leader && t.precedence() > o.precedence(),
                    (Some(_), None) => true,
                    (None, _) => false,
                });
        JoinedKeys {
            switch,
            same_keys,
            same_leader,
        }
    }
}

impl Keys {
    /// Remembers that the peer at `from` sealed with `epoch` (at most `max` peers; past that
    /// the table starts over).
    pub(super) fn note_peer_epoch(&mut self, from: SocketAddr, epoch: u32, max: usize) {
        if self.peer_epoch.len() >= max {
            self.peer_epoch.clear();
        }
        self.peer_epoch.insert(addr_key(&from), epoch);
    }

    /// The epoch the peer at `to` last sealed with.
    pub(super) fn peer_epoch(&self, to: SocketAddr) -> Option<u32> {
        self.peer_epoch.get(&addr_key(&to)).copied()
    }

    /// A member at `from` seals under keys we cannot open: whether to ask it for its keys now
    /// (at most once per `period` per address).
    pub(super) fn unreadable_due(
        &mut self,
        from: SocketAddr,
        now: Duration,
        period: Duration,
    ) -> bool {
        self.unreadable.due(from, now, period)
    }

    /// A key request is sent: returns whether it makes [`SHUT_OUT_REQUESTS`] (or a multiple)
    /// unanswered in a row, time to tell the operator.
    pub(super) fn key_requested(&mut self) -> bool {
        self.unanswered_requests += 1;
        self.unanswered_requests.is_multiple_of(SHUT_OUT_REQUESTS)
    }
}

impl Flock {
    /// The wall-clock time at `now` as this node stamps its join requests (None with security
    /// off).
    pub fn wall_clock(&self, now: Duration) -> Option<crate::crypto::Tai64N> {
        self.keys.sec.as_ref().map(|s| s.wall_at(now))
    }

    /// Sets the wall clock: `unix_nanos` nanoseconds since the Unix epoch at core time `now`.
    /// Drivers call it once, at their start; join requests carry the wall-clock time (counted on
    /// the core's monotonic `now` from there). Without it the boot id's start time stands in.
    pub fn set_wall_clock(&mut self, now: Duration, unix_nanos: u128) {
        if let Some(sec) = self.keys.sec.as_mut() {
            sec.set_wall_clock(now, unix_nanos);
        }
    }

    /// Whether datagrams are sealed (a node built with [`FlockBuilder::keys`](super::FlockBuilder::keys)).
    pub fn is_secure(&self) -> bool {
        self.keys.sec.is_some()
    }

    /// The transient key epoch this node seals with (None: no key yet, or security off).
    pub fn key_epoch(&self) -> Option<u32> {
        self.keys.sec.as_ref()?.transient.own_epoch(self.now)
    }

    /// Transient key epochs held, oldest first.
    pub fn key_epochs(&self) -> Vec<u32> {
        self.keys
            .sec
            .as_ref()
            .map(|s| s.transient.epochs())
            .unwrap_or_default()
    }

    /// The secondary keyring (None with security off).
    pub fn keyring(&self) -> Option<&Keyring> {
        self.keys.sec.as_ref().map(|s| &s.keyring)
    }

    /// Remembers which key a peer seals with, so that we answer under the same key.
    pub(super) fn note_peer_epoch(&mut self, from: SocketAddr, header: &Header) {
        if self.keys.sec.is_some() {
            let max = self.config.members_max;
            self.keys.note_peer_epoch(from, header.key_id, max);
        }
    }

    /// A member sealed under a key of our leader newer than ours: the leader switched to it.
    pub(super) fn follow_newer_key(&mut self, now: Duration, header: &Header) {
        let Some(claim) = self.lead.claim.filter(|c| c.leader != self.me.id) else {
            return;
        };
        if let Some(sec) = self.keys.sec.as_mut() {
            sec.transient.follow_newer(header.key_id, claim.leader, now);
        }
    }

    /// Starts a handshake with `addr` (a join, or a key request) under the keyring's keys.
    pub(super) fn send_handshake(&mut self, addr: SocketAddr, purpose: Purpose) {
        let context = encode_claim(self.lead.claim.as_ref());
        let now = self.now;
        self.wire.counter += 1;
        let counter = self.wire.counter;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        let request = sec.start_handshake(now, counter, addr, purpose, &context, &mut self.rng);
        self.stats.handshakes_sent += 1;
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += request.len() as u64;
        self.out.transmits.push_back(Transmit {
            to: addr,
            kind: TransmitKind::Datagram,
            payload: request,
        });
    }

    /// We answered a handshake. A joiner from a flock that should win a merge makes us ask it
    /// for its keys in turn, so that both sides of a merge learn each other's keys.
    pub(super) fn on_handshake_request(
        &mut self,
        _now: Duration,
        from: SocketAddr,
        request: Header,
        context: Vec<u8>,
        reply: Vec<u8>,
    ) {
        if self.revoked.contains(&request.sender) {
            self.stats.drop(DropReason::Revoked);
            return; // a revoked node gets no key
        }
        self.stats.handshakes_answered += 1;
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += reply.len() as u64;
        self.out.transmits.push_back(Transmit {
            to: from,
            kind: TransmitKind::Datagram,
            payload: reply,
        });
        let theirs = decode_claim(&context);
        let better = match (theirs, self.lead.claim) {
            (Some(t), Some(ours)) => t.leader != ours.leader && t.precedence() > ours.precedence(),
            (Some(_), None) => true,
            _ => false,
        };
        let idle = self.keys.sec.as_ref().is_some_and(|s| {
            s.hs.pending_since()
                .is_none_or(|t| self.now >= t + self.config.timing.probe_timeout)
        });
        if better && idle && !self.leaving && request.sender != self.me.id {
            self.send_handshake(from, Purpose::Join);
        }
    }

    /// Our handshake was answered: we hold the responder's keys now.
    pub(super) fn on_joined(&mut self, now: Duration, from: SocketAddr, joined: Joined) {
        self.stats.joins += 1;
        self.keys.unanswered_requests = 0;
        let responder = joined.header.sender;
        let theirs = decode_claim(&joined.context);
        let tag = theirs.map(|c| c.leader).unwrap_or(responder);
        let current = joined.keys.current.epoch;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        let ours = self.lead.claim;
        let JoinedKeys {
            switch,
            same_keys,
            same_leader,
        } = JoinedKeys::judge(&sec.transient, now, &joined.keys, theirs, ours);
        if !(switch || same_keys || same_leader) {
            // Another flock that should lose a merge: it asks us in turn (our request carried
            // our claim) and switches to our keys. Its keys are of no use to us.
            return;
        }
        // Whatever we lack of the two keys (a key we hold, or held and dropped, is left alone):
        // the same flock's responder may be a rotation ahead of us (our key is its previous one).
        if let Some(prev) = &joined.keys.previous {
            sec.transient
                .install(prev.epoch, prev.key.clone(), tag, now, false);
        }
        let wanted = switch || [theirs, ours].iter().flatten().any(|c| c.epoch == current);
        sec.transient
            .install(current, joined.keys.current.key.clone(), tag, now, wanted);
        // Same leader: which of its keys to seal with is the claim's to say
        // (sync_key_to_leader), never an answer from a member that may lag behind it; the
        // responder's claim is as good as a beat of it (we may have missed the one that named
        // the key we were missing).
        if switch {
            sec.transient.set_own(current);
        }
        if switch {
            // Spread the key so that the rest of our flock can talk to the other side (a merge)
            // or, after a switch, follow us to the winning flock.
            let key = *joined.keys.current.key.as_bytes();
            self.spread.broadcasts.push(Update::Key {
                leader: tag,
                epoch: current,
                key,
            });
        }
        let max = self.config.members_max;
        self.keys.note_peer_epoch(from, current, max);
        if let Some(claim) = theirs {
            self.lead.max_term = self.lead.max_term.max(claim.term);
            if same_leader {
                // The handshake does not carry the keyring version: keep the one we know.
                let ring = ours.map_or(0, |o| o.ring);
                self.apply_claim(now, LeaderClaim { ring, ..claim });
                self.sync_key_to_leader(now);
            }
        }
        if !self.leaving {
            self.start_push_pull(from, true);
        }
    }

    /// Seal with the newest key of the leader we follow. A member that holds none of its keys
    /// (it followed another leader, e.g. a solo one during boot) asks the leader for them.
    pub(super) fn sync_key_to_leader(&mut self, now: Duration) {
        let Some(claim) = self.lead.claim else {
            return;
        };
        if claim.leader == self.me.id || claim.epoch == 0 {
            return;
        }
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        if sec.transient.holds(claim.epoch, now) {
            sec.transient.follow_claim(claim.epoch, claim.leader, now);
        } else {
            self.keys.hint = true;
        }
    }

    /// Handshake with a member whose datagrams we cannot open, at most once per probe interval
    /// per address.
    pub(super) fn handshake_unreadable(&mut self, now: Duration, from: SocketAddr) {
        let period = self.config.timing.probe_interval;
        if self.leaving || !self.keys.unreadable_due(from, now, period) {
            return;
        }
        // The handshake needs a secondary key the member holds. If our handshakes have gone
        // unanswered for a probe interval, the flock may have changed its keyring while we were
        // away: only
        // a push-pull can bring the new ring (sealed under our key, which the member may still
        // hold as its previous one, and answered under it). Not at every unreadable datagram:
        // a push-pull carries the whole member table, and after a rotation many datagrams are
        // unreadable for a moment while the handshakes that settle them succeed.
        let unanswered = self
            .keys
            .sec
            .as_ref()
            .and_then(|s| s.hs.unanswered_since())
            .is_some_and(|t| now >= t + period);
        self.send_handshake(from, Purpose::Join);
        if unanswered && !self.leaving {
            self.start_push_pull(from, false);
        }
    }

    /// A member that holds no fresh key (missed rotations, partitioned, new) asks a member for
    /// it through the handshake, at most once per probe interval.
    pub(super) fn request_key_if_needed(&mut self, now: Duration) {
        let Some(sec) = self.keys.sec.as_ref() else {
            return;
        };
        let hinted = std::mem::take(&mut self.keys.hint);
        if !(sec.transient.needs_key(now) || hinted) || self.members.live_len() == 0 || self.leaving
        {
            return;
        }
        if self.lead.claim.is_some_and(|c| c.leader == self.me.id) {
            return; // the leader makes keys; it never asks for them
        }
        let busy = sec
            .hs
            .pending_since()
            .is_some_and(|t| now < t + self.config.timing.probe_interval);
        if busy {
            return;
        }
        // The leader surely holds its current key; anyone else may lag.
        let leader = self
            .lead
            .claim
            .map(|c| c.leader)
            .filter(|l| self.members.is_live(*l));
        if let Some(id) = leader.or_else(|| self.members.choose_live(&mut self.rng)) {
            let addr = self.addr(id);
            self.stats.key_requests += 1;
            let shut_out = self.keys.key_requested();
            self.send_handshake(addr, Purpose::KeyRequest);
            if shut_out {
                // Members are there but none answers: our secondary keys are not in their
                // keyring any more (removed while we were away), or they are another bloc's.
                tracing::warn!(
                    requests = self.keys.unanswered_requests,
                    "shut out of the flock: no member accepts our secondary key (removed from the flock's keyring?); install a key the flock holds"
                );
            }
        }
    }

    /// Leader: rotate the transient key when due, and announce it under the current one.
    pub(super) fn rotate_if_leader(&mut self, now: Duration) {
        if self.lead.claim.is_none_or(|c| c.leader != self.me.id) || self.leaving {
            return;
        }
        let me = self.me.id;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        let r = sec.rotate_if_due(now, me, &mut self.rng);
        if let Some((epoch, key)) = r
            .announced
            .and_then(|e| Some((e, sec.transient.key_bytes(e)?)))
        {
            self.stats.rotations += 1;
            debug!(epoch, "transient key made");
            self.spread.broadcasts.push(Update::Key {
                leader: me,
                epoch,
                key,
            });
        }
        if let Some(epoch) = r.switched {
            debug!(epoch, "sealing with the new transient key");
            if let Some(claim) = self.lead.claim.as_mut() {
                claim.epoch = epoch;
                claim.beat += 1;
                let claim = *claim;
                self.spread.broadcasts.push(Update::Leader(claim));
            }
        }
        if r.announced.is_some() || r.switched.is_some() {
            self.gossip_round();
        }
    }

    /// A transient key spread by gossip (rotation or merge).
    pub(super) fn apply_key(&mut self, now: Duration, leader: NodeId, epoch: u32, key: [u8; 32]) {
        let following = self.lead.claim;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        // Only the keys of the leader we follow matter (and any key while we hold none): keys
        // of other leaders (solo leaders of a cold boot, a flock that lost a merge) would
        // otherwise circulate for ever, evicted and learnt again.
        let needs = sec.transient.needs_key(now);
        if following.map(|c| c.leader) != Some(leader) && !needs {
            return;
        }
        let wanted = needs || following.is_some_and(|c| c.epoch == epoch);
        if !sec
            .transient
            .install(epoch, SecretKey::from_bytes(key), leader, now, wanted)
        {
            return;
        }
        if needs || following.is_some_and(|c| c.epoch == epoch) {
            sec.transient.set_own(epoch);
        }
        self.spread
            .broadcasts
            .push(Update::Key { leader, epoch, key });
    }

    /// A keyring change, from the operator (`local`) or spread by the flock.
    /// `version`: the ring version a spread change makes (ignored for the operator's own).
    pub(super) fn keyring_op(&mut self, op: KeyringOp, local: bool, version: u64) {
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        if !local && !sec.ring.change_is_news(version) {
            return; // already in our ring, or undone by a later change we hold
        }
        // "use" of a key not installed yet installs it first (gossip may reorder the steps).
        if let KeyringOp::Use(k) = &op {
            if !sec.keyring.contains(k) {
                let _ = sec.keyring.apply(&KeyringOp::Install(k.clone()));
            }
        }
        match sec.keyring.apply(&op) {
            Ok(changed) => {
                let (code, key) = match &op {
                    KeyringOp::Install(k) => (0u8, *k.as_bytes()),
                    KeyringOp::Use(k) => (1, *k.as_bytes()),
                    KeyringOp::Remove(k) => (2, *k.as_bytes()),
                };
                let version = match (local, changed) {
                    (true, true) => sec.ring.next_version(),
                    (true, false) => sec.ring.version,
                    (false, _) => {
                        sec.ring.changed_to(version);
                        version
                    }
                };
                if changed || local {
                    let update = Update::Keyring {
                        op: code,
                        key,
                        version,
                    };
                    self.spread.broadcasts.push(update);
                    if local {
                        // An operator's change goes to every live member at once (as Serf's key
                        // queries do); gossip and the retransmissions cover losses.
                        let targets: Vec<SocketAddr> =
                            self.members.live_ids().map(|id| self.addr(id)).collect();
                        for to in targets {
                            self.send(
                                to,
                                &Message::Gossip {
                                    updates: vec![update],
                                },
                            );
                        }
                    }
                }
                if changed {
                    self.out.events.push_back(Event::KeyringChanged);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, local, "keyring change refused");
                self.out
                    .events
                    .push_back(Event::KeyringRefused(e.to_string()));
            }
        }
    }

    /// Whether a push-pull answer to a peer whose ring is `theirs` carries our keys (it is
    /// behind us).
    pub(super) fn ring_keys_for(&self, theirs: Option<&crux_proto::flock::KeyringState>) -> bool {
        match (self.keys.sec.as_ref(), theirs) {
            (Some(sec), Some(theirs)) => sec.ring_ahead_of(theirs),
            _ => false,
        }
    }

    /// A peer's keyring came with a push-pull: take it if it wins over ours and carries its
    /// keys; if it wins without them (a request from a peer ahead of us), ask that peer back.
    pub(super) fn repair_ring_from(
        &mut self,
        sender: NodeId,
        theirs: &crux_proto::flock::KeyringState,
        reply: bool,
    ) {
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        if !sec.ring_behind(theirs) {
            return;
        }
        if !theirs.keys.is_empty() {
            if sec.adopt_ring(theirs) {
                debug!(version = theirs.version, "keyring repaired from a peer");
                self.out.events.push_back(Event::KeyringChanged);
            }
        } else if !reply && !self.leaving {
            if let Some(addr) = self.member(sender).map(|m| m.info.addr) {
                self.start_push_pull(addr, false);
            }
        }
    }

    /// Member side: push-pull with the leader when its claim names another keyring version.
    pub(super) fn repair_ring_with_leader(&mut self, now: Duration) {
        let Some(claim) = self.lead.claim.filter(|c| c.leader != self.me.id) else {
            return;
        };
        let Some(addr) = self.member(claim.leader).map(|m| m.info.addr) else {
            return;
        };
        let grace = self.config.timing.probe_interval * 4;
        let push_odds = 3.0 / self.live_count() as f64;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        if sec
            .ring
            .repair_due(now, claim.ring, grace, push_odds, &mut self.rng)
            && !self.leaving
        {
            self.start_push_pull(addr, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyAnnouncement;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 7700))
    }

    #[test]
    fn peer_epochs_are_remembered_per_address_and_bounded() {
        let mut k = Keys::default();
        k.note_peer_epoch(addr(1), 5, 2);
        k.note_peer_epoch(addr(2), 6, 2);
        k.note_peer_epoch(addr(1), 7, 2);
        assert_eq!(k.peer_epoch(addr(1)), Some(7));
        assert_eq!(k.peer_epoch(addr(2)), None, "full: started over");
        k.note_peer_epoch(addr(2), 8, 2);
        assert_eq!(
            (k.peer_epoch(addr(1)), k.peer_epoch(addr(2))),
            (Some(7), Some(8))
        );
    }

    #[test]
    fn an_unreadable_member_is_asked_once_per_period() {
        let mut k = Keys::default();
        let period = Duration::from_millis(200);
        let at = |ms| Duration::from_millis(ms);
        assert!(k.unreadable_due(addr(1), at(0), period));
        assert!(!k.unreadable_due(addr(1), at(199), period));
        assert!(k.unreadable_due(addr(2), at(199), period));
        assert!(k.unreadable_due(addr(1), at(200), period));
    }

    #[test]
    fn every_tenth_unanswered_key_request_says_shut_out() {
        let mut k = Keys::default();
        let warnings: Vec<_> = (1..=25).filter(|_| k.key_requested()).collect();
        assert_eq!(warnings.len(), 2);
        assert_eq!(k.unanswered_requests, 25);
    }

    #[test]
    fn keys_from_a_handshake_are_taken_when_needed_or_when_their_flock_wins() {
        let now = Duration::from_secs(1);
        let claim = |leader: u64, term: u64| LeaderClaim {
            leader: NodeId(leader),
            boot: crux_proto::flock::BootId(1),
            term,
            solo: false,
            beat: 0,
            epoch: 0,
            ring: 0,
        };
        let ann = |epoch: u32, b: u8| KeyAnnouncement {
            epoch,
            key: SecretKey::from_bytes([b; 32]),
        };
        let keys = JoinKeys {
            current: ann(5, 5),
            previous: None,
        };
        let mut held =
            TransientKeys::new(crate::crypto::Bloc::new("b"), crate::crypto::ROTATION_MAX);
        let v = JoinedKeys::judge(&held, now, &keys, None, None);
        assert!(v.switch, "no key: take any");
        held.install(5, SecretKey::from_bytes([5; 32]), NodeId(1), now, false);
        held.set_own(5);
        let v = JoinedKeys::judge(&held, now, &keys, Some(claim(1, 1)), Some(claim(1, 1)));
        assert!(!v.switch && v.same_keys && v.same_leader);
        let other = JoinKeys {
            current: ann(5, 6),
            previous: None,
        };
        let v = JoinedKeys::judge(&held, now, &other, Some(claim(2, 3)), Some(claim(1, 1)));
        assert!(
            v.switch && !v.same_keys,
            "same epoch, other bytes, a better flock"
        );
        let v = JoinedKeys::judge(&held, now, &other, Some(claim(2, 1)), Some(claim(1, 3)));
        assert_eq!(
            v,
            JoinedKeys {
                switch: false,
                same_keys: false,
                same_leader: false
            },
            "a flock that loses the merge"
        );
    }
}
