//! Property tests of the security layer that CI runs briefly: opening never panics on arbitrary
//! bytes, and never accepts a sealed datagram that was modified in any way.

use std::time::Duration;

use crux_flock::crypto::{
    check, open, respond, seal, Bloc, HandshakeInitiator, Initiation, Keyring, Origin, PacketKey,
    Purpose, SecretKey, Tai64N, TransientKeys, MAX_SEALED_FRAME_BYTES, ROTATION_MAX,
};
use crux_flock::{BootId, NodeId};
use crux_proto::flock::{Header, Kind, DEFAULT_MTU};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn bloc() -> Bloc {
    Bloc::new("props")
}

fn key() -> PacketKey {
    PacketKey::transient(&SecretKey::from_bytes([3; 32]), &bloc())
}

fn sealed(body: &[u8], counter: u64, seed: u64) -> Vec<u8> {
    let header = Header {
        kind: Kind::Flock,
        bloc_tag: bloc().tag(),
        key_id: 1,
        sender: NodeId(1),
        boot: BootId(2),
        counter,
    };
    let mut out = Vec::new();
    seal(
        &key(),
        &header,
        body,
        &mut ChaCha20Rng::seed_from_u64(seed),
        &mut out,
    );
    out
}

/// A change of a sealed datagram: flip bits in one byte, cut, extend, or splice random bytes.
#[derive(Debug, Clone)]
enum Change {
    Flip(prop::sample::Index, u8),
    Cut(prop::sample::Index),
    Extend(Vec<u8>),
    Overwrite(prop::sample::Index, Vec<u8>),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, x)| Change::Flip(i, x)),
        any::<prop::sample::Index>().prop_map(Change::Cut),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Change::Extend),
        (
            any::<prop::sample::Index>(),
            proptest::collection::vec(any::<u8>(), 1..32)
        )
            .prop_map(|(i, b)| Change::Overwrite(i, b)),
    ]
}

fn apply(mut d: Vec<u8>, c: &Change) -> Vec<u8> {
    match c {
        Change::Flip(i, x) => {
            let at = i.index(d.len());
            d[at] ^= x;
        }
        Change::Cut(i) => d.truncate(i.index(d.len())),
        Change::Extend(more) => d.extend_from_slice(more),
        Change::Overwrite(i, bytes) => {
            let at = i.index(d.len());
            for (j, b) in bytes.iter().enumerate() {
                if let Some(slot) = d.get_mut(at + j) {
                    *slot = *b;
                }
            }
        }
    }
    d
}

/// A join request of `origin` (to an address and at a time these properties do not look at).
fn join_request(origin: Origin) -> Initiation<'static> {
    Initiation {
        purpose: Purpose::Join,
        origin,
        to: "127.0.0.1:7700".parse().unwrap(),
        stamp: Tai64N::default(),
        cookie: None,
        context: b"",
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn open_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut out = Vec::new();
        let _ = check(&bytes, DEFAULT_MTU, bloc().tag());
        let r = open(&key(), &bytes, &mut out);
        prop_assert!(r.is_err());
        prop_assert!(out.is_empty());
    }

    #[test]
    fn open_never_accepts_a_modified_datagram(body in proptest::collection::vec(any::<u8>(), 0..512),
                                              counter in any::<u64>(), seed in any::<u64>(),
                                              change in change()) {
        let good = sealed(&body, counter, seed);
        let mut out = Vec::new();
        prop_assert!(open(&key(), &good, &mut out).is_ok());
        prop_assert_eq!(&out, &body);
        let bad = apply(good.clone(), &change);
        prop_assume!(bad != good);
        let checked = check(&bad, MAX_SEALED_FRAME_BYTES, bloc().tag());
        let opened = open(&key(), &bad, &mut out);
        prop_assert!(checked.is_err() || opened.is_err(), "{:?} accepted", change);
        prop_assert!(opened.is_err(), "{:?} opened", change);
        prop_assert!(out.is_empty());
    }

    #[test]
    fn handshake_decoders_never_panic_or_accept_junk(
        bytes in proptest::collection::vec(any::<u8>(), 0..400), seed in any::<u64>()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let secondary = SecretKey::from_bytes([4; 32]);
        let keyring = Keyring::new(secondary.clone());
        let mut transient = TransientKeys::new(bloc(), ROTATION_MAX);
        transient.install(1, SecretKey::from_bytes([5; 32]), NodeId(2), Duration::ZERO, false);
        transient.set_own(1);
        let origin = Origin { sender: NodeId(1), boot: BootId(1), counter: 0 };
        let r = respond(&keyring, &bloc(), &bytes, &transient, Duration::ZERO, origin, b"", &mut rng);
        prop_assert!(r.is_err());
        let (state, _) = HandshakeInitiator::new(&mut rng, &secondary, &bloc(), &join_request(origin));
        prop_assert!(state.finish(&bytes).is_err());
    }

    #[test]
    fn a_modified_handshake_is_never_accepted(seed in any::<u64>(), change in change()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let secondary = SecretKey::from_bytes([4; 32]);
        let keyring = Keyring::new(secondary.clone());
        let mut transient = TransientKeys::new(bloc(), ROTATION_MAX);
        transient.install(1, SecretKey::from_bytes([5; 32]), NodeId(2), Duration::ZERO, false);
        transient.set_own(1);
        let me = Origin { sender: NodeId(1), boot: BootId(1), counter: 0 };
        let them = Origin { sender: NodeId(2), boot: BootId(2), counter: 0 };
        let (state, request) = HandshakeInitiator::new(&mut rng, &secondary, &bloc(), &join_request(me));
        let bad = apply(request.clone(), &change);
        if bad != request {
            let r = respond(&keyring, &bloc(), &bad, &transient, Duration::ZERO, them, b"", &mut rng);
            prop_assert!(r.is_err());
        }
        let reply = respond(&keyring, &bloc(), &request, &transient, Duration::ZERO, them, b"", &mut rng)
            .unwrap()
            .reply;
        let bad = apply(reply.clone(), &change);
        if bad != reply {
            prop_assert!(state.finish(&bad).is_err());
        }
        prop_assert!(state.finish(&reply).is_ok());
    }
}
