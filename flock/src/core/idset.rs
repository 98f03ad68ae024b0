//! A set of node ids with O(1) insert, remove and uniform random choice.

use super::FastMap;

use crux_proto::flock::NodeId;
use rand::Rng;

#[derive(Default, Debug)]
pub(crate) struct IdSet {
    ids: Vec<NodeId>,
    index: FastMap<NodeId, usize>,
}

impl IdSet {
    pub(crate) fn insert(&mut self, id: NodeId) -> bool {
        if self.index.contains_key(&id) {
            return false;
        }
        self.index.insert(id, self.ids.len());
        self.ids.push(id);
        true
    }

    pub(crate) fn remove(&mut self, id: NodeId) -> bool {
        let Some(i) = self.index.remove(&id) else {
            return false;
        };
        self.ids.swap_remove(i);
        if i < self.ids.len() {
            self.index.insert(self.ids[i], i);
        }
        true
    }

    /// A uniformly random member.
    pub(crate) fn choose(&self, rng: &mut impl Rng) -> Option<NodeId> {
        if self.ids.is_empty() {
            None
        } else {
            Some(self.ids[rng.gen_range(0..self.ids.len())])
        }
    }
}

/// Up to `k` distinct random ids of `ids`, none of them in `exclude`.
pub(crate) fn sample(
    ids: &[NodeId],
    k: usize,
    exclude: &[NodeId],
    rng: &mut impl Rng,
) -> Vec<NodeId> {
    let mut out = Vec::with_capacity(k);
    if ids.is_empty() || k == 0 {
        return out;
    }
    let available = ids.len().saturating_sub(exclude.len());
    if available <= k {
        // Few members: take all eligible ones, in random order.
        out.extend(ids.iter().copied().filter(|id| !exclude.contains(id)));
        for i in (1..out.len()).rev() {
            out.swap(i, rng.gen_range(0..=i));
        }
        out.truncate(k);
        return out;
    }
    let mut attempts = 0;
    while out.len() < k && attempts < 8 * k + 16 {
        attempts += 1;
        let id = ids[rng.gen_range(0..ids.len())];
        if !exclude.contains(&id) && !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn insert_remove_sample() {
        let mut s = IdSet::default();
        for i in 0..10 {
            assert!(s.insert(NodeId(i)));
        }
        assert!(!s.insert(NodeId(3)));
        assert!(s.remove(NodeId(3)));
        assert!(!s.remove(NodeId(3)));
        assert_eq!(s.ids.len(), 9);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let got = sample(&s.ids, 4, &[NodeId(0)], &mut rng);
        assert_eq!(got.len(), 4);
        assert!(!got.contains(&NodeId(0)) && !got.contains(&NodeId(3)));
        let all = sample(&s.ids, 20, &[NodeId(0)], &mut rng);
        assert_eq!(all.len(), 8);
    }
}
