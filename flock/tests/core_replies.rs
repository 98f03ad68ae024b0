//! What the flock core answers, and what it does not (issue 15, item 6: WireGuard's rules on the
//! flock port). Exact behaviour of one converged node (the leader of three, on a lossless
//! in-process network in virtual time) for single inputs made by an insider (a holder of the
//! secondary key: the only one who can make a datagram that authenticates):
//!
//! * a replayed join request, or one not newer than the last from its sender, or one stamped
//!   before the node started, gets no transmit and counts `old_initiation`; one addressed to
//!   another address counts `misdirected`;
//! * a sealed datagram made for another node does not open; one made for this node opens once
//!   (a replay of it gets nothing);
//! * under load (more than 100 join requests a second) a request without a cookie gets a cookie
//!   reply, smaller than the request, and no x25519 work; the request sent again with the cookie
//!   gets the keys; a real joiner does this on its own;
//! * a join reply and a cookie reply are never larger than the request they answer. Answers to
//!   flock datagrams (an ack, a push-pull) need a datagram that opened under the transient key,
//!   was sealed for this node and is new to its replay window: only a key holder can elicit one,
//!   once per datagram. Sent to a source that is not the sender's address in the table (a forged
//!   source, or a node not in the table), such an answer is never larger than the datagram it
//!   answers: it piggybacks what fits, a push-pull answer that does not fit goes over a stream
//!   (TCP, which a forged source cannot open), anything else that does not fit is not sent.
//!   Between members at their own addresses answers are not capped (an ack piggybacks gossip, a
//!   push-pull answer carries the table): capping them slowed gossip enough to break the
//!   simulator's agreement checks.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crux_flock::config::{AddressSpace, Config, Preset};
use crux_flock::crypto::hostile::insider_join;
use crux_flock::crypto::{
    open_for, seal_for, Bloc, Cookie, HandshakeInitiator, Initiation, Keyring, Origin, PacketKey,
    Purpose, SecretKey, Tai64N, COOKIE_REPLY_BYTES, HANDSHAKES_UNDER_LOAD, REPLY_BYTES,
    REQUEST_BYTES,
};
use crux_flock::{
    BootId, DropReason, Flock, Identity, NodeId, SecurityTiming, Transmit, TransmitKind,
};
use crux_proto::flock::{decode_message, encode_message, Header, Kind, Message, PushPull};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

const BLOC: &str = "core-replies";

fn secondary() -> SecretKey {
    SecretKey::from_bytes([9; 32])
}

fn node_addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 7700))
}

fn node(i: u8, space: &str, now: Duration) -> Flock {
    let mut config = Config::new(BLOC, Preset::Lan);
    config.space = AddressSpace::parse(&[space], &[]).expect("space");
    let identity = Identity {
        id: NodeId(i as u64 * 1000),
        // Started at a realistic wall-clock time (2023-11-14), all at once.
        boot: crux_flock::boot_id(1_700_000_000_000, i as u16),
        addr: node_addr(i),
        key: None,
    };
    let mut seed = [0u8; 32];
    seed[0] = i;
    Flock::builder(config, identity)
        .keys(Keyring::new(secondary()), SecurityTiming::default())
        .rng_seed(seed)
        .start(now)
        .expect("node")
}

/// Lossless, zero-latency network in virtual time.
struct Net {
    nodes: Vec<Flock>,
    now: Duration,
}

impl Net {
    fn converged() -> (Net, usize) {
        let mut net = Net {
            nodes: (2..5)
                .map(|i| node(i, "127.0.0.2-127.0.0.4", Duration::ZERO))
                .collect(),
            now: Duration::ZERO,
        };
        net.advance_to(Duration::from_secs(5));
        let leader = net.nodes[0].leader().expect("a leader").id;
        for f in &net.nodes {
            assert_eq!(f.leader().map(|l| l.id), Some(leader));
            assert_eq!(f.live_count(), 3);
        }
        let t = net
            .nodes
            .iter()
            .position(|f| f.identity().id == leader)
            .expect("leader is a node");
        (net, t)
    }

    fn index_of(&self, a: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|f| f.identity().addr == a)
    }

    fn flush(&mut self) {
        let mut queue: VecDeque<(SocketAddr, Transmit)> = VecDeque::new();
        loop {
            for f in &mut self.nodes {
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
            let now = self.now;
            match t.kind {
                TransmitKind::Datagram => self.nodes[i].handle_datagram(now, from, &t.payload),
                TransmitKind::Stream => {
                    let reply = self.nodes[i].handle_stream(now, from, &t.payload);
                    if let (Some(reply), Some(j)) = (reply, self.index_of(from)) {
                        self.nodes[j].handle_stream_reply(now, t.to, &reply);
                    }
                }
            }
        }
    }

    fn advance_to(&mut self, end: Duration) {
        self.flush();
        while let Some(next) = self.nodes.iter().filter_map(|f| f.poll_timeout()).min() {
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            let now = self.now;
            for f in &mut self.nodes {
                if f.poll_timeout().is_some_and(|t| t <= now) {
                    f.handle_timeout(now);
                }
            }
            self.flush();
        }
        self.now = self.now.max(end);
    }
}

fn drops(f: &Flock) -> [u64; DropReason::ALL.len()] {
    DropReason::ALL.map(|r| f.stats().dropped(r))
}

/// Feeds `f` one input: the only counter that moves is `reason`'s, by one, and nothing is sent.
fn dropped_as(f: &mut Flock, reason: DropReason, what: &str, feed: impl FnOnce(&mut Flock)) {
    let mut want = drops(f);
    want[DropReason::ALL
        .iter()
        .position(|r| *r == reason)
        .expect("listed")] += 1;
    feed(f);
    assert_eq!(f.poll_transmit(), None, "{what}: answered");
    assert_eq!(drops(f), want, "{what}: not dropped as {reason:?} alone");
}

/// Everything `f` sends now.
fn transmits(f: &mut Flock) -> Vec<Transmit> {
    std::iter::from_fn(|| f.poll_transmit()).collect()
}

fn source(host: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from([127, 0, 1, host]), port)
}

/// An insider's join request.
struct Asker {
    origin: Origin,
    rng: ChaCha20Rng,
}

impl Asker {
    fn new(seed: u64) -> Asker {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        Asker {
            origin: Origin {
                sender: NodeId(rng.next_u64()),
                boot: BootId(rng.next_u64() >> 1),
                counter: 1,
            },
            rng,
        }
    }

    fn request(
        &mut self,
        to: SocketAddr,
        stamp: Tai64N,
        cookie: Option<Cookie>,
    ) -> (HandshakeInitiator, Vec<u8>) {
        self.origin.counter += 1;
        let initiation = Initiation {
            purpose: Purpose::Join,
            origin: self.origin,
            to,
            stamp,
            cookie,
            context: b"",
        };
        HandshakeInitiator::new(&mut self.rng, &secondary(), &Bloc::new(BLOC), &initiation)
    }
}

/// The one datagram `f` sent, to `to`.
fn only_datagram_to(f: &mut Flock, to: SocketAddr) -> Vec<u8> {
    let sent = transmits(f);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].to, to);
    assert_eq!(sent[0].kind, TransmitKind::Datagram);
    sent[0].payload.clone()
}

#[test]
fn a_replayed_join_request_gets_no_transmit() {
    let (mut net, t) = Net::converged();
    let now = net.now + Duration::from_millis(1);
    let target = &mut net.nodes[t];
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let join = insider_join(target, now, source(1, 9), &secondary(), &mut rng).expect("answered");
    assert!(join.reply.len() <= join.request.len());
    for (i, later) in [0u64, 1, 1000, 60_000].into_iter().enumerate() {
        let from = source(2 + i as u8, 9);
        let at = now + Duration::from_millis(later);
        dropped_as(target, DropReason::OldInitiation, "replayed request", |f| {
            f.handle_datagram(at, from, &join.request)
        });
    }
    assert_eq!(target.stats().cookies_sent, 0);
}

#[test]
fn an_older_join_request_is_dropped_as_old_initiation() {
    let (mut net, t) = Net::converged();
    let now = net.now + Duration::from_millis(1);
    let to = net.nodes[t].identity().addr;
    let wall = net.nodes[t].wall_clock(now).expect("secure");
    let target = &mut net.nodes[t];
    let mut a = Asker::new(2);
    let from = source(1, 9);
    let (state, newer) = a.request(to, wall, None);
    target.handle_datagram(now, from, &newer);
    let reply = only_datagram_to(target, from);
    assert_eq!(reply.len(), REPLY_BYTES);
    state.finish(&reply).expect("keys");
    // Made after it but stamped earlier (a new ephemeral key, a higher counter): dropped.
    let older = Tai64N::from_unix_nanos(wall.unix_nanos() - 1);
    let (_, request) = a.request(to, older, None);
    dropped_as(target, DropReason::OldInitiation, "older stamp", |f| {
        f.handle_datagram(now, from, &request)
    });
    // The same stamp again: not newer.
    let (_, request) = a.request(to, wall, None);
    dropped_as(target, DropReason::OldInitiation, "same stamp", |f| {
        f.handle_datagram(now, from, &request)
    });
    // Newer: answered.
    let (_, request) = a.request(to, wall.next(), None);
    target.handle_datagram(now + Duration::from_secs(1), from, &request);
    assert_eq!(only_datagram_to(target, from).len(), REPLY_BYTES);
    // A new boot of the same node may stamp lower (its clock stepped back): its boot is newer.
    a.origin.boot = BootId(a.origin.boot.0 + 1);
    let (_, request) = a.request(to, older, None);
    target.handle_datagram(now + Duration::from_secs(2), from, &request);
    assert_eq!(only_datagram_to(target, from).len(), REPLY_BYTES);
    // And an old boot of it is not answered any more, whatever its stamp.
    a.origin.boot = BootId(a.origin.boot.0 - 1);
    let (_, request) = a.request(to, wall.next().next(), None);
    dropped_as(target, DropReason::OldInitiation, "old boot", |f| {
        f.handle_datagram(now + Duration::from_secs(3), from, &request)
    });
}

#[test]
fn a_join_request_stamped_before_the_node_started_is_refused() {
    let (mut net, t) = Net::converged();
    let now = net.now + Duration::from_millis(1);
    let to = net.nodes[t].identity().addr;
    let started = net.nodes[t].wall_clock(Duration::ZERO).expect("secure");
    let skew = crux_flock::CLOCK_SKEW_MAX.as_nanos();
    let target = &mut net.nodes[t];
    let (_, request) = Asker::new(3).request(
        to,
        Tai64N::from_unix_nanos(started.unix_nanos() - skew - 1),
        None,
    );
    dropped_as(target, DropReason::OldInitiation, "before the start", |f| {
        f.handle_datagram(now, source(1, 9), &request)
    });
    // Within the allowed skew: answered.
    let (_, request) = Asker::new(4).request(
        to,
        Tai64N::from_unix_nanos(started.unix_nanos() + 1 - skew),
        None,
    );
    target.handle_datagram(now, source(2, 9), &request);
    assert_eq!(only_datagram_to(target, source(2, 9)).len(), REPLY_BYTES);
}

#[test]
fn a_join_request_addressed_elsewhere_is_misdirected() {
    let (mut net, t) = Net::converged();
    let now = net.now + Duration::from_millis(1);
    let wall = net.nodes[t].wall_clock(now).expect("secure");
    let me = net.nodes[t].identity().addr;
    let target = &mut net.nodes[t];
    let mut other_port = me;
    other_port.set_port(me.port() + 1);
    for (i, to) in [node_addr(9), other_port].into_iter().enumerate() {
        let (_, request) = Asker::new(5 + i as u64).request(to, wall, None);
        dropped_as(
            target,
            DropReason::Misdirected,
            "addressed elsewhere",
            |f| f.handle_datagram(now, source(1 + i as u8, 9), &request),
        );
    }
}

#[test]
fn under_load_a_request_gets_a_smaller_cookie_reply_and_the_cookie_gets_the_keys() {
    let (mut net, t) = Net::converged();
    let now = net.now + Duration::from_millis(1);
    let to = net.nodes[t].identity().addr;
    let wall = net.nodes[t].wall_clock(now).expect("secure");
    let target = &mut net.nodes[t];
    // 100 requests in one instant, each from its own address (below the per-source limit).
    for i in 0..HANDSHAKES_UNDER_LOAD {
        let from = source(i as u8, 1000);
        let (_, request) = Asker::new(100 + i).request(to, wall, None);
        target.handle_datagram(now, from, &request);
        assert_eq!(
            only_datagram_to(target, from).len(),
            REPLY_BYTES,
            "request {i}"
        );
    }
    assert_eq!(target.stats().cookies_sent, 0);
    // The next one: a cookie reply, smaller than the request.
    let from = source(200, 1000);
    let mut a = Asker::new(7);
    let (state, request) = a.request(to, wall, None);
    let under_load = target.stats().dropped(DropReason::UnderLoad);
    target.handle_datagram(now, from, &request);
    let cookie_reply = only_datagram_to(target, from);
    assert_eq!(cookie_reply.len(), COOKIE_REPLY_BYTES);
    assert!(cookie_reply.len() < request.len());
    assert_eq!(target.stats().cookies_sent, 1);
    assert_eq!(
        target.stats().dropped(DropReason::UnderLoad),
        under_load + 1
    );
    assert!(state.finish(&cookie_reply).is_err(), "no keys in it");
    let (_, cookie) = state
        .finish_cookie(&cookie_reply)
        .expect("a cookie for our request");
    // The cookie reply answers that request only.
    let (other, _) = a.request(to, wall.next(), None);
    assert!(other.finish_cookie(&cookie_reply).is_err());
    // Still under load: the same request again (replayed) gets nothing at all.
    dropped_as(
        target,
        DropReason::OldInitiation,
        "replay under load",
        |f| f.handle_datagram(now, from, &request),
    );
    // With the cookie, from the same address: the keys.
    let (state, request) = a.request(to, wall.next(), Some(cookie));
    target.handle_datagram(now, from, &request);
    let reply = only_datagram_to(target, from);
    assert_eq!(reply.len(), REPLY_BYTES);
    let joined = state.finish(&reply).expect("keys");
    assert_eq!(Some(joined.keys.current.epoch), target.key_epoch());
    // The cookie is the source's: from another port it is a cookie reply again.
    let other = source(200, 1001);
    let (_, request) = Asker::new(8).request(to, wall, Some(cookie));
    target.handle_datagram(now, other, &request);
    assert_eq!(only_datagram_to(target, other).len(), COOKIE_REPLY_BYTES);
    // Once the load has passed (a second later), no cookie is needed.
    let later = now + Duration::from_secs(1);
    let (_, request) = Asker::new(9).request(to, wall.next(), None);
    target.handle_datagram(later, source(201, 1000), &request);
    assert_eq!(
        only_datagram_to(target, source(201, 1000)).len(),
        REPLY_BYTES
    );
}

#[test]
fn a_joiner_meeting_a_node_under_load_gets_in_with_the_cookie() {
    let (mut net, t) = Net::converged();
    let responder = net.nodes[t].identity().addr;
    // A fourth node whose space is the responder's address alone.
    let space = responder.ip().to_string();
    net.nodes
        .push(node(9, &format!("{space}-{space}"), net.now));
    let j = net.nodes.len() - 1;
    // Run the joiner alone until it sends its join request to the responder.
    let request = loop {
        let at = net.nodes[j].poll_timeout().expect("timers");
        net.now = net.now.max(at);
        net.nodes[j].handle_timeout(net.now);
        let sent = transmits(&mut net.nodes[j]);
        if let Some(r) = sent.into_iter().find(|t| t.to == responder) {
            break r.payload;
        }
    };
    assert_eq!(request.len(), REQUEST_BYTES);
    let now = net.now;
    let wall = net.nodes[t].wall_clock(now).expect("secure");
    let joiner = net.nodes[j].identity().addr;
    // Load the responder in the same instant.
    for i in 0..HANDSHAKES_UNDER_LOAD {
        let from = source(i as u8, 2000);
        let (_, r) = Asker::new(300 + i).request(responder, wall, None);
        net.nodes[t].handle_datagram(now, from, &r);
        assert_eq!(transmits(&mut net.nodes[t]).len(), 1);
    }
    net.nodes[t].handle_datagram(now, joiner, &request);
    let cookie_reply = only_datagram_to(&mut net.nodes[t], joiner);
    assert_eq!(cookie_reply.len(), COOKIE_REPLY_BYTES);
    // The joiner sends the same handshake again at once, with the cookie...
    net.nodes[j].handle_datagram(now, responder, &cookie_reply);
    assert_eq!(net.nodes[j].stats().cookies_received, 1);
    let again = only_datagram_to(&mut net.nodes[j], responder);
    assert_eq!(again.len(), REQUEST_BYTES);
    // ...which the responder, still under load, answers with the keys.
    net.nodes[t].handle_datagram(now, joiner, &again);
    let reply = only_datagram_to(&mut net.nodes[t], joiner);
    assert_eq!(reply.len(), REPLY_BYTES);
    net.nodes[j].handle_datagram(now, responder, &reply);
    assert_eq!(net.nodes[j].stats().joins, 1);
    assert_eq!(net.nodes[j].key_epoch(), net.nodes[t].key_epoch());
    // And it becomes a member.
    net.flush();
    net.advance_to(now + Duration::from_secs(5));
    assert_eq!(net.nodes[j].live_count(), 4);
    assert_eq!(net.nodes[t].live_count(), 4);
}

/// What an insider seals for the target.
struct Sealer {
    key: PacketKey,
    epoch: u32,
    sender: NodeId,
    counter: u64,
    rng: ChaCha20Rng,
}

impl Sealer {
    fn join(net: &mut Net, t: usize, now: Duration) -> Sealer {
        let mut rng = ChaCha20Rng::seed_from_u64(77);
        let target = &mut net.nodes[t];
        let join = insider_join(target, now, source(250, 9), &secondary(), &mut rng).expect("join");
        Sealer {
            key: PacketKey::transient(&join.key.key, &Bloc::new(BLOC)),
            epoch: join.key.epoch,
            sender: NodeId(rng.next_u64()),
            counter: 0,
            rng,
        }
    }

    fn seal(&mut self, to: NodeId, msg: &Message) -> Vec<u8> {
        self.counter += 1;
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: Bloc::new(BLOC).tag(),
            key_id: self.epoch,
            sender: self.sender,
            boot: BootId(1),
            counter: self.counter,
        };
        let mut body = Vec::new();
        encode_message(msg, &mut body);
        let mut out = Vec::new();
        seal_for(&self.key, &header, to, &body, &mut self.rng, &mut out);
        out
    }

    /// Opens what the target sent this insider (sealed for it).
    fn open(&self, bytes: &[u8]) -> Message {
        let mut body = Vec::new();
        open_for(&self.key, bytes, self.sender, &mut body).expect("sealed for the insider");
        decode_message(&body).expect("a message")
    }
}

#[test]
fn a_datagram_sealed_for_another_node_does_not_open_and_one_for_this_node_opens_once() {
    let (mut net, t) = Net::converged();
    let now = net.now + Duration::from_millis(1);
    let mut s = Sealer::join(&mut net, t, now);
    let other = net.nodes[(t + 1) % 3].identity().id;
    let me = net.nodes[t].identity().id;
    let entry = net.nodes[t]
        .members()
        .map(|m| m.info)
        .find(|i| i.id != me)
        .expect("a member");
    let from = source(1, 9);
    let target = &mut net.nodes[t];
    let messages = [
        Message::Ping {
            seq: 2,
            target: Some(me),
            me: entry,
            digest: u64::MAX,
            updates: Vec::new(),
        },
        Message::PushPull(PushPull {
            reply: false,
            join: false,
            members: Vec::new(),
            leader: None,
            ring: None,
            revoked: Vec::new(),
        }),
    ];
    for msg in &messages {
        // Recorded on its way to another member: does not open here.
        let d = s.seal(other, msg);
        dropped_as(
            target,
            DropReason::AuthFailed,
            "sealed for another node",
            |f| f.handle_datagram(now, from, &d),
        );
        // Sealed for the target: answered once, under a seal only the insider opens...
        let d = s.seal(me, msg);
        target.handle_datagram(now, from, &d);
        let sent = transmits(target);
        let answer = sent
            .iter()
            .find(|tx| tx.to == from)
            .unwrap_or_else(|| panic!("{msg:?} not answered: {sent:?}"));
        if answer.kind == TransmitKind::Datagram {
            let opened = s.open(&answer.payload);
            assert!(
                matches!(opened, Message::Ack { .. } | Message::PushPull(_)),
                "{opened:?}"
            );
            println!(
                "{} bytes answered with {} bytes",
                d.len(),
                answer.payload.len()
            );
        }
        // ...and its replay gets nothing.
        dropped_as(target, DropReason::Replay, "replayed", |f| {
            f.handle_datagram(now + Duration::from_millis(1), source(2, 9), &d)
        });
    }
}

#[test]
fn no_handshake_reply_is_larger_than_its_request() {
    let (mut net, t) = Net::converged();
    let now = net.now + Duration::from_millis(1);
    let to = net.nodes[t].identity().addr;
    let wall = net.nodes[t].wall_clock(now).expect("secure");
    let target = &mut net.nodes[t];
    for (i, purpose) in [Purpose::Join, Purpose::KeyRequest].into_iter().enumerate() {
        let mut a = Asker::new(900 + i as u64);
        a.origin.counter += 1;
        let initiation = Initiation {
            purpose,
            origin: a.origin,
            to,
            stamp: wall,
            cookie: None,
            context: &[7; 37],
        };
        let (state, request) =
            HandshakeInitiator::new(&mut a.rng, &secondary(), &Bloc::new(BLOC), &initiation);
        let from = source(10 + i as u8, 9);
        target.handle_datagram(now, from, &request);
        let reply = only_datagram_to(target, from);
        assert!(reply.len() <= request.len(), "{purpose:?}");
        assert_eq!(state.purpose(), purpose);
        state.finish(&reply).expect("keys");
    }
    assert_eq!(REQUEST_BYTES, 268);
    assert_eq!(REPLY_BYTES, 263);
    assert_eq!(COOKIE_REPLY_BYTES, 109);
}

#[test]
fn answers_to_a_source_that_is_not_the_senders_address_are_never_larger() {
    let (mut net, t) = Net::converged();
    let now = net.now + Duration::from_millis(1);
    let mut s = Sealer::join(&mut net, t, now);
    let me = net.nodes[t].identity().id;
    let entry = net.nodes[t]
        .members()
        .map(|m| m.info)
        .find(|i| i.id != me)
        .expect("a member");
    // News to piggyback: a keyring change spreads as gossip.
    net.nodes[t].handle_command(
        now,
        crux_flock::Command::Keyring(crux_flock::crypto::KeyringOp::Install(
            SecretKey::from_bytes([3; 32]),
        )),
    );
    let _ = transmits(&mut net.nodes[t]);
    let from = source(1, 9);
    let ask = |net: &mut Net, s: &mut Sealer, msg: Message| {
        let d = s.seal(me, &msg);
        let target = &mut net.nodes[t];
        target.handle_datagram(now, from, &d);
        let sent: Vec<Transmit> = transmits(target)
            .into_iter()
            .filter(|tx| tx.to == from)
            .collect();
        for tx in &sent {
            if tx.kind == TransmitKind::Datagram {
                assert!(
                    tx.payload.len() <= d.len(),
                    "{} bytes answered with {}: {msg:?}",
                    d.len(),
                    tx.payload.len()
                );
            }
        }
        sent
    };
    let ping = |seq, updates| Message::Ping {
        seq,
        target: Some(me),
        me: entry,
        digest: u64::MAX,
        updates,
    };
    // A small ping: acked, without the news (it does not fit).
    let sent = ask(&mut net, &mut s, ping(1, Vec::new()));
    assert_eq!(sent.len(), 1);
    match s.open(&sent[0].payload) {
        Message::Ack { updates, .. } => assert!(updates.is_empty()),
        other => panic!("{other:?}"),
    }
    // A large ping: the news fits in its ack.
    let big = vec![crux_proto::flock::Update::Alive { member: entry }; 30];
    let sent = ask(&mut net, &mut s, ping(2, big));
    assert_eq!(sent.len(), 1);
    match s.open(&sent[0].payload) {
        Message::Ack { updates, .. } => assert!(!updates.is_empty()),
        other => panic!("{other:?}"),
    }
    // An indirect ping is smaller than any ack: not answered at all.
    let sent = ask(
        &mut net,
        &mut s,
        Message::IndirectPing {
            seq: 3,
            target: me,
            updates: Vec::new(),
        },
    );
    assert!(sent.is_empty(), "{sent:?}");
    // A push-pull answer larger than the request goes over a stream.
    let sent = ask(
        &mut net,
        &mut s,
        Message::PushPull(PushPull {
            reply: false,
            join: false,
            members: Vec::new(),
            leader: None,
            ring: None,
            revoked: Vec::new(),
        }),
    );
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, TransmitKind::Stream);
}

#[test]
fn a_member_at_its_own_address_gets_full_answers() {
    let (mut net, t) = Net::converged();
    let now = net.now + Duration::from_millis(1);
    // A member's ping to the target, as the network carries it, with news at the target.
    net.nodes[t].handle_command(
        now,
        crux_flock::Command::Keyring(crux_flock::crypto::KeyringOp::Install(
            SecretKey::from_bytes([3; 32]),
        )),
    );
    let _ = transmits(&mut net.nodes[t]);
    let m = (t + 1) % 3;
    let member = net.nodes[m].identity().addr;
    let target = net.nodes[t].identity().addr;
    // Drive the member alone; hand what it sends the target over until the target answers
    // (the member's probe: an ack, with the news).
    for _ in 0..200 {
        let at = net.nodes[m].poll_timeout().expect("timers");
        net.now = net.now.max(at);
        let now = net.now;
        net.nodes[m].handle_timeout(now);
        for tx in transmits(&mut net.nodes[m]) {
            if tx.to != target || tx.kind != TransmitKind::Datagram {
                continue;
            }
            net.nodes[t].handle_datagram(now, member, &tx.payload);
            let sent = transmits(&mut net.nodes[t]);
            if let Some(ack) = sent
                .iter()
                .find(|a| a.to == member && a.kind == TransmitKind::Datagram)
            {
                println!(
                    "member's {} bytes answered with {}",
                    tx.payload.len(),
                    ack.payload.len()
                );
                assert!(
                    ack.payload.len() > tx.payload.len(),
                    "the ack carries the news"
                );
                return;
            }
        }
    }
    panic!("the member never probed the target");
}
