//! Leadership: the sticky leader with terms, its gossiped beat, and the election (the best-ranked
//! live member claims when there is no live leader and the membership has been quiet).

use std::time::Duration;

use crux_proto::flock::{LeaderClaim, NodeId, Update};
use tracing::debug;

use super::machine::Flock;
use super::table::Table;
use super::timer::Timer;
use super::{is_live, Event, LeaderView};
use crate::config::Timing;

/// How often the election and leader-liveness checks run, as a fraction of `settle`.
const ELECTION_TICKS_PER_SETTLE: u32 = 4;

/// Highest rank that delays a claim or raises its term (bounds both in huge flocks).
const RANK_MAX: usize = 1000;

/// What a leader claim heard from the flock is, next to the one this node follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Judgement {
    /// The leader we follow, same term, a newer beat: it is alive.
    NewerBeat,
    /// The leader we follow, same term, a beat we already had.
    OldBeat,
    /// A claim that does not win over the one we follow (which is given).
    Weaker(LeaderClaim),
    /// A claim that wins (or we follow none): follow it.
    Stronger,
}

/// The leadership state.
pub(super) struct Leadership {
    /// The claim of the leader this node follows (its own, if it leads).
    pub(super) claim: Option<LeaderClaim>,
    /// When the leader last showed it is alive (a newer beat, an ack to a leader check).
    pub(super) last_beat: Duration,
    /// The highest term seen.
    pub(super) max_term: u64,
    /// When the live membership last changed (an election waits for it to settle).
    pub(super) last_change: Duration,
    /// This node's rank among the live members, as of `last_change`.
    pub(super) rank_cache: Option<(Duration, usize)>,
}

impl Leadership {
    /// No leader known at `now`.
    pub(super) fn new(now: Duration) -> Leadership {
        Leadership {
            claim: None,
            last_beat: now,
            max_term: 0,
            last_change: now,
            rank_cache: None,
        }
    }

    /// The live membership changed at `now`: the election waits for it to settle again.
    pub(super) fn membership_changed(&mut self, now: Duration) {
        self.last_change = now;
        self.rank_cache = None;
    }

    /// Where `claim` stands against the one we follow.
    pub(super) fn judge(&self, claim: &LeaderClaim) -> Judgement {
        match self.claim {
            Some(cur) if cur.leader == claim.leader && cur.term == claim.term => {
                if claim.beat > cur.beat {
                    Judgement::NewerBeat
                } else {
                    Judgement::OldBeat
                }
            }
            Some(cur) if claim.precedence() <= cur.precedence() => Judgement::Weaker(cur),
            _ => Judgement::Stronger,
        }
    }

    /// This node's rank among the live `members`: how many better candidates (lower ids) there
    /// are. Cached until the membership changes.
    pub(super) fn rank(&mut self, members: &Table, me: NodeId) -> usize {
        if let Some((at, rank)) = self.rank_cache {
            if at == self.last_change {
                return rank;
            }
        }
        let rank = members.live_ids().filter(|id| *id < me).count();
        self.rank_cache = Some((self.last_change, rank));
        rank
    }

    /// Whether the membership has been quiet long enough for a candidate of `rank` to claim:
    /// `settle`, plus `election_rank_step` per better candidate (who should claim first).
    pub(super) fn may_claim(&self, now: Duration, t: &Timing, rank: usize) -> bool {
        let wait = t.settle + t.election_rank_step * rank.min(RANK_MAX) as u32;
        now >= self.last_change + wait
    }

    /// The term of a claim by a candidate of `rank`: the highest seen plus one plus the rank. A
    /// lower-ranked candidate that claims before the better one's claim reached it (the news of
    /// the old leader's death reaches members at different times) claims another term, so two
    /// leaders never share a term; the higher term wins and the other steps down.
    pub(super) fn next_term(&mut self, rank: usize) -> u64 {
        self.max_term += 1 + rank.min(RANK_MAX) as u64;
        self.max_term
    }
}

/// The period of the election check.
pub(super) fn election_tick(t: &crate::config::Timing) -> Duration {
    (t.settle / ELECTION_TICKS_PER_SETTLE).max(Duration::from_millis(10))
}

impl Flock {
    /// What the application sees of a claim (None: the leader is not in the table).
    pub(super) fn leader_view_of(&self, claim: &LeaderClaim) -> Option<LeaderView> {
        let addr = self.member(claim.leader)?.info.addr;
        Some(LeaderView {
            id: claim.leader,
            addr,
            term: claim.term,
        })
    }

    /// The leader we followed is gone (dead, left, restarted, revoked).
    pub(super) fn lose_leader(&mut self, now: Duration) {
        if self.lead.claim.take().is_some() {
            debug!("leader lost");
            self.membership_changed(now);
            self.out.events.push_back(Event::LeaderChanged(None));
        }
    }

    /// Whether a claim names a leader we hold live at the claim's boot.
    pub(super) fn claim_is_live(&self, claim: &LeaderClaim) -> bool {
        if claim.leader == self.me.id {
            return claim.boot == self.me.boot && !self.leaving;
        }
        self.members
            .info(claim.leader)
            .is_some_and(|m| m.boot == claim.boot && is_live(m.state))
    }

    /// A leader claim from the flock (gossip, push-pull, a handshake): a live leader's newer
    /// beat, or a better claim, which this node follows from now on.
    pub(super) fn apply_claim(&mut self, now: Duration, claim: LeaderClaim) {
        self.lead.max_term = self.lead.max_term.max(claim.term);
        if claim.leader == self.me.id {
            return; // our own claim coming back, or a claim from a previous boot of ours
        }
        if self.revoked.contains(&claim.leader) {
            return;
        }
        if !self.claim_is_live(&claim) {
            return;
        }
        match self.lead.judge(&claim) {
            Judgement::NewerBeat => {
                self.lead.claim = Some(claim);
                self.lead.last_beat = now;
                self.spread.broadcasts.push(Update::Leader(claim));
            }
            Judgement::OldBeat => {}
            Judgement::Weaker(cur) => {
                if cur.leader == self.me.id {
                    // Let the other side hear about the better claim soon.
                    self.spread.broadcasts.push(Update::Leader(cur));
                }
            }
            Judgement::Stronger => {
                let was_me = self.lead.claim.is_some_and(|c| c.leader == self.me.id);
                self.lead.claim = Some(claim);
                self.sync_key_to_leader(now);
                self.lead.last_beat = now;
                self.spread.broadcasts.push(Update::Leader(claim));
                debug!(leader = %claim.leader, term = claim.term, stepped_down = was_me, "new leader");
                let view = self.leader_view_of(&claim);
                self.out.events.push_back(Event::LeaderChanged(view));
            }
        }
    }

    /// The election check: keys first (they follow the leader), then the leader's liveness
    /// (no fresh beat: probe it ourselves), then a claim if there is no live leader (or only a
    /// solo one, and we are not alone) and the membership is quiet.
    pub(super) fn check_leader(&mut self, now: Duration) {
        self.sync_key_to_leader(now);
        self.request_key_if_needed(now);
        self.rotate_if_leader(now);
        self.repair_ring_with_leader(now);
        let t = self.config.timing.clone();
        // Leader liveness: no fresh beat for a while → probe the leader ourselves.
        if let Some(claim) = self.lead.claim {
            if claim.leader != self.me.id
                && now >= self.lead.last_beat + t.leader_timeout
                && !self.detect.probes.values().any(|p| p.leader_check)
            {
                self.lead.last_beat = now; // next check after another leader_timeout
                self.start_probe(now, claim.leader, true);
            }
        }
        let live_n = self.live_count();
        // A leader that claimed alone claims again once it has company (a claim with company
        // beats a solo one when flocks meet). Its followers leave that to it: another member
        // claiming would move the leadership the flock already follows.
        let upgrade = self
            .lead
            .claim
            .is_some_and(|c| c.solo && c.leader == self.me.id && live_n >= 2);
        if self.lead.claim.is_some() && !upgrade {
            return;
        }
        if now < self.lead.last_change + t.settle {
            return;
        }
        let rank = if upgrade {
            0
        } else {
            self.lead.rank(&self.members, self.me.id)
        };
        if !self.lead.may_claim(now, &t, rank) {
            return;
        }
        let solo = live_n == 1;
        if self
            .lead
            .claim
            .is_some_and(|c| c.solo && c.leader == self.me.id)
            && solo
        {
            return; // already our solo claim
        }
        self.claim(now, solo, rank);
    }

    /// Claims leadership, in the term [`Leadership::next_term`] gives, and starts beating.
    pub(super) fn claim(&mut self, now: Duration, solo: bool, rank: usize) {
        let term = self.lead.next_term(rank);
        let claim = LeaderClaim {
            leader: self.me.id,
            boot: self.me.boot,
            term,
            solo,
            beat: 0,
            epoch: self.key_epoch().unwrap_or(0),
            ring: self.keys.sec.as_ref().map_or(0, |s| s.ring.version),
        };
        debug!(term, solo, "claiming leadership");
        self.stats.claims += 1;
        self.lead.claim = Some(claim);
        self.lead.last_beat = now;
        self.spread.broadcasts.push(Update::Leader(claim));
        let view = self.leader_view_of(&claim);
        self.out.events.push_back(Event::LeaderChanged(view));
        // Tell a few members at once instead of waiting for the next gossip round.
        self.gossip_round();
        let beat = self.config.timing.leader_beat_interval;
        self.schedule(now + beat, Timer::Beat { term });
        if let Some(sec) = self.keys.sec.as_mut() {
            sec.next_rotation = None; // the first rotation of this term comes 30-60 s from now
            sec.pending_switch = None;
        }
        self.rotate_if_leader(now);
    }

    /// Timer: the leader's beat of `term`, gossiped (with its sealing epoch and keyring
    /// version) while this node still leads in that term.
    pub(super) fn on_beat_timer(&mut self, now: Duration, term: u64) {
        let next = now + self.config.timing.leader_beat_interval;
        if let Some(claim) = self.lead.claim.as_mut() {
            if claim.leader == self.me.id && claim.term == term && !self.leaving {
                claim.beat += 1;
                claim.epoch = self
                    .keys
                    .sec
                    .as_ref()
                    .and_then(|s| s.transient.own_epoch(now))
                    .unwrap_or(0);
                claim.ring = self.keys.sec.as_ref().map_or(0, |s| s.ring.version);
                let claim = *claim;
                self.spread.broadcasts.push(Update::Leader(claim));
                self.schedule(next, Timer::Beat { term });
            }
        }
    }

    /// Timer: the election check.
    pub(super) fn on_election_timer(&mut self, now: Duration) {
        let next = now + election_tick(&self.config.timing);
        self.schedule(next, Timer::Election);
        if !self.leaving {
            self.check_leader(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;
    use crux_proto::flock::{BootId, MemberInfo, MemberState};

    fn claim(leader: u64, term: u64, beat: u64) -> LeaderClaim {
        LeaderClaim {
            leader: NodeId(leader),
            boot: BootId(1),
            term,
            solo: false,
            beat,
            epoch: 0,
            ring: 0,
        }
    }

    fn table(live: &[u64]) -> Table {
        let mut t = Table::default();
        for id in live {
            t.set(
                MemberInfo {
                    id: NodeId(*id),
                    boot: BootId(1),
                    addr: std::net::SocketAddr::from(([10, 0, 0, *id as u8], 7700)),
                    incarnation: 0,
                    state: MemberState::Alive,
                    key: None,
                },
                Duration::ZERO,
            );
        }
        t
    }

    #[test]
    fn claims_are_judged_by_beat_then_precedence() {
        let mut l = Leadership::new(Duration::ZERO);
        assert_eq!(
            l.judge(&claim(5, 1, 0)),
            Judgement::Stronger,
            "no leader yet"
        );
        l.claim = Some(claim(5, 2, 3));
        assert_eq!(l.judge(&claim(5, 2, 4)), Judgement::NewerBeat);
        assert_eq!(l.judge(&claim(5, 2, 3)), Judgement::OldBeat);
        assert_eq!(l.judge(&claim(5, 2, 1)), Judgement::OldBeat);
        let cur = l.claim.unwrap();
        assert_eq!(
            l.judge(&claim(4, 1, 9)),
            Judgement::Weaker(cur),
            "a lower term"
        );
        assert_eq!(
            l.judge(&claim(4, 3, 0)),
            Judgement::Stronger,
            "a higher term"
        );
    }

    #[test]
    fn the_rank_is_cached_until_the_membership_changes() {
        let mut l = Leadership::new(Duration::ZERO);
        let me = NodeId(5);
        assert_eq!(l.rank(&table(&[1, 3, 7]), me), 2);
        assert_eq!(l.rank(&table(&[1, 2, 3, 4, 7]), me), 2, "cached");
        l.membership_changed(Duration::from_secs(1));
        assert_eq!(l.rank(&table(&[1, 2, 3, 4, 7]), me), 4);
    }

    #[test]
    fn better_candidates_claim_first_and_worse_ones_in_higher_terms() {
        let t = Timing::preset(Preset::Lan);
        let mut l = Leadership::new(Duration::ZERO);
        l.membership_changed(Duration::from_secs(10));
        let quiet = Duration::from_secs(10) + t.settle;
        assert!(l.may_claim(quiet, &t, 0));
        assert!(!l.may_claim(quiet, &t, 1));
        assert!(l.may_claim(quiet + t.election_rank_step, &t, 1));
        l.max_term = 7;
        assert_eq!(l.next_term(0), 8);
        assert_eq!(l.next_term(2), 11);
        assert_eq!(l.max_term, 11);
        assert_eq!(l.next_term(5000), 11 + 1 + RANK_MAX as u64);
    }
}
