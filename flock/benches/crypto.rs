//! Figures for the flock security layer: `cargo bench -p crux-flock --bench crypto`.
//!
//! * seal and open of a 1,400-byte datagram (ns each);
//! * a full join handshake: request, response, finish (µs);
//! * the hostile-input run: 1,000,000 datagrams (random bytes, truncations, bit flips of valid
//!   datagrams, replays, wrong bloc, wrong key, unknown epochs, oversized, junk handshakes)
//!   through header parse + open + replay check + handshake rate limit, with wall time, drops by
//!   reason and peak memory. `CRUX_BENCH_HOSTILE=<count>` changes the count.

use std::hint::black_box;
use std::time::{Duration, Instant};

use crux_flock::crypto::{
    hostile, max_plaintext, open, respond, seal, Bloc, HandshakeInitiator, Keyring, Origin,
    PacketKey, Purpose, SecretKey, TransientKeys, ROTATION_MAX,
};
use crux_flock::{BootId, NodeId};
use crux_proto::flock::{Header, Kind, DEFAULT_MTU};
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
    transient.install(9, SecretKey::generate(&mut rng), Duration::ZERO);
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
        let ((state, request), a) =
            time(|| HandshakeInitiator::new(&mut rng, &secondary, &bloc, Purpose::Join, me, b""));
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

fn hostile_run(n: u64) {
    let (report, wall) = time(|| hostile::run(0xbad, n));
    let (_, mut traffic) = hostile::setup(0xbad);
    let mut d = Vec::new();
    let ((), generation) = time(|| {
        for _ in 0..n {
            traffic.next_into(&mut d);
            black_box(&d);
        }
    });
    assert_eq!(report.accepted, 0, "a hostile datagram was accepted");
    assert_eq!(report.replies, 0, "a hostile datagram was answered");
    assert_eq!(report.drops.values().sum::<u64>(), n);
    println!(
        "hostile run: {} datagrams ({:.1} MB) in {:.2} s ({:.0} ns per datagram, generation included); \
         accepted 0, replies 0",
        n,
        report.bytes as f64 / 1e6,
        wall.as_secs_f64(),
        wall.as_nanos() as f64 / n as f64
    );
    let drops: Vec<String> = report
        .drops
        .iter()
        .map(|(r, c)| format!("{}={}", r.as_str(), c))
        .collect();
    println!("  drops by reason: {}", drops.join(" "));
    let attacks: Vec<String> = report
        .attacks
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
