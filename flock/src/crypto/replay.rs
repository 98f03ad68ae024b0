//! Replay protection: a sliding window of counters per (sender, boot), as WireGuard's, and the
//! newest handshake initiation per sender ([`InitiationStamps`]).

use std::collections::{BTreeMap, HashMap};

use crux_proto::flock::{BootId, NodeId};

use super::handshake::Tai64N;

const WORD_BITS: u64 = 64;
const RING_WORDS: usize = 128;
/// Counters a window remembers behind the highest one seen: 8,128, as WireGuard (RFC 6479's ring
/// of 128 64-bit words, one word of which is always being recycled).
pub const REPLAY_WINDOW: u64 = (RING_WORDS as u64 - 1) * WORD_BITS;

/// The counters seen from one (sender, boot): the highest one, and a bitmap of the
/// [`REPLAY_WINDOW`] counters below it. Accepts each counter at most once; rejects counters more
/// than the window below the highest. 1 KiB.
#[derive(Clone)]
pub struct ReplayWindow {
    last: u64,
    ring: [u64; RING_WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow::new()
    }
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl ReplayWindow {
    /// An empty window: every counter is new.
    pub fn new() -> ReplayWindow {
        ReplayWindow {
            last: 0,
            ring: [0; RING_WORDS],
        }
    }

    /// The highest counter accepted so far (0 when none).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Whether [`accept`](ReplayWindow::accept) would take `counter`, without changing anything
    /// (a cheap check before decryption).
    pub fn check(&self, counter: u64) -> bool {
        if counter > self.last {
            return true;
        }
        if self.last - counter > REPLAY_WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.ring[word] & bit == 0
    }

    /// Records `counter` if it is new and not too old; returns whether it was accepted. Call only
    /// for authenticated datagrams.
    pub fn accept(&mut self, counter: u64) -> bool {
        let index = counter / WORD_BITS;
        if counter > self.last {
            let current = self.last / WORD_BITS;
            let diff = (index - current).min(RING_WORDS as u64);
            for i in current + 1..=current + diff {
                self.ring[(i % RING_WORDS as u64) as usize] = 0;
            }
            self.last = counter;
        } else if self.last - counter > REPLAY_WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        let old = self.ring[word];
        self.ring[word] = old | bit;
        old & bit == 0
    }

    fn slot(counter: u64) -> (usize, u64) {
        (
            ((counter / WORD_BITS) % RING_WORDS as u64) as usize,
            1 << (counter % WORD_BITS),
        )
    }
}

/// Replay windows of many (sender, boot) pairs, bounded: when full, the least recently used
/// window is evicted (a sender evicted and heard again starts a fresh window; the bound should be
/// a few times the flock size so that only stale boots are evicted in practice).
///
/// Windows are only created and moved by [`accept`](ReplayTable::accept), which the caller calls
/// after a datagram authenticated, so an outsider without a key cannot fill the table.
#[derive(Debug)]
pub struct ReplayTable {
    max_senders: usize,
    tick: u64,
    windows: HashMap<(NodeId, BootId), (ReplayWindow, u64)>,
    by_use: BTreeMap<u64, (NodeId, BootId)>,
}

impl ReplayTable {
    /// An empty table that holds at most `max_senders` windows (at least 1).
    pub fn new(max_senders: usize) -> ReplayTable {
        ReplayTable {
            max_senders: max_senders.max(1),
            tick: 0,
            windows: HashMap::new(),
            by_use: BTreeMap::new(),
        }
    }

    /// Windows held.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// True when no window is held.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// The most windows the table holds.
    pub fn max_senders(&self) -> usize {
        self.max_senders
    }

    /// Whether `accept` would take this counter (no change; unknown senders pass).
    pub fn check(&self, sender: NodeId, boot: BootId, counter: u64) -> bool {
        self.windows
            .get(&(sender, boot))
            .is_none_or(|(w, _)| w.check(counter))
    }

    /// Records an authenticated datagram's counter; false for a replay (drop it,
    /// [`DropReason::Replay`](crate::DropReason::Replay)).
    pub fn accept(&mut self, sender: NodeId, boot: BootId, counter: u64) -> bool {
        self.tick += 1;
        let tick = self.tick;
        let key = (sender, boot);
        if let Some((window, used)) = self.windows.get_mut(&key) {
            self.by_use.remove(used);
            *used = tick;
            self.by_use.insert(tick, key);
            return window.accept(counter);
        }
        if self.windows.len() >= self.max_senders {
            if let Some((_, old)) = self.by_use.pop_first() {
                self.windows.remove(&old);
            }
        }
        let mut window = ReplayWindow::new();
        let fresh = window.accept(counter);
        self.windows.insert(key, (window, tick));
        self.by_use.insert(tick, key);
        fresh
    }

    /// Forgets a sender's windows (all boots), e.g. when it is reaped.
    pub fn forget(&mut self, sender: NodeId) {
        let by_use = &mut self.by_use;
        self.windows.retain(|(id, _), (_, used)| {
            let keep = *id != sender;
            if !keep {
                by_use.remove(used);
            }
            keep
        });
    }
}

/// The newest handshake initiation seen from each sender, WireGuard-style: an initiation is taken
/// only if its `(boot id, timestamp)` is greater than the last one taken from the same node id,
/// so a replayed or older initiation is refused whatever its counter. Boot ids grow across a
/// node's restarts (their high bits are the start time, and the agent keeps them growing), and
/// the timestamp grows within one boot (it counts from the boot's start on a monotonic clock),
/// so a node's own initiations always go up, even if its wall clock steps back.
///
/// Bounded like [`ReplayTable`]: the least recently used sender is forgotten when full; entries
/// are made only for initiations that authenticated (holders of the secondary key).
#[derive(Debug)]
pub struct InitiationStamps {
    max_senders: usize,
    tick: u64,
    last: HashMap<NodeId, (BootId, Tai64N, u64)>,
    by_use: BTreeMap<u64, NodeId>,
}

impl InitiationStamps {
    /// An empty table of at most `max_senders` senders (at least 1).
    pub fn new(max_senders: usize) -> InitiationStamps {
        InitiationStamps {
            max_senders: max_senders.max(1),
            tick: 0,
            last: HashMap::new(),
            by_use: BTreeMap::new(),
        }
    }

    /// Senders held.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// True when no sender is held.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// The newest `(boot, timestamp)` taken from `sender`.
    pub fn newest(&self, sender: NodeId) -> Option<(BootId, Tai64N)> {
        self.last.get(&sender).map(|(b, t, _)| (*b, *t))
    }

    /// Records an authenticated initiation if it is newer than every one taken from `sender`
    /// before; false (drop it, [`DropReason::OldInitiation`](crate::DropReason::OldInitiation))
    /// otherwise.
    pub fn accept(&mut self, sender: NodeId, boot: BootId, stamp: Tai64N) -> bool {
        self.tick += 1;
        let tick = self.tick;
        if let Some((b, t, used)) = self.last.get_mut(&sender) {
            if (boot, stamp) <= (*b, *t) {
                return false;
            }
            self.by_use.remove(used);
            (*b, *t, *used) = (boot, stamp, tick);
            self.by_use.insert(tick, sender);
            return true;
        }
        if self.last.len() >= self.max_senders {
            if let Some((_, old)) = self.by_use.pop_first() {
                self.last.remove(&old);
            }
        }
        self.last.insert(sender, (boot, stamp, tick));
        self.by_use.insert(tick, sender);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn window_is_wireguards() {
        assert_eq!(REPLAY_WINDOW, 8128);
    }

    #[test]
    fn in_order_counters_are_accepted_once() {
        let mut w = ReplayWindow::new();
        for c in 0..20_000 {
            assert!(w.check(c));
            assert!(w.accept(c), "{c}");
            assert!(!w.check(c));
            assert!(!w.accept(c), "{c} twice");
        }
        assert_eq!(w.last(), 19_999);
    }

    #[test]
    fn out_of_order_inside_the_window_is_accepted() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(10_000));
        assert!(w.accept(9_000));
        assert!(w.accept(10_000 - REPLAY_WINDOW));
        assert!(!w.accept(10_000 - REPLAY_WINDOW));
        assert!(w.accept(9_999));
        assert!(w.accept(10_001));
        assert!(!w.accept(9_000));
        assert!(!w.accept(9_999));
    }

    #[test]
    fn too_old_is_rejected() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(10_000));
        assert!(!w.check(10_000 - REPLAY_WINDOW - 1));
        assert!(!w.accept(10_000 - REPLAY_WINDOW - 1));
        assert!(!w.accept(0));
    }

    #[test]
    fn huge_jumps_clear_the_ring() {
        let mut w = ReplayWindow::new();
        for c in 0..100 {
            assert!(w.accept(c));
        }
        assert!(w.accept(u64::MAX - 1));
        // Everything that was set is now far outside the window.
        assert!(!w.accept(99));
        // Inside the new window, nothing was seen yet: stale bits were cleared.
        for c in (u64::MAX - 1 - REPLAY_WINDOW)..(u64::MAX - 1) {
            assert!(w.check(c), "{c}");
        }
        assert!(w.accept(u64::MAX));
        assert!(!w.accept(u64::MAX));
        assert!(!w.accept(u64::MAX - 1));
    }

    #[test]
    fn jump_of_exactly_one_ring_keeps_no_stale_bit() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(5));
        let next = 5 + RING_WORDS as u64 * WORD_BITS; // same ring slot as 5
        assert!(w.accept(next));
        assert!(w.accept(next - 64));
        assert!(!w.accept(5));
    }

    #[test]
    fn table_keeps_one_window_per_sender_and_boot() {
        let mut t = ReplayTable::new(10);
        assert!(t.accept(NodeId(1), BootId(1), 5));
        assert!(!t.accept(NodeId(1), BootId(1), 5));
        assert!(
            t.accept(NodeId(1), BootId(2), 5),
            "a new boot has its own window"
        );
        assert!(t.accept(NodeId(2), BootId(1), 5));
        assert!(!t.check(NodeId(2), BootId(1), 5));
        assert!(t.check(NodeId(3), BootId(1), 5));
        assert_eq!(t.len(), 3);
        t.forget(NodeId(1));
        assert_eq!(t.len(), 1);
        assert!(t.accept(NodeId(1), BootId(1), 5));
    }

    #[test]
    fn table_evicts_the_least_recently_used() {
        let mut t = ReplayTable::new(3);
        for s in 1..=3 {
            assert!(t.accept(NodeId(s), BootId(0), 1));
        }
        assert!(t.accept(NodeId(1), BootId(0), 2)); // 1 is now the most recent; 2 the least
        assert!(t.accept(NodeId(4), BootId(0), 1)); // evicts 2
        assert_eq!(t.len(), 3);
        assert!(t.check(NodeId(2), BootId(0), 1), "2 was evicted");
        assert!(!t.check(NodeId(1), BootId(0), 2));
        assert!(!t.check(NodeId(3), BootId(0), 1));
        assert!(!t.check(NodeId(4), BootId(0), 1));
        assert_eq!(t.by_use.len(), t.windows.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a model: accepted iff never accepted before and within the window of the
        /// highest counter seen so far.
        #[test]
        fn window_matches_a_model(ops in proptest::collection::vec(
            prop_oneof![0u64..20_000, any::<u64>()], 1..400)) {
            let mut w = ReplayWindow::new();
            let mut seen = std::collections::HashSet::new();
            let mut last: Option<u64> = None;
            for c in ops {
                let hi = last.map_or(c, |l| l.max(c));
                let expect = !seen.contains(&c) && hi - c <= REPLAY_WINDOW;
                prop_assert_eq!(w.check(c), expect);
                prop_assert_eq!(w.accept(c), expect);
                if expect { seen.insert(c); }
                last = Some(hi);
            }
        }
    }

    #[test]
    fn an_initiation_is_taken_only_if_newer_than_the_last_of_its_sender() {
        let t = |n: u128| Tai64N::from_unix_nanos(n);
        let mut s = InitiationStamps::new(2);
        assert!(s.accept(NodeId(1), BootId(5), t(100)));
        assert!(!s.accept(NodeId(1), BootId(5), t(100)), "the same");
        assert!(!s.accept(NodeId(1), BootId(5), t(99)), "older");
        assert!(s.accept(NodeId(1), BootId(5), t(101)));
        assert!(
            s.accept(NodeId(1), BootId(6), t(1)),
            "a newer boot, whatever its clock"
        );
        assert!(!s.accept(NodeId(1), BootId(5), t(1000)), "an older boot");
        assert_eq!(s.newest(NodeId(1)), Some((BootId(6), t(1))));
        assert!(s.accept(NodeId(2), BootId(1), t(1)), "another sender");
        // Full: the least recently used sender goes.
        assert!(s.accept(NodeId(3), BootId(1), t(1)));
        assert_eq!(s.len(), 2);
        assert_eq!(s.newest(NodeId(1)), None);
        assert!(s.newest(NodeId(2)).is_some());
    }
}
