//! Deterministic hostile traffic, for tests and benchmarks of the receive path.
//!
//! [`HostileTraffic`] turns a seed and a few recorded valid datagrams (that the target has already
//! accepted) into an endless stream of datagrams none of which may be accepted: random bytes,
//! truncations and bit flips of the recorded ones, exact replays, another bloc's datagrams, the
//! right epoch under the wrong key, unknown epochs, oversized datagrams and junk handshakes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crux_proto::flock::{
    BootId, Header, Kind, NodeId, DEFAULT_MTU, HEADER_BYTES, MAGIC, MAX_DATAGRAM_BYTES, VERSION,
};

use super::envelope::{max_plaintext, seal, MIN_SEALED_BYTES};
use super::handshake::REQUEST_BYTES;
use super::keyring::Keyring;
use super::keys::{Bloc, PacketKey, SecretKey};
use super::security::{Inbound, Security, SecurityConfig};
use crate::DropReason;

/// One kind of hostile datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attack {
    /// Random bytes (sometimes behind a valid magic, version and our bloc tag).
    RandomBytes,
    /// A recorded datagram cut short.
    Truncated,
    /// A recorded datagram with 1–3 bits flipped.
    BitFlip,
    /// A recorded datagram, again.
    Replay,
    /// Sealed by another bloc (its tag, its derived key).
    WrongBloc,
    /// Our tag and current epoch, sealed under a key we do not hold.
    WrongKey,
    /// Our tag, an epoch we do not hold.
    UnknownEpoch,
    /// Longer than the MTU.
    Oversized,
    /// A handshake-kind datagram of random content and key id.
    HandshakeJunk,
}

impl Attack {
    /// Every attack, in the order [`HostileTraffic`] cycles through them.
    pub const ALL: [Attack; 9] = [
        Attack::RandomBytes,
        Attack::Truncated,
        Attack::BitFlip,
        Attack::Replay,
        Attack::WrongBloc,
        Attack::WrongKey,
        Attack::UnknownEpoch,
        Attack::Oversized,
        Attack::HandshakeJunk,
    ];

    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Attack::RandomBytes => "random_bytes",
            Attack::Truncated => "truncated",
            Attack::BitFlip => "bit_flip",
            Attack::Replay => "replay",
            Attack::WrongBloc => "wrong_bloc",
            Attack::WrongKey => "wrong_key",
            Attack::UnknownEpoch => "unknown_epoch",
            Attack::Oversized => "oversized",
            Attack::HandshakeJunk => "handshake_junk",
        }
    }
}

/// A deterministic generator of hostile datagrams aimed at one node.
pub struct HostileTraffic {
    rng: ChaCha20Rng,
    bloc_tag: u32,
    epoch: u32,
    mtu: usize,
    recorded: Vec<Vec<u8>>,
    foreign_tag: u32,
    foreign: PacketKey,
    wrong: PacketKey,
    next: usize,
}

impl std::fmt::Debug for HostileTraffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileTraffic")
            .field("recorded", &self.recorded.len())
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

impl HostileTraffic {
    /// Traffic against a node of `bloc` whose current transient epoch is `epoch` and whose MTU is
    /// `mtu`. `recorded` are valid sealed datagrams the node has already accepted (at least one,
    /// each at least a header long); the same `seed` gives the same stream.
    pub fn new(seed: u64, bloc: &Bloc, epoch: u32, mtu: usize, recorded: Vec<Vec<u8>>) -> Self {
        assert!(
            !recorded.is_empty() && recorded.iter().all(|d| d.len() >= MIN_SEALED_BYTES),
            "hostile traffic needs recorded sealed datagrams"
        );
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let foreign_bloc = Bloc::new(&format!("not-{:08x}-{}", bloc.tag(), rng.next_u32()));
        let foreign = PacketKey::transient(&SecretKey::generate(&mut rng), &foreign_bloc);
        let wrong = PacketKey::transient(&SecretKey::generate(&mut rng), bloc);
        HostileTraffic {
            rng,
            bloc_tag: bloc.tag(),
            epoch,
            mtu,
            recorded,
            foreign_tag: foreign_bloc.tag(),
            foreign,
            wrong,
            next: 0,
        }
    }

    /// Writes the next hostile datagram into `out` (replacing its contents) and says which attack
    /// it is. Attacks take turns.
    pub fn next_into(&mut self, out: &mut Vec<u8>) -> Attack {
        out.clear();
        let attack = Attack::ALL[self.next % Attack::ALL.len()];
        self.next += 1;
        let pick = self.rng.gen_range(0..self.recorded.len());
        match attack {
            Attack::RandomBytes => {
                let len = self.rng.gen_range(0..=self.mtu);
                out.resize(len, 0);
                self.rng.fill_bytes(out);
                let style = self.rng.gen_range(0..3);
                if style >= 1 && len >= HEADER_BYTES {
                    out[..2].copy_from_slice(&MAGIC);
                    out[2] = VERSION;
                    out[3] = self.rng.gen_range(0..2);
                    if style == 2 {
                        out[4..8].copy_from_slice(&self.bloc_tag.to_le_bytes());
                    }
                }
            }
            Attack::Truncated => {
                let d = &self.recorded[pick];
                let len = self.rng.gen_range(0..d.len());
                out.extend_from_slice(&d[..len]);
            }
            Attack::BitFlip => {
                out.extend_from_slice(&self.recorded[pick]);
                for _ in 0..self.rng.gen_range(1..=3) {
                    let bit = self.rng.gen_range(0..out.len() * 8);
                    out[bit / 8] ^= 1 << (bit % 8);
                }
                if out[..] == self.recorded[pick][..] {
                    // Flips that cancelled out: flip one more.
                    out[0] ^= 1;
                }
            }
            Attack::Replay => out.extend_from_slice(&self.recorded[pick]),
            Attack::WrongBloc => {
                let header = self.header(Kind::Flock, self.foreign_tag, self.epoch);
                self.seal_random(&header, Which::Foreign, out);
            }
            Attack::WrongKey => {
                let header = self.header(Kind::Flock, self.bloc_tag, self.epoch);
                self.seal_random(&header, Which::Wrong, out);
            }
            Attack::UnknownEpoch => {
                let mut epoch = self.rng.next_u32();
                if epoch == self.epoch || epoch == self.epoch.wrapping_sub(1) {
                    epoch = self.epoch.wrapping_add(2);
                }
                let header = self.header(Kind::Flock, self.bloc_tag, epoch);
                self.seal_random(&header, Which::Wrong, out);
            }
            Attack::Oversized => {
                let len = self
                    .rng
                    .gen_range(self.mtu + 1..=MAX_DATAGRAM_BYTES.max(self.mtu + 1));
                out.extend_from_slice(&self.recorded[pick]);
                out.resize(len, 0xA5);
            }
            Attack::HandshakeJunk => {
                let key_id = self.rng.next_u32();
                let header = self.header(Kind::Handshake, self.bloc_tag, key_id);
                header.write(out);
                let len = if self.rng.gen_bool(0.5) {
                    REQUEST_BYTES
                } else {
                    self.rng
                        .gen_range(HEADER_BYTES..=self.mtu.max(HEADER_BYTES))
                };
                out.resize(len, 0);
                self.rng.fill_bytes(&mut out[HEADER_BYTES..]);
            }
        }
        attack
    }

    fn header(&mut self, kind: Kind, bloc_tag: u32, key_id: u32) -> Header {
        Header {
            kind,
            bloc_tag,
            key_id,
            sender: NodeId(self.rng.next_u64()),
            boot: BootId(self.rng.next_u64()),
            counter: self.rng.next_u64(),
        }
    }

    fn seal_random(&mut self, header: &Header, which: Which, out: &mut Vec<u8>) {
        let len = self.rng.gen_range(0..=max_plaintext(self.mtu).min(256));
        let mut body = [0u8; 256];
        self.rng.fill_bytes(&mut body[..len]);
        let key = match which {
            Which::Foreign => &self.foreign,
            Which::Wrong => &self.wrong,
        };
        seal(key, header, &body[..len], &mut self.rng, out);
    }
}

enum Which {
    Foreign,
    Wrong,
}

/// A node under attack: its [`Security`] state (the whole receive path the core runs) and the
/// RNG it answers handshakes with.
#[derive(Debug)]
pub struct Target {
    /// The node's security state (node id 1, boot 1).
    pub security: Security,
    rng: ChaCha20Rng,
}

/// What a hostile run saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostileReport {
    /// Datagrams fed.
    pub datagrams: u64,
    /// Bytes fed.
    pub bytes: u64,
    /// Datagrams that were accepted (must stay 0).
    pub accepted: u64,
    /// Replies the node would have sent (must stay 0).
    pub replies: u64,
    /// Drops by reason.
    pub drops: BTreeMap<DropReason, u64>,
    /// Datagrams fed, by attack.
    pub attacks: BTreeMap<Attack, u64>,
    /// Replay windows held at the end (bounded; only authenticated senders get one).
    pub replay_windows: usize,
    /// Sources in the rate limiter at the end (bounded).
    pub limiter_sources: usize,
}

impl Target {
    /// A node of bloc `"hostile-target"`, MTU [`DEFAULT_MTU`], holding a transient key made at
    /// time 0, tables bounded at 1,024 entries. Returns it with `n_recorded` valid datagrams from
    /// a peer that it has already accepted (material for replays, truncations and bit flips).
    pub fn new(seed: u64, n_recorded: usize) -> (Target, Vec<Vec<u8>>) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut config = SecurityConfig::new("hostile-target", DEFAULT_MTU);
        config.max_senders = 1024;
        config.max_sources = 1024;
        let keyring = Keyring::new(SecretKey::generate(&mut rng));
        let mut security = Security::new(&config, keyring, NodeId(1), BootId(1));
        security
            .rotate_if_due(Duration::ZERO, &mut rng)
            .expect("a first key");
        let mut recorded = Vec::new();
        let mut out = Vec::new();
        for c in 0..n_recorded.max(1) as u64 {
            let (epoch, key) = security
                .transient()
                .sealing_key(Duration::ZERO)
                .expect("a key");
            let header = Header {
                kind: Kind::Flock,
                bloc_tag: security.bloc().tag(),
                key_id: epoch,
                sender: NodeId(0xfeed),
                boot: BootId(1),
                counter: c,
            };
            let len = rng.gen_range(0..=256);
            let mut body = vec![0u8; len];
            rng.fill_bytes(&mut body);
            let mut d = Vec::new();
            seal(key, &header, &body, &mut rng, &mut d);
            recorded.push(d);
        }
        let mut target = Target { security, rng };
        for d in &recorded {
            target
                .handle(Duration::ZERO, IpAddr::from([127, 0, 0, 2]), d, &mut out)
                .expect("valid");
        }
        (target, recorded)
    }

    /// Handles one datagram from `from` at `now` ([`Security::open_datagram`]).
    pub fn handle(
        &mut self,
        now: Duration,
        from: IpAddr,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Inbound, DropReason> {
        self.security
            .open_datagram(now, from, bytes, b"", &mut self.rng, out)
    }
}

/// The target and the traffic a [`run`] with this seed uses (to time the generation alone).
pub fn setup(seed: u64) -> (Target, HostileTraffic) {
    let (target, recorded) = Target::new(seed, 16);
    let security = &target.security;
    let epoch = security.transient().current_epoch().expect("installed");
    let traffic = HostileTraffic::new(seed ^ 0x5eed, security.bloc(), epoch, DEFAULT_MTU, recorded);
    (target, traffic)
}

/// Source addresses of a hostile [`run`]: few enough that the handshake rate limit bites.
pub const SOURCES: u64 = 64;

/// Feeds `n` hostile datagrams (seeded by `seed`) to a fresh [`Target`], from [`SOURCES`] source
/// addresses in 127.0.0.0/8 (values only: nothing is sent), one microsecond apart, and reports.
pub fn run(seed: u64, n: u64) -> HostileReport {
    let (mut target, mut traffic) = setup(seed);
    let mut report = HostileReport::default();
    let (mut datagram, mut out) = (Vec::new(), Vec::new());
    for i in 0..n {
        let attack = traffic.next_into(&mut datagram);
        *report.attacks.entry(attack).or_default() += 1;
        report.datagrams += 1;
        report.bytes += datagram.len() as u64;
        let source = (i.wrapping_mul(0x9E37_79B9) % SOURCES) as u32;
        let from = IpAddr::from((0x7f00_0000u32 | source).to_be_bytes());
        let now = Duration::from_secs(1) + Duration::from_micros(i);
        match target.handle(now, from, &datagram, &mut out) {
            Ok(Inbound::Reply { .. }) => report.replies += 1,
            Ok(_) => report.accepted += 1,
            Err(reason) => *report.drops.entry(reason).or_default() += 1,
        }
    }
    report.replay_windows = target.security.replay().len();
    report.limiter_sources = target.security.limiter().len();
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{receive, ReplayTable, TransientKeys, ROTATION_MAX};
    use std::time::Duration;

    #[test]
    fn nothing_hostile_is_accepted_and_every_attack_appears() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let bloc = Bloc::new("b");
        let mut keys = TransientKeys::new(bloc.clone(), ROTATION_MAX);
        keys.install(3, SecretKey::generate(&mut rng), Duration::ZERO);
        let mut replay = ReplayTable::new(16);
        let mut recorded = Vec::new();
        let mut out = Vec::new();
        for c in 0..4 {
            let (e, k) = keys.sealing_key(Duration::ZERO).unwrap();
            let h = Header {
                kind: Kind::Flock,
                bloc_tag: bloc.tag(),
                key_id: e,
                sender: NodeId(1),
                boot: BootId(1),
                counter: c,
            };
            let mut d = Vec::new();
            seal(k, &h, &[c as u8; 40], &mut rng, &mut d);
            let now = Duration::from_secs(1);
            assert!(
                receive::receive(&d, 1400, bloc.tag(), &keys, &mut replay, now, &mut out).is_ok()
            );
            recorded.push(d);
        }
        let mut t = HostileTraffic::new(1, &bloc, 3, 1400, recorded);
        let mut seen = std::collections::BTreeSet::new();
        let mut d = Vec::new();
        for _ in 0..5000 {
            let attack = t.next_into(&mut d);
            seen.insert(attack);
            let now = Duration::from_secs(2);
            match receive::receive(&d, 1400, bloc.tag(), &keys, &mut replay, now, &mut out) {
                Ok(receive::Received::Handshake(_)) => {
                    assert!(matches!(
                        attack,
                        Attack::HandshakeJunk | Attack::RandomBytes | Attack::BitFlip
                    ))
                }
                Ok(r) => panic!("{attack:?} accepted: {r:?}"),
                Err(_) => {}
            }
        }
        assert_eq!(seen.len(), Attack::ALL.len());
        assert_eq!(replay.len(), 1, "no window for forged senders");
        let again: Vec<u8> = {
            let mut t2 = HostileTraffic::new(1, &bloc, 3, 1400, t.recorded.clone());
            let mut d2 = Vec::new();
            t2.next_into(&mut d2);
            d2
        };
        let mut t3 = HostileTraffic::new(1, &bloc, 3, 1400, t.recorded.clone());
        let mut d3 = Vec::new();
        t3.next_into(&mut d3);
        assert_eq!(again, d3, "deterministic");
    }

    #[test]
    fn a_hostile_run_accepts_nothing_and_counts_every_drop() {
        let report = run(7, 20_000);
        assert_eq!(report.datagrams, 20_000);
        assert_eq!((report.accepted, report.replies), (0, 0));
        assert_eq!(report.drops.values().sum::<u64>(), 20_000);
        for reason in [
            DropReason::Oversized,
            DropReason::Truncated,
            DropReason::BadMagic,
            DropReason::WrongBloc,
            DropReason::UnknownKey,
            DropReason::AuthFailed,
            DropReason::Replay,
            DropReason::RateLimited,
        ] {
            assert!(
                report.drops.get(&reason).copied().unwrap_or(0) > 0,
                "{reason:?}: {report:?}"
            );
        }
        assert_eq!(run(7, 2_000), run(7, 2_000), "deterministic");
    }

    #[test]
    fn a_target_answers_a_real_handshake() {
        let (mut target, _) = Target::new(3, 1);
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let origin = crate::crypto::Origin {
            sender: NodeId(5),
            boot: BootId(5),
            counter: 0,
        };
        let (state, request) = crate::crypto::HandshakeInitiator::new(
            &mut rng,
            target.security.keyring().primary(),
            target.security.bloc(),
            crate::crypto::Purpose::Join,
            origin,
            b"",
        );
        let mut out = Vec::new();
        let from = IpAddr::from([127, 0, 0, 5]);
        let Inbound::Reply { reply, .. } = target
            .handle(Duration::from_secs(1), from, &request, &mut out)
            .unwrap()
        else {
            panic!("expected a reply")
        };
        let epoch = target.security.transient().current_epoch();
        assert_eq!(
            Some(state.finish(&reply).unwrap().keys.current.epoch),
            epoch
        );
        let again = target.handle(Duration::from_secs(1), from, &request, &mut out);
        assert_eq!(again.unwrap_err(), DropReason::Replay);
    }
}
