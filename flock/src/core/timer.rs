//! Timers: what the core asks to be woken for, and the heap that keeps them in order.
//!
//! A timer is data ([`Timer`]); the ones that can go stale carry what makes them stale (a probe's
//! sequence number, a suspicion's token, a leader's term), so that a timer that fires after its
//! cause is gone does nothing. Timers due at the same instant fire in the order they were
//! scheduled: the simulator's runs depend on it, so [`Timers`] breaks ties by a counter, never by
//! the timer's value.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use crux_proto::flock::NodeId;

/// Something the core must do at a given time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) enum Timer {
    /// Start the next probe of the round (failure detection).
    Probe,
    /// A direct probe went unanswered: probe indirectly.
    ProbeTimeout { seq: u32 },
    /// The indirect probes went unanswered too: suspect the target.
    IndirectTimeout { seq: u32 },
    /// An indirect probe this node relays went unanswered: nack the requester.
    RelayTimeout { seq: u32 },
    /// A suspicion ran out (unless confirmations or a refutation changed its token).
    Suspicion { id: NodeId, token: u64 },
    /// Probe a suspect again while our own suspicion of it runs (Lifeguard's buddy system).
    SuspectProbe { id: NodeId, token: u64 },
    /// Gossip the queued updates.
    Gossip,
    /// Full-state exchange with a random member.
    PushPull,
    /// Probe an address of the space (or a seed).
    Discovery,
    /// Probe a member held dead.
    DeadProbe,
    /// Forget dead and left members held long enough.
    Reap,
    /// The leader's beat, for the term it claimed.
    Beat { term: u64 },
    /// Check the leader's liveness, the keys, and whether to claim.
    Election,
    /// The graceful leave had time to spread: stop.
    LeaveDone,
}

/// The pending timers, earliest first; equal instants in scheduling order.
#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Duration, u64, Timer)>>,
    order: u64,
}

impl Timers {
    /// Wakes the core at `at` for `timer`.
    pub(super) fn schedule(&mut self, at: Duration, timer: Timer) {
        self.order += 1;
        self.heap.push(Reverse((at, self.order, timer)));
    }

    /// When the earliest timer is due.
    pub(super) fn next_at(&self) -> Option<Duration> {
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Takes the earliest timer if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Duration) -> Option<Timer> {
        let Reverse((at, _, _)) = self.heap.peek()?;
        if *at > now {
            return None;
        }
        self.heap.pop().map(|Reverse((_, _, timer))| timer)
    }

    /// Every pending deadline, soonest first (tests of the schedule).
    #[cfg(test)]
    pub(super) fn deadlines(&self) -> Vec<Duration> {
        let mut d: Vec<Duration> = self.heap.iter().map(|Reverse((t, _, _))| *t).collect();
        d.sort();
        d
    }

    /// Drops every timer (the node left).
    pub(super) fn clear(&mut self) {
        self.heap.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn timers_fire_earliest_first_and_in_scheduling_order_at_one_instant() {
        let mut t = Timers::default();
        t.schedule(ms(20), Timer::Gossip);
        t.schedule(ms(10), Timer::Reap);
        t.schedule(ms(10), Timer::Beat { term: 1 });
        t.schedule(ms(10), Timer::Probe);
        assert_eq!(t.next_at(), Some(ms(10)));
        assert_eq!(t.pop_due(ms(5)), None, "nothing is due before 10 ms");
        // Scheduling order, not the timers' own order (Probe < Reap < Beat as values).
        assert_eq!(t.pop_due(ms(10)), Some(Timer::Reap));
        assert_eq!(t.pop_due(ms(10)), Some(Timer::Beat { term: 1 }));
        assert_eq!(t.pop_due(ms(10)), Some(Timer::Probe));
        assert_eq!(t.pop_due(ms(10)), None);
        assert_eq!(t.pop_due(ms(30)), Some(Timer::Gossip));
        assert_eq!(t.next_at(), None);
    }

    #[test]
    fn clear_drops_every_timer() {
        let mut t = Timers::default();
        t.schedule(ms(1), Timer::Probe);
        t.clear();
        assert_eq!(t.next_at(), None);
        assert_eq!(t.pop_due(ms(100)), None);
    }
}
