//! Membership rules: leave, restart with a new boot, node keys, revocation.

use std::time::Duration;

use crux_proto::flock::{MemberState, NodeId, NodeKey};

use super::*;

#[test]
fn graceful_leave_is_seen_as_left() {
    let mut h = Harness::new(4);
    h.run_for(Duration::from_secs(5));
    let now = h.now;
    h.nodes[3]
        .as_mut()
        .unwrap()
        .handle_command(now, Command::Leave);
    h.run_for(Duration::from_secs(2));
    assert!(h.nodes[3].as_ref().unwrap().has_left());
    let gone = h.nodes[3].as_ref().unwrap().identity().id;
    h.nodes[3] = None;
    for f in h.live() {
        assert_eq!(f.member(gone).unwrap().info.state, MemberState::Left);
        assert_eq!(f.live_count(), 3);
    }
}

#[test]
fn restarted_node_with_new_boot_supersedes_its_old_entry_and_does_not_take_over() {
    let mut h = Harness::new(4);
    h.run_for(Duration::from_secs(5));
    let leader = h.agreed_leader().expect("converged");
    // Restart the leader: same id and address, new (greater) boot id, empty state.
    let old = h.nodes[0].take().unwrap();
    let ident = Identity {
        boot: crate::boot_id(2, 0),
        ..*old.identity()
    };
    let cfg = old.config().clone();
    h.run_for(Duration::from_secs(6)); // the others elect a new leader meanwhile
    let new_leader = h.live().next().unwrap().leader().unwrap();
    assert_ne!(new_leader.id, leader);
    h.nodes[0] = Some(
        Flock::builder(cfg, ident)
            .sim_seed(99)
            .start(h.now)
            .unwrap(),
    );
    h.run_for(Duration::from_secs(5));
    for f in h.live() {
        assert_eq!(
            f.leader().unwrap().id,
            new_leader.id,
            "the restarted node must not take over"
        );
        assert_eq!(f.live_count(), 4);
        assert_eq!(f.member(leader).unwrap().info.boot, ident.boot);
        assert_eq!(f.member(leader).unwrap().info.state, MemberState::Alive);
    }
}

/// The node plane pins each member's key as the flock lists it (DESIGN.md, "Node plane"): every
/// member learns every other member's key from its sealed membership record.
#[test]
fn every_member_learns_every_members_node_key() {
    let mut h = Harness::secure(4);
    h.run_for(Duration::from_secs(5));
    for f in h.live() {
        let mut seen = 0;
        for m in f.members() {
            let i = (m.info.id.0 / 1000) as u8;
            assert_eq!(
                m.info.key,
                Some(NodeKey([i; 32])),
                "{:?} as {:?} sees it",
                m.info.id,
                f.identity().id
            );
            seen += 1;
        }
        assert_eq!(seen, 4);
    }
}

/// Revocation (issue 15, item 3): a node revoked on one member is forgotten by every member, its
/// own datagrams are dropped, it leaves, and a restart of it (a new boot of the same id) stays
/// out.
#[test]
fn a_revoked_node_is_forgotten_everywhere_and_kept_out() {
    let mut h = Harness::secure(4);
    h.run_for(Duration::from_secs(5));
    assert!(h.agreed_leader().is_some());
    let revoked = NodeId(5000);
    let now = h.now;
    h.nodes[0]
        .as_mut()
        .unwrap()
        .handle_command(now, Command::Revoke(revoked));
    h.run_for(Duration::from_secs(3));
    let lost: Vec<_> = h
        .live()
        .filter(|f| f.identity().id != revoked)
        .filter(|f| f.member(revoked).is_some() || f.revoked().all(|r| r != revoked))
        .map(|f| f.identity().id)
        .collect();
    assert!(lost.is_empty(), "{lost:?} still list the revoked node");
    let gone = h.nodes[3].as_ref().unwrap();
    assert!(gone.has_left(), "the revoked node leaves");
    // It comes back with a new boot: the others drop what it sends and keep it out.
    let ident = Identity {
        boot: crate::boot_id(3, 0),
        ..*gone.identity()
    };
    let cfg = gone.config().clone();
    let mut seed = [0u8; 32];
    seed[0] = 99;
    h.nodes[3] = Some(
        Flock::builder(cfg, ident)
            .keys(test_keyring(7), SecurityTiming::default())
            .rng_seed(seed)
            .start(h.now)
            .unwrap(),
    );
    h.run_for(Duration::from_secs(5));
    for f in h.live().filter(|f| f.identity().id != revoked) {
        assert!(
            f.member(revoked).is_none(),
            "{:?} let it back",
            f.identity().id
        );
        assert_eq!(f.live_count(), 3);
    }
    let dropped: u64 = h
        .live()
        .filter(|f| f.identity().id != revoked)
        .map(|f| f.stats().dropped(DropReason::Revoked))
        .sum();
    assert!(dropped > 0, "its datagrams were dropped as revoked");
}
