//! The envelope: `check`, `open` and `receive` never panic on arbitrary bytes and never accept
//! them; a datagram sealed from fuzzer-chosen fields opens to the same body, and the same datagram
//! with one fuzzer-chosen byte changed does not open.
#![no_main]

use std::time::Duration;

use crux_flock::crypto::{
    check, open, receive, seal, Bloc, PacketKey, ReplayTable, SecretKey, TransientKeys,
    MAX_SEALED_FRAME_BYTES, ROTATION_MAX,
};
use crux_flock::{BootId, NodeId};
use crux_proto::flock::{Header, Kind, DEFAULT_MTU};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fuzz_target!(|data: &[u8]| {
    let bloc = Bloc::new("fuzz");
    let mut transient = TransientKeys::new(bloc.clone(), ROTATION_MAX);
    transient.install(1, SecretKey::from_bytes([1; 32]), NodeId(7), Duration::ZERO, false);
    transient.set_own(1);
    let key = PacketKey::transient(&SecretKey::from_bytes([1; 32]), &bloc);
    let mut replay = ReplayTable::new(4);
    let mut out = Vec::new();

    // Arbitrary bytes: never accepted.
    let _ = check(data, MAX_SEALED_FRAME_BYTES, bloc.tag());
    assert!(open(&key, data, &mut out).is_err());
    let r = receive(
        data,
        DEFAULT_MTU,
        NodeId(2),
        &transient,
        &mut replay,
        Duration::ZERO,
        &mut out,
    );
    assert!(r.is_err());

    // Sealed from fuzzer-chosen fields: opens; one changed byte: does not.
    if data.len() < 11 {
        return;
    }
    let counter = u64::from_le_bytes(data[..8].try_into().unwrap());
    let (at, flip) = (
        u16::from_le_bytes([data[8], data[9]]) as usize,
        data[10] | 1,
    );
    let body = &data[11..];
    let header = Header {
        kind: Kind::Flock,
        bloc_tag: bloc.tag(),
        key_id: 1,
        sender: NodeId(7),
        boot: BootId(7),
        counter,
    };
    let mut sealed = Vec::new();
    seal(
        &key,
        &header,
        body,
        &mut ChaCha20Rng::seed_from_u64(counter),
        &mut sealed,
    );
    assert_eq!(
        open(&key, &sealed, &mut out).expect("sealed datagram opens"),
        header
    );
    assert_eq!(out, body);
    let at = at % sealed.len();
    sealed[at] ^= flip;
    assert!(open(&key, &sealed, &mut out).is_err());
});
