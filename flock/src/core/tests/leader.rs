//! Leadership: the first election and the election after the leader crashes.

use std::time::Duration;

use crux_proto::flock::{LeaderClaim, MemberState, Message, NodeId, Update, HEADER_BYTES};

use super::*;

#[test]
fn five_nodes_discover_each_other_and_elect_the_lowest_id() {
    let mut h = Harness::new(5);
    h.run_for(Duration::from_secs(5));
    assert_eq!(h.agreed_leader(), Some(NodeId(2000)));
    for f in h.live() {
        assert!(f.leader().unwrap().term >= 1);
        assert!(f.members().all(|m| m.info.state == MemberState::Alive));
    }
}

#[test]
fn crash_of_the_leader_elects_the_next_best_with_a_higher_term() {
    let mut h = Harness::new(5);
    h.run_for(Duration::from_secs(5));
    let old_term = h.live().next().unwrap().leader().unwrap().term;
    let changes: Vec<u64> = h.live().map(|f| f.stats().leader_changes).collect();
    h.nodes[0] = None; // crash the leader (lowest id)
    h.run_for(Duration::from_secs(10));
    for (f, before) in h.live().zip(&changes[1..]) {
        // One change of leader id for each survivor: losing the leader is not one.
        assert_eq!(f.stats().leader_changes, before + 1, "{}", f.identity().id);
    }
    assert_eq!(h.agreed_leader(), Some(NodeId(3000)));
    for f in h.live() {
        let l = f.leader().expect("a leader");
        assert_eq!(l.id, NodeId(3000));
        assert!(l.term > old_term);
        assert_eq!(
            f.member(NodeId(2000)).unwrap().info.state,
            MemberState::Dead
        );
        assert_eq!(f.live_count(), 4);
    }
}

/// Issue 23, bad input: a claim naming a member at a boot it no longer runs (a stale boot id),
/// however high its term and follower count, moves no leader and no term.
#[test]
fn a_claim_from_a_stale_boot_moves_nothing() {
    let mut h = Harness::new(5);
    h.run_for(Duration::from_secs(5));
    let leader = h.agreed_leader().expect("one leader");
    let term = h.live().next().unwrap().leader().unwrap().term;
    let other = h
        .live()
        .map(|f| f.identity().id)
        .find(|id| *id != leader)
        .unwrap();
    let stale = LeaderClaim {
        leader: other,
        boot: crate::boot_id(0, 99),
        term: 1_000_000,
        solo: false,
        beat: 9,
        epoch: 0,
        ring: 0,
        followers: 1_000_000,
    };
    let gossip = Message::Gossip {
        updates: vec![Update::Leader(stale)],
    };
    let now = h.now;
    for f in h.nodes.iter_mut().flatten() {
        f.handle_datagram(now, addr(9), &datagram(other.0, "test-bloc", &gossip));
    }
    h.run_for(Duration::from_secs(3));
    assert_eq!(h.agreed_leader(), Some(leader));
    for f in h.live() {
        assert_eq!(f.leader().unwrap().term, term, "{}", f.identity().id);
    }
}

/// Issue 23, bad input: a node that comes back (a new boot) and claims with a far higher term
/// (as a node that kept a high term would) has no followers: the flock keeps its leader, which
/// claims again above that term so that no two leaders share one.
#[test]
fn a_restart_claiming_a_higher_term_keeps_the_leader() {
    let mut h = Harness::new(5);
    h.run_for(Duration::from_secs(5));
    let leader = h.agreed_leader().expect("one leader");
    let i = h
        .nodes
        .iter()
        .position(|n| n.as_ref().unwrap().identity().id != leader)
        .unwrap();
    let old = *h.nodes[i].as_ref().unwrap().identity();
    let back = Identity {
        boot: crate::boot_id(2, 77),
        ..old
    };
    h.nodes[i] = Some(
        Flock::builder(config("127.0.0.2-127.0.0.6"), back)
            .sim_seed(77)
            .start(h.now)
            .unwrap(),
    );
    h.run_for(Duration::from_secs(5));
    assert_eq!(h.agreed_leader(), Some(leader));
    let claim = LeaderClaim {
        leader: back.id,
        boot: back.boot,
        term: 1_000_000,
        solo: false,
        beat: 1,
        epoch: 0,
        ring: 0,
        followers: 1,
    };
    let gossip = Message::Gossip {
        updates: vec![Update::Leader(claim)],
    };
    let now = h.now;
    for f in h.nodes.iter_mut().flatten() {
        if f.identity().id != back.id {
            f.handle_datagram(now, back.addr, &datagram(back.id.0, "test-bloc", &gossip));
        }
    }
    h.run_for(Duration::from_secs(3));
    assert_eq!(h.agreed_leader(), Some(leader));
    for f in h.live() {
        assert!(f.leader().unwrap().term > 1_000_000, "{}", f.identity().id);
    }
}

/// Issue 23, bad input: a forged leader datagram (it does not authenticate) and a replayed one
/// are dropped and counted, and the leader stays.
#[test]
fn forged_and_replayed_leader_datagrams_are_dropped_and_counted() {
    let mut h = Harness::secure(5);
    h.run_for(Duration::from_secs(5));
    let leader = h.agreed_leader().expect("one leader");
    let li = h
        .nodes
        .iter()
        .position(|n| n.as_ref().unwrap().identity().id == leader)
        .unwrap();
    // Run until the leader has a datagram to send; deliver everything, keep one of its.
    let mut kept: Option<(SocketAddr, Transmit)> = None;
    let end = h.now + Duration::from_secs(2);
    while kept.is_none() && h.advance(end) {
        let from = h.nodes[li].as_ref().unwrap().identity().addr;
        while let Some(t) = h.nodes[li].as_mut().unwrap().poll_transmit() {
            if t.kind == TransmitKind::Datagram && kept.is_none() && h.index_of(t.to).is_some() {
                kept = Some((from, t.clone()));
            }
            if let Some(j) = h.index_of(t.to) {
                let now = h.now;
                if t.kind == TransmitKind::Datagram {
                    h.nodes[j]
                        .as_mut()
                        .unwrap()
                        .handle_datagram(now, from, &t.payload);
                }
            }
        }
        h.flush();
    }
    let (from, t) = kept.expect("the leader sent a datagram");
    let j = h.index_of(t.to).unwrap();
    let now = h.now;
    let target = h.nodes[j].as_mut().unwrap();
    let replays = target.stats().dropped(DropReason::Replay);
    target.handle_datagram(now, from, &t.payload);
    assert_eq!(target.stats().dropped(DropReason::Replay), replays + 1);
    // The same datagram under a fresh counter (past the replay window) with its body altered:
    // it does not authenticate.
    let mut forged = t.payload.clone();
    let counter = u64::from_le_bytes(forged[28..36].try_into().unwrap()) + 1000;
    forged[28..36].copy_from_slice(&counter.to_le_bytes());
    forged[HEADER_BYTES + 30] ^= 0x55;
    let failed = target.stats().dropped(DropReason::AuthFailed);
    target.handle_datagram(now, from, &forged);
    assert_eq!(target.stats().dropped(DropReason::AuthFailed), failed + 1);
    h.run_for(Duration::from_secs(3));
    assert_eq!(h.agreed_leader(), Some(leader));
}

/// Issue 23, bad input: a member whose clock jumps (suspended, then its time leaps forward by a
/// few seconds, or by longer than it takes to declare it dead: every timer of its fires at once)
/// comes back following the same leader, and the flock's leader does not move.
#[test]
fn a_member_whose_clock_jumps_moves_no_leader() {
    for jump in [Duration::from_secs(3), Duration::from_secs(20)] {
        let mut h = Harness::new(5);
        h.run_for(Duration::from_secs(5));
        let leader = h.agreed_leader().expect("one leader");
        let j = h
            .nodes
            .iter()
            .rposition(|n| n.as_ref().unwrap().identity().id != leader)
            .unwrap();
        let changes: Vec<u64> = h.live().map(|f| f.stats().leader_changes).collect();
        // Frozen: it runs no timer and what is sent to it is lost; then its time leaps.
        let frozen = h.nodes[j].take();
        h.run_for(jump);
        h.nodes[j] = frozen;
        h.run_for(Duration::from_secs(10));
        assert_eq!(h.agreed_leader(), Some(leader), "jump {jump:?}");
        for (i, f) in h.live().enumerate().filter(|(i, _)| *i != j) {
            assert_eq!(f.stats().leader_changes, changes[i], "jump {jump:?}");
        }
    }
}
