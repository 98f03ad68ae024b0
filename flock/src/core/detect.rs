//! Failure detection: SWIM probes (direct, indirect through relays, and over a stream),
//! suspicion with Lifeguard's confirmations and timeouts, refutation, and local health
//! (awareness).
//!
//! Each probe round walks a fresh shuffle of the live members. A probe that gets no ack within
//! the probe timeout goes to `indirect_probes` relays and, as memberlist's TCP ping, over a
//! stream; if nothing answers by the end of the probe interval, the target becomes suspect.
//! Suspicions time out into death after [`suspicion_timeout`], which independent confirmations
//! shorten. A node told it is suspect (or dead) refutes with a higher incarnation.

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{BootId, MemberInfo, MemberState, Message, NodeId, StreamFrame, Update};
use rand::Rng;
use tracing::debug;

use super::machine::Flock;
use super::table::Table;
use super::timer::Timer;
use super::{is_live, Event, FastMap};
use crate::config::Config;

/// Most indirect probes this node relays at once (bounds work a peer can ask of us).
pub(super) const RELAYS_MAX: usize = 1024;
/// Most distinct suspecters remembered per suspicion.
pub(super) const CONFIRMATIONS_MAX: usize = 64;

/// A suspicion running, by suspect.
pub(super) struct Suspicion {
    /// Token of the suspicion when it started (confirmations change `token`, not this).
    pub(super) started_token: u64,
    pub(super) started: Duration,
    pub(super) confirmations: Vec<NodeId>,
    pub(super) token: u64,
}

/// A probe of ours waiting for its ack.
pub(super) struct Probe {
    pub(super) target: NodeId,
    pub(super) sent: Duration,
    pub(super) nacks_expected: u32,
    pub(super) nacks: u32,
    /// Probe of the leader started because its beats stopped arriving.
    pub(super) leader_check: bool,
}

/// An indirect probe this node relays for `requester` (whose sequence number is `seq`).
pub(super) struct Relay {
    pub(super) requester: SocketAddr,
    pub(super) seq: u32,
}

/// The failure detector's state.
#[derive(Default)]
pub(super) struct Detection {
    /// This round's shuffle of the live members, and the next one to probe.
    pub(super) probe_order: Vec<NodeId>,
    pub(super) probe_next: usize,
    /// Our probes waiting for an ack, by sequence number.
    pub(super) probes: FastMap<u32, Probe>,
    /// Indirect probes we relay, by our sequence number.
    pub(super) relays: FastMap<u32, Relay>,
    /// Last sequence number used (pings, probes, relays).
    pub(super) seq: u32,
    /// Suspicions running, by suspect.
    pub(super) suspicions: FastMap<NodeId, Suspicion>,
    /// Last suspicion token handed out.
    pub(super) suspicion_token: u64,
    /// Lifeguard local-health score (0 = healthy): scales probe intervals and timeouts.
    pub(super) awareness: u32,
    /// We refuted a suspicion of us while handling this input: answer its sender directly.
    pub(super) refute_pending: bool,
}

impl Detection {
    /// The next sequence number (pings, probes, relays).
    pub(super) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// `d` scaled by local health (Lifeguard): a node in trouble probes less often and waits
    /// longer for answers, rather than suspecting healthy members.
    pub(super) fn scaled(&self, d: Duration) -> Duration {
        d * (self.awareness + 1)
    }

    /// Something pointed at our own trouble (relays that did not even nack, a suspicion of us
    /// to refute): health gets worse, up to `max`.
    pub(super) fn health_worse(&mut self, max: u32) {
        self.awareness = (self.awareness + 1).min(max);
    }

    /// A probe of ours was acked: health gets better.
    pub(super) fn health_better(&mut self) {
        self.awareness = self.awareness.saturating_sub(1);
    }

    /// The next member to probe: each round walks a fresh shuffle of the live members, skipping
    /// those that stopped being live since. None when no member is live.
    pub(super) fn next_probe_target(
        &mut self,
        members: &Table,
        rng: &mut impl Rng,
    ) -> Option<NodeId> {
        for _ in 0..2 {
            while self.probe_next < self.probe_order.len() {
                let id = self.probe_order[self.probe_next];
                self.probe_next += 1;
                if members.is_live(id) {
                    return Some(id);
                }
            }
            // A new round over a fresh shuffle of the live members.
            self.probe_order = members.live_ids().collect();
            for i in (1..self.probe_order.len()).rev() {
                let j = rng.gen_range(0..=i);
                self.probe_order.swap(i, j);
            }
            self.probe_next = 0;
            if self.probe_order.is_empty() {
                return None;
            }
        }
        None
    }

    /// A new member joins this round: as memberlist, at a random place in the rest of it
    /// (swapped there, so that a cold boot's N joins cost O(N), not O(N²)).
    pub(super) fn insert_probe_order(&mut self, id: NodeId, rng: &mut impl Rng) {
        let lo = self.probe_next.min(self.probe_order.len());
        let at = rng.gen_range(lo..=self.probe_order.len());
        self.probe_order.push(id);
        let last = self.probe_order.len() - 1;
        self.probe_order.swap(at, last);
    }

    /// Starts a suspicion of `id`, first suspected by `from`; returns its token.
    pub(super) fn start_suspicion(&mut self, id: NodeId, from: NodeId, now: Duration) -> u64 {
        self.suspicion_token += 1;
        let token = self.suspicion_token;
        self.suspicions.insert(
            id,
            Suspicion {
                started_token: token,
                started: now,
                confirmations: vec![from],
                token,
            },
        );
        token
    }

    /// How many independent confirmations beyond the first the suspicion of `id` would have
    /// with `from`'s; None when there is no suspicion, `from` already counted, or the count is
    /// full ([`CONFIRMATIONS_MAX`]).
    pub(super) fn would_confirm(&self, id: NodeId, from: NodeId) -> Option<usize> {
        let s = self.suspicions.get(&id)?;
        if s.confirmations.contains(&from) || s.confirmations.len() >= CONFIRMATIONS_MAX {
            return None;
        }
        Some(s.confirmations.len())
    }

    /// Counts `from`'s confirmation of the suspicion of `id` (see
    /// [`would_confirm`](Self::would_confirm)): a new token, so that the timer scheduled for
    /// the shorter timeout is the one that counts. Returns the token and when the suspicion
    /// started.
    pub(super) fn confirm(&mut self, id: NodeId, from: NodeId) -> Option<(u64, Duration)> {
        let s = self.suspicions.get_mut(&id)?;
        s.confirmations.push(from);
        self.suspicion_token += 1;
        s.token = self.suspicion_token;
        Some((s.token, s.started))
    }
}

/// Lifeguard's suspicion timeout after `confirmations` independent confirmations beyond the first
/// suspicion: `max(min, max − (max − min) · log(c + 1) / log(k + 1))`.
pub(crate) fn suspicion_timeout(
    config: &Config,
    live_n: usize,
    is_leader: bool,
    confirmations: usize,
) -> Duration {
    let t = &config.timing;
    let (min, k) = if is_leader {
        (t.leader_suspicion_min, t.leader_confirmations as usize)
    } else {
        let n = (live_n as f64).max(1.0);
        let scale = n.log10().max(1.0);
        let k = (t.suspicion_mult as usize).saturating_sub(2);
        let k = if live_n < k + 2 { 0 } else { k };
        (t.probe_interval.mul_f64(t.suspicion_mult as f64 * scale), k)
    };
    let max = min * t.suspicion_max_mult;
    if k == 0 {
        return min;
    }
    let frac = ((confirmations as f64) + 1.0).ln() / ((k as f64) + 1.0).ln();
    let timeout = max.as_secs_f64() - (max - min).as_secs_f64() * frac;
    Duration::from_secs_f64(timeout.max(min.as_secs_f64()))
}

impl Flock {
    /// `d` scaled by local health ([`Detection::scaled`]).
    pub(super) fn scaled(&self, d: Duration) -> Duration {
        self.detect.scaled(d)
    }

    pub(super) fn next_seq(&mut self) -> u32 {
        self.detect.next_seq()
    }

    /// Probes the next member of the round.
    pub(super) fn probe_round(&mut self, now: Duration) {
        let Some(target) = self.detect.next_probe_target(&self.members, &mut self.rng) else {
            return;
        };
        self.start_probe(now, target, false);
    }

    /// Pings `target` and waits a probe timeout for its ack (a suspect first hears of the
    /// suspicion: Lifeguard's buddy system). `leader_check`: the leader's beats stopped.
    pub(super) fn start_probe(&mut self, now: Duration, target: NodeId, leader_check: bool) {
        let Some(info) = self.members.info(target) else {
            return;
        };
        let addr = info.addr;
        if info.state == MemberState::Suspect {
            // Lifeguard's buddy system: tell a suspect directly, so it can refute in time.
            let suspect = Update::Suspect {
                id: info.id,
                boot: info.boot,
                incarnation: info.incarnation,
                from: self.me.id,
            };
            self.send(
                addr,
                &Message::Gossip {
                    updates: vec![suspect],
                },
            );
        }
        let seq = self.next_seq();
        self.stats.probes += 1;
        self.detect.probes.insert(
            seq,
            Probe {
                target,
                sent: now,
                nacks_expected: 0,
                nacks: 0,
                leader_check,
            },
        );
        let msg = Message::Ping {
            seq,
            target: Some(target),
            me: self.my_info(),
            digest: self.digest(),
            updates: Vec::new(),
        };
        self.send_with_updates(addr, msg);
        let timeout = self.scaled(self.config.timing.probe_timeout);
        self.schedule(now + timeout, Timer::ProbeTimeout { seq });
    }

    /// Timer: no ack to a direct probe. Ask `indirect_probes` relays, and probe over a stream.
    pub(super) fn on_probe_timeout(&mut self, now: Duration, seq: u32) {
        let Some(probe) = self.detect.probes.get(&seq) else {
            return; // acked
        };
        let target = probe.target;
        let sent = probe.sent;
        let Some(target_addr) = self.members.addr(target) else {
            self.detect.probes.remove(&seq);
            return;
        };
        let k = self.config.timing.indirect_probes;
        let relays = self.members.sample_live(k, &[target], &mut self.rng);
        for relay in &relays {
            let addr = self.addr(*relay);
            let msg = Message::PingReq {
                seq,
                target,
                target_addr,
                updates: Vec::new(),
            };
            self.send_with_updates(addr, msg);
        }
        if let Some(probe) = self.detect.probes.get_mut(&seq) {
            probe.nacks_expected = relays.len() as u32;
        }
        // And over a stream, as memberlist's TCP ping: a reliable transport does not lose the
        // probe or its answer, so loss alone does not make a live member suspect (and the flock
        // does not then spread the suspicion and its refutation to every member).
        self.send_frame(target_addr, &StreamFrame::Probe { seq });
        let t = &self.config.timing;
        let end = sent + self.scaled(t.probe_interval.max(t.probe_timeout * 2));
        let at = end.max(now + self.scaled(t.probe_timeout));
        self.schedule(at, Timer::IndirectTimeout { seq });
    }

    /// Timer: no ack by the end of the probe interval either: the target becomes suspect.
    pub(super) fn on_indirect_timeout(&mut self, now: Duration, seq: u32) {
        let Some(probe) = self.detect.probes.remove(&seq) else {
            return;
        };
        // Lifeguard: relays that did not even nack point at our own trouble.
        let missed = probe.nacks_expected.saturating_sub(probe.nacks);
        if missed > 0 {
            self.detect.health_worse(self.config.timing.awareness_max);
        }
        let Some(info) = self.members.info(probe.target) else {
            return;
        };
        if !is_live(info.state) {
            return;
        }
        self.stats.probe_failures += 1;
        debug!(target = %info.id, leader_check = probe.leader_check, "probe failed");
        self.apply_suspect(now, info.id, info.boot, info.incarnation, self.me.id);
    }

    /// An ack to probe `seq`, from `from` (the target itself, directly or through a relay).
    pub(super) fn on_probe_ack(&mut self, now: Duration, seq: u32, from: NodeId) {
        let Some(probe) = self.detect.probes.get(&seq) else {
            return;
        };
        if probe.target != from {
            return; // the address now belongs to someone else: not an answer from the target
        }
        let probe = self.detect.probes.remove(&seq).expect("present");
        self.detect.health_better();
        if probe.leader_check || self.lead.claim.is_some_and(|c| c.leader == from) {
            self.lead.last_beat = now;
        }
    }

    /// A ping that is not a probe (discovery of a stranger, a member held dead).
    pub(super) fn send_ping(&mut self, addr: SocketAddr, target: Option<NodeId>) {
        let seq = self.next_seq();
        let msg = Message::Ping {
            seq,
            target,
            me: self.my_info(),
            digest: self.digest(),
            updates: Vec::new(),
        };
        self.send_with_updates(addr, msg);
    }

    /// A suspicion of `id` at incarnation `inc`, by `from` (ours, gossiped or from a push-pull):
    /// of us, refute it; of an alive member, suspect it; of a suspect, count a confirmation.
    pub(super) fn apply_suspect(
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
        let Some(info) = self.members.info(id) else {
            return;
        };
        if boot != info.boot || inc < info.incarnation {
            return;
        }
        match info.state {
            MemberState::Alive => self.start_suspicion(now, info, inc, from),
            MemberState::Suspect => self.confirm_suspicion(now, info, inc, from),
            MemberState::Dead | MemberState::Left => {}
        }
    }

    /// Lifeguard's suspicion timeout for a suspicion of `id` after `confirmations`
    /// independent confirmations (the leader's suspicions use the leader's own bounds).
    fn suspicion_timeout_of(&self, id: NodeId, confirmations: usize) -> Duration {
        let live_n = self.live_count();
        let is_leader = self.lead.claim.is_some_and(|c| c.leader == id);
        suspicion_timeout(&self.config, live_n, is_leader, confirmations)
    }

    /// An alive member becomes suspect (at incarnation `inc`, first suspected by `from`).
    fn start_suspicion(&mut self, now: Duration, info: MemberInfo, inc: u64, from: NodeId) {
        let (id, boot) = (info.id, info.boot);
        let timeout = self.suspicion_timeout_of(id, 0);
        let token = self.detect.start_suspicion(id, from, now);
        let info = MemberInfo {
            state: MemberState::Suspect,
            incarnation: inc,
            ..info
        };
        self.members.set(info, now);
        self.schedule(now + timeout, Timer::Suspicion { id, token });
        let update = Update::Suspect {
            id,
            boot,
            incarnation: inc,
            from,
        };
        self.spread.broadcasts.push(update);
        if from == self.me.id {
            // Buddy system: our own suspicion goes to the suspect at once, and with every
            // probe of it while the suspicion runs.
            self.send(
                info.addr,
                &Message::Gossip {
                    updates: vec![update],
                },
            );
            let next = now + self.scaled(self.config.timing.probe_interval);
            self.schedule(next, Timer::SuspectProbe { id, token });
        }
        self.out.events.push_back(Event::MemberSuspect(info));
    }

    /// Another node suspects a member we already suspect: an independent confirmation
    /// shortens the suspicion (Lifeguard), and is gossiped on so that others count it too.
    fn confirm_suspicion(&mut self, now: Duration, info: MemberInfo, inc: u64, from: NodeId) {
        let (id, boot) = (info.id, info.boot);
        let Some(confirmations) = self.detect.would_confirm(id, from) else {
            return;
        };
        let timeout = self.suspicion_timeout_of(id, confirmations);
        let (token, started) = self.detect.confirm(id, from).expect("suspected");
        self.schedule((started + timeout).max(now), Timer::Suspicion { id, token });
        // Re-gossip so that others count this independent confirmation too.
        self.spread.broadcasts.push(Update::Suspect {
            id,
            boot,
            incarnation: inc,
            from,
        });
    }

    /// Timer: a suspicion ran out unrefuted: the suspect is dead.
    pub(super) fn on_suspicion_timeout(&mut self, now: Duration, id: NodeId, token: u64) {
        if self
            .detect
            .suspicions
            .get(&id)
            .is_none_or(|s| s.token != token)
        {
            return;
        }
        let Some(info) = self.members.info(id) else {
            return;
        };
        debug!(member = %id, "suspicion timed out: dead");
        self.apply_dead(now, id, info.boot, info.incarnation, self.me.id);
    }

    /// Someone holds us suspect or dead at `incarnation`: come back alive with a higher one.
    pub(super) fn refute(&mut self, incarnation: u64) {
        if self.leaving {
            return;
        }
        if incarnation >= self.self_member.info.incarnation {
            self.self_member.info.incarnation = incarnation + 1;
            self.stats.refutations += 1;
            self.detect.health_worse(self.config.timing.awareness_max);
            self.spread.broadcasts.push(Update::Alive {
                member: self.self_member.info,
            });
        }
        // Whoever told us also hears the refutation directly (see `answer_refutation`).
        self.detect.refute_pending = true;
    }

    /// Sends our current entry straight back to a peer that holds a stale suspicion of us, so
    /// that it does not depend on gossip (which may have died out) to learn the refutation.
    pub(super) fn answer_refutation(&mut self, to: SocketAddr) {
        if std::mem::take(&mut self.detect.refute_pending) && !self.leaving {
            let me = self.self_member.info;
            self.send(
                to,
                &Message::Gossip {
                    updates: vec![Update::Alive { member: me }],
                },
            );
        }
    }

    /// Timer: the next probe of the round (every probe interval, scaled by awareness).
    pub(super) fn on_probe_timer(&mut self, now: Duration) {
        let next = now + self.scaled(self.config.timing.probe_interval);
        self.schedule(next, Timer::Probe);
        if !self.leaving {
            self.probe_round(now);
        }
    }

    /// Timer: an indirect probe we relay went unanswered: tell the requester.
    pub(super) fn on_relay_timeout(&mut self, seq: u32) {
        if let Some(relay) = self.detect.relays.remove(&seq) {
            self.send(relay.requester, &Message::Nack { seq: relay.seq });
        }
    }

    /// Timer: while our own suspicion runs, keep probing the suspect (each probe carries the
    /// suspicion to it: Lifeguard's buddy system), so that it can refute even if the gossip of
    /// the suspicion never reached it (it was cut off when it started).
    pub(super) fn on_suspect_probe_timer(&mut self, now: Duration, id: NodeId, token: u64) {
        let current = self.members.state(id) == Some(MemberState::Suspect)
            && self
                .detect
                .suspicions
                .get(&id)
                .is_some_and(|s| s.started_token == token);
        if current && !self.leaving {
            self.start_probe(now, id, false);
            let next = now + self.scaled(self.config.timing.probe_interval);
            self.schedule(next, Timer::SuspectProbe { id, token });
        }
    }

    /// A request to probe `target` for a peer (SWIM's ping-req): relay it as an indirect ping,
    /// and nack the requester if no ack comes back in time. Bounded by [`RELAYS_MAX`].
    pub(super) fn on_ping_req(
        &mut self,
        now: Duration,
        from: SocketAddr,
        seq: u32,
        target: NodeId,
        target_addr: SocketAddr,
        updates: &[Update],
    ) {
        self.apply_updates(now, updates);
        if self.leaving || self.detect.relays.len() >= RELAYS_MAX {
            return;
        }
        let my_seq = self.next_seq();
        self.detect.relays.insert(
            my_seq,
            Relay {
                requester: from,
                seq,
            },
        );
        let msg = Message::IndirectPing {
            seq: my_seq,
            target,
            updates: Vec::new(),
        };
        self.send_with_updates(target_addr, msg);
        let timeout = self.config.timing.probe_timeout;
        self.schedule(now + timeout, Timer::RelayTimeout { seq: my_seq });
    }

    /// A relayed probe of us: ack it to the relay.
    pub(super) fn on_indirect_ping(
        &mut self,
        now: Duration,
        from: SocketAddr,
        seq: u32,
        target: NodeId,
        updates: &[Update],
    ) {
        self.apply_updates(now, updates);
        if target == self.me.id && !self.leaving {
            let ack = Message::Ack {
                seq,
                me: self.my_info(),
                digest: self.digest(),
                updates: Vec::new(),
            };
            self.send_with_updates(from, ack);
        }
    }

    /// A relay could not reach the target of our probe (Lifeguard counts relays that do not
    /// even nack against our own health).
    pub(super) fn on_nack(&mut self, seq: u32) {
        if let Some(p) = self.detect.probes.get_mut(&seq) {
            p.nacks += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crux_proto::flock::{BootId, MemberInfo, MemberState};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn table(live: &[u64], dead: &[u64]) -> Table {
        let mut t = Table::default();
        for (ids, state) in [(live, MemberState::Alive), (dead, MemberState::Dead)] {
            for id in ids {
                let info = MemberInfo {
                    id: NodeId(*id),
                    boot: BootId(1),
                    addr: std::net::SocketAddr::from(([10, 0, 0, *id as u8], 7700)),
                    incarnation: 0,
                    state,
                    key: None,
                };
                t.set(info, Duration::ZERO);
            }
        }
        t
    }

    fn round(d: &mut Detection, members: &Table, rng: &mut ChaCha8Rng) -> Vec<u64> {
        (0..members.live_len())
            .map(|_| d.next_probe_target(members, rng).unwrap().0)
            .collect()
    }

    #[test]
    fn each_round_probes_every_live_member_once_in_a_fresh_order() {
        let members = table(&[1, 2, 3, 4, 5, 6, 7, 8], &[9]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut d = Detection::default();
        let rounds: Vec<Vec<u64>> = (0..4).map(|_| round(&mut d, &members, &mut rng)).collect();
        for r in &rounds {
            let mut sorted = r.clone();
            sorted.sort();
            assert_eq!(sorted, [1, 2, 3, 4, 5, 6, 7, 8], "dead 9 is never probed");
        }
        assert!(
            rounds.windows(2).any(|w| w[0] != w[1]),
            "shuffled anew: {rounds:?}"
        );
        assert_eq!(
            Detection::default().next_probe_target(&table(&[], &[9]), &mut rng),
            None
        );
    }

    #[test]
    fn a_member_that_joins_mid_round_is_probed_in_that_round() {
        let mut members = table(&[1, 2, 3, 4], &[]);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut d = Detection::default();
        let first = d.next_probe_target(&members, &mut rng).unwrap();
        members = table(&[1, 2, 3, 4, 5], &[]);
        d.insert_probe_order(NodeId(5), &mut rng);
        let rest: Vec<_> = (0..4)
            .map(|_| d.next_probe_target(&members, &mut rng).unwrap())
            .collect();
        assert!(!rest.contains(&first));
        assert!(rest.contains(&NodeId(5)), "{rest:?}");
    }

    #[test]
    fn local_health_scales_timeouts_within_its_bound() {
        let mut d = Detection::default();
        let second = Duration::from_secs(1);
        assert_eq!(d.scaled(second), second);
        for _ in 0..10 {
            d.health_worse(8);
        }
        assert_eq!(d.scaled(second), second * 9, "at most awareness_max");
        d.health_better();
        assert_eq!(d.scaled(second), second * 8);
        assert_eq!(d.next_seq(), 1);
        d.seq = u32::MAX;
        assert_eq!(d.next_seq(), 0, "sequence numbers wrap");
    }

    #[test]
    fn only_distinct_suspecters_confirm_and_each_confirmation_renews_the_token() {
        let mut d = Detection::default();
        let (suspect, me) = (NodeId(7), NodeId(1));
        let started = Duration::from_secs(3);
        let first = d.start_suspicion(suspect, me, started);
        assert_eq!(d.would_confirm(suspect, me), None, "already counted");
        assert_eq!(d.would_confirm(NodeId(8), NodeId(2)), None, "no suspicion");
        assert_eq!(d.would_confirm(suspect, NodeId(2)), Some(1));
        let (token, at) = d.confirm(suspect, NodeId(2)).unwrap();
        assert!(token > first);
        assert_eq!(at, started);
        assert_eq!(d.suspicions[&suspect].started_token, first);
        for i in 3..100 {
            if d.would_confirm(suspect, NodeId(i)).is_some() {
                d.confirm(suspect, NodeId(i));
            }
        }
        assert_eq!(
            d.suspicions[&suspect].confirmations.len(),
            CONFIRMATIONS_MAX
        );
    }
}
