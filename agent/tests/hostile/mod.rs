//! An attacker of a real agent's flock port, shared by `agent/tests/flock_hostile.rs` and the
//! benchmark `bench/flock-hostile` (which includes this file by path).
//!
//! The flock: nodes 1–3 of a [`Cluster`] of four run; node 4's address (inside every node's
//! address space, so the nodes probe it with join requests) is the attacker's **trap**. The
//! target is node 1.
//!
//! Recording (before the attack), what an attacker without the key can get and what an insider
//! sends:
//! * the trap receives the nodes' discovery join requests: valid handshake initiations, never
//!   meant for the target;
//! * an **insider** (the test holds the bloc's secondary key, as any member does) joins through
//!   node 2, and sends node 2 and the target sealed pings, indirect pings, ping-requests and a
//!   stream probe, each answered as a member's would be: valid sealed datagrams and frames
//!   recorded on the wire, most of them addressed to node 2.
//!
//! Attack: from sockets on addresses outside the space (unknown sources), a mix of
//! [`HostileTraffic`]'s nine attacks (over the recorded sealed datagrams and initiations: random
//! bytes, truncations, bit flips, exact replays, another bloc, wrong key, unknown epoch,
//! oversized, junk handshakes) and exact replays of the recorded initiations, plus hostile stream
//! frames over TCP (replays of the recorded frame, random frames). Every few datagrams the insider
//! pings the target and waits for its ack: the target has then handled every datagram sent before
//! (one socket, one queue), so the attackers' sockets already hold any reply it sent, and the
//! socket buffers never overflow. Any datagram or byte the attackers receive is a reply.

#![allow(dead_code)] // the test and the benchmark use different parts

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crux_flock::crypto::hostile::{Attack, HostileTraffic};
use crux_flock::crypto::{
    open_for, seal_for, Bloc, HandshakeInitiator, Initiation, Origin, PacketKey, Purpose,
    SecretKey, Tai64N, MIN_SEALED_BYTES, REQUEST_BYTES,
};
use crux_proto::flock::{
    decode_frame, decode_message, encode_frame, encode_message, BootId, Header, Kind, MemberInfo,
    Message, NodeId, StreamFrame, Update, HEADER_BYTES,
};
use crux_tests::cluster::{http_get, Cluster};
use rand::rngs::OsRng;
use rand::RngCore;

/// Node of the cluster whose address is the trap (configured, never started).
pub const TRAP_NODE: usize = 4;
/// Nodes that run.
pub const NODES: [usize; 3] = [1, 2, 3];
/// The target.
pub const TARGET: usize = 1;
/// Attacker sockets (unknown sources: outside every node's address space).
pub const SOURCES: u8 = 16;
/// Hostile datagrams between two barriers, at most.
const BATCH_DATAGRAMS: usize = 96;
/// Hostile bytes between two barriers, at most, counting what the kernel adds to each datagram
/// ([`KERNEL_OVERHEAD_BYTES`]): well under a socket's default receive buffer (208 KiB), so that
/// neither hostile datagrams nor the barrier's ping are lost there.
const BATCH_BYTES: usize = 128 * 1024;
/// About what one queued datagram costs a receive buffer besides its payload (the skb).
const KERNEL_OVERHEAD_BYTES: usize = 1024;
/// How long one wait for an answer of the flock may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The clock (tests and benchmarks may read it; the flock core may not).
#[allow(clippy::disallowed_methods)]
pub fn now() -> Instant {
    Instant::now()
}

/// The wall clock, as a join request's timestamp.
#[allow(clippy::disallowed_methods)]
pub fn wall() -> Tai64N {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    Tai64N::from_unix_nanos(unix.as_nanos())
}

/// Piggybacked updates that change nothing (suspicions of nodes nobody knows) and make a
/// datagram larger than the answer it asks for: an answer to an address that is not a member's
/// is never larger than the datagram it answers.
fn padding() -> Vec<Update> {
    (0..4)
        .map(|i| Update::Suspect {
            id: NodeId(0xdead_0000_0000_0000 | i),
            boot: BootId(1 << 60),
            incarnation: 1 << 40,
            from: NodeId(0xdead_0000_0000_0000),
        })
        .collect()
}

/// A small deterministic generator for the attacker's choices.
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The address `127.A.B.host` of the cluster's block.
pub fn block_addr(c: &Cluster, host: u8) -> IpAddr {
    match c.agent(1).addr.ip() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], host))
        }
        IpAddr::V6(_) => panic!("loopback IPv4 clusters only"),
    }
}

/// Node k's node id.
pub fn node_id(c: &Cluster, k: usize) -> NodeId {
    c.node_id(k)
        .expect("node id written")
        .parse()
        .expect("node id is hex")
}

/// A holder of the bloc's secondary key (a member, by the threat model) speaking the flock
/// protocol from its own socket.
pub struct Insider {
    /// Its socket (outside the space).
    pub sock: UdpSocket,
    bloc: Bloc,
    secondary: SecretKey,
    id: NodeId,
    boot: BootId,
    counter: u64,
    key: Option<(u32, PacketKey)>,
    seq: u32,
}

impl Insider {
    /// An insider of cluster `c` at `127.A.B.host` (an ephemeral port).
    pub fn new(c: &Cluster, host: u8) -> Insider {
        let sock = UdpSocket::bind(SocketAddr::new(block_addr(c, host), 0)).expect("bind insider");
        sock.set_read_timeout(Some(ANSWER_TIMEOUT))
            .expect("timeout");
        Insider {
            sock,
            bloc: Bloc::new(&c.bloc),
            secondary: SecretKey::parse(&c.key).expect("the cluster's key"),
            id: NodeId(OsRng.next_u64()),
            boot: BootId(OsRng.next_u64() >> 1),
            counter: 0,
            key: None,
            seq: 0,
        }
    }

    /// The transient epoch it holds.
    pub fn epoch(&self) -> Option<u32> {
        self.key.as_ref().map(|k| k.0)
    }

    /// Joins through `to`: returns the join request sent (a valid initiation) once answered.
    pub fn join(&mut self, to: SocketAddr) -> Result<Vec<u8>, String> {
        self.counter += 1;
        let origin = Origin {
            sender: self.id,
            boot: self.boot,
            counter: self.counter,
        };
        let initiation = Initiation {
            purpose: Purpose::Join,
            origin,
            to,
            stamp: wall(),
            cookie: None,
            context: b"",
        };
        let (initiator, request) =
            HandshakeInitiator::new(&mut OsRng, &self.secondary, &self.bloc, &initiation);
        self.sock.send_to(&request, to).map_err(|e| e.to_string())?;
        let deadline = now() + ANSWER_TIMEOUT;
        let mut buf = vec![0u8; 65_536];
        while now() < deadline {
            let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            if from != to || buf.get(3) != Some(&(Kind::Handshake as u8)) {
                continue;
            }
            if let Ok(joined) = initiator.finish(&buf[..n]) {
                let k = joined.keys.current;
                self.key = Some((k.epoch, PacketKey::transient(&k.key, &self.bloc)));
                return Ok(request);
            }
        }
        Err(format!("no answer to a join request from {to}"))
    }

    /// Seals a flock message for node `to` (its next counter).
    pub fn seal(&mut self, to: NodeId, msg: &Message) -> Vec<u8> {
        let mut body = Vec::new();
        encode_message(msg, &mut body);
        self.seal_body(to, &body)
    }

    fn seal_body(&mut self, to: NodeId, body: &[u8]) -> Vec<u8> {
        let (epoch, key) = self.key.as_ref().expect("joined");
        self.counter += 1;
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: self.bloc.tag(),
            key_id: *epoch,
            sender: self.id,
            boot: self.boot,
            counter: self.counter,
        };
        let mut out = Vec::new();
        seal_for(key, &header, to, body, &mut OsRng, &mut out);
        out
    }

    /// Opens a flock datagram sent to this insider.
    fn open(&self, bytes: &[u8]) -> Option<Message> {
        let (_, key) = self.key.as_ref()?;
        let mut body = Vec::new();
        open_for(key, bytes, self.id, &mut body).ok()?;
        decode_message(&body).ok()
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `datagram` to `to` and waits for a flock message from `to` that `want` accepts.
    fn ask(
        &mut self,
        to: SocketAddr,
        datagram: &[u8],
        mut want: impl FnMut(&Message) -> bool,
    ) -> Result<Message, String> {
        self.sock.send_to(datagram, to).map_err(|e| e.to_string())?;
        let deadline = now() + ANSWER_TIMEOUT;
        let mut buf = vec![0u8; 65_536];
        while now() < deadline {
            let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            if from != to {
                continue;
            }
            if let Some(m) = self.open(&buf[..n]) {
                if want(&m) {
                    return Ok(m);
                }
            }
        }
        Err(format!("no answer from {to}"))
    }

    /// Node `to`'s own entry, from its ack to an indirect ping that names it; returns the
    /// datagram sent too.
    pub fn entry_of(
        &mut self,
        to: SocketAddr,
        id: NodeId,
    ) -> Result<(MemberInfo, Vec<u8>), String> {
        let seq = self.next_seq();
        let d = self.seal(
            id,
            &Message::IndirectPing {
                seq,
                target: id,
                updates: padding(),
            },
        );
        match self.ask(
            to,
            &d,
            |m| matches!(m, Message::Ack { seq: s, .. } if *s == seq),
        )? {
            Message::Ack { me, .. } => Ok((me, d)),
            _ => unreachable!(),
        }
    }

    /// A ping to node `id` at `to` carrying `me` (another node's entry: the receiver takes
    /// nothing from it), answered by an ack. Returns the ping sent.
    pub fn ping(&mut self, to: SocketAddr, id: NodeId, me: MemberInfo) -> Result<Vec<u8>, String> {
        let seq = self.next_seq();
        let d = self.seal(
            id,
            &Message::Ping {
                seq,
                target: Some(id),
                me,
                digest: u64::MAX,
                updates: padding(),
            },
        );
        self.ask(
            to,
            &d,
            |m| matches!(m, Message::Ack { seq: s, .. } if *s == seq),
        )?;
        Ok(d)
    }

    /// A stream probe of node `id` at `to` over TCP, answered by a probe ack. Returns the frame
    /// sent.
    pub fn stream_probe(&mut self, to: SocketAddr, id: NodeId) -> Result<Vec<u8>, String> {
        let seq = self.next_seq();
        let frame = self.seal_body(id, &encode_frame(&StreamFrame::Probe { seq }));
        let reply = stream_exchange(to, &frame).map_err(|e| format!("stream to {to}: {e}"))?;
        let (_, key) = self.key.as_ref().expect("joined");
        let mut body = Vec::new();
        open_for(key, &reply, self.id, &mut body).map_err(|e| format!("probe ack: {e}"))?;
        match decode_frame(&body) {
            Ok(StreamFrame::ProbeAck { seq: s, .. }) if s == seq => Ok(frame),
            other => Err(format!("not a probe ack: {other:?}")),
        }
    }
}

/// One stream exchange: a length-prefixed frame out, then everything the peer sends until it
/// closes (the reply frame's bytes, with its prefix removed; empty when it sent nothing).
pub fn stream_exchange(to: SocketAddr, frame: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&to, ANSWER_TIMEOUT)?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    s.write_all(&(frame.len() as u32).to_be_bytes())?;
    s.write_all(frame)?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e),
    }
    Ok(if out.len() >= 4 {
        out[4..].to_vec()
    } else {
        out
    })
}

/// What was recorded before the attack.
pub struct Recording {
    /// Valid sealed flock datagrams (most addressed to node 2, some to the target).
    pub sealed: Vec<Vec<u8>>,
    /// Valid handshake initiations: the nodes' discovery requests caught by the trap, and the
    /// insider's join requests (answered by node 2).
    pub initiations: Vec<Vec<u8>>,
    /// Valid sealed stream frames (probes node 2 answered).
    pub frames: Vec<Vec<u8>>,
    /// The target's current transient epoch (the insider's).
    pub epoch: u32,
    /// The target's node id.
    pub target_id: NodeId,
    /// Node 2's own entry (what the insider's pings carry).
    pub entry2: MemberInfo,
    /// What each recorded datagram, initiation and frame is (for reports).
    pub labels: BTreeMap<Vec<u8>, String>,
}

/// Records what [`Recording`] holds: waits (up to `trap_wait`) for `trap_min` initiations at the
/// trap, then lets the insider talk to node 2 and to the target.
pub fn record(
    c: &Cluster,
    insider: &mut Insider,
    trap_min: usize,
    trap_wait: Duration,
) -> Result<Recording, String> {
    let mut initiations = Vec::new();
    {
        let trap = UdpSocket::bind(c.agent(TRAP_NODE).addr).map_err(|e| format!("trap: {e}"))?;
        trap.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let deadline = now() + trap_wait;
        let mut buf = vec![0u8; 65_536];
        while initiations.len() < trap_min && now() < deadline {
            if let Ok((n, _)) = trap.recv_from(&mut buf) {
                if n == REQUEST_BYTES && buf[3] == Kind::Handshake as u8 {
                    initiations.push(buf[..n].to_vec());
                }
            }
        }
    }
    let target = c.agent(TARGET).addr;
    let node2 = c.agent(2).addr;
    let node3 = c.agent(3).addr;
    let (id1, id2, id3) = (node_id(c, 1), node_id(c, 2), node_id(c, 3));
    let mut sealed = Vec::new();
    let mut frames = Vec::new();
    let mut labels = BTreeMap::new();
    for d in &initiations {
        let sender = u64::from_le_bytes(d[12..20].try_into().expect("8 bytes"));
        let who = if NodeId(sender) == id1 {
            "the target's own"
        } else {
            "another node's"
        };
        labels.insert(
            d.clone(),
            format!("{who} discovery join request (caught at the trap)"),
        );
    }
    for _ in 0..4 {
        let d = insider.join(node2)?;
        labels.insert(d.clone(), "insider join request to node 2".into());
        initiations.push(d);
    }
    // One the target answered itself: a replay of it is older than the newest it took.
    let d = insider.join(target)?;
    labels.insert(d.clone(), "insider join request to the target".into());
    initiations.push(d);
    let mut label = |d: Vec<u8>, what: &str| {
        labels.insert(d.clone(), what.to_string());
        d
    };
    let (entry2, d) = insider.entry_of(node2, id2)?;
    sealed.push(label(d, "indirect ping to node 2 naming node 2"));
    let (_, d) = insider.entry_of(target, id1)?;
    sealed.push(label(d, "indirect ping to the target naming it"));
    for _ in 0..8 {
        // Answered by node 2: an ack from the target, if replayed to it.
        let d = insider.ping(node2, id2, entry2)?;
        sealed.push(label(d, "ping to node 2"));
        // Addressed to node 2, naming the target: node 2 does not answer, the target would.
        let seq = insider.next_seq();
        let d = insider.seal(
            id2,
            &Message::IndirectPing {
                seq,
                target: id1,
                updates: padding(),
            },
        );
        sealed.push(label(d, "indirect ping to node 2 naming the target"));
        // A ping-request node 2 relays to node 3 (answered through node 2).
        let seq = insider.next_seq();
        let d = insider.seal(
            id2,
            &Message::PingReq {
                seq,
                target: id3,
                target_addr: node3,
                updates: Vec::new(),
            },
        );
        insider.ask(
            node2,
            &d,
            |m| matches!(m, Message::Ack { seq: s, .. } if *s == seq),
        )?;
        sealed.push(label(d, "ping-request to node 2 (relayed to node 3)"));
        // Sent to the target itself.
        let d = insider.ping(target, id1, entry2)?;
        sealed.push(label(d, "ping to the target"));
        let f = insider.stream_probe(node2, id2)?;
        frames.push(label(f, "stream probe to node 2"));
    }
    assert!(sealed.iter().all(|d| d.len() >= MIN_SEALED_BYTES));
    Ok(Recording {
        sealed,
        initiations,
        frames,
        epoch: insider.epoch().expect("joined"),
        target_id: id1,
        entry2,
        labels,
    })
}

/// Kinds of hostile input, as printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hostile {
    /// One of [`HostileTraffic`]'s attacks.
    Traffic(Attack),
    /// A recorded handshake initiation, again (exactly).
    InitiationReplay,
    /// A recorded stream frame, again, over TCP.
    FrameReplay,
    /// Random bytes as a stream frame, over TCP.
    FrameRandom,
}

impl Hostile {
    /// Snake-case name.
    pub fn name(self) -> String {
        match self {
            Hostile::Traffic(a) => a.as_str().to_string(),
            Hostile::InitiationReplay => "initiation_replay".into(),
            Hostile::FrameReplay => "frame_replay (tcp)".into(),
            Hostile::FrameRandom => "frame_random (tcp)".into(),
        }
    }
}

/// What the attack did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Hostile datagrams and frames sent, by kind.
    pub sent: BTreeMap<Hostile, u64>,
    /// Replies received: (attacker socket, bytes, header kind byte) of each datagram, or
    /// `(tcp, bytes, 255)` for bytes read back from a stream.
    pub replies: Vec<(SocketAddr, usize, u8)>,
    /// Barriers passed (insider pings answered).
    pub barriers: u64,
    /// Times the insider had to join again (its key was rotated out).
    pub rejoins: u64,
    /// Wall time of the attack.
    pub elapsed: Duration,
    /// With a barrier after every input (`attribute`): replies by what the input was.
    pub attributed: BTreeMap<String, u64>,
}

impl Outcome {
    /// Hostile inputs sent.
    pub fn total(&self) -> u64 {
        self.sent.values().sum()
    }
}

/// The attacker's sockets: `127.A.B.200 …`, outside the space.
pub fn attacker_sockets(c: &Cluster) -> Vec<UdpSocket> {
    (0..SOURCES)
        .map(|i| {
            let s = UdpSocket::bind(SocketAddr::new(block_addr(c, 200 + i), 0)).expect("bind");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect()
}

fn drain(socks: &[UdpSocket], replies: &mut Vec<(SocketAddr, usize, u8)>) {
    let mut buf = vec![0u8; 65_536];
    for s in socks {
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            let kind = if n > 3 { buf[3] } else { 254 };
            replies.push((s.local_addr().expect("addr"), n, kind));
        }
    }
}

/// How much to send.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Hostile datagrams.
    pub datagrams: u64,
    /// Hostile stream frames (over TCP, spread among the datagrams).
    pub frames: u64,
    /// Seed of the hostile traffic.
    pub seed: u64,
    /// A barrier after every input, to tell which input got a reply ([`Outcome::attributed`]).
    pub attribute: bool,
}

/// Sends the plan's hostile datagrams and stream frames to the target from `socks`; see the
/// module doc. `progress` is called after each barrier with the count sent.
pub fn attack(
    c: &Cluster,
    insider: &mut Insider,
    rec: &Recording,
    socks: &[UdpSocket],
    plan: Plan,
    mut progress: impl FnMut(u64),
) -> Result<Outcome, String> {
    let Plan {
        datagrams,
        frames,
        seed,
        attribute,
    } = plan;
    let target = c.agent(TARGET).addr;
    let bloc = Bloc::new(&c.bloc);
    let mut recorded = rec.sealed.clone();
    recorded.extend(rec.initiations.iter().cloned());
    let mut traffic = HostileTraffic::new(seed, &bloc, rec.epoch, 1400, recorded);
    let mut rng = SplitMix(seed);
    let mut out = Outcome::default();
    let started = now();
    let mut d = Vec::with_capacity(65_536);
    let (mut batch_n, mut batch_bytes) = (0usize, 0usize);
    let frame_every = datagrams.checked_div(frames).unwrap_or(u64::MAX).max(1);
    let mut i = 0u64;
    while i < datagrams {
        let kind = if i % 4 == 3 && !rec.initiations.is_empty() {
            d.clear();
            d.extend_from_slice(&rec.initiations[rng.below(rec.initiations.len())]);
            Hostile::InitiationReplay
        } else {
            Hostile::Traffic(traffic.next_into(&mut d))
        };
        let sock = &socks[rng.below(socks.len())];
        // A datagram over the IPv4 limit cannot be sent at all: cut to the limit.
        d.truncate(65_507);
        match sock.send_to(&d, target) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("send: {e}")),
        }
        *out.sent.entry(kind).or_default() += 1;
        i += 1;
        batch_n += 1;
        batch_bytes += d.len() + KERNEL_OVERHEAD_BYTES;
        if i.is_multiple_of(frame_every) && frames > 0 {
            let (kind, frame) = if rng.below(2) == 0 && !rec.frames.is_empty() {
                let f = rec.frames[rng.below(rec.frames.len())].clone();
                (Hostile::FrameReplay, f)
            } else {
                let mut f = vec![0u8; 1 + rng.below(4096)];
                for b in f.iter_mut() {
                    *b = rng.next() as u8;
                }
                (Hostile::FrameRandom, f)
            };
            let reply = stream_exchange(target, &frame).unwrap_or_default();
            if !reply.is_empty() {
                out.replies.push((target, reply.len(), 255));
                let what = rec.labels.get(&frame).cloned().unwrap_or(kind.name());
                *out.attributed.entry(what).or_default() += 1;
            }
            *out.sent.entry(kind).or_default() += 1;
        }
        if attribute || batch_n >= BATCH_DATAGRAMS || batch_bytes >= BATCH_BYTES || i == datagrams {
            barrier(insider, target, rec, &mut out)?;
            let before = out.replies.len();
            drain(socks, &mut out.replies);
            if attribute && out.replies.len() > before {
                let what = match rec.labels.get(&d) {
                    Some(l) => format!("{} of a {l}", kind.name()),
                    None => kind.name(),
                };
                *out.attributed.entry(what).or_default() += (out.replies.len() - before) as u64;
            }
            batch_n = 0;
            batch_bytes = 0;
            progress(i);
        }
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

/// The insider pings the target and waits for the ack; if the target no longer takes its key
/// (rotated out), it joins again through the target and retries.
fn barrier(
    insider: &mut Insider,
    target: SocketAddr,
    rec: &Recording,
    out: &mut Outcome,
) -> Result<(), String> {
    for _ in 0..3 {
        if insider.ping(target, rec.target_id, rec.entry2).is_ok() {
            out.barriers += 1;
            return Ok(());
        }
        insider.join(target)?;
        out.rejoins += 1;
    }
    Err("the target stopped answering the insider".into())
}

/// Polls `check` every 100 ms until it passes or `timeout` passes (then its last error).
pub fn wait(timeout: Duration, check: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    crux_tests::cluster::wait_for(timeout, check)
}

/// After the attack: any late replies (relayed acks, nacks) still queued on the sockets.
pub fn late_replies(socks: &[UdpSocket], out: &mut Outcome) {
    drain(socks, &mut out.replies);
}

/// The target's drop counters, by reason, from its `/metrics`.
pub fn drops(c: &Cluster, k: usize) -> BTreeMap<String, u64> {
    let text = http_get(c.agent(k).http, "/metrics").unwrap_or_default();
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("crux_dropped_total{reason=\"") else {
            continue;
        };
        let Some((reason, value)) = rest.split_once("\"} ") else {
            continue;
        };
        if let Ok(v) = value.trim().parse() {
            m.insert(reason.to_string(), v);
        }
    }
    m
}

/// A counter without labels from node k's `/metrics` (0 if absent).
pub fn counter(c: &Cluster, k: usize, name: &str) -> u64 {
    let text = http_get(c.agent(k).http, "/metrics").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// VmRSS of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Header kind byte of a datagram (for reports).
pub fn header_kind(d: &[u8]) -> Option<u8> {
    (d.len() >= HEADER_BYTES).then(|| d[3])
}
