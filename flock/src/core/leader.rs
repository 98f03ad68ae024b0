//! Leadership: the sticky leader with terms, its gossiped beat, and the election (the best-ranked
//! live member claims when there is no live leader and the membership has been quiet).

use std::time::Duration;

use crux_proto::flock::{LeaderClaim, Update};
use tracing::debug;

use super::machine::Flock;
use super::timer::Timer;
use super::{is_live, Event, LeaderView};

/// How often the election and leader-liveness checks run, as a fraction of `settle`.
const ELECTION_TICKS_PER_SETTLE: u32 = 4;

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
}

/// The period of the election check.
pub(super) fn election_tick(t: &crate::config::Timing) -> Duration {
    (t.settle / ELECTION_TICKS_PER_SETTLE).max(Duration::from_millis(10))
}

impl Flock {
    pub(super) fn leader_view_of(&self, claim: &LeaderClaim) -> Option<LeaderView> {
        let addr = self.member(claim.leader)?.info.addr;
        Some(LeaderView {
            id: claim.leader,
            addr,
            term: claim.term,
        })
    }

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
        match self.lead.claim {
            Some(cur) if cur.leader == claim.leader && cur.term == claim.term => {
                if claim.beat > cur.beat {
                    self.lead.claim = Some(claim);
                    self.lead.last_beat = now;
                    self.spread.broadcasts.push(Update::Leader(claim));
                }
            }
            Some(cur) if claim.precedence() <= cur.precedence() => {
                if cur.leader == self.me.id {
                    // Let the other side hear about the better claim soon.
                    self.spread.broadcasts.push(Update::Leader(cur));
                }
            }
            _ => {
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

    pub(super) fn my_rank(&mut self) -> usize {
        if let Some((at, rank)) = self.lead.rank_cache {
            if at == self.lead.last_change {
                return rank;
            }
        }
        let me = self.me.id;
        let rank = self.members.live_ids().filter(|id| *id < me).count();
        self.lead.rank_cache = Some((self.lead.last_change, rank));
        rank
    }

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
        let need = match self.lead.claim {
            None => true,
            Some(c) => c.solo && live_n >= 2,
        };
        if !need {
            return;
        }
        if now < self.lead.last_change + t.settle {
            return;
        }
        let rank = self.my_rank();
        let wait = t.settle + t.election_rank_step * rank.min(1000) as u32;
        if now < self.lead.last_change + wait {
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

    /// After adopting a leader: seal with its newest key if we hold one, and spread that key
    /// with the claim (a merge: the losing side learns the winner's key this way).
    /// Claims leadership. The term is the highest seen plus one plus our rank among the
    /// candidates: a lower-ranked candidate that claims before the better one's claim reached it
    /// (the news of the old leader's death reaches members at different times) claims another
    /// term, so two leaders never share a term; the higher term wins and the other steps down.
    pub(super) fn claim(&mut self, now: Duration, solo: bool, rank: usize) {
        let term = self.lead.max_term + 1 + rank.min(1000) as u64;
        self.lead.max_term = term;
        let claim = LeaderClaim {
            leader: self.me.id,
            boot: self.me.boot,
            term,
            solo,
            beat: 0,
            epoch: self.key_epoch().unwrap_or(0),
            ring: self.keys.sec.as_ref().map_or(0, |s| s.ring_version),
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
                claim.ring = self.keys.sec.as_ref().map_or(0, |s| s.ring_version);
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
