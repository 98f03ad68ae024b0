//! The piggyback queue: updates waiting to be gossiped, each sent a bounded number of times.
//!
//! As in memberlist's `TransmitLimitedQueue`: updates sent the fewest times go first (newest first
//! among equals), a newer update about the same subject replaces the older one, and an update is
//! dropped after `retransmit_mult × ceil(log10(N + 1))` transmissions.

use std::collections::BTreeMap;

use super::FastMap;

use crux_proto::flock::{update_len, NodeId, Update};

/// What an update is about: a newer update about the same subject supersedes the older.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Subject {
    Member(NodeId),
    Leader,
    /// Security messages (key announcements, keyring changes) use their own subjects.
    Other(u64),
}

fn subject_of(update: &Update) -> Subject {
    match update {
        Update::Alive { member } => Subject::Member(member.id),
        Update::Suspect { id, .. }
        | Update::Dead { id, .. }
        | Update::Left { id, .. }
        | Update::Revoke { id } => Subject::Member(*id),
        Update::Leader(_) => Subject::Leader,
        Update::Key { epoch, .. } => Subject::Other(*epoch as u64),
        Update::Keyring { op, key, .. } => {
            let mut h = *op as u64;
            for chunk in key.chunks(8) {
                h = h.rotate_left(17) ^ u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            }
            Subject::Other(h | 1 << 63)
        }
    }
}

/// Most updates queued at once. A node sends at most a few hundred updates a second (lan: three
/// gossip datagrams every 200 ms of about 25 updates each, plus what rides on probes), and each
/// update goes out `retransmit_mult × ceil(log10(N + 1))` times (15 at 10,000 nodes): some 25 new
/// updates a second. 1,024 queued updates are 40 s of backlog, far beyond the push-pull that
/// carries the same news; a deeper queue only costs memory (at 10,000 nodes, 4,096 × 200 bytes
/// per node was 8 GB across a simulated flock).
pub(crate) const QUEUE_MAX: usize = 1024;
/// No update encodes in fewer bytes than this.
const MIN_UPDATE_BYTES: usize = 8;
/// Updates too large for the remaining room skipped before giving up on filling it.
const MAX_MISSES: usize = 8;

/// Order key: fewest transmissions first, then newest first.
type Slot = (u32, std::cmp::Reverse<u64>);

#[derive(Default)]
pub(crate) struct Broadcasts {
    queue: BTreeMap<Slot, (Subject, Update, usize)>,
    by_subject: FastMap<Subject, Slot>,
    next_order: u64,
}

impl Broadcasts {
    /// Queues `update`, replacing any queued update about the same subject.
    pub(crate) fn push(&mut self, update: Update) {
        let subject = subject_of(&update);
        if let Some(old) = self.by_subject.remove(&subject) {
            self.queue.remove(&old);
        }
        self.next_order += 1;
        let slot = (0, std::cmp::Reverse(self.next_order));
        let len = update_len(&update);
        self.queue.insert(slot, (subject, update, len));
        self.by_subject.insert(subject, slot);
        // Bounded, as Serf's MaxQueueDepth: past the bound, drop what was sent the most (the
        // periodic push-pull still carries it).
        while self.queue.len() > QUEUE_MAX {
            if let Some((_, (subject, _, _))) = self.queue.pop_last() {
                self.by_subject.remove(&subject);
            }
        }
    }

    /// Whether anything worth a gossip round of its own is queued: anything but a leader beat
    /// that was already sent once (beats spread push-style by one round at each node, then ride
    /// along on other datagrams; the next beat supersedes them anyway).
    pub(crate) fn has_news(&self) -> bool {
        match self.by_subject.get(&Subject::Leader) {
            Some(slot) if slot.0 >= 1 => self.queue.len() > 1,
            _ => !self.queue.is_empty(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Takes updates whose encoded sizes add up to at most `budget` bytes, counting one
    /// transmission for each and dropping those that reached `limit`.
    pub(crate) fn take(&mut self, mut budget: usize, limit: u32) -> Vec<Update> {
        let mut taken = Vec::new();
        let mut slots = Vec::new();
        let mut misses = 0;
        for (slot, (_, update, len)) in self.queue.iter() {
            if *len > budget {
                // A smaller update further on may still fit, but do not scan a long queue for it.
                misses += 1;
                if budget < MIN_UPDATE_BYTES || misses >= MAX_MISSES {
                    break;
                }
                continue;
            }
            budget -= len;
            taken.push(*update);
            slots.push(*slot);
            if taken.len() >= 255 {
                break;
            }
        }
        for slot in slots {
            let (subject, update, len) = self.queue.remove(&slot).expect("present");
            let transmits = slot.0 + 1;
            if transmits >= limit {
                self.by_subject.remove(&subject);
            } else {
                let new_slot = (transmits, slot.1);
                self.queue.insert(new_slot, (subject, update, len));
                self.by_subject.insert(subject, new_slot);
            }
        }
        taken
    }

    /// Drops everything (e.g. after leaving).
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.by_subject.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crux_proto::flock::BootId;

    fn left(id: u64, inc: u64) -> Update {
        Update::Left {
            id: NodeId(id),
            boot: BootId(1),
            incarnation: inc,
        }
    }

    #[test]
    fn newer_update_about_same_subject_replaces_older() {
        let mut b = Broadcasts::default();
        b.push(left(1, 1));
        b.push(left(1, 2));
        assert_eq!(b.len(), 1);
        assert_eq!(b.take(1000, 10), vec![left(1, 2)]);
    }

    #[test]
    fn least_sent_first_and_dropped_at_limit() {
        let mut b = Broadcasts::default();
        b.push(left(1, 1));
        assert_eq!(b.take(1000, 2), vec![left(1, 1)]);
        b.push(left(2, 1));
        // 2 was sent 0 times, 1 once: 2 comes first.
        assert_eq!(b.take(1000, 2), vec![left(2, 1), left(1, 1)]);
        // 1 reached the limit of 2 and is gone.
        assert_eq!(b.take(1000, 2), vec![left(2, 1)]);
        assert!(b.is_empty());
    }

    #[test]
    fn respects_byte_budget() {
        let mut b = Broadcasts::default();
        for i in 0..100 {
            b.push(left(i, 1));
        }
        let one = update_len(&left(0, 1));
        let got = b.take(one * 10, 5);
        assert_eq!(got.len(), 10);
    }
}
