//! The handshake decoders: `respond` (a request) and `HandshakeInitiator::finish` (a reply) never
//! panic on arbitrary bytes and never accept them; nor does a secure node's whole receive path
//! (`Flock::handle_datagram`, `Flock::handle_stream`), whether it waits on its join handshake or
//! holds a key of its own: the input is dropped, counted once, and answered with nothing.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use crux_flock::config::{AddressSpace, Config, Preset};
use crux_flock::crypto::{
    respond, Bloc, HandshakeInitiator, Initiation, Keyring, Origin, Purpose, SecretKey, Tai64N,
    TransientKeys, ROTATION_MAX,
};
use crux_flock::{BootId, Flock, Identity, NodeId, SecurityTiming};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// A secure node of bloc "fuzz" at 127.0.0.`i`, probing the addresses of `space`.
fn node(i: u8, space: &str, keyring: &Keyring) -> Flock {
    let mut config = Config::new("fuzz", Preset::Lan);
    config.space = AddressSpace::parse(&[space], &[]).expect("space");
    let identity = Identity {
        id: NodeId(i as u64),
        boot: BootId(i as u64),
        addr: SocketAddr::from(([127, 0, 0, i], 7700)),
        key: None,
    };
    let timing = SecurityTiming::default();
    Flock::builder(config, identity)
        .keys(keyring.clone(), timing)
        .rng_seed([i; 32])
        .start(Duration::ZERO)
        .expect("node")
}

/// Runs `f`'s timers until `done` holds; returns the time then, with its output drained.
fn run_until(f: &mut Flock, done: impl Fn(&Flock) -> bool) -> Duration {
    let mut now = Duration::ZERO;
    while !done(f) {
        now = f.poll_timeout().expect("a timer");
        f.handle_timeout(now);
    }
    while f.poll_transmit().is_some() {}
    while f.poll_event().is_some() {}
    now
}

fuzz_target!(|data: &[u8]| {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let bloc = Bloc::new("fuzz");
    let secondary = SecretKey::from_bytes([2; 32]);
    let keyring = Keyring::new(secondary.clone());
    let mut transient = TransientKeys::new(bloc.clone(), ROTATION_MAX);
    transient.install(1, SecretKey::from_bytes([3; 32]), NodeId(2), Duration::ZERO, false);
    transient.set_own(1);
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
    let initiation = Initiation {
        purpose: Purpose::Join,
        origin,
        to: SocketAddr::from(([127, 0, 0, 2], 7700)),
        stamp: Tai64N::default(),
        cookie: None,
        context: b"",
    };
    let (state, _) = HandshakeInitiator::new(&mut rng, &secondary, &bloc, &initiation);
    assert!(state.finish(data).is_err());
    assert!(state.finish_cookie(data).is_err());

    // One node waits on the join handshake it sent to its neighbour; a lone one made a key.
    let mut joining = node(2, "127.0.0.2-127.0.0.3", &keyring);
    let joining_now = run_until(&mut joining, |f| f.stats().handshakes_sent > 0);
    let mut alone = node(4, "127.0.0.4", &keyring);
    let alone_now = run_until(&mut alone, |f| f.key_epoch().is_some());
    let from = SocketAddr::from(([127, 0, 0, 9], 9));
    for (f, now) in [(&mut joining, joining_now), (&mut alone, alone_now)] {
        let dropped = f.stats().dropped_total();
        f.handle_datagram(now, from, data);
        assert_eq!(f.stats().dropped_total(), dropped + 1);
        assert!(f.handle_stream(now, from, data).is_none());
        assert_eq!(f.stats().dropped_total(), dropped + 2);
        assert!(f.poll_transmit().is_none());
        assert!(f.poll_event().is_none());
    }
});
