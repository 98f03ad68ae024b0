//! Which nodes are the store's Raft voters, as the flock leader decides: 1 while the flock has
//! fewer than 3 live members, 3 from 3, 5 from 7. Voters are kept while they live; one the flock
//! has held dead for longer than the grace period is replaced by a live member. Newcomers are
//! taken in node id order, so every leader picks the same ones. Pure functions: [`crate::supervise`]
//! applies them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What the flock says of a node, for the choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Alive or suspect.
    Live,
    /// Dead or left, for this long.
    Gone(Duration),
}

/// How many voters a flock of `live` members should have.
pub fn target(live: usize) -> usize {
    match live {
        0..=2 => 1,
        3..=6 => 3,
        _ => 5,
    }
}

/// The voters the store should have, given the current ones and what the flock sees. Returns
/// `current` itself when nothing should change, and when no current voter survives (a lost
/// majority is the operator's to recover, never silently replaced).
pub fn choose(
    current: &BTreeSet<u64>,
    nodes: &BTreeMap<u64, Seen>,
    grace: Duration,
) -> BTreeSet<u64> {
    let live: BTreeSet<u64> = nodes
        .iter()
        .filter(|(_, s)| **s == Seen::Live)
        .map(|(id, _)| *id)
        .collect();
    let want = target(live.len());
    let gone_for_good = |id: &u64| match nodes.get(id) {
        Some(Seen::Gone(d)) => *d >= grace,
        Some(Seen::Live) => false,
        // Reaped from the member table: gone for longer than any grace.
        None => true,
    };
    let keep: BTreeSet<u64> = current
        .iter()
        .copied()
        .filter(|id| !gone_for_good(id))
        .collect();
    if !current.is_empty() && keep.is_empty() {
        return current.clone();
    }
    // A majority of the current voters must survive for any change to be made by Raft.
    if !current.is_empty() {
        let alive_voters = current.iter().filter(|id| live.contains(id)).count();
        if alive_voters * 2 <= current.len() {
            return current.clone();
        }
    }
    let mut next = keep;
    for id in &live {
        if next.len() >= want {
            break;
        }
        next.insert(*id);
    }
    next
}

/// The first voters of a new group, initialized by node `me`: `want`, with `me` in place of the
/// highest other id when `want` leaves it out — openraft initializes a group only on one of its
/// members, and the flock's leader (who initializes) need not have one of the lowest ids.
pub fn with_initializer(mut want: BTreeSet<u64>, me: u64) -> BTreeSet<u64> {
    if !want.is_empty() && !want.contains(&me) {
        if let Some(&last) = want.iter().next_back() {
            want.remove(&last);
        }
        want.insert(me);
    }
    want
}

/// Which learners to remove (the flock has held them gone for at least `grace`, or forgot them)
/// and which live members to add as learners, in node id order, so that the group has at most
/// `max` learners. Nothing is added while some are to be removed (a membership change at a time).
pub fn plan_learners(
    voters: &BTreeSet<u64>,
    learners: &BTreeSet<u64>,
    nodes: &BTreeMap<u64, Seen>,
    grace: Duration,
    max: usize,
) -> (BTreeSet<u64>, Vec<u64>) {
    let remove: BTreeSet<u64> = learners
        .iter()
        .copied()
        .filter(|id| match nodes.get(id) {
            Some(Seen::Gone(d)) => *d >= grace,
            Some(Seen::Live) => false,
            None => true,
        })
        .collect();
    if !remove.is_empty() {
        return (remove, Vec::new());
    }
    let room = max.saturating_sub(learners.len());
    let add = nodes
        .iter()
        .filter(|(id, s)| **s == Seen::Live && !voters.contains(id) && !learners.contains(id))
        .map(|(id, _)| *id)
        .take(room)
        .collect();
    (remove, add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GRACE: Duration = Duration::from_secs(60);

    fn flock(live: &[u64], gone: &[(u64, u64)]) -> BTreeMap<u64, Seen> {
        let mut m: BTreeMap<u64, Seen> = live.iter().map(|id| (*id, Seen::Live)).collect();
        for (id, secs) in gone {
            m.insert(*id, Seen::Gone(Duration::from_secs(*secs)));
        }
        m
    }

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn one_voter_then_three_then_five() {
        assert_eq!(choose(&set(&[]), &flock(&[7], &[]), GRACE), set(&[7]));
        assert_eq!(choose(&set(&[7]), &flock(&[7, 3], &[]), GRACE), set(&[7]));
        assert_eq!(
            choose(&set(&[7]), &flock(&[7, 3, 9], &[]), GRACE),
            set(&[3, 7, 9])
        );
        let six = flock(&[1, 2, 3, 4, 5, 6], &[]);
        assert_eq!(choose(&set(&[4, 5, 6]), &six, GRACE), set(&[4, 5, 6]));
        let seven = flock(&[1, 2, 3, 4, 5, 6, 7], &[]);
        assert_eq!(
            choose(&set(&[4, 5, 6]), &seven, GRACE),
            set(&[1, 2, 4, 5, 6])
        );
    }

    #[test]
    fn a_dead_voter_is_replaced_only_after_the_grace_period() {
        let cur = set(&[1, 2, 3]);
        let brief = flock(&[1, 2, 4, 5], &[(3, 10)]);
        assert_eq!(choose(&cur, &brief, GRACE), cur, "within grace: kept");
        let long = flock(&[1, 2, 4, 5], &[(3, 61)]);
        assert_eq!(choose(&cur, &long, GRACE), set(&[1, 2, 4]));
        // No spare member: the dead voter goes (the two left are needed either way), and a
        // newcomer will be added when one comes.
        let none = flock(&[1, 2], &[(3, 600)]);
        assert_eq!(choose(&cur, &none, GRACE), set(&[1, 2]));
        let newcomer = flock(&[1, 2, 8], &[(3, 600)]);
        assert_eq!(choose(&set(&[1, 2]), &newcomer, GRACE), set(&[1, 2, 8]));
    }

    #[test]
    fn a_lost_majority_is_left_to_the_operator() {
        let cur = set(&[1, 2, 3]);
        let lost = flock(&[3, 4, 5, 6], &[(1, 600), (2, 600)]);
        assert_eq!(choose(&cur, &lost, GRACE), cur);
        let all_gone = flock(&[4, 5, 6], &[(1, 600), (2, 600), (3, 600)]);
        assert_eq!(choose(&cur, &all_gone, GRACE), cur);
    }

    #[test]
    fn the_initializing_leader_is_among_the_first_voters() {
        let nodes = flock(&[1, 2, 3, 4, 9], &[]);
        let want = choose(&set(&[]), &nodes, GRACE);
        assert_eq!(want, set(&[1, 2, 3]));
        assert_eq!(with_initializer(want.clone(), 9), set(&[1, 2, 9]));
        assert_eq!(with_initializer(want, 2), set(&[1, 2, 3]));
        // Once the group exists, the choice keeps its live voters.
        assert_eq!(choose(&set(&[1, 2, 9]), &nodes, GRACE), set(&[1, 2, 9]));
    }

    #[test]
    fn learners_are_capped_and_the_gone_ones_removed_first() {
        let voters = set(&[1, 2, 3]);
        let hundred: Vec<u64> = (1..=100).collect();
        let nodes = flock(&hundred, &[]);
        let (remove, add) = plan_learners(&voters, &set(&[]), &nodes, GRACE, 8);
        assert!(remove.is_empty());
        assert_eq!(
            add,
            vec![4, 5, 6, 7, 8, 9, 10, 11],
            "8 learners, in id order"
        );
        let full = set(&[4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(
            plan_learners(&voters, &full, &nodes, GRACE, 8).1,
            Vec::<u64>::new()
        );
        // Learner 5 gone briefly: kept; gone for good (or forgotten): removed before any add.
        let brief = flock(&[1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12], &[(5, 10)]);
        assert_eq!(
            plan_learners(&voters, &full, &brief, GRACE, 8),
            (set(&[]), vec![])
        );
        let long = flock(&[1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12], &[(5, 61)]);
        assert_eq!(
            plan_learners(&voters, &full, &long, GRACE, 8),
            (set(&[5]), vec![])
        );
        let mut without5 = full.clone();
        without5.remove(&5);
        assert_eq!(
            plan_learners(&voters, &without5, &long, GRACE, 8),
            (set(&[]), vec![12])
        );
    }

    proptest! {
        /// Whatever the flock looks like: the choice is deterministic, keeps every live voter,
        /// only adds live members, never exceeds the target unless voters already did, and when it
        /// changes anything a majority of the current voters is alive (Raft can make the change).
        #[test]
        fn choices_are_safe(
            ids in proptest::collection::btree_set(1u64..40, 1..15),
            gone_mask in any::<u64>(),
            secs in proptest::collection::vec(0u64..200, 15),
            voter_mask in any::<u64>(),
        ) {
            let ids: Vec<u64> = ids.into_iter().collect();
            let mut nodes = BTreeMap::new();
            for (k, id) in ids.iter().enumerate() {
                let seen = if gone_mask & (1 << k) != 0 { Seen::Gone(Duration::from_secs(secs[k])) } else { Seen::Live };
                nodes.insert(*id, seen);
            }
            let current: BTreeSet<u64> = ids.iter().enumerate().filter(|(k, _)| voter_mask & (1 << k) != 0).map(|(_, id)| *id).take(5).collect();
            let a = choose(&current, &nodes, GRACE);
            prop_assert_eq!(&a, &choose(&current, &nodes, GRACE));
            let live = |id: &u64| nodes.get(id) == Some(&Seen::Live);
            for v in current.iter().filter(|v| live(v)) {
                prop_assert!(a.contains(v), "live voter {} dropped", v);
            }
            for v in a.difference(&current) {
                prop_assert!(live(v), "{} added but not live", v);
            }
            let want = target(nodes.values().filter(|s| **s == Seen::Live).count());
            prop_assert!(a.len() <= want.max(current.len()));
            if a != current && !current.is_empty() {
                let alive = current.iter().filter(|v| live(v)).count();
                prop_assert!(alive * 2 > current.len());
            }
        }
    }
}
