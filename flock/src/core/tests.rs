//! Exact-output tests of the state machine, and a tiny lossless in-process harness.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{
    decode_message, encode_message, Header, Kind, MemberInfo, MemberState, Message, NodeId,
    NodeKey, HEADER_BYTES,
};

use super::detect::suspicion_timeout;
use super::*;
use crate::config::{bloc_tag, AddressSpace, Config, Preset};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 7700))
}

fn config(space: &str) -> Config {
    let mut c = Config::new("test-bloc", Preset::Lan);
    c.space = AddressSpace::parse(&[space], &[]).unwrap();
    c
}

fn node(i: u8, space: &str) -> Flock {
    let id = Identity {
        id: NodeId(i as u64 * 1000),
        boot: crate::boot_id(1, i as u16),
        addr: addr(i),
        key: None,
    };
    Flock::new(config(space), id, i as u64, Duration::ZERO).unwrap()
}

/// Builds a datagram as node `sender` would.
fn datagram(sender: u64, bloc: &str, msg: &Message) -> Vec<u8> {
    let header = Header {
        kind: Kind::Flock,
        bloc_tag: bloc_tag(bloc),
        key_id: 0,
        sender: NodeId(sender),
        boot: crate::boot_id(1, 1),
        counter: 1,
    };
    let mut out = Vec::new();
    header.write(&mut out);
    encode_message(msg, &mut out);
    out
}

fn peer_info(id: u64, a: SocketAddr) -> MemberInfo {
    MemberInfo {
        id: NodeId(id),
        boot: crate::boot_id(1, 1),
        addr: a,
        incarnation: 0,
        state: MemberState::Alive,
        key: None,
    }
}

fn drain(f: &mut Flock) -> (Vec<Transmit>, Vec<Event>) {
    let mut t = Vec::new();
    let mut e = Vec::new();
    while let Some(x) = f.poll_transmit() {
        t.push(x);
    }
    while let Some(x) = f.poll_event() {
        e.push(x);
    }
    (t, e)
}

#[test]
fn ping_from_unknown_node_is_acked_and_adds_it() {
    let mut f = node(2, "127.0.0.2");
    let _ = drain(&mut f);
    let me = peer_info(7, addr(9));
    let ping = Message::Ping {
        seq: 42,
        target: None,
        me,
        digest: 0,
        updates: vec![],
    };
    f.handle_datagram(
        Duration::from_millis(1),
        addr(9),
        &datagram(7, "test-bloc", &ping),
    );
    let (tx, ev) = drain(&mut f);
    assert_eq!(ev, vec![Event::MemberJoined(me)]);
    assert_eq!(tx.len(), 1);
    assert_eq!(tx[0].to, addr(9));
    assert_eq!(tx[0].kind, TransmitKind::Datagram);
    let (header, body) = Header::parse(&tx[0].payload).unwrap();
    assert_eq!(header.sender, NodeId(2000));
    match decode_message(body).unwrap() {
        Message::Ack {
            seq, me, updates, ..
        } => {
            assert_eq!(seq, 42);
            assert_eq!(me.id, NodeId(2000));
            // The new member is news to gossip.
            assert_eq!(
                updates,
                vec![crux_proto::flock::Update::Alive {
                    member: peer_info(7, addr(9))
                }]
            );
        }
        other => panic!("expected an ack, got {other:?}"),
    }
    assert_eq!(f.live_count(), 2);
}

#[test]
fn hostile_datagrams_are_dropped_counted_and_unanswered() {
    let mut f = node(2, "127.0.0.2");
    let _ = drain(&mut f);
    let now = Duration::from_millis(1);
    let ping = Message::Ping {
        seq: 1,
        target: None,
        me: peer_info(7, addr(9)),
        digest: 0,
        updates: vec![],
    };
    f.handle_datagram(now, addr(9), &datagram(7, "other-bloc", &ping));
    f.handle_datagram(now, addr(9), &[1, 2, 3]);
    let mut bad_magic = datagram(7, "test-bloc", &ping);
    bad_magic[0] = b'X';
    f.handle_datagram(now, addr(9), &bad_magic);
    let mut garbage = datagram(7, "test-bloc", &ping)[..HEADER_BYTES].to_vec();
    garbage.extend_from_slice(&[0xff; 20]);
    f.handle_datagram(now, addr(9), &garbage);
    f.handle_datagram(now, addr(9), &vec![0u8; 2000]);
    f.handle_datagram(now, addr(9), &datagram(2000, "test-bloc", &ping));
    let (tx, ev) = drain(&mut f);
    assert!(tx.is_empty() && ev.is_empty());
    let s = f.stats();
    assert_eq!(s.dropped(DropReason::WrongBloc), 1);
    assert_eq!(s.dropped(DropReason::Truncated), 1);
    assert_eq!(s.dropped(DropReason::BadMagic), 1);
    assert_eq!(s.dropped(DropReason::Malformed), 1);
    assert_eq!(s.dropped(DropReason::Oversized), 1);
    assert_eq!(s.dropped(DropReason::FromSelf), 1);
    assert_eq!(f.live_count(), 1);
}

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

/// A secure node that rotates its transient key every 3–6 s (when it leads).
fn secure_node(i: u8, space: &str, keyring: &crate::crypto::Keyring) -> Flock {
    let timing = SecurityTiming {
        rotation_min: Duration::from_secs(3),
        rotation_max: Duration::from_secs(6),
    };
    secure_node_timed(i, space, keyring, timing)
}

fn secure_node_timed(
    i: u8,
    space: &str,
    keyring: &crate::crypto::Keyring,
    timing: SecurityTiming,
) -> Flock {
    let id = Identity {
        id: NodeId(i as u64 * 1000),
        boot: crate::boot_id(1, i as u16),
        addr: addr(i),
        key: Some(NodeKey([i; 32])),
    };
    let mut seed = [0u8; 32];
    seed[0] = i;
    Flock::new_secure(
        config(space),
        id,
        keyring.clone(),
        timing,
        seed,
        Duration::ZERO,
    )
    .unwrap()
}

fn test_keyring(b: u8) -> crate::crypto::Keyring {
    crate::crypto::Keyring::new(crate::crypto::SecretKey::from_bytes([b; 32]))
}

/// Lossless, zero-latency network of nodes driven in virtual time.
struct Harness {
    nodes: Vec<Option<Flock>>,
    now: Duration,
    /// Datagrams between these two addresses (either way) are lost; streams still pass.
    datagram_cut: Option<(SocketAddr, SocketAddr)>,
}

impl Harness {
    fn of(nodes: Vec<Option<Flock>>) -> Harness {
        Harness {
            nodes,
            now: Duration::ZERO,
            datagram_cut: None,
        }
    }

    fn new(n: u8) -> Harness {
        let space = format!("127.0.0.2-127.0.0.{}", n + 1);
        Harness {
            nodes: (2..n + 2).map(|i| Some(node(i, &space))).collect(),
            now: Duration::ZERO,
            datagram_cut: None,
        }
    }

    fn secure(n: u8) -> Harness {
        let space = format!("127.0.0.2-127.0.0.{}", n + 1);
        let ring = test_keyring(7);
        Harness {
            nodes: (2..n + 2)
                .map(|i| Some(secure_node(i, &space, &ring)))
                .collect(),
            now: Duration::ZERO,
            datagram_cut: None,
        }
    }

    fn index_of(&self, a: SocketAddr) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.as_ref().is_some_and(|f| f.identity().addr == a))
    }

    fn flush(&mut self) {
        self.flush_cut(None);
    }

    /// Delivers everything queued; datagrams to or from `cut` are lost.
    fn flush_cut(&mut self, cut: Option<SocketAddr>) {
        let mut queue: VecDeque<(SocketAddr, Transmit)> = VecDeque::new();
        loop {
            for f in self.nodes.iter_mut().flatten() {
                while let Some(t) = f.poll_transmit() {
                    queue.push_back((f.identity().addr, t));
                }
                while f.poll_event().is_some() {}
            }
            let Some((from, t)) = queue.pop_front() else {
                break;
            };
            let Some(i) = self.index_of(t.to) else {
                continue;
            };
            if cut.is_some_and(|c| c == from || c == t.to) {
                continue;
            }
            let now = self.now;
            let cut = self
                .datagram_cut
                .is_some_and(|(a, b)| (from, t.to) == (a, b) || (from, t.to) == (b, a));
            match t.kind {
                TransmitKind::Datagram if cut => {}
                TransmitKind::Datagram => self.nodes[i]
                    .as_mut()
                    .unwrap()
                    .handle_datagram(now, from, &t.payload),
                TransmitKind::Stream => {
                    let reply = self.nodes[i]
                        .as_mut()
                        .unwrap()
                        .handle_stream(now, from, &t.payload);
                    if let (Some(reply), Some(j)) = (reply, self.index_of(from)) {
                        self.nodes[j]
                            .as_mut()
                            .unwrap()
                            .handle_stream_reply(now, t.to, &reply);
                    }
                }
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.flush();
        while self.advance(end) {
            self.flush();
        }
        self.now = end;
    }

    /// Runs the timers of the next deadline up to `end` (what they send stays queued until a
    /// flush); false when none is due by then.
    fn advance(&mut self, end: Duration) -> bool {
        let next = self
            .nodes
            .iter()
            .flatten()
            .filter_map(|f| f.poll_timeout())
            .min();
        let Some(next) = next.filter(|n| *n <= end) else {
            return false;
        };
        self.now = self.now.max(next);
        let now = self.now;
        for f in self.nodes.iter_mut().flatten() {
            if f.poll_timeout().is_some_and(|t| t <= now) {
                f.handle_timeout(now);
            }
        }
        true
    }

    fn live(&self) -> impl Iterator<Item = &Flock> {
        self.nodes.iter().flatten()
    }

    fn agreed_leader(&self) -> Option<NodeId> {
        let n = self.live().count();
        let mut leader = None;
        for f in self.live() {
            let l = f.leader()?.id;
            if leader.is_some_and(|x| x != l) || f.live_count() != n {
                return None;
            }
            leader = Some(l);
        }
        leader
    }
}

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
    h.nodes[0] = Some(Flock::new(cfg, ident, 99, h.now).unwrap());
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

#[test]
fn push_pull_moves_to_a_stream_when_state_outgrows_a_datagram() {
    let mut h = Harness::new(80);
    h.run_for(Duration::from_secs(10));
    assert!(h.agreed_leader().is_some());
    let streams: u64 = h.live().map(|f| f.stats().streams_out).sum();
    assert!(streams > 0);
    for f in h.live() {
        assert_eq!(f.live_count(), 80);
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
        assert!(f.key_epochs().len() <= 2, "{:?}", f.key_epochs());
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
        Flock::new_secure(
            cfg,
            id,
            ring.clone(),
            SecurityTiming::default(),
            [5; 32],
            Duration::ZERO,
        )
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
    for away_id in [NodeId(4000), NodeId(2000)] {
        let mut h = Harness::secure(5);
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
            "{away_id}: not cut off"
        );
        for g in h.live().filter(|g| g.identity().id != away_id) {
            assert_eq!(g.keyring().unwrap().list(), [&new_key]);
        }
        h.run_for(Duration::from_secs(6));
        for g in h.live() {
            assert_eq!(
                g.keyring().unwrap().list(),
                [&new_key],
                "{away_id}: {} kept another ring",
                g.identity().id
            );
            assert_eq!(g.live_count(), 5);
        }
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
        Flock::new_secure(
            cfg,
            ident,
            test_keyring(7),
            SecurityTiming::default(),
            seed,
            h.now,
        )
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
