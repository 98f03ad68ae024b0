//! The discrete-event queue: a min-heap ordered by `(time, sequence number)`.
//!
//! The sequence number is global and grows with every push, so two events due at the same
//! instant come out in the order they were scheduled: ties never depend on heap internals.
//!
//! [`EventQueue`] is generic over the event type so that other simulators on the same virtual
//! time (`bench/foca-sim`, which runs the foca crate) use the same ordering; the flock's own
//! simulator uses it with its own `Ev` as `Queue`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::Duration;

/// Something that happens at one instant of virtual time.
#[derive(Debug)]
pub(crate) enum Ev {
    /// A node powers up (ignored if it already runs).
    Start { node: u32 },
    /// A node's wake-up; stale unless `gen` is the node's current wake generation.
    Wake { node: u32, gen: u64 },
    /// A datagram reaches `to` (dropped unless `to` still runs the life it had when sent).
    Datagram {
        to: u32,
        life: u32,
        from: u32,
        payload: Vec<u8>,
    },
    /// A stream request reaches `to`; the reply goes back to `from` if it still runs `from_life`.
    StreamRequest {
        to: u32,
        to_life: u32,
        from: u32,
        from_life: u32,
        payload: Vec<u8>,
    },
    /// A stream reply reaches the requester `to`.
    StreamReply {
        to: u32,
        life: u32,
        from: u32,
        payload: Vec<u8>,
    },
    /// A stream request made by `node` to `to` failed.
    StreamFailed {
        node: u32,
        life: u32,
        to: SocketAddr,
    },
}

impl Ev {
    /// Small tag mixed into the trace hash.
    pub(crate) fn tag(&self) -> (u64, u64) {
        match self {
            Ev::Start { node } => (1, *node as u64),
            Ev::Wake { node, .. } => (2, *node as u64),
            Ev::Datagram { to, from, .. } => (3, (*to as u64) << 32 | *from as u64),
            Ev::StreamRequest { to, from, .. } => (4, (*to as u64) << 32 | *from as u64),
            Ev::StreamReply { to, from, .. } => (5, (*to as u64) << 32 | *from as u64),
            Ev::StreamFailed { node, .. } => (6, *node as u64),
        }
    }
}

struct Entry<E> {
    at: Duration,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest entry first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The pending events of a simulation: events of type `E`, each due at an instant of virtual
/// time, popped earliest first and, at equal instants, in the order they were pushed.
pub struct EventQueue<E> {
    heap: BinaryHeap<Entry<E>>,
    seq: u64,
}

/// The flock simulator's queue.
pub(crate) type Queue = EventQueue<Ev>;

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<E> EventQueue<E> {
    /// Schedules `ev` at `at`.
    pub fn push(&mut self, at: Duration, ev: E) {
        self.seq += 1;
        self.heap.push(Entry {
            at,
            seq: self.seq,
            ev,
        });
    }

    /// Removes and returns the earliest event if it is due at or before `limit`.
    pub fn pop_until(&mut self, limit: Duration) -> Option<(Duration, E)> {
        if self.heap.peek()?.at > limit {
            return None;
        }
        self.heap.pop().map(|e| (e.at, e.ev))
    }

    /// Number of pending events.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no event is pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_pop_in_push_order() {
        let mut q = Queue::default();
        let t = Duration::from_millis(5);
        q.push(t, Ev::Start { node: 2 });
        q.push(Duration::from_millis(1), Ev::Start { node: 9 });
        q.push(t, Ev::Start { node: 1 });
        q.push(t, Ev::Start { node: 3 });
        let mut order = Vec::new();
        while let Some((at, ev)) = q.pop_until(t) {
            order.push((at.as_millis(), ev.tag().1));
        }
        assert_eq!(order, [(1, 9), (5, 2), (5, 1), (5, 3)]);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn pop_until_stops_at_the_limit() {
        let mut q = Queue::default();
        q.push(Duration::from_millis(10), Ev::Start { node: 0 });
        assert!(q.pop_until(Duration::from_millis(9)).is_none());
        assert!(q.pop_until(Duration::from_millis(10)).is_some());
    }
}
