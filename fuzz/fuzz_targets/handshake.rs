//! The handshake decoders: `respond` (a request) and `HandshakeInitiator::finish` (a reply) never
//! panic on arbitrary bytes and never accept them; nor does `Security::open_datagram`, the whole
//! receive path, with a handshake pending.
#![no_main]

use std::net::IpAddr;
use std::time::Duration;

use crux_flock::crypto::{
    respond, Bloc, HandshakeInitiator, Keyring, Origin, Purpose, SecretKey, Security,
    SecurityConfig, TransientKeys, ROTATION_MAX,
};
use crux_flock::{BootId, NodeId};
use crux_proto::flock::DEFAULT_MTU;
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fuzz_target!(|data: &[u8]| {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let bloc = Bloc::new("fuzz");
    let secondary = SecretKey::from_bytes([2; 32]);
    let keyring = Keyring::new(secondary.clone());
    let mut transient = TransientKeys::new(bloc.clone(), ROTATION_MAX);
    transient.install(1, SecretKey::from_bytes([3; 32]), Duration::ZERO);
    let origin = Origin {
        sender: NodeId(1),
        boot: BootId(1),
        counter: 0,
    };
    let now = Duration::ZERO;
    let answered = respond(
        &keyring, &bloc, data, &transient, now, origin, b"", &mut rng,
    );
    assert!(answered.is_err());
    let (state, _) =
        HandshakeInitiator::new(&mut rng, &secondary, &bloc, Purpose::Join, origin, b"");
    assert!(state.finish(data).is_err());

    let config = SecurityConfig::new("fuzz", DEFAULT_MTU);
    let mut node = Security::new(&config, keyring, NodeId(2), BootId(2));
    node.rotate_if_due(now, &mut rng);
    node.start_handshake(now, Purpose::KeyRequest, b"", &mut rng);
    let mut out = Vec::new();
    let from = IpAddr::from([127, 0, 0, 9]);
    assert!(node
        .open_datagram(now, from, data, b"", &mut rng, &mut out)
        .is_err());
    assert!(node.open_frame(now, data, &mut out).is_err());
});
