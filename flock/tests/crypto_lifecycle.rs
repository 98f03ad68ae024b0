//! The key lifecycle with the crypto primitives alone, on virtual time: a leader rotates the
//! transient key every 30–60 s, members follow its announcements without dropping one datagram,
//! a partitioned member falls behind and comes back through a key request, and the secondary
//! keyring rotates Serf-style (install, use, remove) with joins working at every step.

use std::time::Duration;

use crux_flock::crypto::{
    next_rotation, receive, respond, seal, Bloc, HandshakeInitiator, Initiation, Installed,
    KeyAnnouncement, Keyring, KeyringOp, OpenError, Origin, Purpose, Received, ReplayTable,
    SecretKey, Tai64N, TransientKeys, ROTATION_MAX, ROTATION_MIN,
};
use crux_flock::{BootId, DropReason, NodeId};
use crux_proto::flock::{Header, Kind, DEFAULT_MTU};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const ANNOUNCE: u8 = 1;
const PING: u8 = 2;

struct Node {
    id: NodeId,
    transient: TransientKeys,
    keyring: Keyring,
    replay: ReplayTable,
    counter: u64,
}

impl Node {
    fn new(id: u64, bloc: &Bloc, secondary: SecretKey) -> Node {
        Node {
            id: NodeId(id),
            transient: TransientKeys::new(bloc.clone(), ROTATION_MAX),
            keyring: Keyring::new(secondary),
            replay: ReplayTable::new(64),
            counter: 0,
        }
    }

    fn origin(&mut self) -> Origin {
        self.counter += 1;
        Origin {
            sender: self.id,
            boot: BootId(1),
            counter: self.counter,
        }
    }

    /// Seals a message under the key this node sends with now.
    fn seal(&mut self, bloc: &Bloc, body: &[u8], now: Duration, rng: &mut ChaCha20Rng) -> Vec<u8> {
        self.counter += 1;
        let (epoch, key) = self.transient.sealing_key(now).expect("has a key");
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: bloc.tag(),
            key_id: epoch,
            sender: self.id,
            boot: BootId(1),
            counter: self.counter,
        };
        let mut out = Vec::new();
        seal(key, &header, body, rng, &mut out);
        out
    }

    /// Receives a datagram; installs announcements.
    fn receive(&mut self, bloc: &Bloc, d: &[u8], now: Duration) -> Result<(), OpenError> {
        let mut body = Vec::new();
        let r = receive(
            d,
            DEFAULT_MTU,
            bloc.tag(),
            &self.transient,
            &mut self.replay,
            now,
            &mut body,
        )?;
        assert!(matches!(r, Received::Flock(_)));
        if body[0] == ANNOUNCE {
            let ann = KeyAnnouncement::decode(&body[1..])?;
            let _: Installed = self.transient.install_announced(ann, now);
        }
        Ok(())
    }

    /// Runs a handshake against `responder` and installs what it brings.
    fn handshake(
        &mut self,
        responder: &mut Node,
        bloc: &Bloc,
        purpose: Purpose,
        now: Duration,
        rng: &mut ChaCha20Rng,
    ) -> Result<(), DropReason> {
        let origin = self.origin();
        let (state, request) = HandshakeInitiator::new(
            rng,
            self.keyring.primary(),
            bloc,
            &Initiation {
                purpose,
                origin,
                to: "127.0.0.1:7700".parse().unwrap(),
                stamp: Tai64N::default(),
                cookie: None,
                context: b"",
            },
        );
        let them = responder.origin();
        let resp = respond(
            &responder.keyring,
            bloc,
            &request,
            &responder.transient,
            now,
            them,
            b"",
            rng,
        )
        .map_err(|e| e.drop_reason())?;
        assert!(resp.reply.len() <= request.len());
        let keys = state.finish(&resp.reply).map_err(|e| e.drop_reason())?.keys;
        self.transient.install_join(keys, now);
        Ok(())
    }
}

#[test]
fn five_minutes_of_rotations_lose_no_datagram_and_a_partitioned_member_returns() {
    let mut rng = ChaCha20Rng::seed_from_u64(0x10_7a7e);
    let bloc = Bloc::new("lifecycle");
    let secondary = SecretKey::generate(&mut rng);
    let mut nodes: Vec<Node> = (0..5)
        .map(|i| Node::new(i, &bloc, secondary.clone()))
        .collect();
    let second = Duration::from_secs(1);

    // The leader (node 0) makes the first key; everyone else joins through it.
    let mut now = Duration::from_secs(1);
    nodes[0].transient.rotate(now, &mut rng);
    let mut next = next_rotation(now, ROTATION_MIN, ROTATION_MAX, &mut rng);
    for i in 1..nodes.len() {
        let (leader, rest) = nodes.split_at_mut(1);
        rest[i - 1]
            .handshake(&mut leader[0], &bloc, Purpose::Join, now, &mut rng)
            .unwrap();
    }

    let partitioned = 4;
    let (cut_from, cut_until) = (Duration::from_secs(60), Duration::from_secs(200));
    let mut rotations = 0;
    let mut rejoined_at = None;
    while now < Duration::from_secs(300) {
        now += second;
        let cut = now >= cut_from && now < cut_until;
        let connected = |i: usize| !(cut && i == partitioned);
        if now >= next {
            let ann = nodes[0].transient.rotate(now, &mut rng);
            next = next_rotation(now, ROTATION_MIN, ROTATION_MAX, &mut rng);
            rotations += 1;
            let mut body = vec![ANNOUNCE];
            body.extend_from_slice(&ann.encode());
            let d = nodes[0].seal(&bloc, &body, now, &mut rng);
            for (i, node) in nodes.iter_mut().enumerate().skip(1) {
                if connected(i) {
                    node.receive(&bloc, &d, now).expect("announcement opens");
                }
            }
        }
        // Everyone pings everyone it can reach.
        for from in 0..nodes.len() {
            let d = nodes[from].seal(&bloc, &[PING], now, &mut rng);
            for (to, node) in nodes.iter_mut().enumerate() {
                if to == from || !connected(from) || !connected(to) {
                    continue;
                }
                match node.receive(&bloc, &d, now) {
                    Ok(()) => {}
                    Err(e)
                        if (from == partitioned || to == partitioned) && rejoined_at.is_none() =>
                    {
                        // The member that missed rotations: it notices and asks again.
                        assert!(
                            matches!(e, OpenError::UnknownKey(_) | OpenError::StaleKey(_)),
                            "{e:?}"
                        );
                    }
                    Err(e) => {
                        panic!("{from}→{to} at {now:?}: {e:?}");
                    }
                }
            }
        }
        // The partitioned member's recovery rule: stale, or a datagram from an epoch ahead.
        let p = &nodes[partitioned];
        let leader_epoch = nodes[0].transient.sealing_key(now).unwrap().0;
        if !cut
            && rejoined_at.is_none()
            && (p.transient.is_stale(now) || p.transient.is_ahead(leader_epoch))
        {
            let (leader, rest) = nodes.split_at_mut(1);
            rest[partitioned - 1]
                .handshake(&mut leader[0], &bloc, Purpose::KeyRequest, now, &mut rng)
                .unwrap();
            rejoined_at = Some(now);
        }
    }
    assert!(
        (4..=10).contains(&rotations),
        "{rotations} rotations in 5 minutes"
    );
    assert_eq!(
        rejoined_at,
        Some(cut_until),
        "back as soon as the partition healed"
    );
    // At the end everyone holds the leader's keys.
    for n in &nodes {
        assert_eq!(
            n.transient.current_epoch(),
            nodes[0].transient.current_epoch()
        );
    }
}

#[test]
fn secondary_keyring_rotation_admits_joiners_at_every_step() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let bloc = Bloc::new("keyring");
    let (old, new) = (SecretKey::generate(&mut rng), SecretKey::generate(&mut rng));
    let now = Duration::from_secs(5);
    let mut member = Node::new(1, &bloc, old.clone());
    member.transient.rotate(now, &mut rng);
    let join = |member: &mut Node, key: &SecretKey, rng: &mut ChaCha20Rng| {
        let mut joiner = Node::new(99, &bloc, key.clone());
        joiner.handshake(member, &bloc, Purpose::Join, now, rng)
    };

    assert_eq!(join(&mut member, &old, &mut rng), Ok(()));
    assert_eq!(
        join(&mut member, &new, &mut rng),
        Err(DropReason::UnknownKey)
    );
    // 1. install the new key everywhere: both admit.
    assert!(member
        .keyring
        .apply(&KeyringOp::Install(new.clone()))
        .unwrap());
    assert_eq!(join(&mut member, &old, &mut rng), Ok(()));
    assert_eq!(join(&mut member, &new, &mut rng), Ok(()));
    // 2. use it: both still admit.
    assert!(member.keyring.apply(&KeyringOp::Use(new.clone())).unwrap());
    assert_eq!(join(&mut member, &old, &mut rng), Ok(()));
    assert_eq!(join(&mut member, &new, &mut rng), Ok(()));
    // 3. remove the old key: a node holding only the old key is shut out.
    assert!(member
        .keyring
        .apply(&KeyringOp::Remove(old.clone()))
        .unwrap());
    assert_eq!(join(&mut member, &new, &mut rng), Ok(()));
    assert_eq!(
        join(&mut member, &old, &mut rng),
        Err(DropReason::UnknownKey)
    );
}

#[test]
fn two_blocs_with_the_same_secondary_key_never_exchange_keys() {
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let shared = SecretKey::generate(&mut rng);
    let (a, b) = (Bloc::new("bloc-a"), Bloc::new("bloc-b"));
    let now = Duration::from_secs(1);
    let mut in_a = Node::new(1, &a, shared.clone());
    in_a.transient.rotate(now, &mut rng);
    let mut in_b = Node::new(2, &b, shared.clone());
    in_b.transient.rotate(now, &mut rng);
    // A node of bloc b asks a member of bloc a (bloc b's tag): dropped before any crypto.
    let origin = in_b.origin();
    let (_, request) = HandshakeInitiator::new(
        &mut rng,
        &shared,
        &b,
        &Initiation {
            purpose: Purpose::Join,
            origin,
            to: "127.0.0.1:7700".parse().unwrap(),
            stamp: Tai64N::default(),
            cookie: None,
            context: b"",
        },
    );
    let them = in_a.origin();
    let err = respond(
        &in_a.keyring,
        &a,
        &request,
        &in_a.transient,
        now,
        them,
        b"",
        &mut rng,
    )
    .unwrap_err();
    assert_eq!(err.drop_reason(), DropReason::WrongBloc);
    // Their flock datagrams do not cross either.
    let d = in_b.seal(&b, &[PING], now, &mut rng);
    assert_eq!(
        in_a.receive(&a, &d, now).unwrap_err().drop_reason(),
        DropReason::WrongBloc
    );
}
