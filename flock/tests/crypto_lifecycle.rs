//! The secondary keyring's lifecycle with the crypto primitives alone: it rotates Serf-style
//! (install, use, remove) with joins working at every step, and two blocs that share a secondary
//! key never exchange keys. Each node holds its transient keys in [`TransientKeys`], the key
//! schedule the flock core runs; the rotation of those keys by the leader is the core's, tested
//! in `flock/src/core/tests.rs` and by the simulator's rotation scenario
//! (`tests/sim_scenarios.rs`).

use std::time::Duration;

use crux_flock::crypto::{
    receive, respond, seal_for, Bloc, HandshakeInitiator, Initiation, Keyring, KeyringOp, Origin,
    Purpose, ReplayTable, SecretKey, Tai64N, TransientKeys, ROTATION_MAX,
};
use crux_flock::{BootId, DropReason, NodeId};
use crux_proto::flock::{Header, Kind, DEFAULT_MTU};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

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

    /// Makes a transient key and seals with it, as a leader does.
    fn lead(&mut self, now: Duration, rng: &mut ChaCha20Rng) {
        let epoch = self.transient.make_key(now, self.id, rng).expect("a key");
        self.transient.set_own(epoch);
    }

    fn origin(&mut self) -> Origin {
        self.counter += 1;
        Origin {
            sender: self.id,
            boot: BootId(1),
            counter: self.counter,
        }
    }

    /// Seals a message for `to` under the key this node sends with now.
    fn seal(
        &mut self,
        bloc: &Bloc,
        to: NodeId,
        body: &[u8],
        now: Duration,
        rng: &mut ChaCha20Rng,
    ) -> Vec<u8> {
        self.counter += 1;
        let (epoch, key) = self.transient.sealing_key(None, now).expect("has a key");
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: bloc.tag(),
            key_id: epoch,
            sender: self.id,
            boot: BootId(1),
            counter: self.counter,
        };
        let mut out = Vec::new();
        seal_for(key, &header, to, body, rng, &mut out);
        out
    }

    /// Receives a datagram, as the flock core does.
    fn receive(&mut self, d: &[u8], now: Duration) -> Result<(), DropReason> {
        let mut body = Vec::new();
        receive(
            d,
            DEFAULT_MTU,
            self.id,
            &self.transient,
            &mut self.replay,
            now,
            &mut body,
        )?;
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
        let leader = responder.id;
        for k in keys.previous.iter().chain([&keys.current]) {
            self.transient
                .install(k.epoch, k.key.clone(), leader, now, true);
        }
        self.transient.set_own(keys.current.epoch);
        Ok(())
    }
}

#[test]
fn secondary_keyring_rotation_admits_joiners_at_every_step() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let bloc = Bloc::new("keyring");
    let (old, new) = (SecretKey::generate(&mut rng), SecretKey::generate(&mut rng));
    let now = Duration::from_secs(5);
    let mut member = Node::new(1, &bloc, old.clone());
    member.lead(now, &mut rng);
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
    in_a.lead(now, &mut rng);
    let mut in_b = Node::new(2, &b, shared.clone());
    in_b.lead(now, &mut rng);
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
    let d = in_b.seal(&b, in_a.id, &[PING], now, &mut rng);
    assert_eq!(in_a.receive(&d, now).unwrap_err(), DropReason::WrongBloc);
}
