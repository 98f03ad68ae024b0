//! Exact outputs of the datagram path: what a ping from a stranger and hostile input do.

use std::time::Duration;

use crux_proto::flock::{decode_message, Header, Message, NodeId, HEADER_BYTES};

use super::*;

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
