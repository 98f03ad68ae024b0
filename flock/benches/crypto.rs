//! Figures for the flock security layer: `cargo bench -p crux-flock --bench crypto`.
//!
//! * seal and open of a 1,400-byte datagram (ns each);
//! * a full join handshake: request, response, finish (µs);
//! * the hostile-input run: 1,000,000 datagrams (random bytes, truncations, bit flips of valid
//!   datagrams, replays, wrong bloc, wrong key, unknown epochs, oversized, junk handshakes)
//!   through a lone secure node's whole receive path ([`Flock::handle_datagram`]: header parse,
//!   open, replay check, handshake rate limit), with wall time, drops by reason and peak memory.
//!   `CRUX_BENCH_HOSTILE=<count>` changes the count. (`tests/core_hostile.rs` checks the same
//!   path under attack in a running flock.)

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crux_flock::config::{AddressSpace, Config, Preset};
use crux_flock::crypto::hostile::{insider_join, HostileTraffic};
use crux_flock::crypto::{
    max_plaintext, open, respond, seal, Bloc, HandshakeInitiator, Initiation, Keyring, Origin,
    PacketKey, Purpose, SecretKey, Tai64N, TransientKeys, ROTATION_MAX,
};
use crux_flock::{BootId, DropReason, Flock, Identity, NodeId, SecurityTiming};
use crux_proto::flock::{
    encode_message, Header, Kind, MemberInfo, MemberState, Message, DEFAULT_MTU,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// Wall time of `f`.
#[allow(clippy::disallowed_methods)] // a benchmark reads the clock
fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// Peak resident set size of this process, from /proc (Linux), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn seal_open(n: u32) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let bloc = Bloc::new("bench");
    let key = PacketKey::transient(&SecretKey::generate(&mut rng), &bloc);
    let plaintext = vec![0x5a; max_plaintext(DEFAULT_MTU)];
    let mut header = Header {
        kind: Kind::Flock,
        bloc_tag: bloc.tag(),
        key_id: 1,
        sender: NodeId(1),
        boot: BootId(1),
        counter: 0,
    };
    let mut sealed = Vec::with_capacity(DEFAULT_MTU);
    let ((), seal_time) = time(|| {
        for c in 0..n {
            header.counter = c as u64;
            sealed.clear();
            seal(&key, &header, &plaintext, &mut rng, &mut sealed);
            black_box(&sealed);
        }
    });
    assert_eq!(sealed.len(), DEFAULT_MTU);
    let mut out = Vec::with_capacity(DEFAULT_MTU);
    let ((), open_time) = time(|| {
        for _ in 0..n {
            open(&key, black_box(&sealed), &mut out).expect("opens");
            black_box(&out);
        }
    });
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    let mbps = |d: Duration| (DEFAULT_MTU as f64 * n as f64) / d.as_secs_f64() / 1e6;
    println!(
        "seal {}-byte datagram: {:>8.0} ns  ({:.0} MB/s)",
        DEFAULT_MTU,
        per(seal_time),
        mbps(seal_time)
    );
    println!(
        "open {}-byte datagram: {:>8.0} ns  ({:.0} MB/s)",
        DEFAULT_MTU,
        per(open_time),
        mbps(open_time)
    );
}

fn handshake(n: u32) {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let bloc = Bloc::new("bench");
    let secondary = SecretKey::generate(&mut rng);
    let keyring = Keyring::new(secondary.clone());
    let mut transient = TransientKeys::new(bloc.clone(), ROTATION_MAX);
    transient.install(
        9,
        SecretKey::generate(&mut rng),
        NodeId(2),
        Duration::ZERO,
        false,
    );
    transient.set_own(9);
    let now = Duration::from_secs(1);
    let me = Origin {
        sender: NodeId(1),
        boot: BootId(1),
        counter: 0,
    };
    let them = Origin {
        sender: NodeId(2),
        boot: BootId(2),
        counter: 0,
    };
    let (mut t_init, mut t_resp, mut t_finish) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        let ((state, request), a) = time(|| {
            HandshakeInitiator::new(
                &mut rng,
                &secondary,
                &bloc,
                &Initiation {
                    purpose: Purpose::Join,
                    origin: me,
                    to: "127.0.0.1:7700".parse().unwrap(),
                    stamp: Tai64N::default(),
                    cookie: None,
                    context: b"",
                },
            )
        });
        let (resp, b) = time(|| {
            respond(
                &keyring, &bloc, &request, &transient, now, them, b"", &mut rng,
            )
            .unwrap()
        });
        let (joined, c) = time(|| state.finish(&resp.reply).unwrap());
        assert_eq!(joined.keys.current.epoch, 9);
        t_init += a;
        t_resp += b;
        t_finish += c;
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "handshake: {:.1} µs total (request {:.1} µs, respond {:.1} µs, finish {:.1} µs)",
        us(t_init + t_resp + t_finish),
        us(t_init),
        us(t_resp),
        us(t_finish)
    );
}

/// Source addresses of the hostile run: few enough that the handshake rate limit bites.
const SOURCES: u64 = 64;

/// A lone secure node that made its own transient key, the traffic against it, and when its
/// clock stands. The traffic replays, truncates and bit-flips 16 pings of a peer (an insider that
/// joined by handshake) that the node has already accepted.
fn hostile_setup(seed: u64) -> (Flock, HostileTraffic, Duration) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let secondary = SecretKey::generate(&mut rng);
    let addr = SocketAddr::from(([127, 0, 0, 1], 7700));
    let mut config = Config::new("hostile-target", Preset::Lan);
    config.space = AddressSpace::parse(&["127.0.0.1"], &[]).expect("space");
    let identity = Identity {
        id: NodeId(1),
        boot: BootId(1),
        addr,
        key: None,
    };
    let (keyring, timing) = (Keyring::new(secondary.clone()), SecurityTiming::default());
    let mut target = Flock::builder(config, identity)
        .keys(keyring, timing)
        .rng_seed([7; 32])
        .start(Duration::ZERO)
        .expect("target");
    let mut now = Duration::ZERO;
    while target.key_epoch().is_none() {
        now = target.poll_timeout().expect("a timer");
        target.handle_timeout(now);
        while target.poll_transmit().is_some() {}
    }
    let peer = SocketAddr::from(([127, 0, 0, 2], 7700));
    let join = insider_join(&mut target, now, peer, &secondary, &mut rng).expect("answered");
    let bloc = Bloc::new("hostile-target");
    let key = PacketKey::transient(&join.key.key, &bloc);
    let me = MemberInfo {
        id: NodeId(0xfeed),
        boot: BootId(1),
        addr: peer,
        incarnation: 0,
        state: MemberState::Alive,
        key: None,
    };
    let mut recorded = Vec::new();
    for counter in 1..=16 {
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: bloc.tag(),
            key_id: join.key.epoch,
            sender: me.id,
            boot: me.boot,
            counter,
        };
        let ping = Message::Ping {
            seq: counter as u32,
            target: None,
            me,
            digest: 0,
            updates: vec![],
        };
        let (mut body, mut d) = (Vec::new(), Vec::new());
        encode_message(&ping, &mut body);
        seal(&key, &header, &body, &mut rng, &mut d);
        let dropped = target.stats().dropped_total();
        target.handle_datagram(now, peer, &d);
        assert_eq!(target.stats().dropped_total(), dropped, "a valid ping");
        recorded.push(d);
    }
    while target.poll_transmit().is_some() {}
    while target.poll_event().is_some() {}
    let traffic = HostileTraffic::new(seed ^ 0x5eed, &bloc, join.key.epoch, DEFAULT_MTU, recorded);
    (target, traffic, now)
}

fn hostile_run(n: u64) {
    let (mut target, mut traffic, start) = hostile_setup(0xbad);
    let before = target.stats().clone();
    let mut attacks = BTreeMap::new();
    let (mut datagram, mut bytes, mut replies) = (Vec::new(), 0u64, 0u64);
    let ((), wall) = time(|| {
        for i in 0..n {
            let attack = traffic.next_into(&mut datagram);
            *attacks.entry(attack).or_insert(0u64) += 1;
            bytes += datagram.len() as u64;
            let host = (i.wrapping_mul(0x9E37_79B9) % SOURCES) as u32;
            let from = SocketAddr::new(IpAddr::from((0x7f00_0100u32 | host).to_be_bytes()), 9);
            let now = start + Duration::from_micros(i);
            target.handle_datagram(now, from, &datagram);
            while target.poll_transmit().is_some() {
                replies += 1;
            }
        }
    });
    let (_, mut traffic, _) = hostile_setup(0xbad);
    let ((), generation) = time(|| {
        for _ in 0..n {
            traffic.next_into(&mut datagram);
            black_box(&datagram);
        }
    });
    assert_eq!(
        target.poll_event(),
        None,
        "a hostile datagram raised an event"
    );
    let after = target.stats();
    let dropped = after.dropped_total() - before.dropped_total();
    assert_eq!(dropped, n, "a hostile datagram was accepted");
    assert_eq!(replies, 0, "a hostile datagram was answered");
    println!(
        "hostile run: {} datagrams ({:.1} MB) in {:.2} s ({:.0} ns per datagram, generation included); \
         accepted 0, replies 0",
        n,
        bytes as f64 / 1e6,
        wall.as_secs_f64(),
        wall.as_nanos() as f64 / n as f64
    );
    let drops: Vec<String> = DropReason::ALL
        .iter()
        .map(|&r| (r, after.dropped(r) - before.dropped(r)))
        .filter(|&(_, c)| c > 0)
        .map(|(r, c)| format!("{}={}", r.as_str(), c))
        .collect();
    println!("  drops by reason: {}", drops.join(" "));
    let attacks: Vec<String> = attacks
        .iter()
        .map(|(a, c)| format!("{}={}", a.as_str(), c))
        .collect();
    println!("  datagrams by attack: {}", attacks.join(" "));
    let handling = wall.saturating_sub(generation);
    println!(
        "  of which generating the datagrams: {:.2} s; receive path alone: {:.2} s ({:.0} ns per datagram)",
        generation.as_secs_f64(),
        handling.as_secs_f64(),
        handling.as_nanos() as f64 / n as f64
    );
    if let Some(kib) = peak_rss_kib() {
        println!(
            "  peak memory (VmHWM of the whole bench process): {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: keep that run short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let hostile_n = std::env::var("CRUX_BENCH_HOSTILE")
        .ok()
        .and_then(|v| v.parse().ok());
    if quick {
        seal_open(2_000);
        handshake(50);
        hostile_run(hostile_n.unwrap_or(10_000));
    } else {
        seal_open(200_000);
        handshake(2_000);
        hostile_run(hostile_n.unwrap_or(1_000_000));
    }
}
