//! Leadership: the first election and the election after the leader crashes.

use std::time::Duration;

use crux_proto::flock::{MemberState, NodeId};

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
    h.nodes[0] = None; // crash the leader (lowest id)
    h.run_for(Duration::from_secs(10));
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
