//! The handshake decoders: `respond` (a request) and `HandshakeInitiator::finish` (a reply) never
//! panic on arbitrary bytes and never accept them.
#![no_main]

use std::time::Duration;

use crux_flock::crypto::{
    respond, Bloc, HandshakeInitiator, Keyring, Origin, Purpose, SecretKey, TransientKeys,
    ROTATION_MAX,
};
use crux_flock::{BootId, NodeId};
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
    assert!(respond(
        &keyring,
        &bloc,
        data,
        &transient,
        Duration::ZERO,
        origin,
        b"",
        &mut rng
    )
    .is_err());
    let (state, _) =
        HandshakeInitiator::new(&mut rng, &secondary, &bloc, Purpose::Join, origin, b"");
    assert!(state.finish(data).is_err());
});
