//! Keys: joins by handshake, rotations, merges of flocks under other keys, keyring changes.

use std::time::Duration;

use crux_proto::flock::{MemberState, NodeId};

use super::*;

#[test]
fn secure_nodes_join_by_handshake_share_one_key_and_follow_rotations() {
    let mut h = Harness::secure(5);
    h.run_for(Duration::from_secs(5));
    assert_eq!(h.agreed_leader(), Some(NodeId(2000)));
    let leader_epochs = |h: &Harness| {
        let l = h.live().find(|f| f.identity().id == NodeId(2000)).unwrap();
        (l.key_epoch().unwrap(), l.key_epochs())
    };
    let (epoch, held) = leader_epochs(&h);
    for f in h.live() {
        // Everyone seals with the leader's current key, or its previous one while the
        // announcement of a rotation is on its way.
        assert!(held.contains(&f.key_epoch().unwrap()));
        assert!(f.key_epochs().contains(&epoch));
        assert!(f.stats().joins >= 1 || f.stats().rotations >= 1);
    }
    // Several rotation periods later everyone follows the leader's newest key, and nobody died.
    h.run_for(Duration::from_secs(30));
    let leader = h.live().find(|f| f.identity().id == NodeId(2000)).unwrap();
    assert!(
        leader.stats().rotations >= 5,
        "rotations: {}",
        leader.stats().rotations
    );
    // Within a second of any rotation, everyone holds the leader's newest key.
    let mut waited = Duration::ZERO;
    while !h
        .live()
        .all(|f| f.key_epochs().contains(&leader_epochs(&h).0))
    {
        assert!(
            waited < Duration::from_secs(1),
            "a rotation did not reach everyone"
        );
        h.run_for(Duration::from_millis(100));
        waited += Duration::from_millis(100);
    }
    let (newest, held) = leader_epochs(&h);
    assert_ne!(newest, epoch);
    for f in h.live() {
        assert!(held.contains(&f.key_epoch().unwrap()));
        assert_eq!(f.live_count(), 5);
        // No key piles up: the previous key, the current one and, during the switch delay
        // after an announcement, the next one (crate::core::secure's docs).
        assert!(f.key_epochs().len() <= 3, "{:?}", f.key_epochs());
    }
}

#[test]
fn secure_nodes_of_another_bloc_or_key_never_merge() {
    let space = "127.0.0.2-127.0.0.5";
    let ring = test_keyring(7);
    let other = test_keyring(8);
    let mut nodes = vec![
        Some(secure_node(2, space, &ring)),
        Some(secure_node(3, space, &ring)),
        Some(secure_node(4, space, &other)),
    ];
    // Same secondary key but another bloc.
    let id = Identity {
        id: NodeId(5000),
        boot: crate::boot_id(1, 5),
        addr: addr(5),
        key: None,
    };
    let mut cfg = config(space);
    cfg.bloc = "another-bloc".into();
    nodes.push(Some(
        Flock::builder(cfg, id)
            .keys(ring.clone(), SecurityTiming::default())
            .rng_seed([5; 32])
            .start(Duration::ZERO)
            .unwrap(),
    ));
    let mut h = Harness {
        nodes,
        now: Duration::ZERO,
        datagram_cut: None,
    };
    h.run_for(Duration::from_secs(10));
    let n = |i: usize| h.nodes[i].as_ref().unwrap();
    assert_eq!(n(0).live_count(), 2);
    assert_eq!(n(1).live_count(), 2);
    assert_eq!(n(2).live_count(), 1);
    assert_eq!(n(3).live_count(), 1);
    assert!(n(2).stats().dropped_total() > 0);
    assert!(n(3).stats().dropped(DropReason::WrongBloc) > 0);
}

#[test]
fn secure_flocks_formed_apart_merge_into_one_with_one_key() {
    // Two flocks form alone (each with its own transient key), then learn of each other.
    let space = "127.0.0.2-127.0.0.7";
    let ring = test_keyring(7);
    let mut a = Harness {
        nodes: (2..5)
            .map(|i| Some(secure_node(i, "127.0.0.2-127.0.0.4", &ring)))
            .collect(),
        now: Duration::ZERO,
        datagram_cut: None,
    };
    let mut b = Harness {
        nodes: (5..8)
            .map(|i| Some(secure_node(i, "127.0.0.5-127.0.0.7", &ring)))
            .collect(),
        now: Duration::ZERO,
        datagram_cut: None,
    };
    a.run_for(Duration::from_secs(5));
    b.run_for(Duration::from_secs(5));
    assert!(a.agreed_leader().is_some() && b.agreed_leader().is_some());
    let mut h = Harness {
        nodes: a.nodes.into_iter().chain(b.nodes).collect(),
        now: a.now,
        datagram_cut: None,
    };
    let now = h.now;
    // Point one node of each side at the other side.
    h.nodes[5]
        .as_mut()
        .unwrap()
        .handle_command(now, Command::Join(vec![addr(2)]));
    h.run_for(Duration::from_secs(15));
    assert_eq!(h.agreed_leader(), Some(NodeId(2000)));
    // Within a second (a rotation may be on its way), everyone seals with the leader's key.
    let leader_epoch = |h: &Harness| h.nodes[0].as_ref().unwrap().key_epoch();
    let mut waited = Duration::ZERO;
    while !h.live().all(|f| f.key_epoch() == leader_epoch(&h)) {
        assert!(waited < Duration::from_secs(1), "the flocks kept two keys");
        h.run_for(Duration::from_millis(100));
        waited += Duration::from_millis(100);
    }
    let epoch = h.nodes[0].as_ref().unwrap().key_epoch().unwrap();
    let held = h.nodes[0].as_ref().unwrap().key_epochs();
    for f in h.live() {
        assert_eq!(f.live_count(), 6);
        assert!(held.contains(&f.key_epoch().unwrap()));
        assert!(f.key_epochs().contains(&epoch));
        assert!(f.members().all(|m| m.info.state == MemberState::Alive));
    }
    let _ = space;
}

#[test]
fn keyring_changes_spread_to_every_member() {
    let mut h = Harness::secure(4);
    h.run_for(Duration::from_secs(5));
    let new_key = crate::crypto::SecretKey::from_bytes([9; 32]);
    let now = h.now;
    let op = crate::crypto::KeyringOp::Install(new_key.clone());
    h.nodes[1]
        .as_mut()
        .unwrap()
        .handle_command(now, Command::Keyring(op));
    h.run_for(Duration::from_secs(3));
    let op = crate::crypto::KeyringOp::Use(new_key.clone());
    h.nodes[2]
        .as_mut()
        .unwrap()
        .handle_command(h.now, Command::Keyring(op));
    h.run_for(Duration::from_secs(3));
    let old = test_keyring(7).primary().clone();
    h.nodes[3].as_mut().unwrap().handle_command(
        h.now,
        Command::Keyring(crate::crypto::KeyringOp::Remove(old.clone())),
    );
    h.run_for(Duration::from_secs(3));
    for f in h.live() {
        let ring = f.keyring().unwrap();
        assert_eq!(ring.primary(), &new_key);
        assert!(!ring.contains(&old));
        assert_eq!(f.live_count(), 4);
    }
}

#[test]
fn a_node_whose_secondary_key_was_removed_cannot_rejoin() {
    // Three nodes rotate their secondary key while a fourth is away with only the old key.
    let space = "127.0.0.2-127.0.0.5";
    let old = test_keyring(7);
    let mut h = Harness {
        nodes: (2..5).map(|i| Some(secure_node(i, space, &old))).collect(),
        now: Duration::ZERO,
        datagram_cut: None,
    };
    h.run_for(Duration::from_secs(5));
    let new_key = crate::crypto::SecretKey::from_bytes([9; 32]);
    let now = h.now;
    let n0 = h.nodes[0].as_mut().unwrap();
    n0.handle_command(
        now,
        Command::Keyring(crate::crypto::KeyringOp::Install(new_key.clone())),
    );
    n0.handle_command(
        now,
        Command::Keyring(crate::crypto::KeyringOp::Use(new_key.clone())),
    );
    h.run_for(Duration::from_secs(2));
    let n0 = h.nodes[0].as_mut().unwrap();
    n0.handle_command(
        h.now,
        Command::Keyring(crate::crypto::KeyringOp::Remove(old.primary().clone())),
    );
    h.run_for(Duration::from_secs(2));
    for f in h.live() {
        assert_eq!(f.keyring().unwrap().len(), 1);
    }
    // The latecomer holds only the removed key: every handshake it sends is dropped unanswered.
    h.nodes.push(Some(secure_node(5, space, &old)));
    h.run_for(Duration::from_secs(10));
    let late = h.nodes[3].as_ref().unwrap();
    assert_eq!(late.live_count(), 1);
    assert!(late.stats().handshakes_sent > 0);
    assert_eq!(late.stats().joins, 0);
    for f in h.nodes[..3].iter().flatten() {
        assert_eq!(f.live_count(), 3);
        assert!(f.stats().dropped(DropReason::UnknownKey) > 0);
    }
    // A latecomer that holds the new key (among others) gets in.
    let ring = {
        let mut r = test_keyring(7);
        r.install(new_key.clone()).unwrap();
        r
    };
    h.nodes[3] = Some(secure_node(5, space, &ring));
    h.run_for(Duration::from_secs(10));
    for f in h.live() {
        assert_eq!(f.live_count(), 4, "{}", f.identity().id);
    }
}

/// Reference: issue 3, "transient keys" — rotations are make-before-break: the leader announces
/// a new key ahead of sealing with it, so that whatever key anyone seals with, every member
/// already holds it.
#[test]
fn a_new_key_is_announced_before_anyone_seals_with_it() {
    let mut h = Harness::secure(5);
    h.run_for(Duration::from_secs(5));
    assert_eq!(h.agreed_leader(), Some(NodeId(2000)));
    let l = h.nodes[0].as_ref().unwrap();
    let rotations_before = l.stats().rotations;
    // A key announced before we look was counted before.
    let pending = l
        .key_epochs()
        .last()
        .copied()
        .filter(|e| Some(*e) != l.key_epoch());
    // Keys the leader held before it sealed with them.
    let mut announced_ahead = std::collections::BTreeSet::new();
    let end = h.now + Duration::from_secs(30);
    while h.advance(end) {
        h.flush();
        for f in h.live() {
            let e = f.key_epoch().expect("a key");
            for g in h.live() {
                assert!(
                    g.key_epochs().contains(&e),
                    "{} seals with {e}, which {} does not hold ({:?})",
                    f.identity().id,
                    g.identity().id,
                    g.key_epochs()
                );
            }
        }
        let leader = h.live().find(|f| f.identity().id == NodeId(2000)).unwrap();
        let own = leader.key_epoch().unwrap();
        let newest = leader.key_epochs().last().copied();
        if let Some(newest) = newest.filter(|e| *e != own && Some(*e) != pending) {
            announced_ahead.insert(newest);
        }
    }
    let leader = h.live().find(|f| f.identity().id == NodeId(2000)).unwrap();
    let rotations = leader.stats().rotations - rotations_before;
    assert!(rotations >= 4, "{:?}", leader.stats());
    assert_eq!(announced_ahead.len() as u64, rotations);
    for f in h.live() {
        assert_eq!(f.live_count(), 5);
    }
}

/// Reference: issue 3 — "a member that missed rotations rejoins through the handshake by
/// itself": a member cut off while a key is announced and switched to asks for it, and the
/// answer brings it the new key even though its own key is still the flock's previous one.
#[test]
fn a_member_that_missed_a_rotation_gets_the_key_by_handshake() {
    let mut h = Harness::secure(5);
    h.run_for(Duration::from_secs(5));
    assert_eq!(h.agreed_leader(), Some(NodeId(2000)));
    let leader = |h: &Harness| -> (u32, Vec<u32>) {
        let l = h.live().find(|f| f.identity().id == NodeId(2000)).unwrap();
        (l.key_epoch().unwrap(), l.key_epochs())
    };
    let away = addr(5);
    let away_index = h.index_of(away).unwrap();
    // Cut the member off just as the leader announces its next key (no key pending before).
    let end = h.now + Duration::from_secs(10);
    while leader(&h).1.last() != Some(&leader(&h).0) && h.advance(end) {
        h.flush();
    }
    let (before, held_before) = leader(&h);
    assert_eq!(held_before.last(), Some(&before));
    let mut cut = false;
    while h.advance(end) {
        if leader(&h).1.iter().any(|e| !held_before.contains(e)) {
            cut = true;
            break;
        }
        h.flush();
    }
    assert!(cut, "no rotation within 10 s");
    h.flush_cut(Some(away));
    // It stays away until the leader seals with the new key and a beat has named it.
    let end = h.now + Duration::from_secs(3);
    while leader(&h).0 == before && h.advance(end) {
        h.flush_cut(Some(away));
    }
    let (new, _) = leader(&h);
    assert_ne!(new, before, "the leader did not switch");
    let end = h.now + Duration::from_millis(600);
    while h.advance(end) {
        h.flush_cut(Some(away));
    }
    let f = h.nodes[away_index].as_ref().unwrap();
    assert!(!f.key_epochs().contains(&new), "{:?}", f.key_epochs());
    assert_eq!(f.key_epoch(), Some(before));
    let joins = f.stats().joins;
    // Back: within a second it seals with the leader's key, got through a handshake.
    h.run_for(Duration::from_secs(1));
    let f = h.nodes[away_index].as_ref().unwrap();
    assert_eq!(f.key_epoch(), Some(leader(&h).0), "{:?}", f.key_epochs());
    assert!(f.stats().joins > joins);
    h.run_for(Duration::from_secs(10));
    for f in h.live() {
        assert_eq!(f.live_count(), 5, "{}", f.identity().id);
        assert!(f.members().all(|m| m.info.state == MemberState::Alive));
    }
}

/// Reference: issue 3, "secondary keyring" — a keyring change spreads to every member, and a
/// member that missed it (cut off while the operator ran install, use and remove, until the
/// gossip of the changes died out) still ends with the same ring, repaired by push-pull against
/// the leader's keyring version. Both ways: a member behind the leader, and a leader behind its
/// members.
#[test]
fn a_node_that_missed_a_keyring_change_ends_with_the_same_ring() {
    // Several seeds: with some, the second of cut-off also spans a transient key rotation, so
    // the member that comes back holds neither the flock's secondary key (to ask for keys) nor
    // its current transient key; only the push-pull it starts under its old transient key
    // (which the others still hold as their previous one, and answer under) brings it back.
    for (salt, away_id) in (0..12).flat_map(|s| [(s, NodeId(4000)), (s, NodeId(2000))]) {
        let mut h = Harness::secure_salted(5, salt);
        h.run_for(Duration::from_secs(5));
        assert_eq!(h.agreed_leader(), Some(NodeId(2000)));
        let away_index = h
            .nodes
            .iter()
            .position(|n| n.as_ref().unwrap().identity().id == away_id)
            .unwrap();
        let away = h.nodes[away_index].as_ref().unwrap().identity().addr;
        let operator = (away_index + 1) % 5;
        let old = test_keyring(7).primary().clone();
        let new_key = crate::crypto::SecretKey::from_bytes([9; 32]);
        let now = h.now;
        let n = h.nodes[operator].as_mut().unwrap();
        for op in [
            crate::crypto::KeyringOp::Install(new_key.clone()),
            crate::crypto::KeyringOp::Use(new_key.clone()),
            crate::crypto::KeyringOp::Remove(old.clone()),
        ] {
            n.handle_command(now, Command::Keyring(op));
        }
        // Cut off for a second: the changes go out to everyone else and their gossip dies out.
        let end = h.now + Duration::from_secs(1);
        h.flush_cut(Some(away));
        while h.advance(end) {
            h.flush_cut(Some(away));
        }
        h.now = end;
        let f = h.nodes[away_index].as_ref().unwrap();
        assert_eq!(
            f.keyring().unwrap().primary(),
            &old,
            "salt {salt}, {away_id}: not cut off"
        );
        for g in h.live().filter(|g| g.identity().id != away_id) {
            assert_eq!(g.keyring().unwrap().list(), [&new_key]);
        }
        h.run_for(Duration::from_secs(6));
        for g in h.live() {
            assert_eq!(
                g.keyring().unwrap().list(),
                [&new_key],
                "salt {salt}, {away_id}: {} kept another ring",
                g.identity().id
            );
            assert_eq!(
                g.live_count(),
                5,
                "salt {salt}, {away_id}: {} does not see all",
                g.identity().id
            );
        }
    }
}

/// Issue 20, item 2: the rng is seeded before anything draws from it, so that nodes powered up
/// together do not schedule their first probe, gossip and dead probe at the same offsets.
#[test]
fn nodes_with_different_seeds_get_different_first_timer_offsets() {
    let ring = test_keyring(7);
    let first = |seed: u8| {
        let mut s = [0u8; 32];
        s[0] = seed;
        let id = Identity {
            id: NodeId(2000),
            boot: crate::boot_id(1, 2),
            addr: addr(2),
            key: None,
        };
        Flock::builder(config("127.0.0.2-127.0.0.3"), id)
            .keys(ring.clone(), SecurityTiming::default())
            .rng_seed(s)
            .start(Duration::ZERO)
            .unwrap()
            .timer_deadlines()
    };
    assert_eq!(first(1), first(1), "one seed, one schedule");
    assert_ne!(first(1), first(2), "two seeds, the same first timers");
}

/// A flock is never seeded with zeros behind the caller's back: no seed, no flock.
#[test]
fn a_flock_without_a_seed_is_refused() {
    let id = Identity {
        id: NodeId(2000),
        boot: crate::boot_id(1, 2),
        addr: addr(2),
        key: None,
    };
    let err = Flock::builder(config("127.0.0.2-127.0.0.3"), id)
        .start(Duration::ZERO)
        .err()
        .expect("refused");
    assert_eq!(err.field, "rng_seed");
}
