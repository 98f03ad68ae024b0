//! Dissemination: the piggyback queue of updates, gossip rounds, push-pull (full-state
//! anti-entropy, over a stream when it outgrows a datagram) and the membership digests that
//! trigger an early push-pull when views differ.
//!
//! News spreads three ways, cheapest first: piggybacked on probes and acks, in gossip datagrams
//! to a few random members, and by periodic push-pull, whose period scales with N so that the
//! full-state bytes per node stay flat, and that stays fast while two views still differ.

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{
    message_len, BootId, MemberInfo, MemberState, Message, NodeId, PushPull, StreamFrame,
};

use super::is_live;
use super::machine::{Flock, REVOKED_MAX};
use super::table::member_hash;
use super::timer::Timer;
use crate::config::PUSH_PULL_SCALE_MEMBERS;

use super::broadcast::Broadcasts;
use super::FastMap;

/// Push-pull stays fast for this many fast intervals after an exchange that taught us members.
pub(super) const FAST_PUSH_PULL_ROUNDS: u32 = 4;
/// A push-pull whose two views differ by at least this many members keeps push-pull fast.
pub(super) const FAST_PUSH_PULL_DIFF: usize = 2;

/// The dissemination state.
#[derive(Default)]
pub(super) struct Dissemination {
    /// Updates waiting to be piggybacked or gossiped.
    pub(super) broadcasts: Broadcasts,
    /// Push-pull runs at the fast interval until then.
    pub(super) fast_push_pull_until: Duration,
    /// Since when the digests peers show us differ from ours.
    pub(super) digest_mismatch_since: Option<Duration>,
    /// When a digest mismatch last made us push-pull.
    pub(super) last_digest_push_pull: Option<Duration>,
    /// Last time we push-pulled with a member because it spoke to us while we held it dead.
    pub(super) last_heal: FastMap<NodeId, Duration>,
}

impl Flock {
    /// The live-membership digest: XOR of [`member_hash`] over the live members and this node.
    pub(super) fn digest(&self) -> u64 {
        member_hash(self.me.id, self.me.boot) ^ self.members.digest()
    }

    pub(super) fn retransmit_limit(&self) -> u32 {
        let n = self.live_count() as f64;
        self.config.timing.retransmit_mult * ((n + 1.0).log10().ceil() as u32).max(1)
    }

    pub(super) fn gossip_round(&mut self) {
        if !self.spread.broadcasts.has_news() {
            return;
        }
        let targets =
            self.members
                .sample_live(self.config.timing.gossip_fanout, &[], &mut self.rng);
        for id in targets {
            if self.spread.broadcasts.is_empty() {
                break;
            }
            let addr = self.addr(id);
            self.send_with_updates(
                addr,
                Message::Gossip {
                    updates: Vec::new(),
                },
            );
        }
    }

    pub(super) fn push_pull_interval(&self, now: Duration) -> Duration {
        let t = &self.config.timing;
        if now < self.spread.fast_push_pull_until {
            return t.push_pull_fast_interval;
        }
        let n = self.live_count();
        // Scale with N so that full-state bytes per node per second stay flat.
        let scale = (n as f64 / PUSH_PULL_SCALE_MEMBERS as f64).max(1.0);
        let base = t.push_pull_interval.mul_f64(scale);
        // ±10 % jitter keeps nodes from synchronising.
        let jitter = 0.9 + 0.2 * (self.wire.counter % 1000) as f64 / 1000.0;
        base.mul_f64(jitter)
    }

    /// `ring_keys`: the peer's keyring is behind ours (answer with our keys).
    pub(super) fn build_push_pull(&self, reply: bool, join: bool, ring_keys: bool) -> PushPull {
        let members = self.members().map(|m| m.info).collect();
        PushPull {
            reply,
            join,
            members,
            leader: self.lead.claim,
            ring: self.keys.sec.as_ref().map(|s| s.ring_state(ring_keys)),
            revoked: self.revoked.iter().copied().collect(),
        }
    }

    pub(super) fn start_push_pull(&mut self, addr: SocketAddr, join: bool) {
        self.stats.push_pulls += 1;
        let pp = self.build_push_pull(false, join, false);
        self.send_push_pull(addr, pp);
    }

    /// Sends a push-pull as a datagram when it fits (see [`Flock::reply_body_cap`]), else as a
    /// stream request.
    pub(super) fn send_push_pull(&mut self, addr: SocketAddr, pp: PushPull) {
        let msg = Message::PushPull(pp);
        if message_len(&msg) <= self.room_for(addr) {
            self.send(addr, &msg);
            return;
        }
        let Message::PushPull(pp) = msg else {
            unreachable!("built above")
        };
        self.send_frame(addr, &StreamFrame::PushPull(pp));
    }

    pub(super) fn on_push_pull(&mut self, now: Duration, sender: NodeId, pp: PushPull) {
        for id in pp.revoked.iter().take(REVOKED_MAX) {
            self.apply_revoke(now, *id);
        }
        let known_before = self.members.len();
        for info in &pp.members {
            match info.state {
                MemberState::Alive => self.apply_alive_from(now, *info, false),
                // As memberlist: a remote view of death only makes us suspect, and the
                // suspicion counts as ours (not as an independent confirmation by the sender).
                MemberState::Suspect | MemberState::Dead => {
                    if info.id != self.me.id && !self.members.contains(info.id) {
                        // A member new to us: learn it, but do not take over a suspicion we
                        // have no evidence of (the view may be stale; its owner's timers and
                        // the gossip about it decide).
                        let alive = MemberInfo {
                            state: MemberState::Alive,
                            ..*info
                        };
                        self.apply_alive_from(now, alive, false);
                        continue;
                    }
                    let me = self.me.id;
                    self.apply_suspect(now, info.id, info.boot, info.incarnation, me);
                }
                MemberState::Left => {
                    if !self.members.contains(info.id) && info.id != self.me.id {
                        continue; // nothing to learn about a node we never knew that left
                    }
                    self.apply_left(now, info.id, info.boot, info.incarnation);
                }
            }
        }
        if let Some(claim) = pp.leader {
            self.apply_claim(now, claim);
        }
        if let Some(ring) = &pp.ring {
            self.repair_ring_from(sender, ring, pp.reply);
        }
        // Adaptive anti-entropy: while two views still differ (one side taught the other a
        // member), keep push-pulling fast; once they agree, fall back to the scaled period.
        let learned = self.members.len().saturating_sub(known_before);
        let they_lack = (self.members.len() + 1).saturating_sub(pp.members.len());
        if learned + they_lack >= FAST_PUSH_PULL_DIFF {
            self.spread.fast_push_pull_until =
                now + self.config.timing.push_pull_fast_interval * FAST_PUSH_PULL_ROUNDS;
        }
    }

    /// Digest anti-entropy: when the live-membership digests of the peers we hear from keep
    /// differing from ours for longer than gossip needs to spread news, push-pull with one of them.
    /// This repairs what gossip missed without waiting for the (N-scaled) periodic push-pull.
    pub(super) fn compare_digest(&mut self, now: Duration, from: SocketAddr, theirs: u64) {
        if theirs == self.digest() {
            self.spread.digest_mismatch_since = None;
            return;
        }
        let t = &self.config.timing;
        let grace = t.push_pull_fast_interval * FAST_PUSH_PULL_ROUNDS;
        let since = *self.spread.digest_mismatch_since.get_or_insert(now);
        let rested = self
            .spread
            .last_digest_push_pull
            .is_none_or(|last| now >= last + grace);
        if now >= since + grace && rested && !self.leaving {
            self.spread.digest_mismatch_since = None;
            self.spread.last_digest_push_pull = Some(now);
            self.start_push_pull(from, false);
        }
    }

    pub(super) fn heal_if_dead(
        &mut self,
        now: Duration,
        from: SocketAddr,
        sender: NodeId,
        boot: BootId,
    ) {
        let Some(info) = self.members.info(sender) else {
            return;
        };
        if info.boot != boot || is_live(info.state) {
            return;
        }
        let period = self.config.timing.dead_probe_interval;
        if self
            .spread
            .last_heal
            .get(&sender)
            .is_some_and(|t| now < *t + period)
        {
            return;
        }
        self.spread.last_heal.insert(sender, now);
        if !self.leaving {
            self.start_push_pull(from, false);
        }
    }

    /// Timer: a gossip round.
    pub(super) fn on_gossip_timer(&mut self, now: Duration) {
        let next = now + self.config.timing.gossip_interval;
        self.schedule(next, Timer::Gossip);
        self.gossip_round();
    }

    /// Timer: push-pull with a random live member.
    pub(super) fn on_push_pull_timer(&mut self, now: Duration) {
        let next = now + self.push_pull_interval(now);
        self.schedule(next, Timer::PushPull);
        if !self.leaving {
            if let Some(id) = self.members.choose_live(&mut self.rng) {
                let addr = self.addr(id);
                self.start_push_pull(addr, false);
            }
        }
    }

    /// A push-pull datagram: merge the peer's state, and answer a request with ours.
    pub(super) fn on_push_pull_message(
        &mut self,
        now: Duration,
        from: SocketAddr,
        sender: NodeId,
        pp: PushPull,
    ) {
        let answer = !pp.reply;
        let ring_keys = self.ring_keys_for(pp.ring.as_ref());
        self.on_push_pull(now, sender, pp);
        if answer && !self.leaving {
            let reply = self.build_push_pull(true, false, ring_keys);
            self.send_push_pull(from, reply);
        }
    }
}
