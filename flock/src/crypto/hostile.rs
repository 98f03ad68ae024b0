//! Deterministic hostile traffic, for tests and benchmarks of the receive path.
//!
//! [`HostileTraffic`] turns a seed and a few recorded valid datagrams (that the target has already
//! accepted) into an endless stream of datagrams none of which may be accepted: random bytes,
//! truncations and bit flips of the recorded ones, exact replays, another bloc's datagrams, the
//! right epoch under the wrong key, unknown epochs, oversized datagrams and junk handshakes.
//! [`insider_join`] gets the transient key of a running [`Flock`] the way a holder of the secondary
//! key could, to seal such valid datagrams. `tests/core_hostile.rs` and the `crypto` benchmark
//! feed the traffic to [`Flock::handle_datagram`].

use std::net::SocketAddr;
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crux_proto::flock::{
    BootId, Header, Kind, NodeId, HEADER_BYTES, MAGIC, MAX_DATAGRAM_BYTES, VERSION,
};

use super::envelope::{max_plaintext, seal, MIN_SEALED_BYTES};
use super::handshake::{HandshakeInitiator, Initiation, Origin, Purpose, REQUEST_BYTES};
use super::keys::{Bloc, PacketKey, SecretKey};
use super::transient::KeyAnnouncement;
use crate::Flock;

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

/// A join handshake with a node, made as any holder of the secondary key could make it (the
/// threat model's insider): what was sent, what came back, and the transient key it brought.
#[derive(Debug)]
pub struct InsiderJoin {
    /// The join request sent.
    pub request: Vec<u8>,
    /// The node's reply.
    pub reply: Vec<u8>,
    /// The node's current transient key, from the reply: seals datagrams the node accepts.
    pub key: KeyAnnouncement,
}

/// Sends `target` a join request under `secondary` from `from` at `now` (a sender id, boot and
/// counter drawn from `rng`), takes the one transmit that answers it, and finishes the handshake.
/// None when the target does not answer (it holds no key yet, or rate-limits `from`) or its reply
/// does not open. Tests and benchmarks use the key to seal valid datagrams for the target.
pub fn insider_join(
    target: &mut Flock,
    now: Duration,
    from: SocketAddr,
    secondary: &SecretKey,
    rng: &mut ChaCha20Rng,
) -> Option<InsiderJoin> {
    let bloc = Bloc::new(&target.config().bloc);
    let origin = Origin {
        sender: NodeId(rng.next_u64()),
        boot: BootId(rng.next_u64()),
        counter: rng.next_u64(),
    };
    let initiation = Initiation {
        purpose: Purpose::Join,
        origin,
        to: target.identity().addr,
        stamp: target.wall_clock(now)?,
        cookie: None,
        context: b"",
    };
    let (initiator, request) = HandshakeInitiator::new(rng, secondary, &bloc, &initiation);
    target.handle_datagram(now, from, &request);
    let reply = target.poll_transmit().filter(|t| t.to == from)?.payload;
    let joined = initiator.finish(&reply).ok()?;
    Some(InsiderJoin {
        request,
        reply,
        key: joined.keys.current,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{receive, seal_for, ReplayTable, TransientKeys, ROTATION_MAX};
    use crate::DropReason;
    use crux_proto::flock::Header;
    use std::collections::{BTreeMap, BTreeSet};

    /// The node the traffic targets, and the node the recorded datagrams came from.
    const ME: NodeId = NodeId(2);
    const PEER: NodeId = NodeId(1);

    /// The flock core's receive path ([`receive`], under the core's [`TransientKeys`]) takes
    /// none of it, and drops some for every reason it checks. (`tests/core_hostile.rs` feeds
    /// the same traffic to a whole [`Flock`].)
    #[test]
    fn nothing_hostile_is_accepted_and_every_attack_appears() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let bloc = Bloc::new("b");
        let mut keys = TransientKeys::new(bloc.clone(), ROTATION_MAX);
        keys.install(
            3,
            SecretKey::generate(&mut rng),
            PEER,
            Duration::ZERO,
            false,
        );
        keys.set_own(3);
        let mut replay = ReplayTable::new(16);
        let mut recorded = Vec::new();
        let mut out = Vec::new();
        for c in 0..4 {
            let (e, k) = keys.sealing_key(None, Duration::ZERO).unwrap();
            let h = Header {
                kind: Kind::Flock,
                bloc_tag: bloc.tag(),
                key_id: e,
                sender: PEER,
                boot: BootId(1),
                counter: c,
            };
            let mut d = Vec::new();
            seal_for(k, &h, ME, &[c as u8; 40], &mut rng, &mut d);
            let now = Duration::from_secs(1);
            assert!(receive(&d, 1400, ME, &keys, &mut replay, now, &mut out).is_ok());
            recorded.push(d);
        }
        let n = 5000;
        let mut t = HostileTraffic::new(1, &bloc, 3, 1400, recorded);
        let mut attacks: BTreeMap<Attack, u64> = BTreeMap::new();
        let mut drops = BTreeSet::new();
        let mut d = Vec::new();
        for _ in 0..n {
            let attack = t.next_into(&mut d);
            *attacks.entry(attack).or_default() += 1;
            let now = Duration::from_secs(2);
            match receive(&d, 1400, ME, &keys, &mut replay, now, &mut out) {
                Ok(h) => panic!("{attack:?} accepted: {h:?}"),
                Err(reason) => {
                    drops.insert(reason);
                }
            }
        }
        assert_eq!(attacks.len(), Attack::ALL.len());
        for attack in Attack::ALL {
            assert!(attacks[&attack] >= n / 10, "{attack:?}: {attacks:?}");
        }
        // Every check of the receive path drops some (handshakes are opened elsewhere).
        for reason in [
            DropReason::Oversized,
            DropReason::Truncated,
            DropReason::BadMagic,
            DropReason::WrongBloc,
            DropReason::UnknownKey,
            DropReason::AuthFailed,
            DropReason::Replay,
            DropReason::Malformed,
        ] {
            assert!(drops.contains(&reason), "no {reason:?}: {drops:?}");
        }
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
}
