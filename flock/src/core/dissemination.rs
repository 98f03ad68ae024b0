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

use super::broadcast::Broadcasts;
use super::machine::Flock;
use super::membership::REVOKED_MAX;
use super::table::member_hash;
use super::timer::Timer;
use super::{is_live, FastMap};
use crate::config::{Timing, PUSH_PULL_SCALE_MEMBERS};

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

impl Dissemination {
    /// The period until the next push-pull: fast while views still differ (see
    /// [`views_differ`](Self::views_differ)), else `push_pull_interval` scaled with the `live_n`
    /// live members (so that full-state bytes per node per second stay flat), ±10 % by
    /// `counter` (any value that differs between nodes) so that nodes do not synchronise.
    pub(super) fn push_pull_interval(
        &self,
        now: Duration,
        live_n: usize,
        counter: u64,
        t: &Timing,
    ) -> Duration {
        if now < self.fast_push_pull_until {
            return t.push_pull_fast_interval;
        }
        let scale = (live_n as f64 / PUSH_PULL_SCALE_MEMBERS as f64).max(1.0);
        let base = t.push_pull_interval.mul_f64(scale);
        let jitter = 0.9 + 0.2 * (counter % 1000) as f64 / 1000.0;
        base.mul_f64(jitter)
    }

    /// A push-pull showed two views that differ by `diff` members (one side taught the other):
    /// push-pull stays fast for a while ([`FAST_PUSH_PULL_ROUNDS`] fast intervals).
    pub(super) fn views_differ(&mut self, now: Duration, diff: usize, fast: Duration) {
        if diff >= FAST_PUSH_PULL_DIFF {
            self.fast_push_pull_until = now + fast * FAST_PUSH_PULL_ROUNDS;
        }
    }

    /// A peer's digest equals ours.
    pub(super) fn digests_agree(&mut self) {
        self.digest_mismatch_since = None;
    }

    /// A peer's digest differs from ours: whether to push-pull with it now. Yes once digests
    /// have differed for `grace` (the time gossip needs to spread news), at most once per
    /// `grace`, and not while `leaving`.
    pub(super) fn digests_differ(&mut self, now: Duration, grace: Duration, leaving: bool) -> bool {
        let since = *self.digest_mismatch_since.get_or_insert(now);
        let rested = self
            .last_digest_push_pull
            .is_none_or(|last| now >= last + grace);
        if now >= since + grace && rested && !leaving {
            self.digest_mismatch_since = None;
            self.last_digest_push_pull = Some(now);
            return true;
        }
        false
    }

    /// A member we hold dead spoke to us: whether to push-pull with it (at most once per
    /// `period` per member).
    pub(super) fn heal_due(&mut self, id: NodeId, now: Duration, period: Duration) -> bool {
        if self.last_heal.get(&id).is_some_and(|t| now < *t + period) {
            return false;
        }
        self.last_heal.insert(id, now);
        true
    }
}

impl Flock {
    /// The live-membership digest: XOR of [`member_hash`] over the live members and this node.
    pub(super) fn digest(&self) -> u64 {
        member_hash(self.me.id, self.me.boot) ^ self.members.digest()
    }

    /// How many times each update is sent: `retransmit_mult × ceil(log10(N + 1))`.
    pub(super) fn retransmit_limit(&self) -> u32 {
        let n = self.live_count() as f64;
        self.config.timing.retransmit_mult * ((n + 1.0).log10().ceil() as u32).max(1)
    }

    /// Sends the queued updates to `gossip_fanout` random live members (if there is news).
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
        let live_n = self.live_count();
        self.spread
            .push_pull_interval(now, live_n, self.wire.counter, &self.config.timing)
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

    /// Starts a push-pull with `addr` (`join`: a first exchange with a node just found).
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

    /// Merges a peer's full state: its members, revocations, leader claim and keyring.
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
        let fast = self.config.timing.push_pull_fast_interval;
        self.spread.views_differ(now, learned + they_lack, fast);
    }

    /// Digest anti-entropy: when the live-membership digests of the peers we hear from keep
    /// differing from ours for longer than gossip needs to spread news, push-pull with one of them.
    /// This repairs what gossip missed without waiting for the (N-scaled) periodic push-pull.
    pub(super) fn compare_digest(&mut self, now: Duration, from: SocketAddr, theirs: u64) {
        if theirs == self.digest() {
            self.spread.digests_agree();
            return;
        }
        let grace = self.config.timing.push_pull_fast_interval * FAST_PUSH_PULL_ROUNDS;
        if self.spread.digests_differ(now, grace, self.leaving) {
            self.start_push_pull(from, false);
        }
    }

    /// A member we hold dead or left at this boot is talking to us: push-pull so both sides
    /// learn (partition heal, false death), at most once per dead-probe interval.
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
        if !self.spread.heal_due(sender, now, period) {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn push_pull_is_fast_while_views_differ_then_scales_with_n() {
        let t = Timing::preset(Preset::Lan);
        let mut d = Dissemination::default();
        let slow = d.push_pull_interval(ms(0), 10, 500, &t);
        assert_eq!(
            slow, t.push_pull_interval,
            "jitter 1.0 at counter 500, no scaling at 10"
        );
        let jittered: Vec<_> = [0, 999]
            .map(|c| d.push_pull_interval(ms(0), 10, c, &t))
            .into();
        assert_eq!(jittered[0], t.push_pull_interval.mul_f64(0.9));
        assert!(jittered[1] < t.push_pull_interval.mul_f64(1.1));
        let big = d.push_pull_interval(ms(0), PUSH_PULL_SCALE_MEMBERS * 4, 500, &t);
        assert_eq!(big, t.push_pull_interval * 4);
        d.views_differ(ms(100), FAST_PUSH_PULL_DIFF - 1, t.push_pull_fast_interval);
        assert_eq!(
            d.push_pull_interval(ms(100), 10, 500, &t),
            slow,
            "one member: not enough"
        );
        d.views_differ(ms(100), FAST_PUSH_PULL_DIFF, t.push_pull_fast_interval);
        let until = ms(100) + t.push_pull_fast_interval * FAST_PUSH_PULL_ROUNDS;
        assert_eq!(
            d.push_pull_interval(until - ms(1), 10, 500, &t),
            t.push_pull_fast_interval
        );
        assert_eq!(d.push_pull_interval(until, 10, 500, &t), slow);
    }

    #[test]
    fn differing_digests_push_pull_after_a_grace_and_at_most_once_per_grace() {
        let mut d = Dissemination::default();
        let grace = ms(1000);
        assert!(!d.digests_differ(ms(0), grace, false));
        assert!(!d.digests_differ(ms(999), grace, false));
        assert!(
            !d.digests_differ(ms(1000), grace, true),
            "not while leaving"
        );
        assert!(d.digests_differ(ms(1000), grace, false));
        assert!(
            !d.digests_differ(ms(1500), grace, false),
            "the mismatch starts again"
        );
        assert!(!d.digests_differ(ms(2499), grace, false));
        assert!(d.digests_differ(ms(2500), grace, false));
        d.digests_agree();
        assert!(
            !d.digests_differ(ms(4000), grace, false),
            "agreement resets the wait"
        );
        assert!(d.digests_differ(ms(5000), grace, false));
    }

    #[test]
    fn a_dead_member_that_speaks_is_healed_at_most_once_per_period() {
        let mut d = Dissemination::default();
        let period = ms(500);
        assert!(d.heal_due(NodeId(1), ms(0), period));
        assert!(!d.heal_due(NodeId(1), ms(499), period));
        assert!(d.heal_due(NodeId(2), ms(499), period), "per member");
        assert!(d.heal_due(NodeId(1), ms(500), period));
    }
}
