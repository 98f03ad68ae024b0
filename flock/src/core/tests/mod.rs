//! Tests of the state machine: exact outputs for small cases, and a tiny lossless in-process
//! harness ([`Harness`]) for whole-flock behaviour. One file per concern.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{
    encode_message, Header, Kind, MemberInfo, MemberState, Message, NodeId, NodeKey,
};

use super::*;
use crate::config::{bloc_tag, AddressSpace, Config, Preset};

mod detect;
mod dissemination;
mod inbound;
mod keys;
mod leader;
mod membership;

pub(super) fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 7700))
}

pub(super) fn config(space: &str) -> Config {
    let mut c = Config::new("test-bloc", Preset::Lan);
    c.space = AddressSpace::parse(&[space], &[]).unwrap();
    c
}

pub(super) fn node(i: u8, space: &str) -> Flock {
    let id = Identity {
        id: NodeId(i as u64 * 1000),
        boot: crate::boot_id(1, i as u16),
        addr: addr(i),
        key: None,
    };
    Flock::builder(config(space), id)
        .sim_seed(i as u64)
        .start(Duration::ZERO)
        .unwrap()
}

/// Builds a datagram as node `sender` would.
pub(super) fn datagram(sender: u64, bloc: &str, msg: &Message) -> Vec<u8> {
    let header = Header {
        kind: Kind::Flock,
        bloc_tag: bloc_tag(bloc),
        key_id: 0,
        sender: NodeId(sender),
        boot: crate::boot_id(1, 1),
        counter: 1,
    };
    let mut out = Vec::new();
    header.write(&mut out);
    encode_message(msg, &mut out);
    out
}

pub(super) fn peer_info(id: u64, a: SocketAddr) -> MemberInfo {
    MemberInfo {
        id: NodeId(id),
        boot: crate::boot_id(1, 1),
        addr: a,
        incarnation: 0,
        state: MemberState::Alive,
        key: None,
    }
}

pub(super) fn drain(f: &mut Flock) -> (Vec<Transmit>, Vec<Event>) {
    let mut t = Vec::new();
    let mut e = Vec::new();
    while let Some(x) = f.poll_transmit() {
        t.push(x);
    }
    while let Some(x) = f.poll_event() {
        e.push(x);
    }
    (t, e)
}

/// A secure node that rotates its transient key every 3–6 s (when it leads).
pub(super) fn secure_node(i: u8, space: &str, keyring: &crate::crypto::Keyring) -> Flock {
    secure_node_salted(i, space, keyring, 0)
}

/// A secure node whose rng seed also depends on `salt`: the same flock with other timer offsets.
pub(super) fn secure_node_salted(
    i: u8,
    space: &str,
    keyring: &crate::crypto::Keyring,
    salt: u8,
) -> Flock {
    let timing = SecurityTiming {
        rotation_min: Duration::from_secs(3),
        rotation_max: Duration::from_secs(6),
    };
    secure_node_timed(i, space, keyring, timing, salt)
}

pub(super) fn secure_node_timed(
    i: u8,
    space: &str,
    keyring: &crate::crypto::Keyring,
    timing: SecurityTiming,
    salt: u8,
) -> Flock {
    let id = Identity {
        id: NodeId(i as u64 * 1000),
        boot: crate::boot_id(1, i as u16),
        addr: addr(i),
        key: Some(NodeKey([i; 32])),
    };
    let mut seed = [0u8; 32];
    seed[0] = i;
    seed[1] = salt;
    Flock::builder(config(space), id)
        .keys(keyring.clone(), timing)
        .rng_seed(seed)
        .start(Duration::ZERO)
        .unwrap()
}

pub(super) fn test_keyring(b: u8) -> crate::crypto::Keyring {
    crate::crypto::Keyring::new(crate::crypto::SecretKey::from_bytes([b; 32]))
}

/// Lossless, zero-latency network of nodes driven in virtual time.
pub(super) struct Harness {
    pub(super) nodes: Vec<Option<Flock>>,
    pub(super) now: Duration,
    /// Datagrams between these two addresses (either way) are lost; streams still pass.
    pub(super) datagram_cut: Option<(SocketAddr, SocketAddr)>,
}

impl Harness {
    pub(super) fn of(nodes: Vec<Option<Flock>>) -> Harness {
        Harness {
            nodes,
            now: Duration::ZERO,
            datagram_cut: None,
        }
    }

    pub(super) fn new(n: u8) -> Harness {
        let space = format!("127.0.0.2-127.0.0.{}", n + 1);
        Harness {
            nodes: (2..n + 2).map(|i| Some(node(i, &space))).collect(),
            now: Duration::ZERO,
            datagram_cut: None,
        }
    }

    pub(super) fn secure(n: u8) -> Harness {
        Harness::secure_salted(n, 0)
    }

    pub(super) fn secure_salted(n: u8, salt: u8) -> Harness {
        let space = format!("127.0.0.2-127.0.0.{}", n + 1);
        let ring = test_keyring(7);
        Harness {
            nodes: (2..n + 2)
                .map(|i| Some(secure_node_salted(i, &space, &ring, salt)))
                .collect(),
            now: Duration::ZERO,
            datagram_cut: None,
        }
    }

    pub(super) fn index_of(&self, a: SocketAddr) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.as_ref().is_some_and(|f| f.identity().addr == a))
    }

    pub(super) fn flush(&mut self) {
        self.flush_cut(None);
    }

    /// Delivers everything queued; datagrams to or from `cut` are lost.
    pub(super) fn flush_cut(&mut self, cut: Option<SocketAddr>) {
        let mut queue: VecDeque<(SocketAddr, Transmit)> = VecDeque::new();
        loop {
            for f in self.nodes.iter_mut().flatten() {
                while let Some(t) = f.poll_transmit() {
                    queue.push_back((f.identity().addr, t));
                }
                while f.poll_event().is_some() {}
            }
            let Some((from, t)) = queue.pop_front() else {
                break;
            };
            let Some(i) = self.index_of(t.to) else {
                continue;
            };
            if cut.is_some_and(|c| c == from || c == t.to) {
                continue;
            }
            let now = self.now;
            let cut = self
                .datagram_cut
                .is_some_and(|(a, b)| (from, t.to) == (a, b) || (from, t.to) == (b, a));
            match t.kind {
                TransmitKind::Datagram if cut => {}
                TransmitKind::Datagram => self.nodes[i]
                    .as_mut()
                    .unwrap()
                    .handle_datagram(now, from, &t.payload),
                TransmitKind::Stream => {
                    let reply = self.nodes[i]
                        .as_mut()
                        .unwrap()
                        .handle_stream(now, from, &t.payload);
                    if let (Some(reply), Some(j)) = (reply, self.index_of(from)) {
                        self.nodes[j]
                            .as_mut()
                            .unwrap()
                            .handle_stream_reply(now, t.to, &reply);
                    }
                }
            }
        }
    }

    pub(super) fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.flush();
        while self.advance(end) {
            self.flush();
        }
        self.now = end;
    }

    /// Runs the timers of the next deadline up to `end` (what they send stays queued until a
    /// flush); false when none is due by then.
    pub(super) fn advance(&mut self, end: Duration) -> bool {
        let next = self
            .nodes
            .iter()
            .flatten()
            .filter_map(|f| f.poll_timeout())
            .min();
        let Some(next) = next.filter(|n| *n <= end) else {
            return false;
        };
        self.now = self.now.max(next);
        let now = self.now;
        for f in self.nodes.iter_mut().flatten() {
            if f.poll_timeout().is_some_and(|t| t <= now) {
                f.handle_timeout(now);
            }
        }
        true
    }

    pub(super) fn live(&self) -> impl Iterator<Item = &Flock> {
        self.nodes.iter().flatten()
    }

    pub(super) fn agreed_leader(&self) -> Option<NodeId> {
        let n = self.live().count();
        let mut leader = None;
        for f in self.live() {
            let l = f.leader()?.id;
            if leader.is_some_and(|x| x != l) || f.live_count() != n {
                return None;
            }
            leader = Some(l);
        }
        leader
    }
}
