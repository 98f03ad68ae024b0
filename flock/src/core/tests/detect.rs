//! Failure detection: refutation, stream probes, Lifeguard's suspicion timeouts.

use std::time::Duration;

use crux_proto::flock::{MemberState, Message, NodeId};

use super::*;
use crate::config::{Config, Preset};
use crate::core::detect::suspicion_timeout;

#[test]
fn suspicion_of_self_is_refuted_with_higher_incarnation() {
    let mut f = node(2, "127.0.0.2");
    let me = *f.identity();
    let _ = drain(&mut f);
    let gossip = Message::Gossip {
        updates: vec![crux_proto::flock::Update::Suspect {
            id: me.id,
            boot: me.boot,
            incarnation: 0,
            from: NodeId(7),
        }],
    };
    f.handle_datagram(
        Duration::from_millis(1),
        addr(9),
        &datagram(7, "test-bloc", &gossip),
    );
    assert_eq!(f.member(me.id).unwrap().info.incarnation, 1);
    assert_eq!(f.stats().refutations, 1);
}

/// Issue 2 (SWIM probes, "suspicion ... refutation"): a member whose datagrams are lost but
/// which answers over a stream stays alive: the prober probes over a stream beside its indirect
/// probes (memberlist's TCP ping), so loss alone does not make it suspect. (With security,
/// for less than a key rotation period: transient keys are announced in datagrams.)
#[test]
fn a_member_that_answers_over_a_stream_is_not_suspected() {
    for secure in [false, true] {
        let space = "127.0.0.2-127.0.0.3";
        let ring = test_keyring(7);
        let mut h = if secure {
            Harness::of(
                (2..4)
                    .map(|i| {
                        Some(secure_node_timed(
                            i,
                            space,
                            &ring,
                            SecurityTiming::default(),
                            0,
                        ))
                    })
                    .collect(),
            )
        } else {
            Harness::new(2)
        };
        h.run_for(Duration::from_secs(5));
        assert!(h.agreed_leader().is_some(), "secure {secure}");
        let a = h.nodes[0].as_ref().unwrap().identity().addr;
        let b = h.nodes[1].as_ref().unwrap().identity().addr;
        h.datagram_cut = Some((a, b));
        h.run_for(Duration::from_secs(20));
        for f in h.live() {
            assert!(
                f.members().all(|m| m.info.state == MemberState::Alive),
                "secure {secure}: {:?}",
                f.members().collect::<Vec<_>>()
            );
            assert_eq!(f.live_count(), 2, "secure {secure}");
        }
    }
}

#[test]
fn suspicion_timeout_follows_lifeguard() {
    let c = Config::new("b", Preset::Lan);
    let t = &c.timing;
    // N = 100: min = 3 × log10(100) × 500 ms = 3 s, max = 6 × min = 18 s, k = 1.
    let min = Duration::from_secs(3);
    assert_eq!(
        suspicion_timeout(&c, 100, false, 0),
        min * t.suspicion_max_mult
    );
    assert_eq!(suspicion_timeout(&c, 100, false, 1), min);
    // Small flocks use log10 floor of 1: min = 1.5 s.
    assert_eq!(
        suspicion_timeout(&c, 5, false, 5),
        Duration::from_millis(1500)
    );
    // The leader: min 500 ms after 3 confirmations.
    assert_eq!(suspicion_timeout(&c, 1000, true, 3), t.leader_suspicion_min);
    assert!(suspicion_timeout(&c, 1000, true, 1) > t.leader_suspicion_min);
}
