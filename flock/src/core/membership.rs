//! The membership rules: what an alive, dead, left or revoke update does to the member table,
//! the sender's own entry carried in pings and acks, the graceful leave, and reaping.
//!
//! A node's entry is ordered by (boot, incarnation): a newer boot supersedes everything about an
//! older one, and within a boot the higher incarnation wins. Only a node speaks for itself
//! alive; suspicion is `detect.rs`'s.

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{BootId, Header, MemberInfo, MemberState, Message, NodeId, Update};

use super::machine::Flock;
use super::timer::Timer;
use super::{is_live, DropReason, Event};

/// Most nodes a flock keeps revoked (each costs 8 bytes in every push-pull). Beyond it, rotate
/// the secondary key: a node without it cannot come back.
pub(crate) const REVOKED_MAX: usize = 1024;

impl Flock {
    /// The live membership changed ([`Leadership::membership_changed`](super::leader::Leadership::membership_changed)).
    pub(super) fn membership_changed(&mut self, now: Duration) {
        self.lead.membership_changed(now);
    }

    /// The sender's own entry, carried in pings and acks.
    pub(super) fn apply_sender(
        &mut self,
        now: Duration,
        from: SocketAddr,
        header: Header,
        me: MemberInfo,
    ) {
        if me.id != header.sender || me.boot != header.boot || me.state != MemberState::Alive {
            return; // only a node's own claim about itself counts here
        }
        // Trust the address we actually heard from for a node's first appearance.
        let info = if self.members.contains(me.id) {
            me
        } else {
            MemberInfo { addr: from, ..me }
        };
        self.apply_alive(now, info);
    }

    /// An alive update (gossiped, or a sender's own entry): spread it further.
    pub(super) fn apply_alive(&mut self, now: Duration, info: MemberInfo) {
        self.apply_alive_from(now, info, true);
    }

    /// `gossip`: whether to spread the news (not when it came by push-pull: anti-entropy already
    /// carries it, and re-gossiping a whole member table costs N × retransmits per node).
    pub(super) fn apply_alive_from(&mut self, now: Duration, info: MemberInfo, gossip: bool) {
        if info.id == self.me.id {
            return; // only we speak for ourselves
        }
        if self.revoked.contains(&info.id) {
            return; // kept out
        }
        let info = MemberInfo {
            state: MemberState::Alive,
            ..info
        };
        let Some(old) = self.members.info(info.id) else {
            if self.members.len() + 1 >= self.config.members_max {
                self.stats.drop(DropReason::TableFull);
                return;
            }
            self.members.set(info, now);
            self.detect.insert_probe_order(info.id, &mut self.rng);
            self.membership_changed(now);
            if gossip {
                self.spread.broadcasts.push(Update::Alive { member: info });
            }
            self.out.events.push_back(Event::MemberJoined(info));
            return;
        };
        let newer =
            info.boot > old.boot || (info.boot == old.boot && info.incarnation > old.incarnation);
        if !newer {
            return;
        }
        let restarted = info.boot > old.boot;
        let was_live = is_live(old.state);
        self.members.set(info, now);
        self.detect.suspicions.remove(&info.id);
        if gossip {
            self.spread.broadcasts.push(Update::Alive { member: info });
        }
        if restarted || !was_live {
            self.membership_changed(now);
            self.out.events.push_back(Event::MemberJoined(info));
            if restarted
                && self
                    .lead
                    .claim
                    .is_some_and(|c| c.leader == info.id && c.boot != info.boot)
            {
                // The leader restarted: its old claim died with its old boot.
                self.lose_leader(now);
            }
        } else {
            self.out.events.push_back(Event::MemberUpdated(info));
        }
    }

    /// A death (our suspicion ran out, or gossiped): of us, refute it.
    pub(super) fn apply_dead(
        &mut self,
        now: Duration,
        id: NodeId,
        boot: BootId,
        inc: u64,
        from: NodeId,
    ) {
        if id == self.me.id {
            if boot == self.me.boot {
                self.refute(inc);
            }
            return;
        }
        let update = Update::Dead {
            id,
            boot,
            incarnation: inc,
            from,
        };
        self.retire(
            now,
            id,
            boot,
            inc,
            MemberState::Dead,
            update,
            Event::MemberDead,
        );
    }

    /// A graceful leave (gossiped, or from a push-pull): of us (an old boot), refute it.
    pub(super) fn apply_left(&mut self, now: Duration, id: NodeId, boot: BootId, inc: u64) {
        if id == self.me.id {
            if boot == self.me.boot && !self.leaving {
                self.refute(inc);
            }
            return;
        }
        let update = Update::Left {
            id,
            boot,
            incarnation: inc,
        };
        self.retire(
            now,
            id,
            boot,
            inc,
            MemberState::Left,
            update,
            Event::MemberLeft,
        );
    }

    /// A member stops being live: declared dead (only from alive or suspect) or gone (left, from
    /// any other state), at incarnation `inc` or later of the same boot. Spreads `update` and
    /// reports the event; a leader that goes loses its leadership.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn retire(
        &mut self,
        now: Duration,
        id: NodeId,
        boot: BootId,
        inc: u64,
        state: MemberState,
        update: Update,
        event: fn(MemberInfo) -> Event,
    ) {
        let Some(info) = self.members.info(id) else {
            return;
        };
        let from_ok = match state {
            MemberState::Dead => is_live(info.state),
            _ => info.state != state,
        };
        if boot != info.boot || inc < info.incarnation || !from_ok {
            return;
        }
        let info = MemberInfo {
            state,
            incarnation: inc,
            ..info
        };
        self.members.set(info, now);
        self.detect.suspicions.remove(&id);
        self.membership_changed(now);
        self.spread.broadcasts.push(update);
        self.out.events.push_back(event(info));
        if self.lead.claim.is_some_and(|c| c.leader == id) {
            self.lose_leader(now);
        }
    }

    /// A revoked node still sends to us (it may not have heard, since nobody gossips to a node
    /// it forgot): tell it, under the key it sealed with, at most once per probe interval per
    /// address, so that it leaves instead of waiting for a stray update.
    pub(super) fn tell_revoked(&mut self, now: Duration, from: SocketAddr, id: NodeId) {
        let period = self.config.timing.probe_interval;
        if self.left || !self.told_revoked.due(from, now, period) {
            return;
        }
        let updates = vec![Update::Revoke { id }];
        self.send(from, &Message::Gossip { updates });
    }

    /// Revokes `id` (from a command, an update or a push-pull): forgets it, keeps it out, and
    /// spreads the news once. This node being the one revoked leaves the flock.
    pub(super) fn apply_revoke(&mut self, now: Duration, id: NodeId) {
        if id == self.me.id {
            if !self.leaving {
                self.out.events.push_back(Event::Revoked);
                self.start_leave(now);
            }
            return;
        }
        if self.revoked.contains(&id) || self.revoked.len() >= REVOKED_MAX {
            return;
        }
        self.revoked.insert(id);
        self.spread.broadcasts.push(Update::Revoke { id });
        if self.members.remove(id).is_some() {
            self.detect.suspicions.remove(&id);
            self.spread.last_heal.remove(&id);
            self.membership_changed(now);
        }
        self.out.events.push_back(Event::MemberRevoked(id));
        if self.lead.claim.is_some_and(|c| c.leader == id) {
            self.lose_leader(now);
        }
    }

    /// The nodes revoked, as this node holds them.
    pub fn revoked(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.revoked.iter().copied()
    }

    /// Forgets the dead and left members held for `reap_after`, and expired keys.
    pub(super) fn reap(&mut self, now: Duration) {
        if let Some(sec) = self.keys.sec.as_mut() {
            sec.forget_expired(now);
        }
        let after = self.config.timing.reap_after;
        let expired: Vec<NodeId> = self
            .members
            .iter()
            .filter(|m| !is_live(m.info.state) && now >= m.since + after)
            .map(|m| m.info.id)
            .collect();
        for id in expired {
            self.members.remove(id);
            self.detect.suspicions.remove(&id);
            self.spread.last_heal.remove(&id);
            self.out.events.push_back(Event::MemberReaped(id));
        }
    }

    /// Leaves gracefully: this node's entry becomes Left (a higher incarnation), told to a few
    /// members at once and gossiped until `leave_propagation` has passed.
    pub(super) fn start_leave(&mut self, now: Duration) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        self.self_member.info.incarnation += 1;
        self.self_member.info.state = MemberState::Left;
        self.self_member.since = now;
        let me = self.self_member.info;
        self.spread.broadcasts.clear();
        self.spread.broadcasts.push(Update::Left {
            id: me.id,
            boot: me.boot,
            incarnation: me.incarnation,
        });
        if self.lead.claim.is_some_and(|c| c.leader == self.me.id) {
            self.lead.claim = None;
        }
        // Tell a few members at once, then keep gossiping until the leave had time to spread.
        let fanout = self.config.timing.gossip_fanout * 2;
        let targets = self.members.sample_live(fanout, &[], &mut self.rng);
        for id in targets {
            let addr = self.addr(id);
            let msg = Message::Gossip {
                updates: vec![Update::Left {
                    id: me.id,
                    boot: me.boot,
                    incarnation: me.incarnation,
                }],
            };
            self.send(addr, &msg);
        }
        let done = if self.members.live_len() == 0 {
            now
        } else {
            now + self.config.timing.leave_propagation
        };
        self.schedule(done, Timer::LeaveDone);
    }

    /// Timer: forget the dead and left members held long enough.
    pub(super) fn on_reap_timer(&mut self, now: Duration) {
        let next = now + reap_period(&self.config.timing);
        self.schedule(next, Timer::Reap);
        self.reap(now);
    }

    /// Timer: the leave had time to spread; this node stops.
    pub(super) fn on_leave_done(&mut self) {
        self.left = true;
        self.spread.broadcasts.clear();
        self.timers.clear();
        self.out.events.push_back(Event::LeaveComplete);
    }
}

/// How often dead and left members are checked for reaping.
pub(super) fn reap_period(t: &crate::config::Timing) -> Duration {
    (t.reap_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
}
